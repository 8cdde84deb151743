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
    """A set of daemon threads: a reconcile stuck on a hung guest never blocks exit.

    Its size follows the ``workers`` setting on reload (``resize``): the main loop hands out
    no more jobs than there are workers, so a pool smaller than that would queue jobs here,
    where a hot-add waits behind resync jobs instead of going first.
    """

    def __init__(self, count: int, run: Callable[[Job], None]) -> None:
        self._jobs: queue.Queue[Optional[Job]] = queue.Queue()  # None: one worker ends
        self._run = run
        self._threads: list[threading.Thread] = []
        self._started = 0
        self.size = 0
        self.resize(count)

    def resize(self, count: int) -> None:
        """Start workers, or tell some to end once their current job is done."""
        count = max(1, count)
        while self.size < count:
            name = f"reconcile-{self._started}"
            thread = threading.Thread(target=self._loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
            self._started += 1
            self.size += 1
        while self.size > count:
            self._jobs.put(None)
            self.size -= 1
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def alive(self) -> int:
        """Worker threads still running (ending ones finish their job first)."""
        return sum(thread.is_alive() for thread in self._threads)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job)


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
        started = time.monotonic()
        session = self._sessions.get(job.ref.host)
        conn = session.conn if session is not None else None  # the one the job will use
        try:
            result = self._reconcile(job)
        except _ReconcileFailed:
            return _retried(job)
        except Exception:  # a bug after the reconcile: it must not kill a worker either
            log.exception("domain '%s': reconcile crashed", job.ref.name)
            self._failed(job, started)
            return _retried(job)
        if result is None:
            return JobDone(job.ref.key, job=job)

        def connected() -> bool:
            return session is not None and conn is not None and session.holds(conn)

        unresponsive = _agent_verdict(result, connected)
        return JobDone(
            job.ref.key,
            result.retry_after,
            job,
            result.retry_reason,
            unresponsive,
            holds=result.retry_holds,
        )

    def _reconcile(self, job: Job) -> Optional[JobResult]:
        """The job's result; None: none (the domain or the connection is gone)."""
        session = self._sessions.get(job.ref.host)
        conn = session.conn if session else None
        if session is None or conn is None:
            return None  # the reconnect's resync covers it
        started = time.monotonic()
        try:
            dom = conn.domain_by_uuid(job.ref.uuid)
            result = self._reconcile_fn(conn, dom, job)
        except errors.NoDomainError:
            return None
        except errors.ConnectError as exc:
            log.warning("%s: %s", conn.uri, exc)
            session.mark_lost(conn)  # only if no reconnect happened meanwhile
            return None
        except errors.VirtHotplugError as exc:
            log.warning("%s", _naming(job.ref.name, str(exc)))
            self._failed(job, started)
            raise _ReconcileFailed from exc
        except Exception as exc:  # a bug: counted and tried again like any failure
            log.exception("domain '%s': reconcile crashed", job.ref.name)
            self._failed(job, started)
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

    def _failed(self, job: Job, started: float) -> None:
        self._stats.count(failures=1)
        self._observer.failed(job, time.monotonic() - started)
        if self._bulk is not None:  # not known: the next resync picks it
            self._bulk.forget(job.ref.host, job.ref.uuid)

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


def _naming(name: str, message: str) -> str:
    """``message`` as a line about domain ``name``: an error raised on the domain already
    names it (``Domain.context``), and must not be prefixed twice."""
    named = f"domain '{name}'"
    return message if message.startswith(named) else f"{named}: {message}"


def _retried(job: Job) -> JobDone:
    """A failed job: tried once more after ``FAILED_RETRY``; a failed retry is left to the
    next periodic resync."""
    if RETRY_FAILED in job.reasons:
        return JobDone(job.ref.key, job=job)
    return JobDone(job.ref.key, FAILED_RETRY, job, RETRY_FAILED)


def _agent_verdict(result: JobResult, connected: Callable[[], bool]) -> Optional[bool]:
    """Whether ``result`` found the guest agent unresponsive. None when that says nothing
    of the guest, so it must not count against its agent circuit breaker: the host did not
    ask the agent (every agent lease of its connection was out: a host-side cap), or the
    connection was lost meanwhile (asked only then: every agent call on it fails or times
    out)."""
    view = result.view
    if view is None or view.agent.state != AGENT_UNRESPONSIVE:
        return False
    if not view.agent.asked or not connected():
        return None
    return True
