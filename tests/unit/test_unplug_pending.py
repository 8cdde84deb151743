"""A pending unplug is a state (``unplug-pending``, warning, with its age and remedy), not a
failure: judged from the domain's history and the layers, and reached by setvcpus' async
shrink from stack 3's recorded sequences (lab notes: libvirt 12.8 + QEMU 11.1 under TCG)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

from virthotplug.core import errors, resizeplan
from virthotplug.core.drift import GUEST_MISSING_VCPUS, UNPLUG_PENDING, find_drift
from virthotplug.core.events import DomainRef, Event, OstMonitorEvent, VcpuRemovedEvent
from virthotplug.core.judge import (
    FATE_REMOVED,
    PLUG,
    REMOVED,
    UNPLUG_REQUEST,
    Observations,
    Observed,
    judge,
)
from virthotplug.core.observed import EventReader
from virthotplug.core.ost import parse_ost_details
from virthotplug.core.view import (
    AGENT_CONNECTED,
    CRITICAL,
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_REQUESTED,
    HISTORY_UNPLUG_TIMEOUT,
    WARNING,
    AgentStatus,
    CountLayer,
    GuestLayer,
    History,
    HistoryEntry,
    HypervisorLayer,
    VcpuEntry,
    VcpuView,
)
from virthotplug.ops.seen import Seen
from virthotplug.ops.shrink import AsyncShrink

REF = DomainRef("qemu:///system", "u", "web1")
ASYNC_FLAG = 32


def history(*entries: tuple[str, int, float]) -> History:
    found = History()
    for kind, vcpu, at in entries:
        found = found.add(HistoryEntry(kind, vcpu, at, "test"))
    return found


def view(live: int, present: str, record: History) -> VcpuView:
    ids = frozenset(int(c) for c in present.split(","))
    vcpus = tuple(VcpuEntry(i, i < live, i > 0) for i in range(4))
    return VcpuView(
        host=REF.host,
        name="web1",
        uuid="u",
        state="running",
        persistent=True,
        agent=AgentStatus(True, AGENT_CONNECTED),
        config=CountLayer(1, 4),
        live=CountLayer(live, 4, vcpus),
        hypervisor=HypervisorLayer(dict.fromkeys(range(live), "running")),
        guest=GuestLayer(ids, ids, ids - {0}),
        history=record,
        domain_type="qemu",
    )


def findings(v: VcpuView, now: Optional[float] = None) -> dict[str, tuple[str, str]]:
    return {f.code: (f.severity, f.message) for f in find_drift(v, now=now)}


# ---- the finding --------------------------------------------------------------------------


def test_case_1_virsh_async_after_recorded_hot_adds_is_pending_not_missing() -> None:
    # setvcpus 3 recorded both plugs; `virsh setvcpus 2 --live --async` then: the guest
    # ejected cpu2, libvirt 12.8 keeps counting it (no vcpu-removed under TCG).
    v = view(3, "0,1", history((HISTORY_PLUGGED, 1, 100.0), (HISTORY_PLUGGED, 2, 101.0)))
    found = findings(v, now=200.0)
    assert GUEST_MISSING_VCPUS not in found
    severity, message = found[UNPLUG_PENDING]
    assert severity == WARNING
    assert "vcpu2 (age unknown)" in message and "not observed" in message
    assert "'virthotplug setvcpus web1 2' repeats the unplug request" in message
    assert [f.cpus for f in find_drift(v) if f.code == UNPLUG_PENDING] == [(2,)]


def test_an_eject_seen_while_libvirt_counts_is_pending_with_its_age() -> None:
    v = view(2, "0", history((HISTORY_PLUGGED, 1, 100.0), (HISTORY_EJECTED, 1, 150.0)))
    severity, message = findings(v, now=160.5)[UNPLUG_PENDING]
    assert severity == WARNING and "vcpu1 (for 10.5 s)" in message
    assert "the guest ejected it" in message
    assert GUEST_MISSING_VCPUS not in findings(v)
    assert "since 1970-01-01T00:02:30Z" in findings(v)[UNPLUG_PENDING][1]


def test_an_unplug_libvirt_gave_up_on_stays_a_stale_vcpu() -> None:
    # setvcpus on libvirt 9.0: the request timed out, the guest ejected, the repeat refused.
    record = history(
        (HISTORY_PLUGGED, 1, 100.0), (HISTORY_UNPLUG_TIMEOUT, 1, 150.0), (HISTORY_EJECTED, 1, 150.2)
    )
    found = findings(view(2, "0", record))
    assert found[GUEST_MISSING_VCPUS][0] == CRITICAL and UNPLUG_PENDING not in found


def test_where_this_host_refused_a_repeat_the_remedy_is_a_restart() -> None:
    record = history(
        (HISTORY_PLUGGED, 1, 100.0), (HISTORY_UNPLUG_TIMEOUT, 1, 150.0), (HISTORY_EJECTED, 1, 150.2)
    )
    refused = dataclasses.replace(record, repeat_refused=155.0)
    stale = findings(view(2, "0", refused))[GUEST_MISSING_VCPUS][1]
    assert "refused a repeated unplug request of this domain (at 1970-01-01T00:02:35Z)" in stale
    assert "only a restart of the domain" in stale and "repeats the unplug request" not in stale
    assert (
        "repeats the unplug request where" in findings(view(2, "0", record))[GUEST_MISSING_VCPUS][1]
    )
    pending = view(2, "0", history((HISTORY_PLUGGED, 1, 100.0), (HISTORY_EJECTED, 1, 150.0)))
    pending = dataclasses.replace(
        pending, history=dataclasses.replace(pending.history, repeat_refused=151.0)
    )
    message = findings(pending, now=160.0)[UNPLUG_PENDING][1]
    assert "only a restart of the domain (shut down, then start)" in message
    assert "setvcpus web1" not in message


def test_a_timeout_before_the_latest_plug_does_not_count() -> None:
    record = history(
        (HISTORY_UNPLUG_TIMEOUT, 1, 90.0),
        (HISTORY_PLUGGED, 1, 100.0),
        (HISTORY_EJECTED, 1, 150.0),
    )
    assert UNPLUG_PENDING in findings(view(2, "0", record))


def test_an_async_unplug_the_guest_has_not_ejected_yet_is_pending() -> None:
    record = history((HISTORY_PLUGGED, 1, 100.0), (HISTORY_UNPLUG_REQUESTED, 1, 150.0))
    severity, message = findings(view(2, "0,1", record), now=151.0)[UNPLUG_PENDING]
    assert severity == WARNING and "vcpu1 (for 1.0 s)" in message
    assert "has not ejected it yet" in message and "setvcpus web1 1" in message


def test_a_pending_unplug_libvirt_completed_is_no_finding() -> None:
    record = history((HISTORY_PLUGGED, 1, 100.0), (HISTORY_UNPLUG_REQUESTED, 1, 150.0))
    assert findings(view(1, "0", record)) == {}


def test_a_rejected_hot_add_is_not_a_pending_unplug() -> None:
    record = history((HISTORY_PLUGGED, 1, 100.0), (HISTORY_REJECTED, 1, 103.0))
    found = findings(view(2, "0", record))
    assert UNPLUG_PENDING not in found and GUEST_MISSING_VCPUS not in found


def test_without_any_record_both_causes_are_named_as_before() -> None:
    found = findings(view(2, "0", History()))
    assert found[GUEST_MISSING_VCPUS][0] == CRITICAL and UNPLUG_PENDING not in found


def test_a_pending_unplug_is_repaired_before_a_grow() -> None:
    v = view(3, "0,1", history((HISTORY_PLUGGED, 1, 1.0), (HISTORY_PLUGGED, 2, 2.0)))
    v = dataclasses.replace(v, findings=find_drift(v))
    assert resizeplan.needs_repair(v, resizeplan.Request(3, True, False))


# ---- the judge on stack 3's sequences -----------------------------------------------------


def ost(device: Optional[str], source: int, status: int, at: float) -> Event:
    info: dict[str, Any] = {"source": source, "status": status, "slot-type": "CPU"}
    if device is not None:
        info.update(device=device, slot=device[4:])
    details = parse_ost_details(json.dumps({"info": info}))
    return OstMonitorEvent(REF, ost=details, mono=at, at=1000.0 + at)


def test_async_unplug_eject_repeat_and_vcpu_removed_judge_removed() -> None:
    # 12.8: async request, OST 3/0x84 then 3/0 (no device), repeat, vcpu-removed.
    observations = Observations()
    observations.add([Observed(PLUG, 2, 0.0, 1000.0)])
    observations.add([Observed(UNPLUG_REQUEST, 2, 1.0, 1001.0)])
    reader = EventReader()
    observations.add(reader.read_all([ost("vcpu2", 3, 0x84, 1.05), ost(None, 3, 0, 1.10)]))
    observations.add([Observed(UNPLUG_REQUEST, 2, 1.2, 1001.2)])
    observations.add(reader.read_all([VcpuRemovedEvent(REF, vcpu=2, mono=1.25, at=1001.25)]))
    verdict = judge(observations.snapshot(), None, None, now=2.0, wall=1002.0, source="t")
    assert verdict.fates[2] == FATE_REMOVED and not verdict.late
    assert [e.kind for e in verdict.entries] == [HISTORY_PLUGGED, HISTORY_EJECTED]


def test_the_late_vcpu_removed_of_a_replugged_slot_changes_nothing() -> None:
    observations = Observations()
    observations.add(
        [
            Observed(UNPLUG_REQUEST, 1, 0.0, 1000.0),
            Observed(REMOVED, 1, 0.1, 1000.1),
            Observed(PLUG, 1, 5.0, 1005.0),
            Observed(REMOVED, 1, 5.01, 1005.01),  # QEMU 11.1's late DEVICE_DELETED -> libvirt
        ]
    )
    verdict = judge(observations.snapshot(), None, None, now=6.0, wall=1006.0, source="t")
    assert verdict.late == frozenset({1}) and verdict.fates[1] == "plugged"


# ---- setvcpus' async shrink, against a fake stack 3 --------------------------------------


class Support:
    def __init__(self, async_flag: Optional[int], event: Optional[int]) -> None:
        self.async_unplug_flag = async_flag
        self.vcpu_removed_event_id = event

    @property
    def vcpu_removed_event(self) -> bool:
        return self.vcpu_removed_event_id is not None

    def describe(self) -> str:
        return "libvirt 12.8.0, QEMU 11.1.2"


class Stack3:
    """libvirt 12.8 + QEMU 11.1 under TCG, as measured: an async request returns at once;
    the guest ejects after ``eject_after`` agent reads; libvirt keeps counting the vCPU
    until the request is repeated, then emits vcpu-removed."""

    def __init__(self, live: int, target: int, eject_after: int, refuse: bool = False) -> None:
        self.live, self.target, self.present = live, target, live
        self.eject_after, self.refuse = eject_after, refuse
        self.fired = False
        self.calls: list[tuple[int, int]] = []
        self.events: list[Event] = []
        self.support = Support(ASYNC_FLAG, 28)
        self.name = "web1"

    # connection
    def bulk_stats(self, _doms: Any) -> list[tuple[Any, dict[str, int]]]:
        return [(self, {"vcpu.current": self.live})]

    def guest_vcpus(self, _dom: Any) -> dict[str, str]:
        if self.fired:
            self.eject_after -= 1
            if self.eject_after <= 0:
                self.present = self.target
        cpus = ",".join(str(c) for c in range(self.present))
        return {"vcpus": cpus, "online": cpus, "offlinable": ""}

    # domain
    def set_vcpus(self, count: int, *, live: bool, config: bool, async_flag: int = 0) -> None:
        self.calls.append((count, async_flag))
        if self.fired and self.refuse:
            raise errors.VirtHotplugError("domain 'web1': refused", code=1)
        if self.fired and self.present <= count:
            for vcpu in range(count, self.live):
                self.events.append(VcpuRemovedEvent(REF, vcpu=vcpu))
            self.live = count
        self.fired = True


def async_shrink(
    stack: Stack3, timeout: float = 2.0
) -> tuple[Any, Any, dict[str, float], list[str]]:
    before = view(stack.live, ",".join(str(c) for c in range(stack.live)), History())
    request = resizeplan.Request(stack.target, True, False, timeout=timeout)
    seen = Seen(lambda: list(stack.events))
    shrink = AsyncShrink(stack, stack, before, request, seen, ASYNC_FLAG, 0.0)  # type: ignore[arg-type]
    shrink.deadline = time.monotonic() + timeout
    shrink.started = time.monotonic()
    stack.set_vcpus(stack.target, live=True, config=False, async_flag=ASYNC_FLAG)
    timings: dict[str, float] = {}
    notes: list[str] = []
    repeated, pending = shrink.run(None, timings, notes)
    return repeated, pending, timings, notes


def test_async_shrink_completes_with_one_repeat_after_the_eject() -> None:
    stack = Stack3(live=3, target=2, eject_after=3)
    repeated, pending, timings, notes = async_shrink(stack)
    assert stack.calls == [(2, ASYNC_FLAG), (2, ASYNC_FLAG)]
    assert repeated == "accepted" and pending == frozenset() and stack.live == 2
    assert timings["guest-ejected"] <= timings["all-layers"] <= timings["vcpu-removed"]
    assert "repeated request completed it" in notes[0]


def test_async_shrink_repeats_nothing_before_the_guest_ejects() -> None:
    stack = Stack3(live=3, target=2, eject_after=10_000)
    repeated, pending, timings, notes = async_shrink(stack, timeout=0.3)
    assert stack.calls == [(2, ASYNC_FLAG)]  # the request alone: nothing repeated
    assert repeated is None and pending == frozenset({2}) and stack.live == 3
    assert "all-layers" not in timings and notes == []


def test_async_shrink_reports_a_refused_repeat() -> None:
    stack = Stack3(live=3, target=2, eject_after=1, refuse=True)
    repeated, pending, _timings, _notes = async_shrink(stack)
    assert repeated == "domain 'web1': refused" and pending == frozenset({2})
    assert len(stack.calls) == 2


class MidwayStack3(Stack3):
    """A repeat that drops the highest vCPU, then fails on the next one."""

    def set_vcpus(self, count: int, *, live: bool, config: bool, async_flag: int = 0) -> None:
        self.calls.append((count, async_flag))
        self.live -= 1
        raise errors.VirtHotplugError("domain 'web1': failed midway", code=1)


def test_an_async_repeat_that_fails_midway_is_recorded_from_libvirts_count() -> None:
    # 4 -> 2: the repeat removed vcpu3 (libvirt's count dropped) and failed on vcpu2. The
    # one repeat of both shrinks reads that from the count, never from the message.
    stack = MidwayStack3(live=4, target=2, eject_after=1)
    seen = Seen(None)
    request = resizeplan.Request(2, True, False)
    before = view(4, "0,1,2,3", History())
    shrink = AsyncShrink(stack, stack, before, request, seen, ASYNC_FLAG, 0.0)  # type: ignore[arg-type]
    assert not shrink._repeat()
    assert shrink.refused == "domain 'web1': failed midway" and stack.calls == [(2, ASYNC_FLAG)]
    asked = [(o.vcpu, o.error) for o in seen.update().events if o.kind == UNPLUG_REQUEST]
    assert asked == [(3, None), (2, 1)]
