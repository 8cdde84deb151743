"""The daemon's hot-add decisions, from recorded guest sequences: which guest CPU a hot-add
brought (the guest's present set after minus before, never the OST event's vCPU id), a
hot-add the guest rejected (bounded looks, one warning, recorded in the history, no spin),
and critical findings held at warning while the guest settles."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import pytest

from virthotplug.core import judge
from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.drift import find_drift
from virthotplug.core.events import DomainRef
from virthotplug.core.policy import FIELDS, EffectivePolicy, Policy
from virthotplug.core.schedule import Job
from virthotplug.core.view import (
    AGENT_CONNECTED,
    HISTORY_REJECTED,
    AgentStatus,
    CountLayer,
    GuestLayer,
    History,
    HistoryEntry,
    HypervisorLayer,
    VcpuView,
)
from virthotplug.daemon import jobs
from virthotplug.ops import reconcile

REF = DomainRef("qemu:///system", "6b0e4c1a-0000-4000-8000-000000000001", "deb13")
VOUCHER = "5e1f" * 8  # the token of the daemon's host locks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view(
    present: str, online: str, live: int, policy: Policy, history: Optional[History] = None
) -> VcpuView:
    ids = lambda text: frozenset(int(c) for c in text.split(",") if c)  # noqa: E731
    guest = GuestLayer(ids(present), ids(online), ids(present) - {0})
    v = VcpuView(
        host=REF.host,
        name=REF.name,
        uuid=REF.uuid,
        state="running",
        persistent=True,
        agent=AgentStatus(True, AGENT_CONNECTED),
        config=CountLayer(live, 4),
        live=CountLayer(live, 4),
        hypervisor=HypervisorLayer(dict.fromkeys(range(live), "running")),
        guest=guest,
        history=history or History(),
    )
    return dataclasses.replace(v, findings=find_drift(v, policy))


class Guest:
    """Plays back a recorded sequence of what the guest agent reported, one per reconcile
    (each reconcile here reads once: nothing to write)."""

    def __init__(self, policy: Policy, *views: tuple[str, str, int]) -> None:
        self.policy = policy
        self.views = list(views)
        self.reconciles = 0
        self.history = History()  # what the domain's metadata holds

    def read_view(self, *_args: Any, **kwargs: Any) -> VcpuView:
        present, online, live = self.views[min(self.reconciles, len(self.views) - 1)]
        self.reconciles += 1
        return view(present, online, live, self.policy, self.history)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(jobs.time, "monotonic", fake)
    yield fake


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[list[HistoryEntry]]:
    writes: list[list[HistoryEntry]] = []

    def record(_dom: Any, entries: Any, *, live_count: Optional[int]) -> History:
        writes.append(list(entries))
        history = History().with_initial(live_count or 1)
        for entry in writes[-1]:
            history = history.add(entry)
        return history

    monkeypatch.setattr(reconcile.history, "record", record)
    return writes


def runner(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> jobs.JobRunner:
    monkeypatch.setattr(reconcile.collect, "read_view", guest.read_view)
    effective = lambda *_a: EffectivePolicy(guest.policy, dict.fromkeys(FIELDS, "test"))  # noqa: E731
    monkeypatch.setattr(jobs, "effective_policy", effective)
    monkeypatch.setattr(reconcile, "effective_policy", effective)
    return jobs.JobRunner(HostConfig(), WatchSettings(), voucher=VOUCHER)


class Dom:
    name = REF.name
    uuid = REF.uuid


class Conn:
    uri = REF.host


def run(r: jobs.JobRunner, clock: Clock, hotadded: frozenset[int] = frozenset(), first: float = 0):
    job = Job(REF, due=clock.now, first_request=first or clock.now, reasons=["ost"])
    job.hotadded = set(hotadded)
    return r.run(Conn(), Dom(), job)  # type: ignore[arg-type]


def test_out_of_order_hot_add_names_the_guest_cpu(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # virsh setvcpu DOM 3 --enable --live: OST says vcpu3, the guest's udev rule brings
    # the new CPU up as cpu1.
    guest = Guest(Policy(mode="online"), ("0", "0", 1), ("0,1", "0,1", 2))
    r = runner(guest, monkeypatch)
    run(r, clock)  # the resync that saw the guest before
    clock.now += 5
    done = run(r, clock, frozenset({3}))
    details = done.record.details
    assert details["hotadded"] == [1] and details["hotadd_vcpus"] == [3]
    credit = [o for o in details["outcomes"] if o["code"] == "onlined-by-guest"]
    assert credit and credit[0]["cpus"] == [1]
    assert done.hotadds_online == {3}
    assert "guest detected CPU 1 (hot-add of vcpu3)" in done.line
    assert done.retry_after is None


def test_rejected_hot_add_is_decided_once_with_at_most_five_reconciles(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, recorded: list[list[HistoryEntry]]
) -> None:
    # Debian 13 under TCG: OST device check success for vcpu1, the guest never lists it.
    guest = Guest(Policy(mode="report"), ("0", "0", 1), ("0", "0", 2))
    r = runner(guest, monkeypatch)
    run(r, clock)
    guest.reconciles = 1
    ost_at = clock.now
    reconciles, results = 0, []
    done = run(r, clock, frozenset({1}), first=ost_at)
    reconciles += 1
    results.append(done)
    while done.retry_after is not None and clock.now - ost_at < 10:
        clock.now += done.retry_after
        done = run(r, clock, frozenset({1}), first=ost_at)  # a retry carries the hint again
        reconciles += 1
        results.append(done)
    assert reconciles <= 5
    assert clock.now - ost_at == pytest.approx(judge.HOTADD_WAIT)
    assert recorded == [[HistoryEntry(HISTORY_REJECTED, 1, recorded[0][0].time, "watch")]]
    last = results[-1]
    assert last.warning and last.retry_after is None
    assert [f["code"] for f in last.record.findings] == ["guest-rejected-vcpu"]
    assert "QEMU's OST said its ACPI accepted the device" in last.line
    assert "detected" not in last.line
    assert last.record.details["rejected_vcpus"] == [1]
    # Looks before the decision are not warnings; they were retries of the hot-add.
    assert not any(x.warning for x in results[:-1])
    assert {x.retry_reason for x in results[:-1]} == {jobs.RETRY_HOTADD}
    # While it waited, the missing vCPU was held at warning (the guest may catch up).
    early = results[0].record.findings
    assert [(f["code"], f["severity"]) for f in early] == [("guest-missing-vcpus", "warning")]
    # Later jobs carrying the same hint (its first_request) start nothing new; the domain's
    # history now says why the guest has one CPU less.
    guest.history = History().add(recorded[0][0])
    clock.now += 60
    again = run(r, clock, frozenset({1}), first=ost_at)
    assert again.retry_after is None and not again.warning and len(recorded) == 1
    assert [f["severity"] for f in again.record.findings] == ["warning"]


def test_a_flood_voids_the_hot_add_its_forged_osts_started(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, recorded: list[list[HistoryEntry]]
) -> None:
    # A guest fakes device-check OSTs for vcpu1 and then floods: the few that became
    # records must not turn into "the guest rejected a hot-add" that never happened.
    from virthotplug.daemon.flood import FloodEvent

    guest = Guest(Policy(mode="report"), ("0", "0", 1))
    r = runner(guest, monkeypatch)
    run(r, clock)
    ost_at = clock.now
    done = run(r, clock, frozenset({1}), first=ost_at)
    assert done.retry_after is not None  # looking for the new CPU
    r.observe(FloodEvent(REF))
    clock.now += judge.HOTADD_WAIT + 1
    done = run(r, clock, frozenset({1}), first=ost_at)  # the retry carries the hint again
    assert done.retry_after is None and not done.warning
    assert "rejected" not in done.line and recorded == []
    assert "guest-rejected-vcpu" not in [f["code"] for f in done.record.findings]


def test_look_delays_are_bounded() -> None:
    first = WatchSettings().hotadd_settle
    times, waited = [0.0], 0.0
    for looks in range(1, judge.HOTADD_RETRIES + 1):
        waited += judge.hotadd_look_delay(looks, waited, first)
        times.append(round(waited, 3))
    assert len(times) == 5 and times[-1] == judge.HOTADD_WAIT
    assert times == sorted(times)


def test_critical_guest_finding_is_held_at_warning_while_settling(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a resume the guest handles a hot-add made while paused ~0.3 s later.
    guest = Guest(Policy(mode="report"), ("0", "0", 2), ("0", "0", 2), ("0,1", "0,1", 2))
    r = runner(guest, monkeypatch)
    first = run(r, clock)
    assert [(f["code"], f["severity"]) for f in first.record.findings] == [
        ("guest-missing-vcpus", "warning")
    ]
    assert first.retry_reason == jobs.RETRY_SETTLE
    assert first.retry_after == pytest.approx(judge.SETTLE_WINDOW)
    clock.now += 0.3
    assert [f["severity"] for f in run(r, clock).record.findings] == ["warning"]
    clock.now += 0.3
    assert run(r, clock).record.findings == []


def test_a_lasting_critical_finding_becomes_critical(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = Guest(Policy(mode="report"), ("0", "0", 2))
    r = runner(guest, monkeypatch)
    run(r, clock)
    clock.now += judge.SETTLE_WINDOW + 0.01
    done = run(r, clock)
    assert [f["severity"] for f in done.record.findings] == ["critical"]
    assert done.retry_after is None


def test_a_settle_retry_never_holds_back_the_action_on_an_ost() -> None:
    # A vCPU hot-added while paused: the reconcile at resume finds the guest behind (held at
    # warning, judged again in SETTLE_WINDOW); the guest's OST comes 0.3 s later and its
    # reconcile must run at once, not when the settle window ends.
    import json
    import time

    from virthotplug.core.events import OstMonitorEvent
    from virthotplug.core.ost import parse_ost_details
    from virthotplug.daemon.eventlog import EventLog
    from virthotplug.daemon.results import JobDone, JobResult
    from virthotplug.daemon.watch import Watch

    assert JobResult.__dataclass_fields__["retry_holds"].default is True  # grace holds
    watch = Watch([REF.host], WatchSettings(), lambda *_a: None, EventLog(None))  # type: ignore[arg-type, return-value]
    now = time.monotonic()
    resumed = Job(REF, due=now, first_request=now, reasons=["lifecycle"])
    watch._job_done(JobDone(REF.key, judge.SETTLE_WINDOW, resumed, jobs.RETRY_SETTLE, holds=False))
    info = {"device": "vcpu1", "source": 1, "status": 0, "slot": "1", "slot-type": "CPU"}
    ost = OstMonitorEvent(REF, ost=parse_ost_details(json.dumps({"info": info})))
    watch._request(REF, ost)
    due = watch._sched.next_due()
    assert due is not None and due - time.monotonic() < 0.1


def test_hot_add_and_settle_retries_are_looks_not_holds(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = Guest(Policy(mode="report"), ("0", "0", 2))
    done = run(runner(guest, monkeypatch), clock)
    assert done.retry_reason == jobs.RETRY_SETTLE and done.retry_holds is False


@pytest.mark.parametrize("holds", [True, False])
def test_the_worker_hands_the_retry_kind_to_the_main_loop(holds: bool) -> None:
    from virthotplug.core.records import Record
    from virthotplug.daemon.eventlog import EventLog
    from virthotplug.daemon.results import JobDone, JobResult
    from virthotplug.daemon.watch import Watch

    def looks_again(_conn: Any, _dom: Any, _job: Job) -> JobResult:
        record = Record(time="", host=REF.host, domain=REF.name, uuid=REF.uuid, event="x")
        return JobResult(record=record, line="", retry_after=1.0, retry_holds=holds)

    class Conn:
        uri = REF.host

        def domain_by_uuid(self, uuid: str) -> str:
            return uuid

    watch = Watch([REF.host], WatchSettings(), looks_again, EventLog(None))
    watch.sessions[REF.host]._conn = Conn()  # type: ignore[assignment]
    watch._run_job(Job(REF, due=0.0, first_request=0.0, reasons=["ost"]))
    done = watch._queue.get_nowait()
    assert isinstance(done, JobDone) and (done.retry_after, done.holds) == (1.0, holds)


def test_an_invalid_policy_is_reported_once_then_routine(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job reports the domain (record, finding) instead of failing; a resync finding
    the same again is routine (debug level), an event is news again."""
    from virthotplug.core.errors import InvalidPolicyError

    guest = Guest(Policy(), ("0", "0", 1))
    r = runner(guest, monkeypatch)

    def invalid(*_args: Any, **_kwargs: Any) -> EffectivePolicy:
        raise InvalidPolicyError(f"domain '{REF.name}': invalid policy in metadata: mode='x'")

    monkeypatch.setattr(reconcile, "effective_policy", invalid)

    def resync(reasons: list[str]) -> Any:
        job = Job(REF, due=clock.now, first_request=clock.now, reasons=reasons)
        return r.run(Conn(), Dom(), job)  # type: ignore[arg-type]

    first, again, event = resync(["host"]), resync(["host"]), resync(["lifecycle"])
    assert first.record.outcome == "invalid-policy" and first.record.action == "none"
    assert first.record.details["policy_error"] == (
        "invalid policy in metadata: mode='x'; nothing is done to the guest"
    )
    assert first.view.findings[0].code == "invalid-policy" and first.policy_mode is None
    assert (first.warning, first.routine) == (True, False)
    assert (again.warning, again.routine) == (False, True)
    assert (event.warning, event.routine) == (True, False)
    assert guest.reconciles == 3  # read, never written


