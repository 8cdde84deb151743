"""The daemon: listen to libvirt and QEMU-monitor events on every host, reconcile domains.

Data flows one way:

    libvirt event thread ─► Listener ─► queue of Event records ─► main loop
        main loop: report the event, turn its intent into a scheduled per-domain job
        (ReconcileQueue: coalesced, one at a time per domain) ─► worker pool
    worker (``worker``): read the layers, decide, act (``reconcile_fn``) ─► EventLog

Level-triggered: every event is only a hint to re-read a domain, and a periodic resync tick
re-reads every running domain, so a lost event (or a whole libvirtd restart) delays but
never loses work. Each host has a ``HostSession`` thread (``session``) that owns its
connection, reconnects with backoff and jitter, and re-registers every callback on the new
connection. What is kept per domain is in its record (``domains``), forgotten on FORGET
events and by each resync's listing of the running domains.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core.breaker import AgentBreaker
from virthotplug.core.events import (
    FORGET,
    RECONCILE,
    AgentEvent,
    DomainRef,
    Event,
    HostEvent,
    LifecycleEvent,
    OstMonitorEvent,
)
from virthotplug.core.schedule import Job, Key, ReconcileQueue
from virthotplug.daemon import memory
from virthotplug.daemon.domains import AgentFailures, DomainRegistry
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.flood import FloodGuard, summary_event
from virthotplug.daemon.results import (
    EventSource,
    JobDone,
    NoObserver,
    Observer,
    ReconcileFn,
    Settings,
    WatchStats,
)
from virthotplug.daemon.resync import BulkResync
from virthotplug.daemon.session import HostSession
from virthotplug.daemon.worker import JobWorker, WorkerPool
from virthotplug.host.connection import Connection
from virthotplug.host.libvirt_module import ensure_event_loop

log = logging.getLogger(__name__)

MAIN_LOOP_WAKEUP = 0.25  # bounds how long a stop request or a due job waits
SHUTDOWN_GRACE = 1.5  # SIGTERM to exit stays under 2 s even with a slow daemon
WITHDRAW_GRACE = 0.5  # what a stop request gives ``on_stop`` (a hung libvirtd never answers)
# Items handled per pass of the main loop before due jobs are dispatched and the tick runs:
# under a sustained flood the queue never empties, and the loop must still go round.
DRAIN_BATCH = 500
FLOOD_COLLECT = 0.25  # seconds between two looks at the flood guard (summaries, back-offs)


@dataclass(frozen=True)
class _Control:
    what: str  # "stop" or "reload"


@dataclass(frozen=True)
class _Listed:
    """A resync's listing of a host's running domains, and when it began (monotonic)."""

    event: HostEvent
    since: float
    complete: bool  # every running domain was read (none failed)


# --- the daemon ---------------------------------------------------------------------------


class Watch:
    def __init__(
        self,
        uris: Sequence[Optional[str]],
        settings: Settings,
        reconcile_fn: ReconcileFn,
        eventlog: EventLog,
        *,
        reload: Optional[Callable[[], Settings]] = None,
        sources: Sequence[EventSource] = (),
        observer: Optional[Observer] = None,
        observe: Optional[Callable[[Event], None]] = None,
        resync: Optional[BulkResync] = None,
        domains: Optional[DomainRegistry] = None,
        on_stop: Optional[Callable[[Mapping[str, Connection]], None]] = None,
    ) -> None:
        self.settings = settings
        # Told of a stop request, with every host's connection still open (best effort: it
        # gets WITHDRAW_GRACE seconds, on a thread of its own).
        self._on_stop = on_stop
        self._eventlog = eventlog
        self._reload = reload
        # SimpleQueue: its put is reentrant, so a signal handler may call it while the main
        # thread is inside get (a Queue's lock would deadlock there).
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._sched = ReconcileQueue()
        # Everything kept per domain, forgotten in one place (``DomainRegistry.forget``).
        self.domains = domains if domains is not None else DomainRegistry()
        self._breaker = AgentBreaker(AgentFailures(self.domains))
        self._flood = FloodGuard()
        self.sessions = {
            s.uri: s
            for s in (
                HostSession(u, self._queue.put, self._stop, self._flood, self._in_scope)
                for u in uris
            )
        }
        self.stats = WatchStats()
        # Why the daemon stopped by itself (no host left); ``run`` raises it.
        self.failure: Optional[errors.VirtHotplugError] = None
        self._workers: Optional[WorkerPool] = None
        self._sources = list(sources)
        self._observer: Observer = observer if observer is not None else NoObserver()
        # Sees every event on this loop, quickly (``JobRunner.observe``: the vCPU history).
        self._observe = observe
        self._bulk = resync  # None: the resync lists running domains and reconciles each
        self._worker = JobWorker(
            self.sessions,
            reconcile_fn,
            eventlog,
            self._observer,
            self.stats,
            lambda key: self._flood.suppressed(key),  # tests replace the guard
            resync,
        )
        self._resyncing: set[Connection] = set()  # connections with a resync in flight
        self.domains.on_forget(self._sched.forget)
        self.domains.on_forget(lambda key: self._flood.forget(key))  # tests replace the guard
        self.domains.on_forget(self._drop_monitor)

    # control (signal handlers and tests call these)

    def queue_depth(self) -> int:
        """Reconciles due (waiting for a worker) or running: the metrics' queue depth, read
        on the metrics thread. A job set for later (a grace period, a retry) is not counted."""
        return self._sched.due_or_running(time.monotonic())

    def request_stop(self) -> None:
        """Stop soon; safe from a signal handler (it only enqueues: a handler runs on the
        main thread between two bytecodes, maybe while that thread holds a lock)."""
        self._queue.put(_Control("stop"))

    def request_reload(self) -> None:
        self._queue.put(_Control("reload"))

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _begin_stop(self) -> None:
        self._stop.set()
        for session in self.sessions.values():
            session.mark_lost()  # wakes its liveness wait at once

    # main loop

    def run(self) -> None:
        ensure_event_loop()  # before the first open()
        for session in self.sessions.values():
            self._first_connect(session)
        self._workers = WorkerPool(self.settings.workers, self._run_job)
        for session in self.sessions.values():
            session.start()
        for source in self._sources:
            source.start(self._queue.put)
        next_tick = time.monotonic() + self.settings.resync_interval
        next_flood = time.monotonic()
        while not self._stop.is_set():
            self._drain(self._wait_time(next_tick))
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = now + self.settings.resync_interval
            if now >= next_flood:
                self._flood_collect()
                next_flood = now + FLOOD_COLLECT
            self._dispatch(now)
        self._shutdown()
        if self.failure is not None:
            raise self.failure

    def _first_connect(self, session: HostSession) -> None:
        try:
            session.connect_once()
        except (errors.InvalidURIError, errors.PermissionDeniedError):
            raise
        except errors.VirtHotplugError as exc:
            if len(self.sessions) == 1 and isinstance(exc, errors.ConnectError):
                log.warning("%s: %s; retrying in the background", session.uri, exc)
            else:
                log.warning("%s: %s", session.uri, exc)

    def _wait_time(self, next_tick: float) -> float:
        now = time.monotonic()
        wait = min(MAIN_LOOP_WAKEUP, max(0.0, next_tick - now))
        # A due job only matters while a worker is free: when all are busy, the next one to
        # finish wakes the loop (its JobDone), so waiting for it never spins.
        workers = self._workers.size if self._workers is not None else self.settings.workers
        due = self._sched.next_due() if self._sched.running < workers else None
        if due is not None:
            wait = min(wait, max(0.0, due - now))
        return wait

    def _drain(self, timeout: float) -> None:
        """Handle what is queued, at most DRAIN_BATCH items: a burst becomes one pass, and
        so coalesces, and a flood that never lets the queue empty still lets the loop
        dispatch and tick."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        for _ in range(DRAIN_BATCH):
            self._handle(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
        self._handle(item)

    def _handle(self, item: Any) -> None:
        if isinstance(item, JobDone):
            self._job_done(item)
        elif isinstance(item, _Control):
            self._control(item)
        elif isinstance(item, Event):
            self.stats.count(events=1)
            self._event(item)
        elif isinstance(item, _Listed):
            self.stats.count(events=1)
            self._event(item.event)
            if item.complete:  # FORGET events lost in a gap: their domains go now
                uuids = (ref.uuid for ref in item.event.domains)
                self.domains.prune(item.event.host, uuids, item.since)

    def _control(self, item: _Control) -> None:
        if item.what == "stop":
            self._withdraw()
            self._begin_stop()
        elif item.what == "reload" and self._reload is not None:
            try:
                self.settings = self._reload()
                log.info("configuration reloaded")
            except errors.VirtHotplugError as exc:
                log.error("reload failed, keeping the previous configuration: %s", exc)
                return
            self._resize_workers()

    def _withdraw(self) -> None:
        """Before the connections close: ``on_stop`` for an orderly stop, waited for at
        most WITHDRAW_GRACE seconds (then left to end with the process)."""
        conns = {uri: s.conn for uri, s in self.sessions.items() if s.conn is not None}
        if self._on_stop is None or not conns:
            return
        stop = threading.Thread(target=self._on_stop, args=(conns,), name="stop", daemon=True)
        stop.start()
        stop.join(WITHDRAW_GRACE)
        if stop.is_alive():
            log.warning("stopping without waiting any longer for the hosts to answer")

    def _resize_workers(self) -> None:
        """A reload applies ``workers`` in full: the pool and the count of free slots."""
        pool = self._workers
        if pool is not None and pool.size != max(1, self.settings.workers):
            log.info("workers: %d, were %d", max(1, self.settings.workers), pool.size)
            pool.resize(self.settings.workers)

    def _event(self, ev: Event) -> None:
        if ev.domain is not None and not self._watches(ev.domain):
            return  # out of the daemon's scope (watch --domain): not even recorded
        if ev.domain is not None and ev.intent != FORGET:
            self.domains.record(ev.domain.key)  # in use: a resync listing begun before keeps it
        self._observer.event(ev)
        if self._observe is not None:
            self._observe(ev)
        if not (isinstance(ev, HostEvent) and ev.what == "listed" and not ev.reason):
            self._eventlog.event(ev)
        if isinstance(ev, HostEvent):
            self._host_event(ev)
            return
        if self._bulk is not None and ev.domain is not None:
            # Any event may follow a change of the definitions: read them again next time.
            self._bulk.invalidate(ev.domain.host, ev.domain.uuid)
        self._monitor_registration(ev)
        if isinstance(ev, AgentEvent) and ev.connected and ev.domain is not None:
            self._agent_connected(ev.domain)
        if ev.domain is not None and ev.intent == FORGET:
            self.domains.forget(ev.domain.key)
        elif ev.domain is not None and ev.intent == RECONCILE:
            self._request(ev.domain, ev)

    def _monitor_registration(self, ev: Event) -> None:
        """A domain's QEMU monitor registration follows its life: on start and resume, off
        on stop and crash (and when the hook says it stopped); an undefined domain that runs
        on, transient, keeps it."""
        session = self.sessions.get(ev.domain.host) if ev.domain is not None else None
        if session is None or ev.domain is None:
            return
        if isinstance(ev, LifecycleEvent) and ev.event_name in ("started", "resumed"):
            self._flood.running(ev.domain.host, (ev.domain.uuid,))
            session.monitors.add(ev.domain.uuid)

    def _drop_monitor(self, key: Key) -> None:
        session = self.sessions.get(key[0])
        if session is not None:
            session.monitors.drop(key[1])

    def _flood_collect(self) -> None:
        """Summaries of what the flood guard dropped, suppressed domains whose back-off is
        over (probe them: listen again once their vCPUs are idle), and the periodic
        reconcile of suppressed ones."""
        summaries, probe, resync = self._flood.collect()
        for summary in summaries:
            self._handle(summary_event(summary))
        for ref in probe:
            session = self.sessions.get(ref.host)
            if session is not None:
                session.monitors.probe(ref.uuid)
        now = time.monotonic()
        for ref in resync:
            self._sched.request(ref, due=now, at=now, reason="flood")

    def _host_event(self, ev: HostEvent) -> None:
        session = self.sessions.get(ev.host)
        # "lost" is only reported here: whoever noticed the loss (the connection's close
        # callback, the liveness poll) has already ended that connection, and by now the
        # session may be on a new one.
        if ev.what == "gone" and session is not None:
            self._session_gone(session)
        elif ev.what == "connected" and session is not None:
            self._resync(session)  # events in the gap are lost: re-read everything
        elif ev.what == "listed":
            listed = [ref for ref in ev.domains if self._watches(ref)]
            self._flood.running(ev.host, (ref.uuid for ref in listed))
            if session is not None:
                session.monitors.sync(ref.uuid for ref in listed)
            for ref in listed if ev.reconcile is None else ev.reconcile:
                if self._watches(ref):
                    self._request(ref, ev)

    def _watches(self, ref: DomainRef) -> bool:
        return self._in_scope(ref.name, ref.uuid)

    def _in_scope(self, name: str, uuid: str) -> bool:
        # Through self.settings each time: a reload (SIGHUP) may change the scope.
        return self.settings.watches(name, uuid)

    def _request(self, ref: DomainRef, ev: Event) -> None:
        delay, hotadded = 0.0, frozenset[int]()
        if isinstance(ev, OstMonitorEvent) and ev.ost is not None and ev.ost.is_cpu:
            # Read at once: the guest usually lists the CPU by the OST event; the job looks
            # again with short backoff until it does (core.judge.hotadd_look_delay).
            if ev.hotadd_vcpu is not None:
                hotadded = frozenset({ev.hotadd_vcpu})
        elif isinstance(ev, AgentEvent):
            delay = 0.1  # the agent needs a moment after connecting to answer
        self._sched.request(ref, due=ev.mono + delay, at=ev.mono, reason=ev.kind, hotadded=hotadded)

    def _tick(self) -> None:
        for session in self.sessions.values():
            if session.failure is not None:  # every resync period, so no one misses it
                log.error("%s: not watched: %s", session.uri, session.failure)
            elif session.conn is not None:
                self._resync(session)

    def _session_gone(self, session: HostSession) -> None:
        alive = [s for s in self.sessions.values() if s.failure is None]
        if alive:
            log.error(
                "%s: no longer watched (%s); still watching %d of %d hosts",
                session.uri,
                session.failure,
                len(alive),
                len(self.sessions),
            )
            return
        log.error("no host left to watch: exiting")
        self.failure = session.failure
        self._begin_stop()

    def _resync(self, session: HostSession) -> None:
        """Re-read the host's running domains off the main thread (one resync per host at a
        time), then reconcile those that need it: with a bulk resync the ones it picked,
        else every one."""
        assert self._workers is not None
        conn = session.conn
        if conn is None or conn in self._resyncing:
            return
        self._resyncing.add(conn)

        def list_running() -> None:
            since = time.monotonic()
            try:
                self._queue.put(self._resync_event(conn, since))
            except errors.VirtHotplugError as exc:
                log.warning("%s: resync failed: %s", conn.uri, exc)
            finally:
                self._resyncing.discard(conn)
            memory.trim()  # what the pass read and dropped, back to the system

        threading.Thread(target=list_running, name="resync", daemon=True).start()

    def _resync_event(self, conn: Connection, since: float) -> _Listed:
        if self._bulk is None:
            refs = tuple(DomainRef(conn.uri, d.uuid, d.name) for d in conn.list_running())
            return _Listed(HostEvent(None, host=conn.uri, what="listed", domains=refs), since, True)
        done = self._bulk.run(conn)
        listed = HostEvent(
            None,
            host=conn.uri,
            what="listed",
            reason=done.describe(),
            domains=done.listed,
            reconcile=done.reconcile,
        )
        return _Listed(listed, since, done.complete)

    def _dispatch(self, now: float) -> None:
        assert self._workers is not None
        free = self._workers.size - self._sched.running
        for job in self._sched.pop_due(now, free):
            self.stats.count(coalesced=job.coalesced - 1)
            self._workers.submit(job)

    def _agent_connected(self, ref: DomainRef) -> None:
        if self._breaker.reset(ref.key):
            self._sched.release(ref.key)
            log.info("domain '%s': guest agent connected: reconciling it again", ref.name)

    def _breaker_verdict(self, done: JobDone) -> None:
        """Count unresponsive agents; a domain past the threshold waits without a worker."""
        if done.unresponsive is None:
            return  # no word on the agent
        until = self._breaker.record(done.key, unresponsive=done.unresponsive, now=time.monotonic())
        if not done.unresponsive:
            self._sched.release(done.key)
            return
        if until is None or done.job is None:
            return
        self._sched.hold(done.key, until)
        ref = done.job.ref
        # One reconcile then, to try again (and another wait if it still does not answer).
        self._sched.request(ref, due=until, at=time.monotonic(), reason="agent-retry")
        log.warning(
            "domain '%s': guest agent unresponsive %d times in a row: not reconciled for "
            "%.0f s, or until its agent connects",
            ref.name,
            self._breaker.failures(done.key),
            until - time.monotonic(),
        )

    def _job_done(self, done: JobDone) -> None:
        self._sched.finish(done.key)
        self._breaker_verdict(done)
        if done.retry_after is not None and done.job is not None:
            job = done.job
            now = time.monotonic()
            at = now + done.retry_after
            self._sched.request(
                job.ref,
                due=now if done.holds else at,
                not_before=at if done.holds else 0.0,
                at=job.first_request,
                reason=done.reason,
                hotadded=frozenset(job.hotadded),
            )

    # worker side

    def _run_job(self, job: Job) -> None:
        self._queue.put(self._worker.run(job))

    def _shutdown(self) -> None:
        for source in self._sources:
            source.close()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for session in self.sessions.values():
            session.join(max(0.0, deadline - time.monotonic()))
        log.info(
            "stopped: %d events, %d reconciles (%d coalesced), %d failures",
            self.stats.events,
            self.stats.reconciles,
            self.stats.coalesced,
            self.stats.failures,
        )
