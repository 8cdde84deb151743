"""The daemon: listen to libvirt and QEMU-monitor events on every host, reconcile domains.

Data flows one way:

    libvirt event thread ─► Listener ─► queue of Event records ─► main loop
        main loop: report the event, turn its intent into a scheduled per-domain job
        (ReconcileQueue: coalesced, one at a time per domain) ─► worker pool
    worker: read the layers, decide, act (``reconcile_fn``) ─► EventLog

Level-triggered: every event is only a hint to re-read a domain, and a periodic resync tick
re-reads every running domain, so a lost event (or a whole libvirtd restart) delays but
never loses work. Each host has a ``HostSession`` thread that owns its connection,
reconnects with backoff and jitter, and re-registers every callback on the new connection.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

import tenacity

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
from virthotplug.core.records import Record
from virthotplug.core.schedule import Job, Key, ReconcileQueue
from virthotplug.core.view import AGENT_UNRESPONSIVE
from virthotplug.daemon import memory
from virthotplug.daemon.domains import AgentFailures, DomainRegistry
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.flood import FloodGuard, flood_finding, summary_event
from virthotplug.daemon.listener import Listener
from virthotplug.daemon.resync import BulkResync
from virthotplug.daemon.subscriptions import MonitorSubscriptions
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.libvirt_module import ensure_event_loop

if TYPE_CHECKING:
    from virthotplug.core.view import VcpuView

log = logging.getLogger("virthotplug.daemon.watch")

LIVENESS_POLL = 5.0  # seconds between isAlive checks, in case no close callback arrives
MAIN_LOOP_WAKEUP = 0.25  # bounds how long a stop request or a due job waits
SHUTDOWN_GRACE = 1.5  # SIGTERM to exit stays under 2 s even with a slow daemon
# Items handled per pass of the main loop before due jobs are dispatched and the tick runs:
# under a sustained flood the queue never empties, and the loop must still go round.
DRAIN_BATCH = 500
FLOOD_COLLECT = 0.25  # seconds between two looks at the flood guard (summaries, back-offs)
# A reconcile that failed (libvirt refused a call) is tried once more after this long; if
# that fails too, the next periodic resync tries again (it no longer counts the domain as
# known), so a lasting failure costs one warning a resync, never a spin.
FAILED_RETRY = 5.0  # seconds
RETRY_FAILED = "failed"


class EventSource(Protocol):
    """An extra producer of events (e.g. the hook socket): started with the daemon's
    enqueue function, closed on shutdown. It must only enqueue, never block the caller.
    """

    def start(self, enqueue: Callable[[Event], None]) -> None: ...
    def close(self) -> None: ...


class Settings(Protocol):
    """The daemon settings it reads (``config.WatchSettings``)."""

    resync_interval: float
    agent_timeout: float
    workers: int
    hotadd_settle: float

    def watches(self, name: str, uuid: str) -> bool: ...


@dataclass(frozen=True)
class JobResult:
    """What one job did, for the event log. ``retry_after`` re-schedules the domain
    (e.g. a grace period after a hot-add that has not expired yet).
    """

    record: Record  # its JSON line
    line: str
    failed: bool = False
    retry_after: Optional[float] = None
    view: Optional[VcpuView] = None  # the domain as the reconcile left it (for metrics)
    routine: bool = False  # nothing done, nothing new: a log line only at debug level
    retry_reason: str = "grace"  # what the retry is for, as its job's reason
    warning: bool = False  # news worth a warning (e.g. a hot-add the guest rejected)
    # vCPU ids (of OST hot-add events) whose guest CPUs this reconcile found online.
    hotadds_online: frozenset[int] = frozenset()
    policy_mode: Optional[str] = None  # the effective policy's mode it ran under (metrics)


ReconcileFn = Callable[[Connection, Domain, Job], JobResult]


class Observer(Protocol):
    """Sees what the daemon does (``metrics.Metrics``): every event as the main loop
    handles it, every reconcile as it ends (on a worker). Must be quick and never raise.
    """

    def event(self, ev: Event) -> None: ...
    def reconciled(self, job: Job, result: JobResult, seconds: float) -> None: ...
    def failed(self, job: Job, seconds: float) -> None: ...


class _NoObserver:
    def event(self, ev: Event) -> None:
        pass

    def reconciled(self, job: Job, result: JobResult, seconds: float) -> None:
        pass

    def failed(self, job: Job, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class _JobDone:
    key: Key
    retry_after: Optional[float] = None
    job: Optional[Job] = None
    reason: str = "grace"
    unresponsive: bool = False  # the reconcile found the guest agent not answering


class _ReconcileFailed(Exception):
    """A reconcile job failed with an error already logged: retry it (``FAILED_RETRY``)."""


@dataclass(frozen=True)
class _Control:
    what: str  # "stop" or "reload"


@dataclass(frozen=True)
class _Listed:
    """A resync's listing of a host's running domains, and when it began (monotonic)."""

    event: HostEvent
    since: float
    complete: bool  # every running domain was read (none failed)


# --- per-host connection owner ------------------------------------------------------------


class HostSession:
    """Owns one host's connection: connect, subscribe, wait for loss, reconnect."""

    def __init__(
        self,
        uri: Optional[str],
        enqueue: Callable[[Any], None],
        stop: threading.Event,
        guard: Optional[FloodGuard] = None,
        watches: Callable[[str, str], bool] = lambda _name, _uuid: True,
    ):
        self.uri = Connection(uri).uri
        self._watches = watches  # the daemon's scope (--domain): by name and UUID
        self._enqueue = enqueue
        self._stop = stop
        self._lost = threading.Event()
        self._conn: Optional[Connection] = None
        # Why the session thread ended (a permanent error, or a crash); None while it runs.
        self.failure: Optional[errors.VirtHotplugError] = None
        self._guard = guard if guard is not None else FloodGuard()
        self.monitors = MonitorSubscriptions(self.uri, lambda: self._conn, self._guard)
        self._thread = threading.Thread(target=self._run, name=f"host {self.uri}", daemon=True)

    @property
    def conn(self) -> Optional[Connection]:
        return self._conn

    def start(self) -> None:
        self.monitors.start()
        self._thread.start()

    def connect_once(self) -> None:
        """First connection, in the caller's thread: a bad URI fails the start at once."""
        self._conn = self._open()

    def mark_lost(self, conn: Optional[Connection] = None) -> None:
        """End the current connection. With ``conn``, only if it still is the current one:
        a loss reported late by an old connection (its close callback, a worker's call
        that failed on it) must not tear down the connection that replaced it."""
        if conn is not None and conn is not self._conn:
            log.debug("%s: ignoring a loss of a replaced connection", self.uri)
            return
        self._lost.set()

    def join(self, timeout: float) -> None:
        """Wait for the session thread to close its connection (after a stop request)."""
        self._lost.set()
        self.monitors.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._conn is not None:  # never started: the first connection is ours to close
            self._conn.close()
            self._conn = None

    def _run(self) -> None:
        """The session thread. When it ends for any reason but a stop request, it records
        why (``failure``) and says so with a "gone" record: the daemon exits non-zero once
        no host is left, instead of running on, live but blind."""
        try:
            self._loop()
        except Exception as exc:  # not ours: a bug, or a binding raising the unexpected
            log.exception("%s: host session failed", self.uri)
            self.failure = errors.VirtHotplugError(f"{self.uri}: host session failed: {exc}")
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
                if not self._stop.is_set():  # everyone who counts connections hears of it
                    self._enqueue(HostEvent(None, host=self.uri, what="lost", reason="failed"))
        if not self._stop.is_set():
            if self.failure is None:
                self.failure = errors.VirtHotplugError(f"{self.uri}: host session ended")
            why = self.failure.message
            self._enqueue(HostEvent(None, host=self.uri, what="gone", reason=why))

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._conn is None:
                conn = self._reconnect()
                if conn is None:
                    return
                self._conn = conn
            self._enqueue(HostEvent(None, host=self.uri, what="connected"))
            self._wait_until_lost()
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _open(self) -> Connection:
        self._lost.clear()
        conn = Connection(self.uri).open()
        try:
            listener = Listener(
                self.uri,
                self._enqueue,
                lambda: self.mark_lost(conn),
                guard=self._guard,
                on_flood=lambda ref: self.monitors.drop_now(ref.uuid),
            )
            conn.subscribe(listener)
            self._monitor_running(conn)
        except errors.VirtHotplugError:
            conn.close()
            raise
        return conn

    def _monitor_running(self, conn: Connection) -> None:
        """Register the QEMU monitor events of every running domain in scope before the
        session reports "connected": a hot-add made right after must not lose its OST event
        while the first resync is still reading. Later starts and resyncs go through
        ``self.monitors`` (its own thread)."""
        if not conn.support.monitor_events:
            return
        for dom in conn.list_running():
            suppressed = self._guard.is_suppressed((self.uri, dom.uuid))
            if suppressed or not self._watches(dom.name, dom.uuid):
                continue
            try:
                conn.monitor_domain(dom)
            except errors.NoDomainError:
                continue  # stopped meanwhile
            except errors.ConnectError:
                raise
            except errors.VirtHotplugError as exc:
                log.warning("%s: no QEMU monitor events for %s: %s", self.uri, dom.name, exc)

    def _reconnect(self) -> Optional[Connection]:
        """Retry forever with exponential backoff and jitter, until connected or stopped."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_worth_reconnecting),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=30),
            stop=lambda _state: self._stop.is_set(),
            sleep=self._sleep,
            before_sleep=lambda state: log.warning(
                "%s: reconnect attempt %d failed: %s",
                self.uri,
                state.attempt_number,
                state.outcome.exception() if state.outcome else "",
            ),
            reraise=True,
        )
        try:
            return retrying(self._open)
        except errors.VirtHotplugError as exc:
            if not self._stop.is_set():
                # Only permanent errors end up here (access refused, a URI no driver takes):
                # retrying cannot help, and a service manager's restart shows the failure.
                log.error("%s: giving up: %s", self.uri, exc)
                self.failure = exc
            return None

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)  # a stop request cuts the backoff short

    def _wait_until_lost(self) -> None:
        while not self._stop.is_set():
            if self._lost.wait(LIVENESS_POLL):
                return
            conn = self._conn
            if conn is None or not conn.is_alive():
                self._enqueue(HostEvent(None, host=self.uri, what="lost", reason="not alive"))
                return


def _worth_reconnecting(exc: BaseException) -> bool:
    permanent = (errors.InvalidURIError, errors.PermissionDeniedError)
    return isinstance(exc, errors.VirtHotplugError) and not isinstance(exc, permanent)


# --- worker pool --------------------------------------------------------------------------


class _Workers:
    """A fixed set of daemon threads: a reconcile stuck on a hung guest never blocks exit."""

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


# --- the daemon ---------------------------------------------------------------------------


@dataclass
class WatchStats:
    events: int = 0
    reconciles: int = 0
    failures: int = 0
    coalesced: int = 0
    started: float = field(default_factory=time.monotonic)
    # Workers count too: without a lock an increment is a read-modify-write that only
    # happens to be atomic on today's CPython (and is not with free threading).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                setattr(self, name, getattr(self, name) + n)


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
    ) -> None:
        self.settings = settings
        self._reconcile_fn = reconcile_fn
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
        self._workers: Optional[_Workers] = None
        self._sources = list(sources)
        self._observer: Observer = observer if observer is not None else _NoObserver()
        # Sees every event on this loop, quickly (``JobRunner.observe``: the vCPU history).
        self._observe = observe
        self._bulk = resync  # None: the resync lists running domains and reconciles each
        self._resyncing: set[Connection] = set()  # connections with a resync in flight
        self.domains.on_forget(self._sched.forget)
        self.domains.on_forget(lambda key: self._flood.forget(key))  # tests replace the guard
        self.domains.on_forget(self._drop_monitor)

    # control (signal handlers and tests call these)

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
        self._workers = _Workers(self.settings.workers, self._run_job)
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
        # finish wakes the loop (its _JobDone), so waiting for it never spins.
        due = self._sched.next_due() if self._sched.running < self.settings.workers else None
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
        if isinstance(item, _JobDone):
            self._job_done(item)
        elif isinstance(item, _Control):
            self._control(item)
        elif isinstance(item, Event):
            self.stats.events += 1
            self._event(item)
        elif isinstance(item, _Listed):
            self.stats.events += 1
            self._event(item.event)
            if item.complete:  # FORGET events lost in a gap: their domains go now
                uuids = (ref.uuid for ref in item.event.domains)
                self.domains.prune(item.event.host, uuids, item.since)

    def _control(self, item: _Control) -> None:
        if item.what == "stop":
            self._begin_stop()
        elif item.what == "reload" and self._reload is not None:
            try:
                self.settings = self._reload()
                log.info("configuration reloaded")
            except errors.VirtHotplugError as exc:
                log.error("reload failed, keeping the previous configuration: %s", exc)

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
        on stop, crash, undefine (and when the hook says it stopped)."""
        session = self.sessions.get(ev.domain.host) if ev.domain is not None else None
        if session is None or ev.domain is None:
            return
        if isinstance(ev, LifecycleEvent) and ev.event_name in ("started", "resumed"):
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
            # again with short backoff until it does (jobs.hotadd_look_delay).
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
        free = self.settings.workers - self._sched.running
        for job in self._sched.pop_due(now, free):
            self.stats.coalesced += job.coalesced - 1
            self._workers.submit(job)

    def _agent_connected(self, ref: DomainRef) -> None:
        if self._breaker.reset(ref.key):
            self._sched.release(ref.key)
            log.info("domain '%s': guest agent connected: reconciling it again", ref.name)

    def _breaker_verdict(self, done: _JobDone) -> None:
        """Count unresponsive agents; a domain past the threshold waits without a worker."""
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

    def _job_done(self, done: _JobDone) -> None:
        self._sched.finish(done.key)
        self._breaker_verdict(done)
        if done.retry_after is not None and done.job is not None:
            job = done.job
            now = time.monotonic()
            self._sched.request(
                job.ref,
                due=now,
                not_before=now + done.retry_after,
                at=job.first_request,
                reason=done.reason,
                hotadded=frozenset(job.hotadded),
            )

    # worker side

    def _run_job(self, job: Job) -> None:
        result = None
        failed = False
        try:
            result = self._reconcile(job)
        except _ReconcileFailed:
            failed = True
        except Exception:  # a bug in one reconcile must not kill a worker
            log.exception("domain '%s': reconcile crashed", job.ref.name)
        finally:
            retry_after = result.retry_after if result is not None else None
            reason = result.retry_reason if result is not None else "grace"
            if failed and RETRY_FAILED not in job.reasons:
                retry_after, reason = FAILED_RETRY, RETRY_FAILED
            view = result.view if result is not None else None
            unresponsive = view is not None and view.agent.state == AGENT_UNRESPONSIVE
            self._queue.put(_JobDone(job.ref.key, retry_after, job, reason, unresponsive))

    def _reconcile(self, job: Job) -> Optional[JobResult]:
        session = self.sessions.get(job.ref.host)
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
            self.stats.count(failures=1)
            log.warning("domain '%s': %s", job.ref.name, exc)
            self._observer.failed(job, time.monotonic() - started)
            if self._bulk is not None:
                self._bulk.forget(conn.uri, job.ref.uuid)  # not known: the next resync picks it
            raise _ReconcileFailed from exc
        result = self._with_flood_finding(job, result)
        self.stats.count(reconciles=1)
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
        info = self._flood.suppressed(job.ref.key)
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
