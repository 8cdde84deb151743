"""setvcpus decisions from recorded sequences: the repeated unplug after libvirt gave up
(accepted on one host, refused on another), the grow guard (repair first, refuse only what
is known to crash QEMU, name the observation), and a hot-add the guest rejected."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import pytest

from virthotplug.core import errors, resizeplan
from virthotplug.core.config import HostConfig
from virthotplug.core.drift import find_drift
from virthotplug.core.events import DomainRef, OstMonitorEvent
from virthotplug.core.judge import (
    HOTADD_WAIT,
    VIR_ERR_OPERATION_TIMEOUT,
    judge,
    recorded_entries,
)
from virthotplug.core.ost import parse_ost_details
from virthotplug.core.view import (
    AGENT_CONNECTED,
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_UNPLUG_TIMEOUT,
    AgentStatus,
    CountLayer,
    GuestLayer,
    History,
    HistoryEntry,
    HypervisorLayer,
    VcpuView,
)
from virthotplug.ops import resize
from virthotplug.ops.reconcile import guest_seen, libvirt_seen
from virthotplug.ops.seen import Failure, Seen
from virthotplug.ops.shrink import after_shrink

REF = DomainRef("qemu:///system", "u", "web1")
REFUSED = "An error occurred, but the cause is unknown"
TIMED_OUT = "domain 'web1': Timed out during operation: vcpu unplug request timed out"
# libvirt's virErrorNumber, as the connection hands them over with the exception.
VIR_ERR_INTERNAL_ERROR, VIR_ERR_OPERATION_FAILED = 1, 9


class Support:
    def __init__(self, text: str) -> None:
        self.text = text

    def describe(self) -> str:
        return self.text


class FakeConn:
    def __init__(self, host: str, guest: str) -> None:
        self.support = Support(host)
        self.guest = guest

    def guest_vcpus(self, _dom: Any) -> dict[str, str]:
        return {"vcpus": self.guest, "online": self.guest, "offlinable": ""}

    def bulk_stats(self, doms: list[Any]) -> list[tuple[Any, dict[str, int]]]:
        return [(dom, {"vcpu.current": dom.counted}) for dom in doms]


class FakeDom:
    name = "web1"

    def __init__(self, refuse: Optional[str] = None, counted: int = 3) -> None:
        self.refuse = refuse
        self.counted = counted  # libvirt's live count
        self.calls: list[int] = []

    def set_vcpus(self, count: int, *, live: bool, config: bool, **_flags: bool) -> None:
        self.calls.append(count)
        if self.refuse is not None:
            raise errors.VirtHotplugError(f"domain 'web1': {self.refuse}")
        self.counted = count


class Libvirt12Dom(FakeDom):
    """libvirt 12.8 + QEMU 11.1 under TCG: an unplug request removes, highest first, the
    vCPUs asked for before (the guest ejected them; the repeat corrects the count), and
    gives up waiting (VIR_ERR_OPERATION_TIMEOUT) on the first one not asked for before."""

    def __init__(self, counted: int) -> None:
        super().__init__(None, counted)
        self.asked: set[int] = set()

    def set_vcpus(self, count: int, *, live: bool, config: bool, **_flags: bool) -> None:
        self.calls.append(count)
        while self.counted > count:
            vcpu = self.counted - 1
            if vcpu not in self.asked:
                self.asked.add(vcpu)
                raise errors.VirtHotplugError(TIMED_OUT, code=VIR_ERR_OPERATION_TIMEOUT)
            self.counted -= 1


def view(
    live: int, present: str, history: Optional[History] = None, kind: str = "qemu"
) -> VcpuView:
    ids = frozenset(int(c) for c in present.split(","))
    v = VcpuView(
        host=REF.host,
        name="web1",
        uuid="u",
        state="running",
        persistent=True,
        agent=AgentStatus(True, AGENT_CONNECTED),
        config=CountLayer(live, 4),
        live=CountLayer(live, 4),
        hypervisor=HypervisorLayer(dict.fromkeys(range(live), "running")),
        guest=GuestLayer(ids, ids, ids - {0}),
        history=history or History(),
        domain_type=kind,
    )
    return dataclasses.replace(v, findings=find_drift(v))


STALE = History().add(HistoryEntry(HISTORY_UNPLUG_TIMEOUT, 2, 10.0, "setvcpus"))


def shrink(
    host: str, refuse: Optional[str], failure: Failure, guest: str = "0,1"
) -> tuple[Optional[str], list[str], FakeDom]:
    # 3 -> 2: libvirt failed the unplug of vcpu2; the guest lists what ``guest`` says.
    conn, dom, notes = FakeConn(host, guest), FakeDom(refuse), []
    request = resizeplan.Request(2, True, False, timeout=0.2)
    seen = Seen(None)
    seen.requested([2], 0.0, failure)
    repeated = after_shrink(conn, dom, view(3, "0,1,2"), request, 0.0, notes, seen)  # type: ignore[arg-type]
    return repeated, notes, dom


TIMEOUT = Failure(TIMED_OUT, VIR_ERR_OPERATION_TIMEOUT)


def test_the_repeated_unplug_is_accepted_where_the_host_accepts_it() -> None:
    repeated, notes, dom = shrink("libvirt 11.3.0, QEMU 10.0.2", None, TIMEOUT)
    assert repeated == "accepted" and dom.calls == [2]
    assert "accepted by this host (libvirt 11.3.0, QEMU 10.0.2)" in notes[0]


def test_a_refused_repeat_reports_the_stale_vcpu_and_the_remedy() -> None:
    repeated, _, dom = shrink("libvirt 9.0.0, QEMU 7.2.0", REFUSED, TIMEOUT)
    assert repeated is not None and REFUSED in repeated and dom.calls == [2]
    after = view(3, "0,1", STALE)
    conn = FakeConn("libvirt 9.0.0, QEMU 7.2.0", "0,1")
    text = " ".join(resizeplan.drift_notes(conn.support.describe(), after, TIMED_OUT, repeated))
    assert "refused the repeated unplug request" in text
    assert "vcpu2: libvirt's unplug timed out" in text
    assert "restart the domain" in text and "known to crash QEMU" in text


def test_no_repeat_when_the_guest_has_not_ejected() -> None:
    repeated, _, dom = shrink("libvirt 9.0.0, QEMU 7.2.0", None, TIMEOUT, guest="0,1,2")
    assert repeated is None and dom.calls == []


def test_the_repeat_is_chosen_by_error_code_whatever_the_message_says() -> None:
    # libvirt 12.8 changed the text, and a localized libvirtd translates it: the code stays.
    localized = Failure("Zeitüberschreitung beim Vorgang", VIR_ERR_OPERATION_TIMEOUT)
    repeated, _, dom = shrink("libvirt 12.8.0, QEMU 11.1.2", None, localized)
    assert repeated == "accepted" and dom.calls == [2]
    # The old text with another code (the guest did not report an eject): no repeat.
    other = Failure("operation failed: vcpu unplug request timed out", 9)
    repeated, _, dom = shrink("libvirt 9.0.0, QEMU 7.2.0", None, other)
    assert repeated is None and dom.calls == []


def test_grow_with_a_stale_vcpu_the_host_will_not_repair_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn, dom = FakeConn("libvirt 9.0.0, QEMU 7.2.0", "0,1"), FakeDom(REFUSED)
    before = view(3, "0,1", STALE)
    with pytest.raises(errors.UnsupportedError) as caught:
        resize._repair_before_grow(
            conn, dom, HostConfig(), before, resizeplan.Request(3, True, False), []
        )  # type: ignore[arg-type]
    text = str(caught.value)
    assert "this host (libvirt 9.0.0, QEMU 7.2.0) refused the repeated unplug" in text
    assert "vcpu2: libvirt's unplug timed out" in text
    assert "7.2" not in text.replace("libvirt 9.0.0, QEMU 7.2.0", "")


def test_grow_repairs_a_stale_vcpu_first_where_the_host_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn, dom, notes = FakeConn("libvirt 11.3.0, QEMU 10.0.2", "0,1"), FakeDom(), []
    repaired = view(2, "0,1", STALE)
    monkeypatch.setattr(resize.collect, "read_view", lambda *_a, **_k: repaired)
    got = resize._repair_before_grow(
        conn, dom, HostConfig(), view(3, "0,1", STALE), resizeplan.Request(3, True, False), notes
    )  # type: ignore[arg-type]
    assert got is repaired and dom.calls == [2]
    assert "repaired first" in notes[0] and "libvirt now counts 2" in notes[0]


def test_a_rejected_hot_add_is_not_a_stale_vcpu() -> None:
    rejected = History().add(HistoryEntry("rejected", 1, 5.0, "watch"))
    assert not resizeplan.stale(view(2, "0", rejected))
    assert resizeplan.stale(view(2, "0"))  # without history: it may be either


def test_tcg_thread_budget() -> None:
    # Started with 1, plugged 3 times (one slot re-plugged after an unplug): 4 of 4 made.
    history = History().with_initial(1)
    for i, vcpu in enumerate((1, 2, 3)):
        history = history.add(HistoryEntry(HISTORY_PLUGGED, vcpu, float(i * 10), "ost"))
    history = history.add(HistoryEntry(HISTORY_EJECTED, 3, 40.0, "ost"))
    with pytest.raises(errors.UnsupportedError) as caught:
        resizeplan.check_thread_budget(view(3, "0,1,2", history), 1)
    assert "has created 4" in str(caught.value) and "maximum (4)" in str(caught.value)
    resizeplan.check_thread_budget(view(3, "0,1,2", history, kind="kvm"), 1)
    resizeplan.check_thread_budget(view(3, "0,1,2", History(), kind="qemu"), 1)


def ost(vcpu: int, mono: float) -> Any:
    info = {"device": f"vcpu{vcpu}", "source": 1, "status": 0, "slot": "1", "slot-type": "CPU"}
    details = json.dumps({"info": info})
    return OstMonitorEvent(REF, ost=parse_ost_details(details), mono=mono)


def test_rejected_from_the_ost_events_and_the_guest_list() -> None:
    # What setvcpus asks the judge after its wait: the OST events it saw, the guest before
    # (cpu0) and now.
    def rejected(events: list[Any], present: str, at: float) -> frozenset[int]:
        seen = Seen(lambda: events)
        seen.observations.present = frozenset({0})
        observations = seen.update()
        return judge(
            observations.snapshot(),
            guest_seen(view(2, present)),
            libvirt_seen(view(2, present)),
            now=at,
            wall=0.0,
            source="setvcpus",
        ).rejected

    assert rejected([ost(1, 100.0)], "0", 100.0 + HOTADD_WAIT) == {1}
    assert rejected([ost(1, 100.0)], "0,1", 100.0 + HOTADD_WAIT) == frozenset()
    assert rejected([], "0", 100.0 + HOTADD_WAIT) == frozenset()  # no OST seen: not known


def test_only_the_vcpu_libvirt_tried_is_recorded_as_timed_out() -> None:
    # 3 -> 1 timed out: libvirt tried vcpu2 first and stopped there; vcpu1 was never asked.
    seen = Seen(None)
    seen.requested(resizeplan.unplugged(view(3, "0,1,2"), 1), 0.0, TIMEOUT)
    observations = seen.update()
    entries = recorded_entries(observations.events, "setvcpus")
    assert [(e.kind, e.vcpu) for e in entries] == [(HISTORY_UNPLUG_TIMEOUT, 2)]


def test_unplugged_vcpus_are_the_highest_libvirt_ids() -> None:
    assert resizeplan.unplugged(view(3, "0,1,2"), 2) == [2]


def test_a_request_libvirt_already_counts_is_a_hot_add_while_a_vcpu_is_stale() -> None:
    # libvirt 9.0: 3 -> 2 timed out (libvirt still counts 3, the guest has 2); asking for 3
    # again needs a plug, and the host refuses the repair: refused, nothing plugged.
    conn, dom = FakeConn("libvirt 9.0.0, QEMU 7.2.22", "0,1"), FakeDom(REFUSED)
    with pytest.raises(errors.UnsupportedError):
        resize._preflight(
            conn, dom, HostConfig(), view(3, "0,1", STALE), resizeplan.Request(3, True, False), []
        )  # type: ignore[arg-type]
    assert dom.calls == [2]  # only the repeated unplug was asked for
    forced = resizeplan.Request(3, True, False, force=True)
    assert resize._preflight(conn, dom, HostConfig(), view(3, "0,1", STALE), forced, []).live  # type: ignore[arg-type]


# --- --maximum and --hotpluggable: what the persistent definition must show -----------------


def test_maximum_is_verified_on_the_config_maximum() -> None:
    request = resizeplan.Request(6, False, True, maximum=True)
    lowered = CountLayer(2, 6)
    assert resizeplan.config_check(lowered, request).ok
    assert not resizeplan.config_check(CountLayer(2, 8), request).ok
    assert resizeplan.config_check(lowered, request).layer == "config maximum"


def test_hotpluggable_is_verified_on_the_vcpus_the_change_enabled() -> None:
    from virthotplug.core.view import VcpuEntry

    before = CountLayer(1, 3)
    marked = CountLayer(
        3, 3, (VcpuEntry(0, True, False), VcpuEntry(1, True, True), VcpuEntry(2, True, True))
    )
    plain = CountLayer(
        3, 3, (VcpuEntry(0, True, False), VcpuEntry(1, True, True), VcpuEntry(2, True, False))
    )
    (ok,) = resizeplan.hotpluggable_check(before, marked)
    assert ok.ok and ok.target == "vCPU 1-2"
    (missed,) = resizeplan.hotpluggable_check(before, plain)
    assert not missed.ok and missed.now == "not vCPU 2"
    assert resizeplan.hotpluggable_check(marked, marked) == []  # nothing enabled: no check


# --- libvirt 12.8 + QEMU 11.1 (stack 3) with a guest that rejected hot-adds (Linux 7.2) -------

FALSE_CLAIMS = ("stale", "restart the domain", "crash")


def test_two_rejected_vcpus_are_removed_one_repeat_at_a_time() -> None:
    # Issue 21 case 6: libvirt counts 3, the guest has cpu0. libvirt gives up on vcpu2; the
    # repeat removes vcpu2 and gives up on vcpu1; the next repeat removes vcpu1.
    conn, dom, notes = FakeConn("libvirt 12.8.0, QEMU 11.1.2", "0"), Libvirt12Dom(3), []
    before = view(3, "0")
    request = resizeplan.Request(1, True, False, timeout=0.2)
    failure = resize._set_vcpus(conn, dom, before, request)  # type: ignore[arg-type]
    assert failure is not None and failure.code == VIR_ERR_OPERATION_TIMEOUT
    seen = Seen(None)
    seen.requested(resizeplan.unplugged(before, 1), 0.0, failure)
    repeated = after_shrink(conn, dom, before, request, 0.0, notes, seen)  # type: ignore[arg-type]
    assert repeated == "accepted" and dom.counted == 1 and dom.calls == [1, 1, 1]
    entries = recorded_entries(seen.update().events, "setvcpus")
    assert [(e.kind, e.vcpu) for e in entries] == [
        (HISTORY_UNPLUG_TIMEOUT, 2),
        (HISTORY_UNPLUG_TIMEOUT, 1),
    ]
    text = " ".join(notes).lower()
    assert not [claim for claim in FALSE_CLAIMS if claim in text], text


def test_a_repeat_that_changes_nothing_is_a_refusal() -> None:
    # libvirt 9.0: the repeat fails and libvirt's count stays: refused, not tried again.
    conn, dom, notes = FakeConn("libvirt 9.0.0, QEMU 7.2.0", "0"), FakeDom(REFUSED), []
    seen = Seen(None)
    seen.requested([1, 2], 0.0, TIMEOUT)
    request = resizeplan.Request(1, True, False, timeout=0.2)
    repeated = after_shrink(conn, dom, view(3, "0"), request, 0.0, notes, seen)  # type: ignore[arg-type]
    assert repeated is not None and REFUSED in repeated and dom.calls == [1]


def test_grow_past_a_vcpu_nothing_explains_unplugs_it_first_then_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 21 case 4: libvirt counts 2, the guest has cpu0, nothing on record (the guest
    # rejected vcpu1 while no watch ran). The first unplug times out: not a refused repeat.
    conn, dom, notes = FakeConn("libvirt 12.8.0, QEMU 11.1.2", "0"), Libvirt12Dom(2), []
    repaired = view(1, "0")
    monkeypatch.setattr(resize.collect, "read_view", lambda *_a, **_k: repaired)
    request = resizeplan.Request(3, True, False, timeout=0.2)
    got = resize._repair_before_grow(conn, dom, HostConfig(), view(2, "0"), request, notes)  # type: ignore[arg-type]
    assert got is repaired and dom.calls == [1, 1] and dom.counted == 1
    assert "the repeated unplug request was accepted" in notes[0], notes
    text = " ".join(notes).lower()
    assert not [claim for claim in FALSE_CLAIMS if claim in text], text


class Libvirt9Dom(FakeDom):
    """libvirt 9.0 + QEMU 7.2: the first unplug gives up waiting, a repeat is refused."""

    def set_vcpus(self, count: int, *, live: bool, config: bool, **_flags: bool) -> None:
        self.calls.append(count)
        if len(self.calls) == 1:
            raise errors.VirtHotplugError(TIMED_OUT, code=VIR_ERR_OPERATION_TIMEOUT)
        raise errors.VirtHotplugError(REFUSED, code=VIR_ERR_INTERNAL_ERROR)


def test_grow_past_a_vcpu_nothing_explains_where_the_host_refuses_the_repeat() -> None:
    conn, dom = FakeConn("libvirt 9.0.0, QEMU 7.2.0", "0"), Libvirt9Dom(counted=2)
    request = resizeplan.Request(3, True, False, timeout=0.2)
    with pytest.raises(errors.UnsupportedError) as caught:
        resize._repair_before_grow(conn, dom, HostConfig(), view(2, "0"), request, [])  # type: ignore[arg-type]
    assert dom.calls == [1, 1]  # the first unplug, then one repeat
    assert "refused the repeated unplug request" in str(caught.value)


# --- the TCG thread budget, from what proves it (issue 21 case 3) ----------------------------


def record(initial: int, *events: tuple[str, int], since_start: bool = False) -> History:
    history = History(initial=initial, since_start=since_start)
    for i, (kind, vcpu) in enumerate(events):
        history = history.add(HistoryEntry(kind, vcpu, float(10 * i), "ost"))
    return history


def test_a_record_complete_since_the_start_proves_the_count() -> None:
    # Booted with 1 under watch; vcpu1 plugged, unplugged, plugged again: 3 of 4 made.
    proven = record(
        1,
        (HISTORY_PLUGGED, 1),
        (HISTORY_EJECTED, 1),
        (HISTORY_PLUGGED, 1),
        since_start=True,
    )
    resizeplan.check_thread_budget(view(2, "0,1", proven), 1)  # the 4th: allowed
    with pytest.raises(errors.UnsupportedError) as caught:
        resizeplan.check_thread_budget(view(2, "0,1", proven), 2)
    assert "has created 3 (counted since QEMU's start" in str(caught.value)


def test_an_incomplete_record_that_saw_unplugs_leaves_the_count_unknown() -> None:
    # Case 3: the record began after a hot-add made while no watch ran (it counts 2 at its
    # start); it saw vcpu1 ejected and plugged again. QEMU had made 4 of 4: one more aborts.
    gap = record(2, (HISTORY_EJECTED, 1), (HISTORY_PLUGGED, 1))
    with pytest.raises(errors.UnsupportedError) as caught:
        resizeplan.check_thread_budget(view(2, "0,1", gap), 1)
    text = str(caught.value)
    assert "how many it has created is not known: at least 3" in text
    assert "vCPU 1 unplugged" in text and "--force" in text


def test_without_an_unplug_on_record_the_live_count_bounds_the_plugs() -> None:
    resizeplan.check_thread_budget(view(1, "0"), 3)  # nothing on record: 1 + 3 <= 4
    plugs_only = record(1, (HISTORY_PLUGGED, 1))
    resizeplan.check_thread_budget(view(2, "0,1", plugs_only), 2)
    # A repair that unplugged vCPUs first still counts the threads they had.
    with pytest.raises(errors.UnsupportedError):
        resizeplan.check_thread_budget(view(1, "0"), 3, at_least=2)


def test_qemu_stopped_text_says_what_was_known() -> None:
    text = resizeplan.qemu_stopped_text(view(2, "0,1"), 3, "Unable to read from monitor")
    assert text.startswith("domain 'web1': QEMU stopped (crashed) during the hot-add (2 -> 3")
    assert "libvirt reported: Unable to read from monitor" in text
    assert "how many it had created was not known" in text
    proven = record(1, (HISTORY_PLUGGED, 1), since_start=True)
    assert "it had created 2 (counted since QEMU's start)" in resizeplan.qemu_stopped_text(
        view(2, "0,1", proven), 3, None
    )


def test_case3_a_cpu_the_guest_took_and_ejected_is_no_kernel_rejection() -> None:
    # Issue 21 case 3 began with case 2's false "rejected" entry: what watch records of that
    # sequence (plug, then the guest's eject) makes check and setvcpus speak of an eject.
    events = [ost(1, 100.0), *eject(1, 102.0)]
    seen = Seen(lambda: events)
    history = History()
    for entry in recorded_entries(seen.update().events, "watch"):
        history = history.add(entry)
    after = view(2, "0", history)
    codes = [f.code for f in after.findings]
    # The guest ejected it while libvirt still counts it: a pending unplug, not a rejection.
    assert "guest-rejected-vcpu" not in codes and "unplug-pending" in codes
    text = " ".join(f.message for f in after.findings)
    assert "6.12" not in text and "kernel" not in text
    # setvcpus DOM 2 then repairs it first (the unplug was seen: this is the repeat).
    assert resizeplan.needs_repair(after, resizeplan.Request(2, True, False))


def eject(vcpu: int, mono: float) -> list[Any]:
    def report(status: int, device: Optional[str], at: float) -> Any:
        info: dict[str, Any] = {"source": 3, "status": status, "slot-type": "CPU"}
        if device is not None:
            info.update(device=device, slot=str(vcpu))
        return OstMonitorEvent(REF, ost=parse_ost_details(json.dumps({"info": info})), mono=at)

    return [report(0x84, f"vcpu{vcpu}", mono), report(0, None, mono + 0.05)]


class StoppingDom(FakeDom):
    """QEMU aborts under the plug: libvirt fails the request and marks the domain shut off
    a moment later (after it reads the monitor's end)."""

    def __init__(self, stops_after: int) -> None:
        super().__init__(counted=2)
        self.looks = 0
        self.stops_after = stops_after

    def is_active(self) -> bool:
        self.looks += 1
        return self.looks <= self.stops_after


def test_a_domain_that_stops_under_the_hot_add_is_qemu_stopping() -> None:
    dom = StoppingDom(stops_after=2)
    request = resizeplan.Request(3, True, False)
    with pytest.raises(errors.QemuStoppedError) as caught:
        resize._raise_if_stopped(dom, view(2, "0,1"), request, True, "monitor closed")  # type: ignore[arg-type]
    assert caught.value.exit_status == errors.EXIT_QEMU_STOPPED == 13
    assert "QEMU stopped (crashed) during the hot-add (2 -> 3 vCPUs)" in str(caught.value)
    # A domain that keeps running: the request's own error stands.
    resize._raise_if_stopped(StoppingDom(stops_after=10**6), view(2, "0,1"), request, True, "x")  # type: ignore[arg-type]
    # A shrink is never called a crashed hot-add.
    resize._raise_if_stopped(StoppingDom(stops_after=0), view(2, "0,1"), request, False, "x")  # type: ignore[arg-type]


def test_setvcpus_events_keep_their_own_text_in_json_and_their_name_on_the_line() -> None:
    # The JSON "event" is the event's description, as before QEMU's names were printed; the
    # human line names the QEMU event first.
    from types import SimpleNamespace

    from virthotplug.cli.commands import setvcpus

    event = ost(2, 100.5)
    described = setvcpus._described(SimpleNamespace(requests=()), [event], 100.0)  # type: ignore[arg-type]
    assert described == [(event, "ACPI_DEVICE_OST", event.describe())]
    assert event.describe().startswith("device check: success")
