"""One host's connection: connect, subscribe to its events, notice its loss, reconnect.

A ``HostSession`` thread owns the connection of one host. It reconnects with exponential
backoff and jitter, re-registers every callback on the new connection, and reports what
happens to the main loop as ``HostEvent`` records ("connected", "lost", "gone"). Events in
a gap are lost: the main loop resyncs the host on each "connected".
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

import tenacity

from virthotplug.core import errors
from virthotplug.core.events import HostEvent
from virthotplug.daemon.flood import FloodGuard
from virthotplug.daemon.listener import Listener
from virthotplug.daemon.subscriptions import MonitorSubscriptions
from virthotplug.host.connection import Connection

log = logging.getLogger(__name__)

LIVENESS_POLL = 5.0  # seconds between isAlive checks, in case no close callback arrives


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

    def holds(self, conn: Connection) -> bool:
        """Whether ``conn`` is still this session's connection, and alive."""
        return conn is self._conn and not self._lost.is_set() and conn.is_alive()

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
