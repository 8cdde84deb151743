"""The one owner of libvirt connections: every libvirt call virthotplug makes goes through
a ``Connection`` or the ``Domain`` wrappers it hands out.

It resolves the URI like virsh, reads the connection's capability record once at open
(``host.support``), classifies ``libvirtError`` into the project's exceptions
(``host.errors``), looks domains up like virsh, registers and drops event callbacks, and
papers over binding quirks (``guestVcpus`` returns None instead of raising).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any, Callable, Iterable, Optional, Protocol, TypeVar

from virthotplug.core import errors
from virthotplug.host.domain import Domain
from virthotplug.host.errors import classify, open_error
from virthotplug.host.libvirt_module import libvirt_module
from virthotplug.host.libvirt_types import Stats, VirConnect, VirDomain
from virthotplug.host.support import Capabilities, read_capabilities

log = logging.getLogger(__name__)

# How messages name the host before libvirt has said which URI its default is.
DEFAULT_URI_LABEL = "libvirt's default URI"
T = TypeVar("T")

# virsh's state names, by virDomainState value.
DOMAIN_STATES = {
    0: "no state",
    1: "running",
    2: "idle",
    3: "paused",
    4: "in shutdown",
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")

# Monitor events virthotplug subscribes to (libvirt_qemu passthrough; does not taint).
MONITOR_EVENTS = ("ACPI_DEVICE_OST", "DEVICE_DELETED")
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3  # a dead daemon is noticed within ~20 s


def default_uri(*, readonly: bool = False) -> str:
    """The URI libvirt connects to when given none, as it names it (``virConnectGetURI``):
    ``LIBVIRT_DEFAULT_URI``, else ``uri_default`` of libvirt.conf, else its probe (the
    system daemon for root, the session daemon for other users). Asking needs a connection."""
    with Connection(None, readonly=readonly) as conn:
        return conn.uri


class EventSink(Protocol):
    """Receives libvirt callbacks, already unwrapped. Implementations only enqueue."""

    def on_lifecycle(self, dom: VirDomain, event: int, detail: int) -> None: ...
    def on_agent(self, dom: VirDomain, state: int, reason: int) -> None: ...
    def on_device_removed(self, dom: VirDomain, alias: str, failed: bool) -> None: ...
    def on_vcpu_removed(self, dom: VirDomain, vcpu: int) -> None: ...
    def on_metadata(self, dom: VirDomain, mtype: int, namespace: Any) -> None: ...
    def on_monitor(
        self, dom: VirDomain, event: str, details: Any, emitted: Optional[float]
    ) -> None: ...
    def on_close(self, reason: int) -> None: ...


class NoLeaseError(errors.AgentUnavailableError):
    """Every agent lease of the connection is out (``_AgentLeases``): the agent was not asked."""


class _AgentLeases:
    """Connections for guest-agent calls: one call per connection at a time, and at most
    ``limit`` calls in flight per host.

    A call to a hung guest agent can block inside libvirtd indefinitely, and libvirt's client
    then holds back every other call on the same connection until its next keepalive
    wake-up (measured: exactly the keepalive interval; without keepalive, until the stuck
    call returns). So an agent call never shares its connection: it leases one, and a call
    stuck on a hung guest ties up only its own lease, never other domains.

    Each lease is a connection of its own, and under ``qemu+ssh`` an ssh process: so the
    leases out at once are capped. A lease is returned by the thread that made the call,
    when the call really ends: a caller that stopped waiting for it (``call_with_timeout``)
    leaves it counted until then, so hung guests cannot make the host open more than
    ``limit`` connections. A call that finds every lease out waits ``wait`` seconds for one,
    then fails for its domain (``AgentUnavailableError``).
    """

    MAX_IDLE = 8
    LIMIT = 16  # leases out at once, per connection (per host)
    WAIT = 30.0  # seconds a call waits for a lease when all of them are out

    def __init__(
        self,
        open_connection: Callable[[], VirConnect],
        *,
        limit: int = LIMIT,
        wait: float = WAIT,
    ) -> None:
        self._open = open_connection
        self._idle: list[VirConnect] = []
        self._lock = threading.Lock()
        self.limit = limit
        self._wait = wait
        self._slots = threading.BoundedSemaphore(limit)
        self._out = 0  # leases out now (their calls have not ended yet)
        # Set when the owning connection closes (a reconnect): leases still out are closed
        # when they come back, and no new ones are opened for the old connection.
        self._closed = False

    @property
    def out(self) -> int:
        """Leases out now: calls that have not ended, whether or not anyone still waits."""
        with self._lock:
            return self._out

    def run(self, uuid: str, fn: Callable[[VirDomain], T]) -> T:
        if not self._slots.acquire(timeout=self._wait):
            raise NoLeaseError(
                f"guest agent not asked: {self.limit} guest-agent calls on this host "
                f"are still out after {self._wait:g} s"
            )
        try:
            conn = self._lease()
            try:
                return fn(conn.lookupByUUIDString(uuid))
            finally:
                self._release(conn)
        finally:
            self._slots.release()

    def _lease(self) -> VirConnect:
        with self._lock:
            if self._closed:
                raise errors.ConnectError("the connection was closed (reconnecting)")
            self._out += 1
            if self._idle:
                return self._idle.pop()
        try:
            return self._open()
        except BaseException:
            with self._lock:
                self._out -= 1
            raise

    def _release(self, conn: VirConnect) -> None:
        with self._lock:
            self._out -= 1
            if not self._closed and len(self._idle) < self.MAX_IDLE:
                self._idle.append(conn)
                return
        _close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)


def _close_quietly(conn: VirConnect) -> None:
    try:
        conn.close()
    except Exception as exc:  # closing a dead connection is not worth reporting
        log.debug("closing an agent connection: %s", exc)


class Connection:
    """One libvirt connection. Thread-safe for calls (libvirt connections are)."""

    def __init__(self, uri: Optional[str] = None, *, readonly: bool = False) -> None:
        # None: libvirt's own default (see ``default_uri``). Once open, ``uri`` is the URI
        # libvirt says it connected to, and every further connection (agent leases) uses it.
        self._requested = uri
        self.uri = uri if uri is not None else DEFAULT_URI_LABEL
        self.readonly = readonly
        self.libvirt: Any = libvirt_module()
        self._conn: Optional[VirConnect] = None
        self._support: Optional[Capabilities] = None
        self._agents = _AgentLeases(self._open_raw)
        self._domain_callbacks: list[int] = []
        # Per-domain QEMU monitor registrations: UUID -> callback ids (one per event name).
        self._monitor_callbacks: dict[str, list[int]] = {}
        self._monitor_lock = threading.Lock()
        self._monitor_forward: Optional[Callable[..., None]] = None
        self._close_registered = False

    # lifecycle

    def open(self) -> Connection:
        if self._agents._closed:  # opened again after close(): fresh agent leases
            self._agents = _AgentLeases(self._open_raw)
        try:
            self._conn = self._open_raw()
            if self._conn is not None and self._requested is None:
                self._requested = self.uri = str(self._conn.getURI())
            self._support = read_capabilities(self.uri, self._conn, self.libvirt)
        except self.libvirt.libvirtError as exc:
            raise open_error(exc, self._requested) from None
        if self._conn is None:  # very old bindings return None instead of raising
            raise errors.ConnectError(f"cannot connect to '{self.uri}'")
        return self

    def _open_raw(self) -> VirConnect:
        opener = self.libvirt.openReadOnly if self.readonly else self.libvirt.open
        conn: VirConnect = opener(self._requested)
        return conn

    def close(self) -> None:
        self._agents.close()
        # Also on a dead connection: each registration holds a reference to the virConnect,
        # which libvirt drops locally before it asks the daemon (that part fails, quietly).
        # Skipped, the closed connection is never freed, nor its client's event loop: one
        # eventfd leaked per reconnect.
        self.unsubscribe()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a dead connection is not worth reporting
                log.debug("closing %s: %s", self.uri, exc)

    def __enter__(self) -> Connection:
        return self.open() if self._conn is None else self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def raw(self) -> VirConnect:
        """The underlying ``virConnect``."""
        if self._conn is None:
            raise errors.ConnectError(f"not connected to '{self.uri}'")
        return self._conn

    @property
    def support(self) -> Capabilities:
        """The capability record read at ``open()``."""
        if self._support is None:
            raise errors.ConnectError(f"not connected to '{self.uri}'")
        return self._support

    def call(self, fn: Callable[[], T], *, context: str = "") -> T:
        """Run one libvirt call, translating its error."""
        try:
            return fn()
        except self.libvirt.libvirtError as exc:
            raise classify(exc, context=context) from None

    def affect_flags(self, *, live: bool, config: bool) -> int:
        live_flag = self.libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0
        return int(live_flag | (self.libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))

    # lookups

    def lookup(self, ident: str) -> Domain:
        """Find a domain like virsh: by id when numeric, then by UUID, then by name."""
        conn = self.raw
        attempts: list[Callable[[], VirDomain]] = []
        if ident.isdigit() and len(ident) < 10:
            attempts.append(lambda: conn.lookupByID(int(ident)))
        if _UUID_RE.match(ident):
            attempts.append(lambda: conn.lookupByUUIDString(ident))
        attempts.append(lambda: conn.lookupByName(ident))
        for attempt in attempts:
            try:
                return Domain(self, attempt())
            except self.libvirt.libvirtError as exc:
                err = classify(exc)
                if not isinstance(err, (errors.NoDomainError, errors.InvalidRequestError)):
                    raise classify(exc, context=f"domain {errors.quote(ident)}") from None
        where = errors.shown(self.uri)
        raise errors.NoDomainError(
            f"failed to get domain {errors.quote(ident)}: no such domain on {where}"
        )

    def domain_by_uuid(self, uuid: str) -> Domain:
        raw = self.call(lambda: self.raw.lookupByUUIDString(uuid), context=f"domain {uuid}")
        return Domain(self, raw)

    def list_domains(self) -> list[Domain]:
        return self._list(0)

    def list_running(self) -> list[Domain]:
        return self._list(self.libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)

    def transient_uuids(self) -> set[str]:
        """UUIDs of transient domains, in one call (``isPersistent`` is one call per domain)."""
        return {d.uuid for d in self._list(self.libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)}

    def _list(self, flags: int) -> list[Domain]:
        raws = self.call(lambda: self.raw.listAllDomains(flags), context="listing domains")
        return [Domain(self, raw) for raw in raws]

    # reads

    def bulk_stats(
        self, domains: Optional[list[Domain]] = None, *, active: bool = False
    ) -> list[tuple[Domain, Stats]]:
        """State and vCPU stats of all (or only the active, or the given) domains in one
        call."""
        groups = self.libvirt.VIR_DOMAIN_STATS_STATE | self.libvirt.VIR_DOMAIN_STATS_VCPU
        if domains is None:
            flags = self.libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE if active else 0
            rows = self.call(lambda: self.raw.getAllDomainStats(groups, flags), context="stats")
        elif not domains:
            return []
        else:
            raws = [d.raw for d in domains]
            rows = self.call(lambda: self.raw.domainListGetStats(raws, groups, 0), context="stats")
        return [(Domain(self, raw), record) for raw, record in rows]

    def agent_call(self, uuid: str, fn: Callable[[VirDomain], T], *, context: str = "") -> T:
        """Run one guest-agent call on a leased connection of its own (see _AgentLeases).

        Its errors are classified as an agent call's: they stay the domain's unless their
        code says the host is the problem (see ``host.errors``).
        """
        try:
            return self._agents.run(uuid, fn)
        except NoLeaseError as exc:
            raise NoLeaseError(f"{context}: {exc}" if context else str(exc)) from None
        except self.libvirt.libvirtError as exc:
            raise classify(exc, context=context, agent=True) from None

    def guest_vcpus(self, dom: Domain) -> dict[str, str]:
        """The guest agent's view of ``dom`` (``Domain.guest_vcpus``)."""
        return dom.guest_vcpus()

    # events

    def subscribe(self, sink: EventSink, *, monitor: Iterable[Domain] = ()) -> None:
        """Register the domain events (all domains), the close callback and keepalive, and
        QEMU monitor events for the ``monitor`` domains (more later with ``monitor_domain``).

        Registrations belong to one connection: after a reconnect, call this again on the
        new one. Needs ``ensure_event_loop()`` before ``open()``.
        """
        libvirt = self.libvirt
        conn = self.raw
        domain_events: list[tuple[int, Callable[..., None]]] = [
            (
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                lambda _c, dom, event, detail, _o: sink.on_lifecycle(dom, event, detail),
            ),
            (
                libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                lambda _c, dom, state, reason, _o: sink.on_agent(dom, state, reason),
            ),
            (
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                lambda _c, dom, alias, _o: sink.on_device_removed(dom, alias, False),
            ),
            (
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                lambda _c, dom, alias, _o: sink.on_device_removed(dom, alias, True),
            ),
        ]
        metadata_change = getattr(libvirt, "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE", None)
        if metadata_change is not None:  # libvirt >= 3.0: a policy set on a running domain
            domain_events.append(
                (metadata_change, lambda _c, dom, mtype, ns, _o: sink.on_metadata(dom, mtype, ns))
            )
        vcpu_removed = self.support.vcpu_removed_event_id
        if vcpu_removed is not None:  # libvirt >= 12.4, binding and daemon: libvirt dropped it
            domain_events.append(
                (vcpu_removed, lambda _c, dom, vcpu, _o: sink.on_vcpu_removed(dom, vcpu))
            )
        for event_id, callback in domain_events:
            register = functools.partial(
                conn.domainEventRegisterAny, None, event_id, callback, None
            )
            callback_id = self.call(register, context="registering domain events")
            self._domain_callbacks.append(callback_id)
        if self.support.monitor_events:
            self._monitor_forward = _monitor_forwarder(sink)
            for dom in monitor:
                self.monitor_domain(dom)
        else:
            log.info("%s: no QEMU monitor events on the %s driver", self.uri, self.support.driver)
        self.call(
            lambda: conn.registerCloseCallback(lambda _c, reason, _o: sink.on_close(reason), None),
            context="registering the close callback",
        )
        self._close_registered = True
        try:
            self.call(
                lambda: conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT),
                context="enabling keepalive",
            )
        except errors.UnsupportedError:  # in-process drivers have no daemon to lose
            log.debug("%s: no keepalive on this connection", self.uri)

    def monitor_domain(self, dom: Domain) -> bool:
        """Register the QEMU monitor events of one domain (idempotent); False when this
        connection has none (another driver, or not subscribed).

        One registration per domain, never one for all domains: libvirtd queues a
        subscriber's events without bound, so a guest that floods them must be cut off
        alone (``unmonitor_domain``) while every other domain keeps its hints. QEMU monitor
        event passthrough needs a read-write connection and does not taint the domain
        (qemuMonitorCommand would).
        """
        forward = self._monitor_forward
        if forward is None:
            return False
        with self._monitor_lock:
            if dom.uuid in self._monitor_callbacks:
                return True
            ids: list[int] = []
            for name in MONITOR_EVENTS:
                try:
                    ids.append(dom.register_monitor_event(name, forward))
                except errors.VirtHotplugError:
                    self._deregister_monitor(ids)
                    raise
            self._monitor_callbacks[dom.uuid] = ids
        return True

    def unmonitor_domain(self, uuid: str) -> bool:
        """Drop one domain's QEMU monitor registrations; False when it had none. Never from
        a libvirt callback: deregistering is a call to the daemon."""
        with self._monitor_lock:
            ids = self._monitor_callbacks.pop(uuid, None)
            if ids is None:
                return False
            self._deregister_monitor(ids)
        return True

    @property
    def monitoring(self) -> bool:
        """Whether this connection is subscribed to QEMU monitor events (``subscribe`` on a
        driver that has them): only then can ``monitor_domain`` register a domain."""
        return self._monitor_forward is not None

    def monitored(self) -> frozenset[str]:
        """UUIDs of the domains whose QEMU monitor events this connection receives."""
        with self._monitor_lock:
            return frozenset(self._monitor_callbacks)

    def _deregister_monitor(self, ids: list[int]) -> None:
        conn = self._conn
        if conn is None or not ids:
            return
        import libvirt_qemu

        for callback_id in ids:
            try:
                libvirt_qemu.qemuMonitorEventDeregister(conn, callback_id)
            except Exception as exc:  # the connection may be dead: its registrations too
                log.debug("%s: deregistering monitor event %d: %s", self.uri, callback_id, exc)

    def unsubscribe(self) -> None:
        """Drop every registration; errors are ignored (the connection may be dead)."""
        conn = self._conn
        if conn is None:
            return
        with self._monitor_lock:
            monitor, self._monitor_callbacks = self._monitor_callbacks, {}
            self._monitor_forward = None
        for ids in monitor.values():
            self._deregister_monitor(ids)
        steps: list[Callable[[], Any]] = [
            functools.partial(conn.domainEventDeregisterAny, i) for i in self._domain_callbacks
        ]
        if self._close_registered:
            steps.append(conn.unregisterCloseCallback)
        self._domain_callbacks = []
        self._close_registered = False
        for step in steps:
            try:
                step()
            except Exception as exc:
                log.debug("%s: deregistering: %s", self.uri, exc)

    def is_alive(self) -> bool:
        conn = self._conn
        try:
            return conn is not None and conn.isAlive() == 1
        except Exception:
            return False


