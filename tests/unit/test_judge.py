"""The judge of what happened to each vCPU, from recorded event sequences of the three lab
stacks (libvirt 9.0/QEMU 7.2, 11.3/10.0, 12.8/11.1) and of the guests that reject hot-adds
(Linux 6.12.85+ and 7.2 under TCG)."""

from __future__ import annotations

import json
from typing import Optional

import pytest

from virthotplug.core import judge
from virthotplug.core.events import (
    DeviceDeletedMonitorEvent,
    DeviceRemovalEvent,
    DomainRef,
    Event,
    OstMonitorEvent,
)
from virthotplug.core.judge import (
    DELETED,
    EJECT,
    FATE_CREDITED,
    FATE_LISTED,
    FATE_PLUGGED,
    FATE_REJECTED,
    FATE_REMOVED,
    FATE_STALE,
    FATE_UNPLUG_REQUESTED,
    HOTADD_WAIT,
    PLUG,
    PLUG_REQUEST,
    REMOVED,
    UNPLUG_REQUEST,
    VIR_ERR_OPERATION_TIMEOUT,
    GuestSeen,
    LibvirtSeen,
    Observations,
    Observed,
)
from virthotplug.core.observed import EventReader, deleted_vcpu
from virthotplug.core.ost import parse_device_deleted, parse_ost_details
from virthotplug.core.view import (
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_TIMEOUT,
)

REF = DomainRef("qemu:///system", "u", "web1")
T0 = 1000.0  # monotonic time of the first event
WALL = 1_700_000_000.0
VIR_ERR_OPERATION_FAILED = 9


def ost(vcpu: Optional[int], source: int, status: int, at: float) -> Event:
    info: dict[str, object] = {"source": source, "status": status, "slot-type": "CPU"}
    if vcpu is not None:
        info.update(device=f"vcpu{vcpu}", slot=str(vcpu))
    details = json.dumps({"info": info})
    return OstMonitorEvent(REF, ost=parse_ost_details(details), at=WALL + at, mono=T0 + at)


def deleted(path: str, at: float, device: Optional[str] = None) -> Event:
    fields = {"path": path} | ({"device": device} if device else {})
    return DeviceDeletedMonitorEvent(
        REF, deleted=parse_device_deleted(json.dumps(fields)), at=WALL + at, mono=T0 + at
    )


def request(vcpu: int, at: float, error: Optional[int] = None) -> Observed:
    return Observed(UNPLUG_REQUEST, vcpu, T0 + at, WALL + at, error)


def observed(kind: str, vcpu: int, at: float) -> Observed:
    return Observed(kind, vcpu, T0 + at, WALL + at)


def guest(present: str, online: Optional[str] = None, at: float = 0.0) -> GuestSeen:
    ids = frozenset(int(c) for c in present.split(","))
    on = ids if online is None else frozenset(int(c) for c in online.split(","))
    return GuestSeen(ids, on, T0 + at)


def unplug(vcpu: int, at: float) -> list[Event]:
    """The guest's eject: in progress (0x84) for vcpuN, then success without a device."""
    return [ost(vcpu, 3, 0x84, at), ost(None, 3, 0, at + 0.05)]


def read(events: list[Event]) -> list[Observed]:
    return EventReader().read_all(events)


def verdict(
    obs: Observations,
    seen: Optional[GuestSeen],
    count: int,
    enabled: str = "",
    at: float = 0.0,
) -> judge.Verdict:
    ids = frozenset(int(c) for c in enabled.split(",") if c)
    return judge.judge(
        obs.snapshot(),
        seen,
        LibvirtSeen(count, ids),
        now=T0 + at,
        wall=WALL + at,
        source="watch",
    )


# --- reading events -------------------------------------------------------------------------


def test_reader_names_the_vcpu_of_each_report() -> None:
    events = [
        ost(1, 1, 0, 0.0),
        *unplug(1, 5.0),
        deleted("/machine/peripheral/vcpu1/lapic", 5.1),  # a child: never the vCPU
        deleted("/machine/peripheral/vcpu2", 6.0),  # exactly the vCPU's path
        deleted("/machine/peripheral/vcpu3", 6.5, device="vcpu3"),
        DeviceRemovalEvent(REF, alias="vcpu2", at=WALL + 7, mono=T0 + 7),
        DeviceRemovalEvent(REF, alias="vcpu2", failed=True, at=WALL + 8, mono=T0 + 8),
        DeviceRemovalEvent(REF, alias="net0", at=WALL + 9, mono=T0 + 9),
    ]
    assert [(o.kind, o.vcpu, round(o.at - T0, 3)) for o in read(events)] == [
        (PLUG, 1, 0.0),
        (EJECT, 1, 5.05),
        (DELETED, 2, 6.0),
        (DELETED, 3, 6.5),
        (REMOVED, 2, 7.0),
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/machine/peripheral/vcpu1/lapic",
        "/machine/peripheral/vcpu01",
        "/machine/peripheral/vcpu",
        "/machine/peripheral/vcpu1x",
        "/machine/peripheral-anon/vcpu1",
        "/machine/peripheral/vcpu99999999",
    ],
)
def test_no_vcpu_from_sub_paths_or_odd_names(path: str) -> None:
    assert deleted_vcpu(path) is None


