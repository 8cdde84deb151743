"""End-to-end tier: real libvirtd, QEMU and qemu-ga on the tiny guests of tests/lab.

Every test in tests/e2e is marked ``e2e``. The shared VMs boot in parallel once per session;
a lab that cannot start fails every test that needs it, with the reason: e2e tests never skip.

Fixtures (the VMs are ``lab.LabVM``; see tests/lab/lab.py for their methods):
    lab                   the session's ``Lab``: connection, guest image, ``lab.ost`` events
    vm_manual             4 vCPUs max, 1 live; hot-added CPUs stay offline (Debian/Ubuntu)
    vm_auto               hot-added CPUs come online by themselves (the distro udev rule)
    vm_manual_8           like vm_manual with 8 vCPUs max
    vm_noagent_channel    no agent channel in the domain ("agent not configured")
    vm_agent_not_running  agent channel, no agent in the guest ("agent not connected")
    vm_agent_control      agent for tests to stop, hang, continue and restart
    vm_scratch            like vm_manual, for tests that break the domain (a failed unplug)
    make_vm               factory for VMs of the test's own; removed when the test ends
A shared VM is handed out as freshly booted: if an earlier test changed it (hot-added a CPU,
stopped the agent, failed an unplug, ...), it is power-cycled first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LAB_DIR = Path(__file__).resolve().parents[1] / "lab"
sys.path.insert(0, str(LAB_DIR))

from domains import (  # noqa: E402
    AGENT_NOT_RUNNING,
    AUTO,
    MANUAL,
    NO_AGENT_CHANNEL,
)
from lab import (  # noqa: E402
    Lab,
    LabError,
    LabVM,
    VMFactory,
    VMRequest,
    accelerator_description,
)

E2E_DIR = Path(__file__).resolve().parent
SHARED = {
    "manual": VMRequest(MANUAL, label="manual"),
    "auto": VMRequest(AUTO, label="auto"),
    "manual_8": VMRequest(MANUAL, max_vcpus=8, label="manual8"),
    "noagent_channel": VMRequest(NO_AGENT_CHANNEL, label="nochannel"),
    "agent_not_running": VMRequest(AGENT_NOT_RUNNING, label="noagent"),
    "agent_control": VMRequest(MANUAL, label="agentctl"),
    "scratch": VMRequest(MANUAL, label="scratch"),
}
_timings: dict[str, float] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only those under tests/e2e.
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def pytest_report_header() -> str:
    return f"lab accelerator: {accelerator_description()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The header above appears only when pytest is pointed at tests/e2e itself.
    if _timings:
        terminalreporter.section("lab")
        terminalreporter.write_line(f"accelerator: {accelerator_description()}")
        for what, seconds in _timings.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    started = time.monotonic()
    the_lab = Lab()
    try:
        the_lab.open()
    except (LabError, OSError) as exc:
        pytest.fail(f"the lab cannot start: {exc}", pytrace=False)
    _timings["lab start (sweep, guest image)"] = time.monotonic() - started
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture(scope="session")
def shared_vms(lab: Lab) -> dict[str, LabVM]:
    started = time.monotonic()
    try:
        vms = lab.start_many(list(SHARED.values()))
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    _timings[f"boot of {len(vms)} shared VMs in parallel"] = time.monotonic() - started
    return dict(zip(SHARED, vms))


def _fresh(vm: LabVM) -> LabVM:
    if not vm.is_pristine():
        vm.restart()
    return vm


@pytest.fixture
def vm_manual(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["manual"])


@pytest.fixture
def vm_auto(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["auto"])


@pytest.fixture
def vm_manual_8(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["manual_8"])


@pytest.fixture
def vm_noagent_channel(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["noagent_channel"])


@pytest.fixture
def vm_agent_not_running(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["agent_not_running"])


@pytest.fixture
def vm_agent_control(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["agent_control"])


@pytest.fixture
def vm_scratch(shared_vms: dict[str, LabVM]) -> LabVM:
    return _fresh(shared_vms["scratch"])


@pytest.fixture
def make_vm(lab: Lab) -> Iterator[VMFactory]:
    factory = VMFactory(lab)
    try:
        yield factory
    finally:
        factory.remove_all()
