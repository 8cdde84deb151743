"""``virthotplug setvcpus`` against ``virsh setvcpus`` in the domain's other states, on every
stack: the rest of tp-libvirt's matrix after test_setvcpus_conformance.py (its compare() and
its recorded causes are reused: the same option from the same state, the same acceptance, the
same five counts and guest online set afterwards, the same cause when refused).

States: paused, shut off, after save/restore, after managedsave + start, after a guest reboot
(a reset: the same QEMU, the vCPU hot-added before it stays), after a libvirtd restart, with
vCPUs pinned before the plug (``virsh vcpupin``: the pinning is compared after it), with the
guest agent stopped, and started from a definition without the agent's channel. Then 12
plug iterations, one vCPU at a time, on a domain of its own with 13 vCPUs at most: under TCG
QEMU aborts a plug that would create more vCPU threads in the domain's life than its
maximum, and the matrix domain's 4 leave room for 3.

The guest's online set is read through the lab's control channel (sysfs), so that a stopped
agent does not hide it; a paused guest runs no code and has none (its online set reads as
empty, and a plug is checked once it resumes).

Two results differ from virsh's on purpose (see virthotplug(1)): where the guest cannot be
verified (paused, agent stopped, no agent channel) virthotplug makes the change and exits 11,
not 0; and
``setvcpus DOM N`` without --live/--config/--current on a shut-off domain changes its
persistent definition (virsh's documented --current), where virsh calls libvirt's older
virDomainSetVcpus, which refuses a domain that is not running.
"""

from __future__ import annotations

import dataclasses
import time
import xml.etree.ElementTree as ET
from typing import Callable, Optional

import libvirt
import pytest
from domains import MANUAL
from lab import Lab, LabVM, VMRequest
from matrix_fixtures import Case, vhp
from test_setvcpus_conformance import (
    CONFORMANCE,
    State,
    Step,
    compare,
    hotpluggable_vcpus,
    steps,
    virsh,
)

EXIT_UNVERIFIED = 11  # virthotplug: the change was made, not every layer verified
ITERATIONS = 12
AGENT_CHANNEL = "org.qemu.guest_agent.0"


def observe(vm: LabVM) -> State:
    """The five counts, the guest's online set (sysfs; empty while it runs no code), the
    persistent hotpluggable vCPUs and the pinning of both definitions."""
    dom = vm.dom
    config, live = libvirt.VIR_DOMAIN_AFFECT_CONFIG, libvirt.VIR_DOMAIN_AFFECT_LIVE
    maximum = libvirt.VIR_DOMAIN_VCPU_MAXIMUM
    active = bool(dom.isActive())
    running = active and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    return State(
        int(dom.vcpusFlags(config | maximum)),
        int(dom.vcpusFlags(live | maximum)) if active else 0,
        int(dom.vcpusFlags(config)),
        int(dom.vcpusFlags(live)) if active else 0,
        vm.cpu_state().online if running else frozenset(),
        hotpluggable_vcpus(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)),
        pinning(dom, active),
    )


