"""Build (or find in the cache) everything the e2e matrix boots, in parallel: the roots of
stacks 2 and 3, the Debian 12, 13 and 14 guest images, the busybox guest and the service
guest (Debian 12 with libvirtd, for the package's systemd unit). ``make lab-images`` runs it,
so that CI shows the build as a stage of its own; the tests find everything cached.

Prints one line per item with the seconds it took, and exits non-zero naming what failed.
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import debian_image
import guest
import service_image
import stacks
from sandbox import host_device_facts

BUILDS: dict[str, Callable[[], object]] = {
    "stack 2 (trixie root: libvirt + QEMU)": stacks.ensure_stack2,
    "stack 3 (forky root: libvirt + QEMU + python3)": stacks.ensure_stack3,
    "debian12 guest (stock + rule images)": lambda: debian_image.ensure_distro("debian12"),
    "debian13 guest (stock + rule images)": lambda: debian_image.ensure_distro("debian13"),
    "debian14 guest (stock + rule images)": lambda: debian_image.ensure_distro("debian14"),
    "busybox guest": guest.ensure_image,
    "service guest (debian12 + libvirtd)": service_image.ensure_built,
}


def _timed(build: Callable[[], object]) -> float:
    started = time.monotonic()
    build()
    return time.monotonic() - started


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    devices = host_device_facts()
    started = time.monotonic()
    # Mostly downloads and package scripts: they overlap well even on two cores.
    with ThreadPoolExecutor(len(BUILDS), thread_name_prefix="lab-image") as pool:
        futures = {name: pool.submit(_timed, build) for name, build in BUILDS.items()}
    failed = 0
    for name, future in futures.items():
        error = future.exception()
        if error is not None:
            failed += 1
            print(f"FAILED {name}: {error}")
        else:
            print(f"{name}: {future.result():.1f} s")
    print(f"lab images: {time.monotonic() - started:.1f} s in all")
    if host_device_facts() != devices:
        print(f"the host's devices changed: {devices} -> {host_device_facts()}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