# --- stack 1: libvirt 9.0 + QEMU 7.2 ---------------------------------------------------------


def test_stack1_unplug_timeout_leaves_a_stale_vcpu() -> None:
    # setvcpus 2 -> 1: the guest ejects vcpu1, libvirt times out after 5 s and keeps it.
    obs = Observations()
    obs.add([request(1, 0.0, VIR_ERR_OPERATION_TIMEOUT)])
    obs.add(read([*unplug(1, 0.2), deleted("/machine/peripheral/vcpu1/lapic", 0.3)]))
    v = verdict(obs, guest("0", at=5.1), 2, "0,1", at=5.1)
    assert v.fates == {1: FATE_STALE}
    assert [(e.kind, e.vcpu, e.source) for e in v.entries] == [
        (HISTORY_UNPLUG_TIMEOUT, 1, "watch"),
        (HISTORY_EJECTED, 1, "ost"),
    ]
    assert judge.repeat_unplug(obs.events[:1], obs.events, guest("0"), 1)


def test_stack1_a_refused_repeat_stays_stale() -> None:
    obs = Observations()
    obs.add([request(1, 0.0, VIR_ERR_OPERATION_TIMEOUT), *read(unplug(1, 0.2))])
    obs.add([request(1, 5.2, 1)])  # VIR_ERR_INTERNAL_ERROR: "the cause is unknown"
    assert verdict(obs, guest("0"), 2, "0,1", at=6.0).fates == {1: FATE_UNPLUG_REQUESTED}


def test_stack1_the_refused_repeat_is_this_hosts_observed_refusal() -> None:
    obs = Observations()
    obs.add([request(1, 0.0, VIR_ERR_OPERATION_TIMEOUT), *read(unplug(1, 0.2))])
    assert verdict(obs, guest("0"), 2, "0,1", at=5.1).repeat_refused is None
    obs.add([request(1, 5.2, 1)])
    assert verdict(obs, guest("0"), 2, "0,1", at=6.0).repeat_refused == WALL + 5.2


@pytest.mark.parametrize(
    "requests",
    [
        [request(1, 0.0, VIR_ERR_OPERATION_TIMEOUT)],  # a first request, failed
        [request(2, 0.0, VIR_ERR_OPERATION_TIMEOUT), request(2, 5.1)],  # repeat accepted
        # A repeat that removed vcpu2 and gave up on vcpu1, never asked before: no refusal.
        [request(2, 0.0, VIR_ERR_OPERATION_TIMEOUT), request(2, 5.1), request(1, 5.1, 1)],
    ],
)
def test_no_refused_repeat_where_none_was_refused(requests: list[Observed]) -> None:
    assert judge.repeat_refused(requests) is None


def test_a_refusal_already_recorded_is_not_reported_again() -> None:
    events = [request(1, 0.0, VIR_ERR_OPERATION_TIMEOUT), request(1, 5.2, 1)]
    assert judge.repeat_refused(events, start=2) is None
    assert judge.repeat_refused([*events, request(1, 9.0, 1)], start=2) == WALL + 9.0


# --- stack 2: libvirt 11.3 + QEMU 10.0 -------------------------------------------------------


def test_stack2_the_repeated_unplug_is_accepted_and_corrects_the_count() -> None:
    obs = Observations()
    obs.add([request(2, 0.0, VIR_ERR_OPERATION_TIMEOUT), *read(unplug(2, 0.3))])
    assert verdict(obs, guest("0,1"), 3, "0,1,2", at=5.1).fates == {2: FATE_STALE}
    obs.add([request(2, 5.1)])  # accepted, libvirt counts 2
    v = verdict(obs, guest("0,1"), 2, "0,1", at=5.2)
    assert v.fates == {2: FATE_REMOVED}
    assert not v.rejected and not v.late


# --- stack 3: libvirt 12.8 + QEMU 11.1 -------------------------------------------------------


