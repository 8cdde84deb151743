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
    make_vm               VMs of the test's own, removed when it ends: make_vm(behaviour=...,
                          max_vcpus=..., memory_mib=...), make_vm.many([VMRequest(...), ...])
A shared VM is handed out as freshly booted: if an earlier test changed it (hot-added a CPU,
stopped the agent, failed an unplug, ...), it is power-cycled first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable

import libvirt
import pytest

from virthotplug.host.domxml import NAMESPACE

# tests/lab is not a package: its modules import each other by plain name, as they do when
# run as scripts (guest.py, demo.py).
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
    LabVM,
    VMFactory,
    VMRequest,
    accelerator_description,
)
from matrix_fixtures import (  # noqa: E402, F401 (fixtures: pytest finds them by name here)
    host_untouched,
    matrix,
    matrix_lab,
    matrix_summary,
    matrix_vm,
    matrix_vm_as_is,
    matrix_vms,
    stack1_lab,
    stack2_lab,
    stack3_lab,
)
from service_fixtures import (  # noqa: E402, F401 (a fixture: pytest finds it by name here)
    service_guest,
    service_summary,
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


# Run first in the tier, before the shared VMs boot: these measure libvirtd's answers and
# memory while a guest floods monitor events at full speed, which takes a core on its own;
# on a small machine the idle shared VMs' timers would compete with what is measured.
RUN_FIRST = ("test_flood.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only those under tests/e2e.
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)
    e2e = [i for i, item in enumerate(items) if E2E_DIR in item.path.parents]
    if e2e:
        tier = [items[i] for i in e2e]
        tier.sort(key=lambda item: item.path.name not in RUN_FIRST)  # stable: order kept
        for index, item in zip(e2e, tier):
            items[index] = item


def pytest_report_header() -> str:
    return f"lab accelerator: {accelerator_description()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The header above appears only when pytest is pointed at tests/e2e itself.
    if _timings:
        terminalreporter.section("lab")
        terminalreporter.write_line(f"accelerator: {accelerator_description()}")
        for what, seconds in _timings.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
    # Which host stacks ran, with the versions their daemons reported.
    if matrix_summary():
        terminalreporter.section("matrix")
        for line in matrix_summary():
            terminalreporter.write_line(line)
    # The service guest's steps (test_service_systemd.py).
    if service_summary():
        terminalreporter.section("service")
        for line in service_summary():
            terminalreporter.write_line(line)


def fail_on_error(what: str, action: Callable[[], object]) -> None:
    """Run ``action``; whatever stops it fails the test with the reason (never a skip)."""
    try:
        action()
        return
    except Exception as exc:
        message = f"{what}: {type(exc).__name__}: {exc}"
    # Outside the except block: the report shows the reason, not a chain of tracebacks.
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    started = time.monotonic()
    the_lab = Lab()
    fail_on_error("the lab cannot start", the_lab.open)
    _timings["lab start (sweep, guest image)"] = time.monotonic() - started
    try:
        yield the_lab
    finally:
        the_lab.close()


class SharedVMs:
    """The session's shared VMs, booted in parallel up front or, if unforeseen, on demand."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab
        self._vms: dict[str, LabVM] = {}

    def boot(self, keys: Iterable[str]) -> None:
        wanted = set(keys)
        missing = [k for k in SHARED if k in wanted and k not in self._vms]
        if not missing:
            return
        started = time.monotonic()
        vms = self._lab.start_many([SHARED[k] for k in missing])
        self._vms.update(zip(missing, vms))
        _timings[f"boot of shared VMs ({', '.join(missing)})"] = time.monotonic() - started

    def fresh(self, key: str) -> LabVM:
        """The VM as freshly booted: power-cycled if an earlier test changed it, and without
        a virthotplug policy in its metadata (a restart keeps metadata, and a policy there
        would override the configuration file of the next test).
        """
        self.boot([key])
        vm = self._vms[key]
        if not vm.is_pristine():
            vm.restart()
        _clear_policy(vm)
        return vm


def _clear_policy(vm: LabVM) -> None:
    for flags in (libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
        vm.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE, flags)


@pytest.fixture(scope="session")
def shared_vms(lab: Lab, request: pytest.FixtureRequest) -> SharedVMs:
    # Boot every shared VM that the selected tests use, all at once.
    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    needed = [key for key in SHARED if f"vm_{key}" in used]
    shared = SharedVMs(lab)
    fail_on_error("the shared lab VMs cannot boot", lambda: shared.boot(needed))
    return shared


@pytest.fixture
def vm_manual(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("manual")


@pytest.fixture
def vm_auto(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("auto")


@pytest.fixture
def vm_manual_8(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("manual_8")


@pytest.fixture
def vm_noagent_channel(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("noagent_channel")


@pytest.fixture
def vm_agent_not_running(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("agent_not_running")


@pytest.fixture
def vm_agent_control(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("agent_control")


@pytest.fixture
def vm_scratch(shared_vms: SharedVMs) -> LabVM:
    return shared_vms.fresh("scratch")


@pytest.fixture
def make_vm(lab: Lab) -> Iterator[VMFactory]:
    factory = VMFactory(lab)
    try:
        yield factory
    finally:
        factory.remove_all()
