"""Flood control: the per-domain counter, threshold and back-off (daemon/flood.py), the
listener in front of it, and the daemon's main loop under a simulated 10,000 OST/s flood."""

from __future__ import annotations

import threading
import time
import tracemalloc
from typing import Any, Optional

import pytest

from virthotplug.core.config import WatchSettings
from virthotplug.core.events import DomainRef, Event, OstMonitorEvent
from virthotplug.core.schedule import Job
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.flood import (
    BURST_EVENTS,
    BURST_SECONDS,
    FLOOD_THRESHOLD,
    PASS_PER_WINDOW,
    FloodEvent,
    FloodGuard,
    SuppressedEvent,
    Verdict,
    flood_finding,
    summary_event,
)
from virthotplug.daemon.listener import Listener
from virthotplug.daemon.watch import Watch, _Listed
from virthotplug.host.connection import Connection, Domain

HOST = "qemu:///system"
A, B = (HOST, "uuid-a"), (HOST, "uuid-b")
HOTADD = '{"info": {"source": 1, "status": 0, "device": "vcpu1", "slot": "1", "slot-type": "CPU"}}'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _guard(**kwargs: Any) -> tuple[FloodGuard, Clock]:
    clock = Clock()
    return FloodGuard(clock, **kwargs), clock


def _admit(guard: FloodGuard, key: tuple[str, str] = A, n: int = 1, kind: str = "ost") -> list:
    return [guard.admit(key, lambda: "dom-a", kind, monitor=kind != "agent") for _ in range(n)]


# --- the state machine --------------------------------------------------------------------


def test_a_few_events_per_window_pass_the_rest_are_summarised_once() -> None:
    guard, clock = _guard()
    verdicts = _admit(guard, n=50)
    assert verdicts.count(Verdict.PASS) == PASS_PER_WINDOW
    assert verdicts.count(Verdict.DROP) == 50 - PASS_PER_WINDOW
    assert guard.collect() == ([], [], [])  # the window is not over yet
    clock.now += 1.0
    summaries, resubscribe, resync = guard.collect()
    (summary,) = summaries
    assert summary.ref == DomainRef(HOST, "uuid-a", "dom-a")
    assert summary.dropped == {"ost": 50 - PASS_PER_WINDOW} and not summary.suppressed
    assert resubscribe == resync == []
    assert _admit(guard, n=1) == [Verdict.PASS]  # a new window, a new budget


def test_domains_have_budgets_of_their_own() -> None:
    guard, _clock = _guard()
    _admit(guard, A, n=100)
    assert _admit(guard, B, n=1) == [Verdict.PASS]


def test_agent_events_share_the_budget_but_never_count_as_a_flood() -> None:
    guard, _clock = _guard(threshold=10)
    verdicts = _admit(guard, n=100, kind="agent")
    assert Verdict.FLOOD not in verdicts
    assert not guard.is_suppressed(A)


def test_a_flood_is_detected_once_then_everything_is_dropped() -> None:
    guard, clock = _guard()
    clock_step = 0.5 / (FLOOD_THRESHOLD + 1)  # the threshold is crossed within half a second
    verdicts = []
    for _ in range(FLOOD_THRESHOLD + 100):
        clock.now += clock_step
        verdicts += _admit(guard)
    assert verdicts.count(Verdict.FLOOD) == 1
    assert verdicts.index(Verdict.FLOOD) == FLOOD_THRESHOLD  # the event that passed it
    assert verdicts[FLOOD_THRESHOLD + 1 :] == [Verdict.DROP] * 99
    info = guard.suppressed(A)
    assert info is not None and info.events == FLOOD_THRESHOLD + 1
    assert 1.8 * FLOOD_THRESHOLD < info.rate < 2.2 * FLOOD_THRESHOLD  # threshold + 1 in ~0.5 s
    finding = flood_finding(info)
    assert (finding.code, finding.severity) == ("ost-flood", "warning")
    assert "/s" in finding.message


