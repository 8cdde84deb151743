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

REF = DomainRef("qemu:///system", "u", "web1")
REFUSED = "An error occurred, but the cause is unknown"
TIMED_OUT = "domain 'web1': operation failed: vcpu unplug request timed out"


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


class FakeDom:
    name = "web1"

    def __init__(self, refuse: Optional[str] = None) -> None:
        self.refuse = refuse
        self.calls: list[int] = []

    def set_vcpus(self, count: int, *, live: bool, config: bool) -> None:
        self.calls.append(count)
        if self.refuse is not None:
            raise errors.VirtHotplugError(f"domain 'web1': {self.refuse}")


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


def shrink(host: str, refuse: Optional[str]) -> tuple[Optional[str], list[str], FakeDom]:
    # 3 -> 2: libvirt timed out, the guest ejected (it lists cpu0-1).
    conn, dom, notes = FakeConn(host, "0,1"), FakeDom(refuse), []
    request = resizeplan.Request(2, True, False, timeout=1.0)
    started = 0.0
    repeated = resize._after_shrink(conn, dom, view(3, "0,1,2"), request, TIMED_OUT, started, notes)  # type: ignore[arg-type]
    return repeated, notes, dom


def test_the_repeated_unplug_is_accepted_where_the_host_accepts_it() -> None:
    repeated, notes, dom = shrink("libvirt 11.3.0, QEMU 10.0.2", None)
    assert repeated == "accepted" and dom.calls == [2]
    assert "accepted by this host (libvirt 11.3.0, QEMU 10.0.2)" in notes[0]


def test_a_refused_repeat_reports_the_stale_vcpu_and_the_remedy() -> None:
    repeated, _, dom = shrink("libvirt 9.0.0, QEMU 7.2.0", REFUSED)
    assert repeated is not None and REFUSED in repeated and dom.calls == [2]
    after = view(3, "0,1", STALE)
    conn = FakeConn("libvirt 9.0.0, QEMU 7.2.0", "0,1")
    text = " ".join(resizeplan.drift_notes(conn.support.describe(), after, TIMED_OUT, repeated))
    assert "refused the repeated unplug request" in text
    assert "vcpu2: libvirt's unplug timed out" in text
    assert "restart the domain" in text and "known to crash QEMU" in text


def test_no_repeat_when_the_guest_has_not_ejected() -> None:
    conn, dom = FakeConn("libvirt 9.0.0, QEMU 7.2.0", "0,1,2"), FakeDom()
    request = resizeplan.Request(2, True, False, timeout=0.2)
    assert resize._after_shrink(conn, dom, view(3, "0,1,2"), request, TIMED_OUT, 0.0, []) is None  # type: ignore[arg-type]
    assert dom.calls == []


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
    events = [ost(1, 100.0)]
    assert resize._rejected(events, frozenset(), 1) == {1}
    assert resize._rejected(events, frozenset({1}), 1) == frozenset()
    assert resize._rejected([], frozenset(), 1) == frozenset()  # no OST seen: not known


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