def test_stack3_async_unplug_repeat_removed_then_late_events_at_the_replug() -> None:
    obs = Observations()
    # virsh setvcpus DOM 1 --live --async: fired, the guest ejects, libvirt keeps counting.
    obs.add([request(1, 0.0), *read(unplug(1, 0.1))])
    assert verdict(obs, guest("0"), 2, "0,1", at=1.0).fates == {1: FATE_STALE}
    # The repeated request corrects the count; then libvirt's vcpu-removed.
    obs.add([request(1, 2.0), observed(REMOVED, 1, 2.1)])
    assert verdict(obs, guest("0"), 1, "0", at=2.2).fates == {1: FATE_REMOVED}
    # Plug the slot again: QEMU sends the old vcpu1's DEVICE_DELETED only now, and libvirt a
    # second vcpu-removed, for a vCPU that has just been plugged and is present.
    obs.add(read([ost(1, 1, 0, 10.0), deleted("/machine/peripheral/vcpu1", 10.02, "vcpu1")]))
    obs.add([observed(REMOVED, 1, 10.03)])
    obs.hinted({1}, T0 + 10.0)
    v = verdict(obs, guest("0,1", "0"), 2, "0,1", at=10.3)
    assert v.late == {1}
    assert v.fates == {1: FATE_LISTED} and v.listed == {1} and not v.rejected
    assert [(e.kind, e.vcpu) for e in v.entries if e.time >= WALL + 10] == [(HISTORY_PLUGGED, 1)]


def test_stack3_late_device_deleted_is_not_recorded_as_an_eject() -> None:
    obs = Observations()
    obs.add(read([*unplug(1, 0.1), ost(1, 1, 0, 10.0)]))
    obs.recorded_upto = len(obs.events)  # written by an earlier job
    obs.add(read([deleted("/machine/peripheral/vcpu1", 10.02, "vcpu1")]))
    v = verdict(obs, guest("0,1"), 2, "0,1", at=10.5)
    assert v.entries == () and v.late == {1} and v.fates == {1: FATE_PLUGGED}


def test_stack3_grow_after_an_unplug_the_late_removal_comes_before_the_plug() -> None:
    # Issue 21 case 5, as setvcpus 1 -> 2 sees it after an earlier unplug of vcpu1 (repeat
    # accepted): QEMU's DEVICE_DELETED for the old vcpu1 comes 4-8 ms into the grow, before
    # the new vcpu1's OST report (23-60 ms), and libvirt's second vcpu-removed with it.
    obs = Observations(present=frozenset({0}))
    obs.add([observed(PLUG_REQUEST, 1, 0.0)])
    obs.add(read([deleted("/machine/peripheral/vcpu1", 0.005, "vcpu1")]))
    obs.add([observed(REMOVED, 1, 0.006), *read([ost(1, 1, 0, 0.04)])])
    obs.hinted({1}, T0 + 0.04)
    v = verdict(obs, guest("0,1", "0"), 2, "0,1", at=0.3)
    assert v.late == {1} and v.listed == {1} and not v.rejected
    assert v.fates == {1: FATE_LISTED}
    assert [(e.kind, e.vcpu) for e in v.entries] == [(HISTORY_PLUGGED, 1)]
    assert [(o.kind, round(o.at - T0, 3)) for o in judge.late_removals(obs.events)] == [
        (DELETED, 0.005),
        (REMOVED, 0.006),
    ]


def test_stack3_under_watch_the_removals_at_the_replug_are_the_old_vcpus() -> None:
    # What watch sees of the same (it sees no request): the unplug's eject and libvirt's
    # vcpu-removed after the repeat; at the re-plug, QEMU's DEVICE_DELETED and a second
    # vcpu-removed before the new OST report. Only the first removal ends vcpu1's unplug.
    obs = Observations()
    obs.add([*read(unplug(1, 0.1)), observed(REMOVED, 1, 5.2)])
    obs.add(read([deleted("/machine/peripheral/vcpu1", 10.005, "vcpu1")]))
    obs.add([observed(REMOVED, 1, 10.006), *read([ost(1, 1, 0, 10.04)])])
    obs.hinted({1}, T0 + 10.04)
    v = verdict(obs, guest("0,1", "0"), 2, "0,1", at=10.3)
    assert v.late == {1} and v.fates == {1: FATE_LISTED} and not v.rejected
    assert [(e.kind, e.vcpu, e.source) for e in v.entries] == [
        (HISTORY_EJECTED, 1, "ost"),
        (HISTORY_PLUGGED, 1, "ost"),
    ]