def test_suppressed_domains_are_reconciled_periodically_and_probed_when_quiet() -> None:
    guard, clock = _guard(threshold=10, backoff_first=30.0, resync=10.0, probe_interval=1.0)
    _admit(guard, n=11)
    assert guard.is_suppressed(A)
    resyncs = 0
    for _ in range(29):  # a backlog keeps arriving for 29 s: not quiet
        clock.now += 1.0
        _admit(guard, n=3)
        _summaries, probe, resync = guard.collect()
        assert probe == []
        resyncs += len(resync)
    assert resyncs == 2  # every 10 s
    clock.now += 29.0
    assert guard.collect()[1] == []
    clock.now += 1.0  # 30 s without an event: probe (its vCPU times), not yet listened to
    _summaries, probe, _resync = guard.collect()
    assert [ref.uuid for ref in probe] == ["uuid-a"]
    assert guard.is_suppressed(A)
    clock.now += 0.5
    assert guard.collect()[1] == []  # one probe per probe_interval
    clock.now += 0.5
    assert [ref.uuid for ref in guard.collect()[1]] == ["uuid-a"]
    ref = guard.resubscribe(A)  # the probe found its vCPUs idle
    assert ref is not None and ref.name == "dom-a"
    assert not guard.is_suppressed(A)
    assert guard.resubscribe(A) is None  # only once


def test_a_busy_domain_is_probed_again_later_and_logged_once() -> None:
    guard, clock = _guard(threshold=10, backoff_first=30.0, probe_retry=10.0)
    _admit(guard, n=11)
    clock.now += 30.0
    assert guard.collect()[1]
    assert guard.still_busy(A) is True  # worth one log line
    for _ in range(9):
        clock.now += 1.0
        assert guard.collect()[1] == []
    clock.now += 1.0
    assert guard.collect()[1]
    assert guard.still_busy(A) is False  # already said
    assert guard.is_suppressed(A)


def test_events_during_a_probe_keep_the_domain_suppressed() -> None:
    guard, clock = _guard(threshold=10, backoff_first=30.0)
    _admit(guard, n=11)
    clock.now += 30.0
    assert guard.collect()[1]
    _admit(guard, n=1)  # a late backlog event: not quiet after all
    assert guard.resubscribe(A) is None and guard.is_suppressed(A)


def test_the_back_off_doubles_with_each_flood_and_is_capped() -> None:
    guard, clock = _guard(
        threshold=10, probation_threshold=10, backoff_first=30.0, backoff_max=100.0
    )
    backoffs = []
    for _ in range(4):
        clock.now += 1.0
        assert Verdict.FLOOD in _admit(guard, n=11)  # suppressed again at once
        info = guard.suppressed(A)
        assert info is not None
        backoffs.append(info.backoff)
        clock.now += info.backoff
        assert guard.collect()[1]  # probed
        assert guard.resubscribe(A) is not None  # idle: listened to again
    assert backoffs == [30.0, 60.0, 100.0, 100.0]
    clock.now += 100.0  # behaved for backoff_max: the history goes
    clock.now += 1.0
    guard.collect()
    assert len(guard) == 0
    _admit(guard, n=11)
    info = guard.suppressed(A)
    assert info is not None and info.backoff == 30.0


def test_a_domain_that_flooded_is_on_probation_when_resubscribed() -> None:
    guard, clock = _guard(threshold=100, probation_threshold=10, backoff_first=30.0)
    assert Verdict.FLOOD in _admit(guard, n=101)
    clock.now += 31.0
    assert guard.collect()[1]  # quiet for its back-off: probed
    assert guard.resubscribe(A) is not None  # and idle: listened to again
    clock.now += 1.0
    verdicts = _admit(guard, n=11)  # the flood never stopped: cut off at the 11th event
    assert verdicts.index(Verdict.FLOOD) == 10
    assert Verdict.FLOOD not in _admit(guard, B, n=100)  # a domain that never flooded


def _emitted(guard: FloodGuard, times: list[float]) -> list[Verdict]:
    """Monitor events QEMU emitted at ``times`` (its timestamps), all read at once."""
    return [guard.admit(A, lambda: "dom-a", "ost", monitor=True, emitted=t) for t in times]


def test_a_burst_by_qemus_clock_is_a_flood_however_slowly_it_is_read() -> None:
    guard, clock = _guard()
    start = 1_700_000_000.0
    verdicts = []
    for i in range(BURST_EVENTS + 10):  # 10 us apart at QEMU, read one per 10 ms here
        clock.now += 0.01
        verdicts += _emitted(guard, [start + i * 1e-5])
    assert verdicts.index(Verdict.FLOOD) == BURST_EVENTS  # the event that passed it
    info = guard.suppressed(A)
    assert info is not None and info.events == BURST_EVENTS + 1
    assert 50_000 < info.rate < 200_000  # QEMU's rate (~100,000/s), not the read rate
    assert "ms (~" in info.describe()