# --- the record complete since QEMU's start (the TCG thread count) ---------------------------

STARTED, BOOTED, FROM_SNAPSHOT = 2, 0, 3  # libvirt's lifecycle event and its details


class MonitoredConn(Conn):
    def __init__(self, monitored: bool) -> None:
        self.listening = {REF.uuid} if monitored else set()

    def monitored(self) -> frozenset[str]:
        return frozenset(self.listening)

    def domain_by_uuid(self, uuid: str) -> Dom:
        assert uuid == REF.uuid
        return Dom()


@pytest.fixture
def marks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []

    def started(_dom: Any, live_count: int, _since: float, voucher: str) -> History:
        calls.append(("started" if voucher == VOUCHER else f"started by {voucher!r}", live_count))
        return History(initial=live_count, since_start=bool(voucher), voucher=voucher)

    def not_since_start(_dom: Any) -> History:
        calls.append(("not-since-start", 0))
        return History()

    monkeypatch.setattr(jobs.history, "started", started)
    monkeypatch.setattr(jobs.history, "not_since_start", not_since_start)
    return calls


def start_event(detail: int) -> Any:
    from virthotplug.core.events import LifecycleEvent

    return LifecycleEvent(REF, event=STARTED, detail=detail)


def run_on(r: jobs.JobRunner, conn: Conn, clock: Clock) -> Any:
    job = Job(REF, due=clock.now, first_request=clock.now, reasons=["lifecycle"])
    return r.run(conn, Dom(), job)  # type: ignore[arg-type]


