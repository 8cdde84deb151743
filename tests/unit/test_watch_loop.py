"""The daemon's main loop: it sleeps while every worker is busy (no spinning), and it
reports what it handles to an observer (the metrics)."""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

from virthotplug.core.config import WatchSettings
from virthotplug.core.events import DomainRef, LifecycleEvent
from virthotplug.core.schedule import Job
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.results import JobResult
from virthotplug.daemon.watch import MAIN_LOOP_WAKEUP, WITHDRAW_GRACE, Watch, _Control
from virthotplug.daemon.worker import WorkerPool
from virthotplug.host.connection import Connection, Domain


def _never(_conn: Connection, _dom: Domain, _job: Job) -> JobResult:
    raise AssertionError("not reached")


def _watch(workers: int, observer: Any = None) -> Watch:
    settings = WatchSettings(workers=workers, resync_interval=3600)
    return Watch([], settings, _never, EventLog(None), observer=observer)


def _ref(i: int) -> DomainRef:
    return DomainRef("test:///default", f"uuid-{i}", f"dom{i}")


def test_no_spinning_while_every_worker_is_busy() -> None:
    watch = _watch(workers=2)
    sched = watch._sched
    for i in range(3):
        sched.request(_ref(i), due=0.0, at=0.0, reason="lifecycle")
    assert len(sched.pop_due(time.monotonic(), 2)) == 2  # both workers busy, one job due
    next_tick = time.monotonic() + 3600
    assert watch._wait_time(next_tick) >= MAIN_LOOP_WAKEUP * 0.9
    sched.finish(_ref(0).key)  # a worker is free: the due job is dispatched at once
    assert watch._wait_time(next_tick) == 0.0


def test_queue_depth_counts_due_and_running_reconciles() -> None:
    watch = _watch(workers=2)
    sched = watch._sched
    assert watch.queue_depth() == 0
    for i in range(3):
        sched.request(_ref(i), due=0.0, at=0.0, reason="lifecycle")
    sched.request(_ref(0), due=0.0, at=0.0, reason="ost")  # merged: still one job of dom0
    sched.request(_ref(3), due=time.monotonic() + 3600, at=0.0, reason="resync")  # later
    assert watch.queue_depth() == 3
    (job,) = sched.pop_due(time.monotonic(), 1)  # running: still in the queue's depth
    assert watch.queue_depth() == 3
    sched.finish(job.ref.key)
    assert watch.queue_depth() == 2
    sched.hold(_ref(1).key, time.monotonic() + 3600)  # held (agent breaker): not due
    assert watch.queue_depth() == 1


def test_future_jobs_still_bound_the_wait() -> None:
    watch = _watch(workers=2)
    watch._sched.request(_ref(0), due=time.monotonic() + 0.05, at=0.0, reason="ost")
    assert 0.0 < watch._wait_time(time.monotonic() + 3600) <= 0.05


class _Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def event(self, ev: Any) -> None:
        self.events.append(ev)

    def reconciled(self, job: Job, result: JobResult, seconds: float) -> None:
        pass

    def failed(self, job: Job, seconds: float) -> None:
        pass


def test_the_observer_sees_every_event() -> None:
    recorder = _Recorder()
    watch = _watch(workers=1, observer=recorder)
    ev = LifecycleEvent(_ref(1), event=2, detail=0)  # started: a reconcile is scheduled
    watch._event(ev)
    assert recorder.events == [ev]
    assert len(watch._sched) == 1


def _alive_after(pool: WorkerPool, count: int) -> int:
    deadline = time.monotonic() + 5
    while pool.alive() != count and time.monotonic() < deadline:
        time.sleep(0.01)
    return pool.alive()


def test_a_reload_applies_the_number_of_workers_in_full() -> None:
    # The pool and the count of free slots change together: with more slots than workers,
    # jobs would queue in the pool, a hot-add behind resync jobs.
    reloaded = [WatchSettings(workers=4), WatchSettings(workers=1)]
    watch = Watch(
        [], WatchSettings(workers=2), _never, EventLog(None), reload=lambda: reloaded.pop(0)
    )
    watch._workers = pool = WorkerPool(2, watch._run_job)
    watch._control(_Control("reload"))
    assert pool.size == 4 and _alive_after(pool, 4) == 4
    watch._control(_Control("reload"))
    assert pool.size == 1 and _alive_after(pool, 1) == 1


def test_a_stop_request_gives_on_stop_the_open_connections_for_a_bounded_time() -> None:
    # The daemon takes its since-start marks off (``JobRunner.withdraw``) while its
    # connections are open; a libvirtd that never answers delays the stop only so long.
    uri = "test:///default"
    seen: list[tuple[dict[str, Any], bool]] = []
    hung = threading.Event()

    def on_stop(conns: Mapping[str, Any]) -> None:
        seen.append((dict(conns), watch._stop.is_set()))
        hung.wait(10)

    watch = Watch([uri], WatchSettings(), _never, EventLog(None), on_stop=on_stop)
    conn = object()
    watch.sessions[uri]._conn = conn  # type: ignore[assignment]
    started = time.monotonic()
    watch._control(_Control("stop"))
    took = time.monotonic() - started
    hung.set()
    assert seen == [({uri: conn}, False)]  # before the sessions are told to close
    assert watch._stop.is_set()
    assert WITHDRAW_GRACE * 0.9 <= took < WITHDRAW_GRACE + 1.0