def test_real_vcpu_changes_are_no_burst() -> None:
    # An unplug of 100 vCPUs on a fast host: DEVICE_DELETED and two OSTs microseconds
    # apart, one vCPU every 5 ms; then a hot-add of 100, one OST every 5 ms.
    guard, _clock = _guard(threshold=10**6)
    start = 1_700_000_000.0
    unplug = [start + cpu * 0.005 + k * 1e-6 for cpu in range(100) for k in range(3)]
    hotadd = [start + 1.0 + cpu * 0.005 for cpu in range(100)]
    assert Verdict.FLOOD not in _emitted(guard, unplug + hotadd)


def test_a_paced_flood_below_the_burst_rate_is_caught_by_the_window() -> None:
    guard, clock = _guard()
    start = 1_700_000_000.0
    step = 2 * BURST_SECONDS / BURST_EVENTS  # half the burst rate
    verdicts = []
    for i in range(FLOOD_THRESHOLD + 1):
        clock.now += step
        verdicts += _emitted(guard, [start + i * step])
    assert verdicts.index(Verdict.FLOOD) == FLOOD_THRESHOLD


def test_a_step_of_the_hosts_clock_starts_a_new_burst() -> None:
    guard, _clock = _guard()
    start = 1_700_000_000.0
    times = [start + i * 1e-5 for i in range(BURST_EVENTS // 2)]
    times += [start - 3600 + i * 1e-5 for i in range(BURST_EVENTS // 2 + 1)]  # stepped back
    assert Verdict.FLOOD not in _emitted(guard, times)


def test_memory_follows_the_active_domains() -> None:
    guard, clock = _guard()
    for i in range(1000):
        _admit(guard, (HOST, f"uuid-{i}"))
    assert len(guard) == 1000
    clock.now += 1.0
    guard.collect()
    assert len(guard) == 0


def test_a_stopped_domain_keeps_its_flood_history() -> None:
    guard, _clock = _guard(threshold=10)
    _admit(guard, n=11)
    guard.forget(A)
    assert guard.is_suppressed(A)
    guard.forget(B)  # unknown: nothing happens


def test_records_describe_themselves() -> None:
    guard, clock = _guard(threshold=10)
    _admit(guard, n=20)
    info = guard.suppressed(A)
    ref = DomainRef(HOST, "uuid-a", "dom-a")
    flood = FloodEvent(ref, info=info)
    assert flood.kind == "flood" and flood.details()["events"] == 11
    clock.now += 1.0
    (summary,) = guard.collect()[0]
    ev = summary_event(summary)
    assert isinstance(ev, SuppressedEvent) and ev.kind == "suppressed"
    # 5 passed, 5 over the budget, the 11th is the flood, 9 more after it
    assert ev.details() == {"dropped": {"ost": 14}, "seconds": 1.0, "monitor_suppressed": True}
    assert "14 ost" in ev.describe()
    assert ev.intent == "report"  # its periodic reconcile covers a suppressed domain


# --- the listener ---------------------------------------------------------------------------


class FakeDomain:
    def __init__(self, uuid: str, name: str) -> None:
        self._uuid, self._name = uuid, name

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid


def test_the_listener_hands_a_flooding_domain_over_once() -> None:
    got: list[Event] = []
    flooded: list[DomainRef] = []
    listener = Listener(HOST, got.append, lambda: None, guard=FloodGuard(), on_flood=flooded.append)
    dom = FakeDomain("uuid-a", "dom-a")
    for _ in range(5000):
        listener.on_monitor(dom, "ACPI_DEVICE_OST", HOTADD)
    assert [ref.name for ref in flooded] == ["dom-a"]
    osts = [e for e in got if isinstance(e, OstMonitorEvent)]
    floods = [e for e in got if isinstance(e, FloodEvent)]
    assert len(osts) == PASS_PER_WINDOW and len(floods) == 1
    assert floods[0].info is not None and floods[0].info.events == FLOOD_THRESHOLD + 1


def test_the_listener_passes_qemus_timestamp_to_the_guard() -> None:
    flooded: list[DomainRef] = []
    listener = Listener(
        HOST, lambda _e: None, lambda: None, guard=FloodGuard(), on_flood=flooded.append
    )
    dom = FakeDomain("uuid-a", "dom-a")
    for i in range(BURST_EVENTS + 1):
        listener.on_monitor(dom, "ACPI_DEVICE_OST", HOTADD, 1_700_000_000.0 + i * 1e-5)
    assert [ref.name for ref in flooded] == ["dom-a"]


def test_lifecycle_events_are_never_dropped() -> None:
    got: list[Event] = []
    listener = Listener(HOST, got.append, lambda: None, guard=FloodGuard())
    dom = FakeDomain("uuid-a", "dom-a")
    for _ in range(100):
        listener.on_lifecycle(dom, 2, 0)
    assert len(got) == 100


# --- the daemon under a flood -------------------------------------------------------------


class _Flood:
    """A libvirt event thread delivering ``rate`` OST events/s of one domain."""

    def __init__(self, listener: Listener, rate: int, seconds: float) -> None:
        self._listener, self._rate, self._seconds = listener, rate, seconds
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        dom = FakeDomain("uuid-flood", "flood")
        start = time.monotonic()
        while time.monotonic() - start < self._seconds:
            due = int((time.monotonic() - start) * self._rate)
            while self.sent < due:
                self._listener.on_monitor(dom, "ACPI_DEVICE_OST", HOTADD)
                self.sent += 1
            time.sleep(0.002)


@pytest.mark.parametrize("threshold", [FLOOD_THRESHOLD, 10**9], ids=["suppressed", "budget"])
def test_a_flooding_domain_delays_another_domains_hotadd_by_less_than_100ms(
    threshold: int,
) -> None:
    settings = WatchSettings(workers=2, resync_interval=3600, hotadd_settle=0.1)
    watch = Watch([], settings, _never, EventLog(None))
    started: dict[str, list[float]] = {}

    def reconcile(job: Job) -> Optional[float]:
        started.setdefault(job.ref.name, []).append(time.monotonic())
        return None

    watch._worker._reconcile = reconcile  # type: ignore[method-assign]
    watch._flood = FloodGuard(threshold=threshold)
    listener = Listener(HOST, watch._queue.put, lambda: None, guard=watch._flood)
    loop = threading.Thread(target=watch.run, daemon=True)
    tracemalloc.start()
    try:
        loop.start()
        # The same hot-add without a flood: the delay the daemon adds on purpose (settling).
        calm_sent = time.monotonic()
        listener.on_monitor(FakeDomain("uuid-calm", "calm"), "ACPI_DEVICE_OST", HOTADD)
        _wait_started(started, "calm", calm_sent + 2.0)
        flood = _Flood(listener, rate=10_000, seconds=3.0)
        flood.thread.start()
        time.sleep(1.5)
        before = tracemalloc.get_traced_memory()[0]
        sent = time.monotonic()
        listener.on_monitor(FakeDomain("uuid-other", "other"), "ACPI_DEVICE_OST", HOTADD)
        _wait_started(started, "other", sent + 2.0)
        queue_len = watch._queue.qsize()
        flood.thread.join()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        watch.request_stop()
        loop.join(5)
    assert flood.sent > 20_000  # the flood really ran (10,000/s for 3 s)
    assert "calm" in started and "other" in started, "a hot-add was never dispatched"
    baseline = started["calm"][0] - calm_sent
    delay = started["other"][0] - sent - baseline
    assert delay < 0.1, f"hot-add job delayed by {delay * 1000:.0f} ms more than without a flood"
    assert queue_len < 100  # the flood does not pile up in the daemon
    assert grown < 2 * 1024 * 1024, f"memory grew by {grown} bytes during the flood"
    assert len(watch._sched) <= 3


def _wait_started(started: dict[str, list[float]], name: str, deadline: float) -> None:
    while name not in started and time.monotonic() < deadline:
        time.sleep(0.005)


def _never(_conn: Connection, _dom: Domain, _job: Job) -> Any:
    raise AssertionError("not reached")


# --- registrations follow the domains' lives --------------------------------------------


class _Monitors:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def add(self, uuid: str) -> None:
        self.calls.append(("add", uuid))

    def drop(self, uuid: str) -> None:
        self.calls.append(("drop", uuid))

    def sync(self, uuids: Any) -> None:
        self.calls.append(("sync", sorted(uuids)))

    def probe(self, uuid: str) -> None:
        self.calls.append(("probe", uuid))


class _Session:
    def __init__(self) -> None:
        self.monitors = _Monitors()
        self.conn = None

    def mark_lost(self) -> None:
        pass


def test_monitor_registrations_follow_lifecycle_resyncs_and_floods() -> None:
    from virthotplug.core.events import HostEvent, LifecycleEvent

    watch = Watch([], WatchSettings(workers=1, resync_interval=3600), _never, EventLog(None))
    session = _Session()
    watch.sessions[HOST] = session  # type: ignore[assignment]
    ref = DomainRef(HOST, "uuid-a", "dom-a")
    watch._event(HostEvent(None, host=HOST, what="listed", domains=(ref,)))
    watch._event(LifecycleEvent(ref, event=2, detail=0))  # started
    watch._event(LifecycleEvent(ref, event=3, detail=0))  # suspended: nothing
    watch._event(LifecycleEvent(ref, event=4, detail=0))  # resumed
    watch._event(LifecycleEvent(ref, event=5, detail=1))  # stopped (destroyed)
    watch._event(LifecycleEvent(ref, event=1, detail=0))  # undefined: it was not running
    watch._event(LifecycleEvent(ref, event=2, detail=0))  # started (transient)
    watch._event(LifecycleEvent(ref, event=1, detail=0))  # undefined while it runs: kept
    assert session.monitors.calls == [
        ("sync", ["uuid-a"]),
        ("add", "uuid-a"),
        ("add", "uuid-a"),
        ("drop", "uuid-a"),
        ("add", "uuid-a"),
    ]


def test_a_quiet_domain_is_listened_to_again_and_suppressed_ones_are_reconciled() -> None:
    watch = Watch([], WatchSettings(workers=1, resync_interval=3600), _never, EventLog(None))
    session = _Session()
    watch.sessions[HOST] = session  # type: ignore[assignment]
    guard, clock = _guard(threshold=10, backoff_first=30.0, resync=10.0)
    watch._flood = guard
    assert Verdict.FLOOD in _admit(guard, n=11)
    clock.now += 10.0
    watch._flood_collect()  # the periodic reconcile of a suppressed domain
    assert [job.reasons for job in watch._sched.pop_due(10**9, 8)] == [["flood"]]
    clock.now += 20.0
    watch._flood_collect()
    assert session.monitors.calls == [("probe", "uuid-a")]


def _flooded_watch() -> tuple[Watch, _Session, FloodGuard, Clock]:
    watch = Watch([], WatchSettings(workers=1, resync_interval=3600), _never, EventLog(None))
    session = _Session()
    watch.sessions[HOST] = session  # type: ignore[assignment]
    guard, clock = _guard(threshold=10, backoff_first=30.0, resync=10.0)
    watch._flood = guard
    assert Verdict.FLOOD in _admit(guard, n=11)
    return watch, session, guard, clock


def _work_for_an_hour(watch: Watch, session: _Session, clock: Clock) -> list[Any]:
    """What the main loop does for suppressed domains in an hour: probes and reconciles."""
    done: list[Any] = []
    for _ in range(3600):
        clock.now += 1.0
        watch._flood_collect()
        for job in watch._sched.pop_due(10**9, 8):
            done.append(job.reasons)
            watch._sched.finish(job.ref.key)
    return done + session.monitors.calls


def test_a_flooded_domain_that_is_destroyed_costs_nothing_more() -> None:
    from virthotplug.core.events import LifecycleEvent

    watch, session, guard, clock = _flooded_watch()
    ref = DomainRef(HOST, "uuid-a", "dom-a")
    watch._event(LifecycleEvent(ref, event=5, detail=1))  # stopped (destroyed): transient, gone
    session.monitors.calls.clear()
    assert _work_for_an_hour(watch, session, clock) == []  # no probe, no reconcile
    assert len(guard) == 0  # and its history went after BACKOFF_MAX


def test_a_flooded_domain_gone_in_a_reconnect_gap_costs_nothing_after_the_resync() -> None:
    from virthotplug.core.events import HostEvent

    watch, session, _, clock = _flooded_watch()
    watch._event(OstMonitorEvent(DomainRef(HOST, "uuid-a", "dom-a"), error="a hint"))
    clock.now += 1.0
    listed = HostEvent(None, host=HOST, what="listed", domains=())  # no longer running
    watch._handle(_Listed(listed, since=time.monotonic(), complete=True))
    session.monitors.calls.clear()
    assert _work_for_an_hour(watch, session, clock) == []


def test_a_flooded_domain_started_again_is_probed_again() -> None:
    from virthotplug.core.events import LifecycleEvent

    watch, session, _, clock = _flooded_watch()
    ref = DomainRef(HOST, "uuid-a", "dom-a")
    watch._event(LifecycleEvent(ref, event=5, detail=1))  # stopped
    watch._event(LifecycleEvent(ref, event=2, detail=0))  # started again: still suppressed
    session.monitors.calls.clear()
    clock.now += 30.0
    watch._flood_collect()
    assert ("probe", "uuid-a") in session.monitors.calls