def test_a_kvm_removal_after_the_eject_is_the_vcpus_own() -> None:
    # Where QEMU finalizes the vCPU at once (KVM): eject, then DEVICE_DELETED, then libvirt's
    # device removal: the vCPU is removed; the removal is recorded once.
    obs = Observations()
    obs.add([request(1, 0.0), *read([*unplug(1, 0.1), deleted("/machine/peripheral/vcpu1", 0.2)])])
    obs.add([observed(REMOVED, 1, 0.21)])
    v = verdict(obs, guest("0"), 1, "0", at=0.5)
    assert v.fates == {1: FATE_REMOVED}
    assert [(e.kind, e.source) for e in v.entries] == [
        (HISTORY_EJECTED, "ost"),
        (HISTORY_EJECTED, "device-deleted"),
    ]


# --- guests that reject hot-adds --------------------------------------------------------------


def pending(baseline: Optional[str], *vcpus: int) -> Observations:
    obs = Observations(present=frozenset(int(c) for c in baseline.split(",")) if baseline else None)
    obs.add(read([ost(v, 1, 0, 0.0) for v in vcpus]))
    obs.hinted(vcpus, T0)
    return obs


def test_linux_7_2_rejects_the_hot_add_after_the_wait() -> None:
    obs = pending("0", 1)
    v = verdict(obs, guest("0"), 2, "0,1", at=0.05)
    assert v.look_again is not None and not v.rejected and not v.decided
    v = verdict(obs, guest("0"), 2, "0,1", at=HOTADD_WAIT)
    assert v.rejected == {1} and v.fates == {1: FATE_REJECTED} and v.decided
    assert (HISTORY_REJECTED, 1, "watch") in [(e.kind, e.vcpu, e.source) for e in v.entries]


def test_no_agent_answer_decides_nothing() -> None:
    obs = pending("0", 1)
    v = verdict(obs, None, 2, "0,1", at=60.0)
    assert v.undecided == {1} and not v.rejected and not v.decided
    assert FATE_REJECTED not in v.fates.values()
    assert all(e.kind != HISTORY_REJECTED for e in v.entries)


def test_looks_are_bounded_then_decided() -> None:
    obs, at, looks = pending("0", 1), 0.0, 0
    while True:
        v = verdict(obs, guest("0"), 2, at=at)
        looks += 1
        obs.settle(v, guest("0"), recorded=True)
        if v.look_again is None:
            break
        at += v.look_again
    assert looks == 5 and at == pytest.approx(HOTADD_WAIT) and v.rejected == {1}
    assert obs.pending is None
    # A retry carrying the same hint is not news.
    obs.hinted({1}, T0)
    assert obs.pending is None


def test_replugged_slot_unplugged_within_3s_after_we_onlined_it_is_not_rejected() -> None:
    # The baseline is from before the previous unplug (cpu1 listed then): the guest lists
    # cpu1 again, this tool onlines it, and 2 s later the slot is unplugged (sync, TCG: libvirt
    # keeps counting it). The look at 3 s sees one CPU for libvirt's two.
    obs = pending("0,1", 1)
    obs.wrote_online(frozenset({1}), T0 + 0.4)
    obs.add([request(1, 2.0, VIR_ERR_OPERATION_TIMEOUT), *read(unplug(1, 2.1))])
    v = verdict(obs, guest("0"), 2, "0,1", at=HOTADD_WAIT)
    assert not v.rejected and v.listed == {1} and v.credited == frozenset()
    assert v.fates[1] != FATE_REJECTED
    assert all(e.kind != HISTORY_REJECTED for e in v.entries)


def test_case2_watch_onlined_a_replugged_cpu_then_virsh_unplugged_it_within_3s() -> None:
    # Issue 21 case 2 (stack 3, busybox guest): watch last saw cpu0-1 (before the slot's
    # earlier unplug), QEMU re-plugs vcpu1, watch onlines cpu1 at 0.4 s, then `virsh
    # setvcpus DOM 1` (not seen as a request: only the guest's eject) at 2 s; libvirt keeps
    # counting vcpu1 (TCG). The look at 3 s sees one CPU for libvirt's two.
    obs = pending("0,1", 1)
    v = verdict(obs, guest("0,1", "0"), 2, "0,1", at=0.05)
    obs.settle(v, guest("0,1", "0"), recorded=True)
    assert v.listed == {1} and v.decided and not v.rejected
    obs.wrote_online(frozenset({1}), T0 + 0.4)
    obs.add(read(unplug(1, 2.0)))
    v = verdict(obs, guest("0"), 2, "0,1", at=HOTADD_WAIT)
    assert not v.rejected and v.fates == {1: FATE_STALE}
    assert HISTORY_REJECTED not in [e.kind for e in v.entries]
    # The same when the agent answered only at 3 s (the first looks saw nothing).
    late_agent = pending("0,1", 1)
    late_agent.wrote_online(frozenset({1}), T0 + 0.4)
    late_agent.add(read(unplug(1, 2.0)))
    v = verdict(late_agent, guest("0"), 2, "0,1", at=HOTADD_WAIT)
    assert not v.rejected and v.fates[1] != FATE_REJECTED