class OpeningConnection:
    """A connection opened on a thread of its own, while the caller goes on (imports the
    read path, loads its configuration): libvirtd takes from a few milliseconds to a second
    to answer an open (the test driver parses its whole node file), time the caller's own
    start-up fits in. ``result`` waits for it: the open connection, or the open's error.
    """

    def __init__(self, uri: Optional[str], *, readonly: bool = False) -> None:
        self._uri, self._readonly = uri, readonly
        self._conn: Optional[Connection] = None
        self._error: Optional[BaseException] = None
        self._handed_over = False  # result() gave it to the caller, who closes it
        self._thread = threading.Thread(target=self._open, name="open", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self._conn = Connection(self._uri, readonly=self._readonly).open()
        except BaseException as exc:  # raised in the caller's thread, by result()
            self._error = exc

    def result(self) -> Connection:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._conn is not None
        self._handed_over = True
        return self._conn

    def discard(self) -> None:
        """Close it if ``result`` never handed it over (the caller failed before reading)."""
        self._thread.join()
        if self._conn is not None and not self._handed_over:
            self._conn.close()


def _monitor_forwarder(sink: EventSink) -> Callable[..., None]:
    def forward(
        _c: Any, dom: VirDomain, event: str, seconds: int, micros: int, details: Any, _o: Any
    ) -> None:
        # When QEMU emitted it (host clock; libvirt passes -1 when QEMU sent none).
        emitted = seconds + micros / 1e6 if seconds >= 0 and micros >= 0 else None
        sink.on_monitor(dom, event, details, emitted)

    return forward
