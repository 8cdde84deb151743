"""The service guest: Debian 12 with systemd, libvirtd and virthotplug's dependencies baked in.

For the test of the Debian package's systemd unit under a real systemd
(tests/e2e/test_service_systemd.py). The guest has no network, so everything the package
and the test need is in the image: the Debian 12 guest of debian_image.py (same
debootstrap, same configuration, same kernel and initramfs) plus

- ``libvirt-daemon-system`` (libvirtd under systemd with its sockets; ``libvirt-daemon``
  depends on the QEMU driver) and ``qemu-system-x86``: starting a domain runs the libvirt
  hook, and only the QEMU driver runs hooks (the test driver runs none);
- the package's dependencies: python3-libvirt, python3-lxml, python3-tenacity and the
  recommended python3-prometheus-client;
- the lab control channel (``org.virthotplug.lab.0``) served by ``service_guest/control.py``
  under its own systemd unit: shell commands in, status and output out, no guest agent
  involved (``qemuAgentCommand`` would taint the domain).

The extra packages are installed with apt in the sandbox (sandbox.py: never the host's
/dev) with services forbidden to start; the apt sources and lists are emptied afterwards.
One raw ext4 image is made with ``mke2fs -d``. Cached in ``<lab cache>/service-bookworm-<hash>``,
the hash covering the Debian 12 inputs, the extra packages, the files written in and the
builder version; domains boot a qcow2 overlay of their own.

    python3 tests/lab/service_image.py      build (or find) and print
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import debian_image
from guest import cache_root
from sandbox import SandboxError, apt_install, debootstrap, forbid_service_starts, write_apt_sources

log = logging.getLogger("lab.service")

KIND = "debian12-service"
DISTRO = "debian12"
BUILDER_VERSION = 1
EXTRA_PACKAGES = (
    "libvirt-daemon-system",
    "qemu-system-x86",
    "python3-libvirt",
    "python3-lxml",
    "python3-tenacity",
    "python3-prometheus-client",
)
CONTROL_PROGRAM = Path(__file__).resolve().parent / "service_guest" / "control.py"
CONTROL_UNIT_NAME = "vhp-lab-control.service"
CONTROL_UNIT = """\
[Unit]
Description=virthotplug lab control channel (org.virthotplug.lab.0)

[Service]
ExecStart=/usr/bin/python3 -I /usr/local/sbin/vhp-lab-control
Restart=always
RestartSec=1s

[Install]
WantedBy=multi-user.target
"""
IMAGE_FILE = "service.img"
# Room for the overlay's writes too: the package, libvirt's state and the journal.
IMAGE_SIZE_MIB = 1536
MEMORY_MIB = 1024
LIVE_VCPUS = 2


def files() -> dict[str, str]:
    """What is written into the tree besides debian_image.FILES (path -> text)."""
    return {
        "usr/local/sbin/vhp-lab-control": CONTROL_PROGRAM.read_text(),
        f"etc/systemd/system/{CONTROL_UNIT_NAME}": CONTROL_UNIT,
    }


@dataclass(frozen=True)
class BuildInputs:
    base: str  # debian_image's key for Debian 12
    packages: list[str]
    files: dict[str, str]
    size_mib: int
    builder: int = BUILDER_VERSION

    def key(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:16]


def build_inputs() -> BuildInputs:
    base = debian_image.build_inputs(DISTRO).key()
    return BuildInputs(base, list(EXTRA_PACKAGES), files(), IMAGE_SIZE_MIB)


def _install_extras(rootfs: Path, inputs: BuildInputs) -> None:
    """The extra packages from the archive, no service started; the guest's own systemd
    starts what their packages enabled when it boots."""
    forbid_service_starts(rootfs)
    write_apt_sources(rootfs, debian_image.SUITES[DISTRO])
    apt_install(rootfs, inputs.packages)
    (rootfs / "usr/sbin/policy-rc.d").unlink()


def _write_files(rootfs: Path, inputs: BuildInputs) -> None:
    for rel, text in inputs.files.items():
        path = rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (rootfs / "usr/local/sbin/vhp-lab-control").chmod(0o755)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / CONTROL_UNIT_NAME).symlink_to(f"/etc/systemd/system/{CONTROL_UNIT_NAME}")


def build(cache: Path, inputs: BuildInputs) -> Path:
    """Build into a temporary directory beside the final one, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".service-bookworm-build-", dir=cache))
    try:
        rootfs = tmp / "rootfs"
        rootfs.mkdir()
        debootstrap(rootfs, debian_image.SUITES[DISTRO], include=debian_image.PACKAGES)
        _install_extras(rootfs, inputs)
        _write_files(rootfs, inputs)
        # debian_image's configuration (FILES, initramfs), which also empties apt's lists.
        version = debian_image._configure(rootfs)
        shutil.copyfile(rootfs / f"boot/vmlinuz-{version}", tmp / debian_image.KERNEL_FILE)
        shutil.copyfile(rootfs / f"boot/initrd.img-{version}", tmp / debian_image.INITRD_FILE)
        debian_image._mke2fs(rootfs, tmp / IMAGE_FILE, inputs.size_mib)
        shutil.rmtree(rootfs)
        manifest = {**inputs.__dict__, "kernel_version": version}
        manifest["files"] = sorted(inputs.files)
        return debian_image.publish(tmp, manifest, cache / f"service-bookworm-{inputs.key()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(directory: Path) -> bool:
    names = (debian_image.KERNEL_FILE, debian_image.INITRD_FILE, debian_image.MANIFEST_FILE)
    return all((directory / name).is_file() for name in (*names, IMAGE_FILE))


def prune(cache: Path, keep: Path) -> None:
    builds = [d for d in cache.glob("service-bookworm-*") if d.is_dir() and d != keep]
    builds.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in builds[debian_image.KEEP_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_built(cache: Path | None = None) -> Path:
    """The build directory of the service guest, built if the cache has none."""
    cache = cache or cache_root()
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    inputs = build_inputs()
    directory = cache / f"service-bookworm-{inputs.key()}"
    if is_complete(directory):
        log.info("service image %s is cached in %s", inputs.key(), directory)
        return directory
    started = time.monotonic()
    log.info("building service image %s (debootstrap bookworm + libvirt)", inputs.key())
    try:
        build(cache, inputs)
    except SandboxError as exc:
        raise debian_image.ImageError(f"cannot build the service guest: {exc}") from exc
    log.info("built service image %s in %.1f s", inputs.key(), time.monotonic() - started)
    prune(cache, directory)
    return directory


def ensure_image(cache: Path | None = None) -> debian_image.DebianImage:
    """The service guest as a Debian guest kind (its <kernel>, <initrd> and disk)."""
    directory = ensure_built(cache)
    manifest = json.loads((directory / debian_image.MANIFEST_FILE).read_text())
    return debian_image.DebianImage(
        kind=KIND,
        suite=debian_image.SUITES[DISTRO],
        kernel=directory / debian_image.KERNEL_FILE,
        initrd=directory / debian_image.INITRD_FILE,
        disk=directory / IMAGE_FILE,
        key=directory.name,
        kernel_version=manifest["kernel_version"],
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    try:
        directory = ensure_built()
    except debian_image.ImageError as exc:
        log.error("%s", exc)
        return 1
    print(f"{KIND}: {directory} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
