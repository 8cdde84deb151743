"""Per-domain state lives only as long as the domain does: a stopped or crashed domain
leaves nothing behind in the daemon (thousands of short-lived domains a day must
not grow it), and the counters workers update are exact."""

from __future__ import annotations

import threading

from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.events import DomainRef, HookEvent, LifecycleEvent
from virthotplug.core.judge import Observations
from virthotplug.core.schedule import Job
from virthotplug.daemon.domains import DomainJobs
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.jobs import JobRunner
from virthotplug.daemon.results import JobResult, WatchStats
from virthotplug.daemon.watch import Watch
from virthotplug.host.connection import Connection, Domain
from virthotplug.ops import reconcile

STOPPED, UNDEFINED, CRASHED = 5, 1, 8


def _never(_conn: Connection, _dom: Domain, _job: Job) -> JobResult:
    raise AssertionError("not reached")


def _ref(i: int) -> DomainRef:
    return DomainRef("qemu:///system", f"uuid-{i}", f"dom{i}")


def _runner_with_state(refs: list[DomainRef]) -> JobRunner:
    runner = JobRunner(HostConfig(), WatchSettings())
    for ref in refs:
        rec = runner.domains.record(ref.key)
        rec.jobs = DomainJobs(Observations(ours={1}), findings=("guest-cpu-offline",))
    return runner


def test_a_forgotten_domain_leaves_no_state_in_the_job_runner() -> None:
    refs = [_ref(i) for i in range(3)]
    runner = _runner_with_state(refs)
    watch = Watch([], WatchSettings(), _never, EventLog(None), domains=runner.domains)
    watch._event(LifecycleEvent(refs[0], event=STOPPED, detail=1))
    watch._event(LifecycleEvent(refs[1], event=CRASHED, detail=0))
    watch._event(HookEvent(refs[2], operation="release", sub_operation="end"))
    assert not list(runner.domains.records())


def test_a_running_domain_undefined_keeps_its_state() -> None:
    """Undefining a running domain leaves it running, transient: what the daemon knows of
    it (its hot-adds, findings) stays, and a reconcile re-reads it (found by the soak: the
    next hot-add's OST event was lost with the forgotten monitor registration)."""
    (ref,) = [_ref(0)]
    runner = _runner_with_state([ref])
    watch = Watch([], WatchSettings(), _never, EventLog(None), domains=runner.domains)
    watch._event(LifecycleEvent(ref, event=UNDEFINED, detail=0))
    (record,) = runner.domains.records()
    assert record.jobs is not None and record.jobs.findings == ("guest-cpu-offline",)
    assert len(watch._sched) == 1  # a reconcile of the now transient domain


def test_domain_locks_go_with_their_last_user() -> None:
    key = ("qemu:///system", "uuid-lock")
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reconcile._lock_for(*key):
            inside.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    assert key in reconcile._domain_locks
    release.set()
    holder.join(5)
    assert key not in reconcile._domain_locks
    for i in range(1000):
        with reconcile._lock_for("qemu:///system", f"short-lived-{i}"):
            pass
    assert not [k for k in reconcile._domain_locks if k[1].startswith("short-lived-")]


def test_worker_counters_are_counted_under_a_lock() -> None:
    stats = WatchStats()

    def work() -> None:
        for _ in range(5000):
            stats.count(reconciles=1, failures=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (stats.reconciles, stats.failures) == (40000, 40000)