def test_a_boot_the_daemon_saw_begins_the_record_once_its_monitor_events_come(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, marks: list[tuple[str, int]]
) -> None:
    guest = Guest(Policy(mode="report"), ("0", "0", 1))
    r = runner(guest, monkeypatch)
    r.observe(start_event(BOOTED))
    run_on(r, MonitoredConn(monitored=False), clock)  # not listening yet: not begun
    assert marks == []
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks == [("started", 1)]
    assert r.domains.record(REF.key).jobs.since_start


def test_a_gap_or_another_runs_mark_takes_the_mark_off(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, marks: list[tuple[str, int]]
) -> None:
    from virthotplug.core.events import HostEvent

    guest = Guest(Policy(mode="report"), ("0", "0", 1))
    guest.history = History(initial=1, since_start=True)  # as another watch left it
    r = runner(guest, monkeypatch)
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks == [("not-since-start", 0)]
    # This daemon saw the boot; then its connection was lost and made again.
    marks.clear()
    r.observe(start_event(BOOTED))
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks == [("started", 1)]
    r.observe(HostEvent(None, host=REF.host, what="connected"))
    assert not r.domains.record(REF.key).jobs.since_start
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks[-1] == ("not-since-start", 0)


def test_a_snapshot_revert_is_no_fresh_start(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, marks: list[tuple[str, int]]
) -> None:
    r = runner(Guest(Policy(mode="report"), ("0", "0", 1)), monkeypatch)
    r.observe(start_event(FROM_SNAPSHOT))
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks == []


def test_an_orderly_stop_takes_off_the_marks_this_run_vouches_for(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, marks: list[tuple[str, int]]
) -> None:
    r = runner(Guest(Policy(mode="report"), ("0", "0", 1)), monkeypatch)
    r.observe(start_event(BOOTED))
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks == [("started", 1)]
    r.withdraw({REF.host: MonitoredConn(monitored=True)})  # type: ignore[dict-item]
    assert marks[-1] == ("not-since-start", 0)
    assert not r.domains.record(REF.key).jobs.since_start
    # A start a job sees after the stop request begins the record, unmarked.
    r.observe(start_event(BOOTED))
    run_on(r, MonitoredConn(monitored=True), clock)
    assert marks[-1] == ("started by ''", 1)
    assert not r.domains.record(REF.key).jobs.since_start
