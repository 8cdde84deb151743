"""The e2e matrix: host stacks (stack1, stack2, stack3) x guests (busybox, debian12,
debian12-rule, debian13, debian14), imported by conftest.py.

A matrix test is parametrized with ``case`` (a ``Case`` or a tuple of them) and asks for
``matrix_vm`` / ``matrix_lab`` (one case) or ``matrix_vms`` (a tuple). Every VM the
selected tests need boots once per session, all at once on every stack; each is handed out
as freshly booted (power-cycled first if an earlier test changed it). Stacks 2 and 3 are
built (or found in the cache) and started once per session, and each is stopped at the end
by the last run that uses it. A stack or image that cannot be built fails the tests with the
reason.

The e2e tier also checks that the host itself is untouched at its end: /dev/ptmx is still a
character device, /dev/kvm has its owner, group and mode, and the host's package set is
exactly what it was at the start (``dpkg-query -W``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from domains import MANUAL
from lab import Lab, LabVM, VMRequest
from matrix import GUEST_KINDS
from sandbox import host_device_facts
from stacks import STACK2, STACK3, Stack, StackDefinition, Users, ensure_stack

STACKS = ("stack1", "stack2", "stack3")
# The guest kernel's own words for a rejected hot-add (lab notes, Debian 13 and 14 under TCG).
REJECTED = r"ACPI: Unable to map lapic to logical cpu number"
# Stack name -> "libvirt X, QEMU Y" as its daemon reported it; printed in the lab summary.
STACKS_RAN: dict[str, str] = {}
MATRIX_TIMINGS: dict[str, float] = {}
CLI_TIMEOUT = 180.0
# The Debian 14 guest boots once per session (53-90 s under TCG) and its tests go on from the
# state the last one left; under TCG QEMU aborts once it has made more vCPU threads in the
# domain's life than the domain's maximum, so that guest gets room for all of their plugs.
MAX_VCPUS = {"debian14": 8}


@dataclass(frozen=True)
class Case:
    stack: str
    guest: str

    def __post_init__(self) -> None:
        assert self.stack in STACKS and self.guest in GUEST_KINDS, self

    def __str__(self) -> str:
        return f"{self.stack}-{self.guest}"

    def request(self) -> VMRequest:
        label = f"m{self.guest.replace('-', '')}"
        return VMRequest(
            MANUAL, max_vcpus=MAX_VCPUS.get(self.guest, 4), label=label, guest=self.guest
        )


def cases(*names: str) -> list[Case]:
    """``cases("stack1-debian12", ...)``: the parameters of a matrix test."""
    found = []
    for name in names:
        stack, guest = name.split("-", 1)
        found.append(Case(stack, guest))
    return found


def fail_on_error(what: str, action: Callable[[], Any]) -> Any:
    """Run ``action``; whatever stops it fails the test with the reason (never a skip)."""
    try:
        return action()
    except Exception as exc:
        message = f"{what}: {type(exc).__name__}: {exc}"
    pytest.fail(message, pytrace=False)


# ---- the virthotplug command line ---------------------------------------------------------


@dataclass(frozen=True)
class Run:
    status: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def vhp(uri: str, *argv: str, config: Path | None = None) -> Run:
    """``virthotplug -c URI [--config-file CONF] ARGV...`` as a real process."""
    cmd = [sys.executable, "-m", "virthotplug", "-c", uri]
    if config is not None:
        cmd += ["--config-file", str(config)]
    done = subprocess.run(
        [*cmd, *argv], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    return Run(done.returncode, done.stdout, done.stderr)


# ---- stacks 2 and 3 -----------------------------------------------------------------------


class StackSession:
    """A stack for one session: built or found, started unless running, stopped at the end
    when no other run uses it."""

    def __init__(self, definition: StackDefinition) -> None:
        self.definition = definition
        self.stack: Stack | None = None
        self._users: Users | None = None

    def open(self) -> Stack:
        title = self.definition.title
        started = time.monotonic()
        self.stack = ensure_stack(self.definition)
        MATRIX_TIMINGS[f"{title} build or cache lookup"] = time.monotonic() - started
        self._users = Users(self.definition)
        started = time.monotonic()
        if self.stack.start():
            MATRIX_TIMINGS[f"{title} start"] = time.monotonic() - started
        return self.stack

    def close(self) -> None:
        if self._users is not None and self._users.leave() and self.stack is not None:
            self.stack.stop()


def open_lab(uri: str) -> Lab:
    started = time.monotonic()
    lab = Lab(uri)
    lab.open()
    libvirt_version, hypervisor = lab.versions()
    STACKS_RAN[lab.placement.name] = f"libvirt {libvirt_version}, {hypervisor} ({uri})"
    MATRIX_TIMINGS[f"{lab.placement.name} lab start"] = time.monotonic() - started
    return lab


def stack_lab(definition: StackDefinition) -> Iterator[Lab]:
    session = StackSession(definition)
    title = definition.title
    stack = fail_on_error(f"{title} cannot be built or started", session.open)
    try:
        the_lab = fail_on_error(f"the lab cannot start on {title}", lambda: open_lab(stack.uri))
        try:
            yield the_lab
        finally:
            the_lab.close()
    finally:
        session.close()


@pytest.fixture(scope="session")
def stack2_lab() -> Iterator[Lab]:
    yield from stack_lab(STACK2)


@pytest.fixture(scope="session")
def stack3_lab() -> Iterator[Lab]:
    yield from stack_lab(STACK3)


@pytest.fixture(scope="session")
def stack1_lab(lab: Lab) -> Lab:
    """The session's stack 1 lab (the ``lab`` fixture), with its versions recorded."""
    libvirt_version, hypervisor = lab.versions()
    STACKS_RAN["stack1"] = f"libvirt {libvirt_version}, {hypervisor} ({lab.uri})"
    return lab