def test_an_eject_before_the_guest_listed_is_not_a_rejection() -> None:
    obs = pending("0", 1)
    obs.add(read(unplug(1, 1.0)))
    v = verdict(obs, guest("0"), 2, "0,1", at=HOTADD_WAIT)
    assert not v.rejected and v.decided and v.fates[1] == FATE_STALE


def test_out_of_order_hot_add_names_the_guest_cpu_and_credits_the_guest() -> None:
    # virsh setvcpu DOM 3 --enable --live: OST says vcpu3; the guest's udev rule brings the
    # new CPU up as cpu1.
    obs = pending("0", 3)
    v = verdict(obs, guest("0,1"), 2, "0,3", at=0.4)
    assert v.listed == {1} and v.credited == {1} and v.fates == {3: FATE_CREDITED}


def test_our_own_write_is_never_the_guests_credit() -> None:
    obs = pending("0", 1)
    obs.wrote_online(frozenset({1}), T0 + 0.2)
    v = verdict(obs, guest("0,1"), 2, at=0.3)
    assert v.listed == {1} and v.credited == frozenset() and v.fates == {1: FATE_LISTED}


def test_unknown_baseline_counts_against_libvirt() -> None:
    obs = pending(None, 2)
    assert verdict(obs, guest("0,1,2"), 3, at=0.2).listed == {2}
    v = verdict(obs, guest("0,1"), 3, at=HOTADD_WAIT)
    assert v.rejected == {2}


def test_a_flood_voids_what_the_domain_sent() -> None:
    obs = pending("0", 1)
    obs.distrust(T0 + 0.5)
    v = verdict(obs, guest("0"), 2, at=HOTADD_WAIT + 1)
    assert not v.rejected and v.entries == () and v.fates == {}
    obs.hinted({1}, T0)  # the retry of the job the forged OST started
    assert obs.pending is None


# --- the repeated unplug ----------------------------------------------------------------------


def test_repeat_is_chosen_by_error_code_and_eject_never_by_text() -> None:
    ejected = read(unplug(1, 0.2))
    timed_out = [request(1, 0.0, VIR_ERR_OPERATION_TIMEOUT)]
    assert judge.repeat_unplug(timed_out, ejected, None, 1)  # the guest's OST says ejected
    assert judge.repeat_unplug(timed_out, [], guest("0"), 1)  # the guest lists no more
    assert not judge.repeat_unplug(timed_out, [], guest("0,1"), 1)  # not ejected: no repeat
    assert not judge.repeat_unplug(timed_out, [], None, 1)  # nothing observed: no repeat
    failed = [request(1, 0.0, VIR_ERR_OPERATION_FAILED)]
    assert judge.repeat_unplug(failed, ejected, None, 1)  # another code, but the guest ejected
    assert not judge.repeat_unplug(failed, [], guest("0"), 1)
    assert not judge.repeat_unplug([request(1, 0.0)], ejected, guest("0"), 1)  # accepted


def test_settle_holds_findings_for_the_window_only() -> None:
    since, left = judge.settling_left({}, ["guest-missing-vcpus"], 10.0)
    assert since == {"guest-missing-vcpus": 10.0} and left == pytest.approx(judge.SETTLE_WINDOW)
    since, left = judge.settling_left(since, ["guest-missing-vcpus"], 11.0)
    assert left == pytest.approx(judge.SETTLE_WINDOW - 1.0)
    assert judge.settling_left(since, ["guest-missing-vcpus"], 14.0)[1] is None
    assert judge.settling_left(since, [], 11.0) == ({}, None)


def test_look_delays_are_bounded() -> None:
    times, waited = [0.0], 0.0
    for looks in range(1, judge.HOTADD_RETRIES + 1):
        waited += judge.hotadd_look_delay(looks, waited, 0.1)
        times.append(round(waited, 3))
    assert times == [0.0, 0.1, 0.3, 0.9, HOTADD_WAIT]


def test_a_partly_taken_grow_rejects_the_highest_after_the_wait() -> None:
    obs = pending("0", 1, 2)
    assert not verdict(obs, guest("0,1"), 3, at=0.5).rejected  # still in time
    v = verdict(obs, guest("0,1"), 3, at=HOTADD_WAIT)
    assert v.listed == {1} and v.rejected == {2}
