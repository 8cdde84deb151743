"""The reconcile workers: a pool of threads, and what each does with one job.

A worker finds the job's domain on its host's current connection, runs the reconcile
(``ReconcileFn``: read, decide, act), reports the outcome (event log, observer, bulk resync)
and hands a ``JobDone`` back to the main loop, which alone touches the scheduler. A failed
reconcile is tried again once after ``FAILED_RETRY``; if that fails too, the next periodic
resync tries again (it no longer counts the domain as known), so a lasting failure costs
one warning a resync, never a spin.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Mapping, Optional

from virthotplug.core import errors
from virthotplug.core.schedule import Job, Key
from virthotplug.core.view import AGENT_UNRESPONSIVE
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.flood import FloodInfo, flood_finding
from virthotplug.daemon.results import JobDone, JobResult, Observer, ReconcileFn, WatchStats
from virthotplug.daemon.resync import BulkResync
from virthotplug.daemon.session import HostSession

log = logging.getLogger(__name__)

FAILED_RETRY = 5.0  # seconds
RETRY_FAILED = "failed"


class WorkerPool:
    """A set of daemon threads: a reconcile stuck on a hung guest never blocks exit."""

    def __init__(self, count: int, run: Callable[[Job], None]) -> None:
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._loop, args=(run,), name=f"reconcile-{i}", daemon=True)
            for i in range(max(1, count))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _loop(self, run: Callable[[Job], None]) -> None:
        while True:
            run(self._jobs.get())


class _ReconcileFailed(Exception):
    """A reconcile job failed with an error already logged: retry it (``FAILED_RETRY``)."""


class JobWorker:
    """Runs jobs (on worker threads) for the main loop's ``Watch``."""

    def __init__(
        self,
        sessions: Mapping[str, HostSession],
        reconcile_fn: ReconcileFn,
        eventlog: EventLog,
        observer: Observer,
        stats: WatchStats,
        suppressed: Callable[[Key], Optional[FloodInfo]],
        bulk: Optional[BulkResync],
    ) -> None:
        self._sessions = sessions
        self._reconcile_fn = reconcile_fn
        self._eventlog = eventlog
        self._observer = observer
        self._stats = stats
        self._suppressed = suppressed  # the flood guard's word on a domain
        self._bulk = bulk

    def run(self, job: Job) -> JobDone:
        result = None
        failed = False
        try:
            result = self._reconcile(job)
        except _ReconcileFailed:
            failed = True
        except Exception:  # a bug in one reconcile must not kill a worker
            log.exception("domain '%s': reconcile crashed", job.ref.name)
        retry_after = result.retry_after if result is not None else None
        reason = result.retry_reason if result is not None else "grace"
        if failed and RETRY_FAILED not in job.reasons:
            retry_after, reason = FAILED_RETRY, RETRY_FAILED
        view = result.view if result is not None else None
        unresponsive = view is not None and view.agent.state == AGENT_UNRESPONSIVE
        return JobDone(job.ref.key, retry_after, job, reason, unresponsive)

    def _reconcile(self, job: Job) -> Optional[JobResult]:
        session = self._sessions.get(job.ref.host)
        conn = session.conn if session else None
        if conn is None:
            return None  # the reconnect's resync covers it
        started = time.monotonic()
        try:
            dom = conn.domain_by_uuid(job.ref.uuid)
            result = self._reconcile_fn(conn, dom, job)
        except errors.NoDomainError:
            return None
        except errors.ConnectError as exc:
            log.warning("%s: %s", conn.uri, exc)
            if session is not None:
                session.mark_lost(conn)  # only if no reconnect happened meanwhile
            return None
        except errors.VirtHotplugError as exc:
            self._stats.count(failures=1)
            log.warning("domain '%s': %s", job.ref.name, exc)
            self._observer.failed(job, time.monotonic() - started)
            if self._bulk is not None:
                self._bulk.forget(conn.uri, job.ref.uuid)  # not known: the next resync picks it
            raise _ReconcileFailed from exc
        result = self._with_flood_finding(job, result)
        self._stats.count(reconciles=1)
        self._eventlog.reconcile(
            result.record,
            result.line,
            failed=result.failed or result.warning,
            routine=result.routine and not result.warning,
        )
        self._observer.reconciled(job, result, time.monotonic() - started)
        if self._bulk is not None:
            self._bulk.reconciled(conn.uri, result.view)
        return result

    def _with_flood_finding(self, job: Job, result: JobResult) -> JobResult:
        """A domain whose monitor events are suppressed says so in its record and metrics."""
        info = self._suppressed(job.ref.key)
        if info is None:
            return result
        finding = flood_finding(info)
        as_dict = {"code": finding.code, "severity": finding.severity, "message": finding.message}
        record = dataclasses.replace(
            result.record, findings=[*result.record.findings, {**as_dict, "cpus": []}]
        )
        view = result.view
        if view is not None:
            view = dataclasses.replace(view, findings=(*view.findings, finding))
        line = f"{result.line}; {finding.code}: {finding.message}"
        return dataclasses.replace(result, record=record, view=view, line=line, routine=False)
