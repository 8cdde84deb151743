"""One record per domain, forgotten in one place: on FORGET events, and by every resync's
listing of the running domains, so that a domain that went away while its events were lost
(undefined during a reconnect gap) leaves nothing behind after the next resync."""

from __future__ import annotations

import time
from typing import Any

import pytest

from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.events import DomainRef, LifecycleEvent
from virthotplug.core.schedule import Job
from virthotplug.core.view import AgentStatus, VcpuView
from virthotplug.daemon.domains import AgentFailures, DomainRegistry
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.jobs import JobRunner
from virthotplug.daemon.results import JobResult
from virthotplug.daemon.watch import Watch

HOST = "test:///default"
GONE = DomainRef(HOST, "uuid-gone", "gone")
KEPT = DomainRef(HOST, "uuid-kept", "kept")
RESUMED = 4


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Conn:
    """A new connection after a gap: only ``KEPT`` is still running."""

    uri = HOST

    def list_running(self) -> list[Any]:
        return [KEPT]


class _Monitors:
    def __init__(self) -> None:
        self.dropped: list[str] = []

    def drop(self, uuid: str) -> None:
        self.dropped.append(uuid)

    def add(self, uuid: str) -> None:
        pass

    def sync(self, running: Any) -> None:
        pass


def _never(_conn: Any, _dom: Any, _job: Job) -> JobResult:
    raise AssertionError("not reached")


def _view(ref: DomainRef) -> VcpuView:
    agent = AgentStatus(configured=True, state="unresponsive")
    return VcpuView(
        host=HOST, name=ref.name, uuid=ref.uuid, state="running", persistent=True, agent=agent
    )


def _daemon(clock: _Clock) -> tuple[Watch, JobRunner, _Monitors]:
    domains = DomainRegistry(clock)
    runner = JobRunner(HostConfig(), WatchSettings(), domains)
    watch = Watch([HOST], WatchSettings(), _never, EventLog(None), domains=domains)
    monitors = _Monitors()
    watch.sessions[HOST].monitors = monitors  # type: ignore[assignment]
    return watch, runner, monitors


def _give_state(watch: Watch, ref: DomainRef) -> None:
    """Something in every store: an event, a job waiting, jobs' and breaker's counts."""
    watch._event(LifecycleEvent(ref, event=RESUMED, detail=0))  # a reconcile is scheduled
    rec = watch.domains.record(ref.key)
    rec.jobs.observations.ours, rec.jobs.findings = {1}, ("guest-cpu-offline",)
    rec.view = _view(ref)
    watch._breaker.record(ref.key, unresponsive=True, now=time.monotonic())


def test_a_domain_gone_in_a_reconnect_gap_is_forgotten_by_the_next_resync() -> None:
    clock = _Clock()
    watch, runner, monitors = _daemon(clock)
    _give_state(watch, GONE)
    _give_state(watch, KEPT)
    clock.now += 1.0  # the reconnect: GONE was undefined meanwhile, its events lost
    watch._handle(watch._resync_event(_Conn(), clock.now))  # type: ignore[arg-type]
    assert [rec.key for rec in watch.domains.records()] == [KEPT.key]
    assert runner.domains.get(GONE.key) is None
    assert watch._breaker.failures(GONE.key) == 0 and watch._breaker.failures(KEPT.key) == 1
    assert [job.ref for job in watch._sched.pop_due(time.monotonic() + 1, 8)] == [KEPT]
    assert monitors.dropped == [GONE.uuid]


def test_a_domain_started_while_the_listing_ran_is_kept() -> None:
    clock = _Clock()
    watch, _runner, _monitors = _daemon(clock)
    listing_began = clock.now
    clock.now += 0.5
    _give_state(watch, GONE)  # started after the listing began: not in it, yet running
    watch._handle(watch._resync_event(_Conn(), listing_began))  # type: ignore[arg-type]
    assert watch.domains.get(GONE.key) is not None
    watch._handle(watch._resync_event(_Conn(), clock.now + 1))  # type: ignore[arg-type]
    assert watch.domains.get(GONE.key) is None  # the next listing does not have it either


def test_a_forget_event_drops_the_record_and_tells_every_store() -> None:
    clock = _Clock()
    watch, _runner, monitors = _daemon(clock)
    _give_state(watch, GONE)
    watch._event(LifecycleEvent(GONE, event=5, detail=1))  # stopped (destroyed)
    assert not list(watch.domains.records()) and len(watch._sched) == 0
    assert monitors.dropped == [GONE.uuid]
    assert watch.domains.forgotten_within(GONE.key, 1.0)


def test_agent_failures_live_in_the_records() -> None:
    domains = DomainRegistry()
    counts = AgentFailures(domains)
    counts[GONE.key] = 2
    assert dict(counts) == {GONE.key: 2} and len(counts) == 1
    del counts[GONE.key]
    assert GONE.key not in counts
    with pytest.raises(KeyError):
        del counts[KEPT.key]


def test_the_main_loop_never_writes_what_a_running_job_writes() -> None:
    # A flood voids what the domain sent, its pending hot-add included: the main loop only
    # leaves a mark in the record (under its lock); the domain's next job applies it to its
    # observations. A job running meanwhile never has them voided under it.
    from virthotplug.daemon.flood import FloodEvent

    runner = JobRunner(HostConfig(), WatchSettings())
    domain = runner._domain(GONE.key)
    domain.observations.hinted({1}, 5.0)
    runner.observe(FloodEvent(GONE))
    assert domain.observations.pending is not None
    assert domain.observations.decided_upto == float("-inf")
    runner._apply_distrust(GONE.key, domain)  # what the next job does first
    assert domain.observations.pending is None and domain.observations.decided_upto > 5.0
    assert runner.domains.record(GONE.key).distrusted_at is None


def test_a_resync_read_before_the_stop_does_not_bring_a_forgotten_domain_back() -> None:
    clock = _Clock()
    domains = DomainRegistry(clock)
    domains.record(GONE.key)
    domains.forget(GONE.key)
    clock.now += 1.0
    gone, kept = domains.records_of(HOST, [GONE.uuid, KEPT.uuid])
    assert gone is None and kept is not None and kept.touched == clock.now
    assert [rec.key for rec in domains.records(HOST)] == [KEPT.key]