def pinning(dom: libvirt.virDomain, active: bool) -> tuple[tuple[str, int, str], ...]:
    """(definition, vCPU, host CPUs) for each vCPU libvirt gives pinning for."""
    layers = [("config", libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
    if active:
        layers.append(("live", libvirt.VIR_DOMAIN_AFFECT_LIVE))
    return tuple(
        (layer, vcpu, ",".join(str(cpu) for cpu, on in enumerate(cpus) if on))
        for layer, flag in layers
        for vcpu, cpus in enumerate(dom.vcpuPinInfo(flag))
    )


class StatePreparer:
    """Puts the domain in a named state; a domain still as prepared (same observation, the
    persistent definition defined again) is left as it is."""

    def __init__(self, lab: Lab, vm: LabVM, inactive_xml: str) -> None:
        self.lab = lab
        self.vm = vm
        self.inactive_xml = inactive_xml
        self.ready: Optional[str] = None
        self.prepared: Optional[State] = None
        self.seconds = 0.0  # spent preparing
        self.states: dict[str, Callable[[], None]] = {
            "paused": self._paused,
            "shutoff": self._shutoff,
            "restored": self._restored,
            "managedsaved": self._managedsaved,
            "rebooted": self._rebooted,
            "libvirtd-restarted": self._libvirtd_restarted,
            "pinned": self._pinned,
            "agent-stopped": self._agent_stopped,
            "agent-channel-missing": self._agent_channel_missing,
        }

    def __call__(self, name: str) -> None:
        self.lab.conn.defineXML(self.inactive_xml)
        if self.ready == name and observe(self.vm) == self.prepared:
            return
        started = time.monotonic()
        self.ready = None
        self.states[name]()
        self.prepared = observe(self.vm)
        self.ready = name
        self.seconds += time.monotonic() - started

    def _paused(self) -> None:
        self.vm.restart()
        self.vm.dom.suspend()

    def _shutoff(self) -> None:
        if self.vm.dom.isActive():
            self.vm.dom.destroy()

    def _restored(self) -> None:
        vm = self.vm
        vm.restart()
        # In the lab's log directory: the same path for the host and a stack's daemon.
        saved = vm.spec.serial_log.with_name(f"{vm.name}.save")
        try:
            vm.dom.save(str(saved))
            self.lab.conn.restore(str(saved))
        finally:
            saved.unlink(missing_ok=True)
        vm.wait_ready()

    def _managedsaved(self) -> None:
        self.vm.restart()
        self.vm.dom.managedSave()
        self.vm.start()

    def _rebooted(self) -> None:
        vm = self.vm
        vm.restart()
        vm.hot_add(2)
        vm.wait_cpu_state(lambda s: s.present == {0, 1}, timeout=30, what="2 CPUs")
        vm.dom.reset()  # a reboot: the same QEMU, vCPU 1 stays plugged
        vm.wait_ready()
        vm.wait_cpu_state(lambda s: s.online == {0, 1}, timeout=30, what="2 CPUs online")

    def _libvirtd_restarted(self) -> None:
        self.vm.restart()
        self.lab.restart_libvirtd()
        self.vm.wait_ready()

    def _pinned(self) -> None:
        vm = self.vm
        vm.restart()
        cpus = int(self.lab.conn.getInfo()[2])
        last_only = tuple(cpu == cpus - 1 for cpu in range(cpus))
        first_only = tuple(cpu == 0 for cpu in range(cpus))
        both = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        vm.dom.pinVcpuFlags(0, last_only, both)
        # vCPU 1 is not plugged yet: its pinning waits in the definitions for the plug.
        try:
            vm.dom.pinVcpuFlags(1, first_only, both)
        except libvirt.libvirtError as exc:
            print(f"  pinned: the live pinning of unplugged vCPU 1 refused: {exc}")
            vm.dom.pinVcpuFlags(1, first_only, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def _agent_stopped(self) -> None:
        vm = self.vm
        vm.restart()
        vm.control_ok("agent-stop")
        vm.wait_agent_channel("disconnected")

    def _agent_channel_missing(self) -> None:
        """Started from a definition without the agent's channel; the persistent one is
        defined back as it was at once (the running domain keeps the one it started from)."""
        vm = self.vm
        if vm.dom.isActive():
            vm.dom.destroy()
        self.lab.conn.defineXML(without_agent_channel(self.inactive_xml))
        try:
            vm.start(agent=False)
        finally:
            self.lab.conn.defineXML(self.inactive_xml)
        live = vm.dom.XMLDesc(0)
        assert AGENT_CHANNEL not in live, "the domain runs with the agent's channel"


def without_agent_channel(xml: str) -> str:
    """The domain XML without the guest agent's virtio channel."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None
    for channel in devices.findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            devices.remove(channel)
    return ET.tostring(root, encoding="unicode")


# Each state's refused steps first: they leave the domain as prepared, for the next step.
STEPS = (
    *steps(
        ("1 --guest", "paused"),
        ("2 --config", "paused"),
        ("2 --live", "paused"),
        ("2 --live", "shutoff"),
        ("1 --guest", "shutoff"),
        ("2 --config", "shutoff"),
        ("2 --current", "shutoff"),
        ("3 --maximum --config", "shutoff"),
        ("2 --live", "restored"),
        ("2 --live", "managedsaved"),
        ("3 --live", "rebooted"),
        ("2 --live", "libvirtd-restarted"),
        ("2 --live", "pinned"),
        ("1 --guest", "agent-stopped"),
        ("2 --live", "agent-stopped"),
        ("1 --guest", "agent-channel-missing"),
        ("2 --live", "agent-channel-missing"),
    ),
)
# What virsh says for each refused step, and how virthotplug names the same cause.
CAUSES = {
    "paused: 1 --guest": (
        "requested operation is not valid: domain is not running",
        "is paused: --guest needs a running domain",
    ),
    "shutoff: 2 --live": (
        "requested operation is not valid: domain is not running",
        "a live change needs a running domain",
    ),
    "shutoff: 1 --guest": (
        "requested operation is not valid: domain is not running",
        "is not running: --guest needs it running",
    ),
    "agent-stopped: 1 --guest": (
        "guest agent is not responding: qemu guest agent is not connected",
        "qemu guest agent is not connected",
    ),
    "agent-channel-missing: 1 --guest": (
        "qemu guest agent is not configured",
        "which is not configured: the running domain has no org.qemu.guest_agent.0 channel",
    ),
}
# States where virthotplug makes the change but cannot verify the guest (exit status 11).
UNVERIFIED = {"paused", "agent-stopped", "agent-channel-missing"}


def compare_in_state(step: Step, lab: Lab, vm: LabVM, prepare: StatePreparer) -> Optional[str]:
    key = f"{step.prepare}: {step}"
    causes = {str(step): CAUSES[key]} if key in CAUSES else {}
    accepted = frozenset({0, EXIT_UNVERIFIED} if step.prepare in UNVERIFIED else {0})
    found = compare(step, lab, vm, prepare, causes, observe, accepted)
    if found is None and key == "paused: 2 --live":
        # The guest sees the plug once it runs again.
        vm.dom.resume()
        vm.wait_cpu_state(lambda s: s.present == {0, 1}, timeout=30, what="vCPU 1 after resume")
    return found


def no_option_on_shut_off(lab: Lab, vm: LabVM, prepare: StatePreparer) -> Optional[str]:
    """The deliberate difference: virsh (virDomainSetVcpus) refuses, virthotplug changes the
    persistent definition as --current does."""
    prepare("shutoff")
    theirs = virsh(lab, vm, ("2",), False, observe)
    print(f"  shutoff: 2: virsh said: {theirs.text.strip()}")
    if theirs.accepted or "domain is not running" not in theirs.text:
        return f"shutoff: 2: virsh {theirs.text.strip()!r}, expected 'domain is not running'"
    prepare("shutoff")
    run = vhp(lab.uri, "setvcpus", vm.name, "2")
    after = observe(vm)
    if run.status != 0 or after.current_config != 2:
        return f"shutoff: 2: virthotplug exit {run.status}, {after}: {run.text[-400:]}"
    return None


@pytest.mark.parametrize("case", CONFORMANCE, ids=str)
def test_setvcpus_in_every_state_does_what_virsh_does(
    case: Case, matrix_lab: Lab, matrix_vm: LabVM
) -> None:
    vm, lab = matrix_vm, matrix_lab
    inactive = vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    prepare = StatePreparer(lab, vm, inactive)
    differences: list[str] = []
    started = time.monotonic()
    try:
        for step in STEPS:
            step_started = time.monotonic()
            found = compare_in_state(step, lab, vm, prepare)
            verdict = "same" if found is None else "DIFFERENT"
            seconds = time.monotonic() - step_started
            print(f"{case}: {step.prepare}: {step}: {verdict} ({seconds:.1f} s)")
            if found is not None:
                differences.append(found)
        found = no_option_on_shut_off(lab, vm, prepare)
        print(f"{case}: shutoff: 2: {'as documented' if found is None else 'DIFFERENT'}")
        if found is not None:
            differences.append(found)
    finally:
        lab.conn.defineXML(inactive)
        vm.restart()
        print(
            f"{case}: states took {time.monotonic() - started:.1f} s "
            f"({prepare.seconds:.1f} s preparing)"
        )
    assert differences == [], "\n".join(differences)
    assert vm.taints() == []


def expected_after_plug(count: int, maximum: int, hotpluggable: frozenset[int]) -> State:
    return State(maximum, maximum, 1, count, frozenset(range(count)), hotpluggable)


@pytest.mark.parametrize("case", CONFORMANCE, ids=str)
def test_twelve_plugs_one_vcpu_at_a_time(case: Case, matrix_lab: Lab) -> None:
    lab = matrix_lab
    maximum = ITERATIONS + 1  # room for every plug in one QEMU life, under TCG too
    vm = lab.define(VMRequest(MANUAL, max_vcpus=maximum, label="plug12", guest=case.guest))
    started = time.monotonic()
    try:
        lab.boot([vm])
        print(f"{case}: {maximum}-vCPU domain booted in {time.monotonic() - started:.1f} s")
        hotpluggable = observe(vm).config_hotpluggable
        for count in range(2, maximum + 1):
            plug_started = time.monotonic()
            run = vhp(lab.uri, "setvcpus", vm.name, str(count), "--live", "--online")
            seen = observe(vm)
            seconds = time.monotonic() - plug_started
            print(f"{case}: plug {count - 1}: {count} vCPUs, exit {run.status} ({seconds:.1f} s)")
            assert run.status == 0, run.text
            expected = expected_after_plug(count, maximum, hotpluggable)
            # The pinning is libvirt's default here (compared with virsh's in the states).
            assert seen == dataclasses.replace(expected, pins=seen.pins), run.text
    finally:
        lab.remove(vm)
        print(f"{case}: 12 plugs took {time.monotonic() - started:.1f} s")