# ---- shared matrix VMs --------------------------------------------------------------------


def _cases_of(value: object) -> list[Case]:
    if isinstance(value, Case):
        return [value]
    if isinstance(value, tuple):
        return [c for c in value if isinstance(c, Case)]
    return []


class MatrixVMs:
    """The session's matrix VMs, one per case, booted in parallel on every stack."""

    def __init__(self, labs: Callable[[str], Lab]) -> None:
        self._labs = labs
        self._vms: dict[Case, LabVM] = {}

    def boot(self, wanted: Iterable[Case]) -> None:
        missing = sorted({c for c in wanted if c not in self._vms}, key=str)
        if not missing:
            return
        started = time.monotonic()
        by_stack = {s: [c for c in missing if c.stack == s] for s in STACKS}
        defined = {c: self._labs(c.stack).define(c.request()) for c in missing}
        stacks = [s for s in STACKS if by_stack[s]]
        # Every stack at once: each lab boots its own VMs in parallel too.
        with ThreadPoolExecutor(len(stacks), thread_name_prefix="matrix-boot") as pool:
            futures = [
                pool.submit(self._labs(s).boot, [defined[c] for c in by_stack[s]]) for s in stacks
            ]
        self._vms.update(defined)
        errors = [str(f.exception()) for f in futures if f.exception() is not None]
        if errors:
            raise RuntimeError("\n".join(errors))
        names = ", ".join(f"{c} {defined[c].boot_seconds:.0f} s" for c in missing)
        MATRIX_TIMINGS[f"boot of matrix VMs ({names})"] = time.monotonic() - started

    def fresh(self, case: Case) -> LabVM:
        self.boot([case])
        vm = self._vms[case]
        if not vm.is_pristine():
            vm.restart()
        return vm

    def as_is(self, case: Case) -> LabVM:
        """The case's VM as the last test left it (booted once if not yet): for a guest that
        takes a minute to boot, tests of one module that can start from either state."""
        self.boot([case])
        return self._vms[case]

    def boot_times(self) -> dict[Case, float]:
        return {c: vm.boot_seconds for c, vm in self._vms.items()}


@pytest.fixture(scope="session")
def matrix(request: pytest.FixtureRequest) -> MatrixVMs:
    needed = {
        case
        for item in request.session.items
        for value in getattr(getattr(item, "callspec", None), "params", {}).values()
        for case in _cases_of(value)
    }
    labs: dict[str, Lab] = {}

    def lab_of(stack: str) -> Lab:
        if stack not in labs:
            labs[stack] = request.getfixturevalue(f"{stack}_lab")
        return labs[stack]

    for stack in sorted({c.stack for c in needed}):
        lab_of(stack)  # opened here, on the main thread, before any boot
    vms = MatrixVMs(lab_of)
    fail_on_error("the matrix VMs cannot boot", lambda: vms.boot(needed))
    return vms


@pytest.fixture
def matrix_lab(case: Case, request: pytest.FixtureRequest) -> Lab:
    lab: Lab = request.getfixturevalue(f"{case.stack}_lab")
    return lab


@pytest.fixture
def matrix_vm(case: Case, matrix: MatrixVMs) -> LabVM:
    vm: LabVM = fail_on_error(f"{case} cannot be made fresh", lambda: matrix.fresh(case))
    return vm


@pytest.fixture
def matrix_vm_as_is(case: Case, matrix: MatrixVMs) -> LabVM:
    vm: LabVM = fail_on_error(f"{case} cannot boot", lambda: matrix.as_is(case))
    return vm


@pytest.fixture
def matrix_vms(case: tuple[Case, ...], matrix: MatrixVMs) -> tuple[LabVM, ...]:
    return tuple(
        fail_on_error(f"{c} cannot be made fresh", lambda c=c: matrix.fresh(c)) for c in case
    )


# ---- the host stays as it was -------------------------------------------------------------


def host_packages() -> str:
    done = subprocess.run(["dpkg-query", "-W"], capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture(scope="session", autouse=True)
def host_untouched() -> Iterator[None]:
    """At the end of the e2e tier: /dev/ptmx, /dev/kvm and the package set as at its start."""
    devices, packages = host_device_facts(), host_packages()
    yield
    problems = [
        f"{path}: was {was}, now {now}"
        for path, was, now in (
            (p, devices.get(p), host_device_facts().get(p)) for p in {*devices, "/dev/ptmx"}
        )
        if was != now
    ]
    if host_packages() != packages:
        before, after = set(packages.splitlines()), set(host_packages().splitlines())
        problems.append(
            f"host packages changed: gone {sorted(before - after)}, new {sorted(after - before)}"
        )
    assert not problems, "the e2e tier changed the host:\n" + "\n".join(problems)


def matrix_summary() -> list[str]:
    lines = [f"{stack}: {versions}" for stack, versions in sorted(STACKS_RAN.items())]
    lines += [f"{what}: {seconds:.1f} s" for what, seconds in MATRIX_TIMINGS.items()]
    return lines
