"""The service guest for test_service_systemd.py, imported by conftest.py.

``service_guest``: the Debian package built from this tree (tests/package/build.sh, while the
guest boots) and a booted service guest (tests/lab/service_image.py: Debian 12, systemd,
libvirtd and the package's dependencies, no network) on the host's libvirtd, driven
through ``GuestShell``. The domain is destroyed and undefined at the end, whatever happens.

The build needs the package's build dependencies on the host (``make host`` installs them):
build.sh would otherwise install them, and the e2e tier must not change the host's packages.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import service_image
from guest_shell import GuestShell
from lab import Lab, LabError, VMRequest
from matrix import DEBIAN_READY_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tests" / "package" / "build.sh"
BUILD_TIMEOUT = 600.0
# What the summary's "service" section prints: seconds per step.
SERVICE_TIMINGS: dict[str, float] = {}


@dataclass(frozen=True)
class ServiceGuest:
    shell: GuestShell
    deb: Path


def missing_build_dependencies() -> str:
    """dpkg-checkbuilddeps' complaint ('' when the host can build the package)."""
    done = subprocess.run(["dpkg-checkbuilddeps"], cwd=ROOT, capture_output=True, text=True)
    return "" if done.returncode == 0 else (done.stderr.strip() or done.stdout.strip())


def _finish_build(build: subprocess.Popen[str], out: Path) -> Path:
    started = time.monotonic()
    try:
        stdout, stderr = build.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        build.kill()
        raise LabError(f"tests/package/build.sh took more than {BUILD_TIMEOUT:.0f} s") from None
    SERVICE_TIMINGS["waiting for the .deb after the boot"] = time.monotonic() - started
    if build.returncode != 0:
        raise LabError(f"tests/package/build.sh failed ({build.returncode}):\n{stderr[-3000:]}")
    debs = sorted(out.glob("virthotplug_*_all.deb"))
    if len(debs) != 1 or stdout.strip() != str(debs[0]):
        raise LabError(f"tests/package/build.sh built {debs}, said {stdout.strip()!r}")
    return debs[0]


@pytest.fixture(scope="module")
def service_guest(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceGuest]:
    missing = missing_build_dependencies()
    if missing:
        pytest.fail(f"cannot build the Debian package ({missing}): run make host", pytrace=False)
    out = tmp_path_factory.mktemp("package")
    build = subprocess.Popen(
        ["bash", str(BUILD), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    vm = None
    try:
        started = time.monotonic()
        vm = lab.define(VMRequest(label="service", guest=service_image.KIND))
        SERVICE_TIMINGS["service image (build or cache lookup) and define"] = (
            time.monotonic() - started
        )
        SERVICE_TIMINGS["boot to the control channel"] = vm.start(DEBIAN_READY_TIMEOUT)
        yield ServiceGuest(GuestShell(vm), _finish_build(build, out))
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
        if vm is not None:
            lab.remove(vm)


def service_summary() -> list[str]:
    return [f"{what}: {seconds:.1f} s" for what, seconds in SERVICE_TIMINGS.items()]
