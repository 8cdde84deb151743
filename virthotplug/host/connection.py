"""The one owner of libvirt connections: every libvirt call virthotplug makes sits here.

It resolves the URI like virsh, silences libvirt's default error printer, classifies
``libvirtError`` into the project's exceptions (design: which errors are transient, which
mean the connection is gone, which are permanent), looks domains up like virsh, and papers
over binding quirks (``guestVcpus`` returns None instead of raising).

libvirt is imported lazily so that commands which never connect start fast.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from typing import Any, Callable, Optional, Protocol, TypeVar

from virthotplug.core import errors

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
T = TypeVar("T")
Domain = Any  # a libvirt.virDomain; opaque outside this module
Stats = dict[str, Any]  # one domain's bulk stats record ("state.state", "vcpu.current", ...)

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
STATE_RUNNING = 1

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_handler_lock = threading.Lock()
_handler_installed = False
_event_loop_thread: Optional[threading.Thread] = None

# Monitor events virthotplug subscribes to (libvirt_qemu passthrough; does not taint).
MONITOR_EVENTS = ("ACPI_DEVICE_OST", "DEVICE_DELETED")
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3  # a dead daemon is noticed within ~20 s


def resolve_uri(explicit: Optional[str]) -> str:
    """``-c/--connect`` first, then ``LIBVIRT_DEFAULT_URI``, then ``qemu:///system``."""
    return explicit or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def libvirt_module() -> Any:
    """Import libvirt once and silence its default handler (it prints every failed call)."""
    global _handler_installed
    import libvirt

    with _handler_lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_installed = True
    return libvirt


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it in one thread.

    Must happen before the first ``open()`` of any connection that wants events or a close
    callback; libvirt binds a connection to the event implementation present when it opens.
    """
    global _event_loop_thread
    libvirt = libvirt_module()
    with _handler_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _event_loop_thread = threading.Thread(
            target=_run_event_loop, args=(libvirt,), name="libvirt-events", daemon=True
        )
        _event_loop_thread.start()


def _run_event_loop(libvirt: Any) -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")


class EventSink(Protocol):
    """Receives libvirt callbacks, already unwrapped. Implementations only enqueue."""

    def on_lifecycle(self, dom: Domain, event: int, detail: int) -> None: ...
    def on_agent(self, dom: Domain, state: int, reason: int) -> None: ...
    def on_device_removed(self, dom: Domain, alias: str, failed: bool) -> None: ...
    def on_monitor(self, dom: Domain, event: str, details: Any) -> None: ...
    def on_close(self, reason: int) -> None: ...


# --- error classification ---------------------------------------------------------------

# libvirt error code names → project exception. Looked up with getattr because older
# bindings lack the newer codes.
_BY_CODE: tuple[tuple[str, type[errors.VirtHotplugError]], ...] = (
    ("VIR_ERR_NO_DOMAIN", errors.NoDomainError),
    ("VIR_ERR_NO_CONNECT", errors.InvalidURIError),
    ("VIR_ERR_SYSTEM_ERROR", errors.ConnectError),
    ("VIR_ERR_RPC", errors.ConnectError),
    ("VIR_ERR_INVALID_CONN", errors.ConnectError),
    ("VIR_ERR_OPERATION_TIMEOUT", errors.TransientError),
    ("VIR_ERR_AGENT_UNRESPONSIVE", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_UNSYNCED", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_COMMAND_TIMEOUT", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_COMMAND_FAILED", errors.AgentError),
    ("VIR_ERR_OPERATION_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_NO_SUPPORT", errors.UnsupportedError),
    ("VIR_ERR_ARGUMENT_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_CONFIG_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_OPERATION_INVALID", errors.InvalidRequestError),
    ("VIR_ERR_INVALID_ARG", errors.InvalidRequestError),
    ("VIR_ERR_OPERATION_FAILED", errors.InvalidRequestError),
    ("VIR_ERR_OPERATION_DENIED", errors.PermissionDeniedError),
    ("VIR_ERR_AUTH_FAILED", errors.PermissionDeniedError),
    ("VIR_ERR_AUTH_CANCELLED", errors.PermissionDeniedError),
    ("VIR_ERR_AUTH_UNAVAILABLE", errors.PermissionDeniedError),
    ("VIR_ERR_ACCESS_DENIED", errors.PermissionDeniedError),
    ("VIR_ERR_XML_ERROR", errors.MalformedXMLError),
    ("VIR_ERR_XML_DETAIL", errors.MalformedXMLError),
)


def classify(exc: Exception, *, context: str = "") -> errors.VirtHotplugError:
    """Translate a ``libvirtError`` into the project's exception, message prefixed by context."""
    libvirt = libvirt_module()
    if not isinstance(exc, libvirt.libvirtError):
        return errors.VirtHotplugError(f"{context}: {exc}" if context else str(exc))
    code, domain = exc.get_error_code(), exc.get_error_domain()
    message = _one_line(exc.get_error_message() or str(exc))
    text = f"{context}: {message}" if context else message
    return _exception_class(libvirt, code, domain, message)(text, code=code)


def _exception_class(
    libvirt: Any, code: int, domain: int, message: str
) -> type[errors.VirtHotplugError]:
    lowered = message.lower()
    if "permission denied" in lowered or "read only access" in lowered:
        return errors.PermissionDeniedError
    if "agent is not configured" in lowered:
        return errors.AgentNotConfiguredError
    if "not running" in lowered and code == getattr(libvirt, "VIR_ERR_OPERATION_INVALID", -1):
        return errors.NotRunningError
    if code == getattr(libvirt, "VIR_ERR_INTERNAL_ERROR", -1) and domain in (
        getattr(libvirt, "VIR_FROM_RPC", -1),
        getattr(libvirt, "VIR_FROM_REMOTE", -1),
    ):
        return errors.ConnectError
    for name, cls in _BY_CODE:
        if code == getattr(libvirt, name, None):
            return cls
    return errors.VirtHotplugError


def _open_error(exc: Exception, uri: str) -> errors.VirtHotplugError:
    """Errors from ``open()`` are about the URI or the daemon, whatever their code."""
    libvirt = libvirt_module()
    err = classify(exc, context=f"cannot connect to '{uri}'")
    domain = exc.get_error_domain() if isinstance(exc, libvirt.libvirtError) else None
    bad_uri = domain == getattr(libvirt, "VIR_FROM_URI", -1) or "uri" in err.message.lower()
    if isinstance(err, (errors.PermissionDeniedError, errors.InvalidURIError)):
        return err
    # At open() the URI (and the node file it may name) is the only argument: a refused
    # argument or definition means the URI is unusable, not that the daemon is down.
    unusable = (errors.MalformedXMLError, errors.InvalidRequestError, errors.UnsupportedError)
    if bad_uri or isinstance(err, unusable):
        return errors.InvalidURIError(err.message, code=err.code)
    if isinstance(err, errors.ConnectError):
        return errors.ConnectError(f"{err.message} (is libvirtd running?)", code=err.code)
    return errors.ConnectError(err.message, code=err.code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- the connection ---------------------------------------------------------------------


class _AgentLeases:
    """Connections for guest-agent calls: one call per connection at a time.

    A call to a hung guest agent can block inside libvirtd indefinitely, and libvirt's client
    then holds back every other call on the same connection until its next keepalive
    wake-up (measured: exactly the keepalive interval; without keepalive, until the stuck
    call returns). So an agent call never shares its connection: it leases one, and a call
    stuck on a hung guest ties up only its own lease, never other domains.
    """

    MAX_IDLE = 8

    def __init__(self, open_connection: Callable[[], Any]) -> None:
        self._open = open_connection
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def run(self, uuid: str, fn: Callable[[Domain], T]) -> T:
        conn = self._lease()
        try:
            return fn(conn.lookupByUUIDString(uuid))
        finally:
            self._release(conn)

    def _lease(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._open()

    def _release(self, conn: Any) -> None:
        with self._lock:
            if len(self._idle) < self.MAX_IDLE:
                self._idle.append(conn)
                return
        _close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception as exc:  # closing a dead connection is not worth reporting
        log.debug("closing an agent connection: %s", exc)


class Connection:
    """One libvirt connection. Thread-safe for calls (libvirt connections are)."""

    def __init__(self, uri: Optional[str] = None, *, readonly: bool = False) -> None:
        self.uri = resolve_uri(uri)
        self.readonly = readonly
        self._conn: Any = None
        self._agents = _AgentLeases(self._open_raw)
        self._domain_callbacks: list[int] = []
        self._monitor_callbacks: list[int] = []
        self._close_registered = False

    # lifecycle

    def open(self) -> Connection:
        libvirt = libvirt_module()
        try:
            self._conn = self._open_raw()
        except libvirt.libvirtError as exc:
            raise _open_error(exc, self.uri) from None
        if self._conn is None:  # very old bindings return None instead of raising
            raise errors.ConnectError(f"cannot connect to '{self.uri}'")
        return self

    def _open_raw(self) -> Any:
        libvirt = libvirt_module()
        return (libvirt.openReadOnly if self.readonly else libvirt.open)(self.uri)

    def close(self) -> None:
        self._agents.close()
        if self.is_alive():
            self.unsubscribe()
        else:  # a dead connection's registrations died with it; deregistering only warns
            self._domain_callbacks, self._monitor_callbacks = [], []
            self._close_registered = False
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
    def raw(self) -> Any:
        """The underlying ``virConnect`` (for event registration in the listener)."""
        if self._conn is None:
            raise errors.ConnectError(f"not connected to '{self.uri}'")
        return self._conn

    def call(self, fn: Callable[[], T], *, context: str = "") -> T:
        """Run one libvirt call, translating its error."""
        libvirt = libvirt_module()
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise classify(exc, context=context) from None

    # lookups

    def lookup(self, ident: str) -> Domain:
        """Find a domain like virsh: by id when numeric, then by UUID, then by name."""
        libvirt = libvirt_module()
        conn = self.raw
        attempts: list[Callable[[], Any]] = []
        if ident.isdigit() and len(ident) < 10:
            attempts.append(lambda: conn.lookupByID(int(ident)))
        if _UUID_RE.match(ident):
            attempts.append(lambda: conn.lookupByUUIDString(ident))
        attempts.append(lambda: conn.lookupByName(ident))
        for attempt in attempts:
            try:
                return attempt()
            except libvirt.libvirtError as exc:
                err = classify(exc)
                if not isinstance(err, (errors.NoDomainError, errors.InvalidRequestError)):
                    raise classify(exc, context=f"domain '{ident}'") from None
        raise errors.NoDomainError(f"failed to get domain '{ident}': no such domain on {self.uri}")

    def list_domains(self) -> list[Domain]:
        return self.call(lambda: list(self.raw.listAllDomains(0)), context="listing domains")

    def list_running(self) -> list[Domain]:
        libvirt = libvirt_module()
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        return self.call(lambda: list(self.raw.listAllDomains(flags)), context="listing domains")

    def transient_uuids(self) -> set[str]:
        """UUIDs of transient domains, in one call (``isPersistent`` is one call per domain)."""
        libvirt = libvirt_module()
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT
        domains = self.call(lambda: self.raw.listAllDomains(flags), context="listing domains")
        return {d.UUIDString() for d in domains}

    # reads

    def bulk_stats(self, domains: Optional[list[Domain]] = None) -> list[tuple[Domain, Stats]]:
        """State and vCPU stats of all (or the given) domains in one call."""
        libvirt = libvirt_module()
        groups = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_VCPU
        if domains is None:
            return self.call(lambda: self.raw.getAllDomainStats(groups, 0), context="stats")
        if not domains:
            return []
        return self.call(lambda: self.raw.domainListGetStats(domains, groups, 0), context="stats")

    def xml(self, dom: Domain, *, inactive: bool) -> str:
        libvirt = libvirt_module()
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self.call(lambda: dom.XMLDesc(flags), context=f"domain '{dom.name()}'"))

    def guest_vcpus(self, dom: Domain) -> dict[str, Any]:
        """The guest agent's view; always raises on failure (the binding returns None)."""
        libvirt = libvirt_module()
        context = f"domain '{dom.name()}'"

        def query(leased: Domain) -> dict[str, Any]:
            reply = leased.guestVcpus(0)
            if reply is None:
                # Read now: freeing the leased handle resets the thread's last error.
                raise _last_error(libvirt, context)
            return reply  # type: ignore[no-any-return]

        try:
            return self._agents.run(dom.UUIDString(), query)
        except libvirt.libvirtError as exc:
            raise classify(exc, context=context) from None

    def agent_api_missing(self, dom: Domain) -> Optional[str]:
        """The driver's message when it has no guest-agent vCPU API at all (the test
        driver), else None. Asked on the shared connection with a domain whose agent cannot
        be reached (not running, or no agent channel): the driver answers from its argument
        checks at once, no guest is involved, so no agent lease is needed (opening one can
        be costly: the test driver re-reads its whole node file for every connection)."""
        libvirt = libvirt_module()
        no_support = getattr(libvirt, "VIR_ERR_NO_SUPPORT", 3)
        try:
            if dom.guestVcpus(0) is not None:
                return None
            last = libvirt.virGetLastError()  # the binding returns None instead of raising
            code, message = (last[0], str(last[2] or "")) if last else (0, "")
        except libvirt.libvirtError as exc:
            code, message = exc.get_error_code(), exc.get_error_message() or str(exc)
        return _one_line(message) if code == no_support else None

    def vcpu_info(self, dom: Domain) -> list[tuple[int, int, int, int]]:
        """``virDomainGetVcpus`` rows (number, state, cpu time, cpu) of a running domain."""
        return self.call(lambda: list(dom.vcpus()[0]), context=f"domain '{dom.name()}'")

    def state(self, dom: Domain) -> int:
        return int(self.call(lambda: dom.state(0)[0], context=f"domain '{dom.name()}'"))

    def taint_messages(self, dom: Domain) -> list[str]:
        libvirt = libvirt_module()
        flags = libvirt.VIR_DOMAIN_MESSAGE_TAINTING
        return self.call(lambda: list(dom.messages(flags)), context=f"domain '{dom.name()}'")

    # events

    def subscribe(self, sink: EventSink) -> None:
        """Register every callback virthotplug needs on this connection, all domains.

        Registrations belong to one connection: after a reconnect, call this again on the
        new one. Needs ``ensure_event_loop()`` before ``open()``.
        """
        libvirt = libvirt_module()
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
        for event_id, callback in domain_events:
            register = functools.partial(
                conn.domainEventRegisterAny, None, event_id, callback, None
            )
            callback_id = self.call(register, context="registering domain events")
            self._domain_callbacks.append(callback_id)
        self._subscribe_monitor(sink)
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

    def _subscribe_monitor(self, sink: EventSink) -> None:
        # QEMU monitor event passthrough: read-write connection needed; it does not taint
        # the domain (qemuMonitorCommand would).
        import libvirt_qemu

        def forward(
            _c: Any, dom: Domain, event: str, _s: int, _us: int, details: Any, _o: Any
        ) -> None:
            sink.on_monitor(dom, event, details)

        for name in MONITOR_EVENTS:
            register = functools.partial(
                libvirt_qemu.qemuMonitorEventRegister, self.raw, None, name, forward, None, 0
            )
            try:
                callback_id = self.call(register, context=f"QEMU monitor event {name}")
            except errors.UnsupportedError as exc:  # not a QEMU connection (test driver)
                log.info("%s: no QEMU monitor events: %s", self.uri, exc)
                return
            self._monitor_callbacks.append(callback_id)

    def unsubscribe(self) -> None:
        """Drop every registration; errors are ignored (the connection may be dead)."""
        conn = self._conn
        if conn is None:
            return
        steps: list[Callable[[], Any]] = [
            functools.partial(conn.domainEventDeregisterAny, i) for i in self._domain_callbacks
        ]
        if self._monitor_callbacks:
            import libvirt_qemu

            steps += [
                functools.partial(libvirt_qemu.qemuMonitorEventDeregister, conn, i)
                for i in self._monitor_callbacks
            ]
        if self._close_registered:
            steps.append(conn.unregisterCloseCallback)
        self._domain_callbacks, self._monitor_callbacks = [], []
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

    def domain_by_uuid(self, uuid: str) -> Domain:
        return self.call(lambda: self.raw.lookupByUUIDString(uuid), context=f"domain {uuid}")

    # metadata and writes

    def metadata(self, dom: Domain, namespace: str, *, live: bool) -> Optional[str]:
        """An element of the live (or persistent) definition's metadata; None when absent."""
        libvirt = libvirt_module()
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
        kind = libvirt.VIR_DOMAIN_METADATA_ELEMENT
        try:
            return str(dom.metadata(kind, namespace, flags))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == getattr(libvirt, "VIR_ERR_NO_DOMAIN_METADATA", 80):
                return None
            raise classify(exc, context=f"domain '{dom.name()}' metadata") from None

    def set_metadata(
        self, dom: Domain, xml: Optional[str], key: str, namespace: str, *, live: bool, config: bool
    ) -> None:
        """Write a metadata element, or remove it when ``xml`` is None."""
        libvirt = libvirt_module()
        flags = _affect_flags(libvirt, live=live, config=config)
        kind = libvirt.VIR_DOMAIN_METADATA_ELEMENT
        self.call(
            lambda: dom.setMetadata(kind, xml, key if xml else None, namespace, flags),
            context=f"domain '{dom.name()}' metadata",
        )

    def set_guest_vcpus(self, dom: Domain, cpulist: str, online: bool) -> None:
        """Online or offline guest CPUs through the agent (first-class API: no taint).

        A failure may follow a partial success: re-read the guest afterwards.
        """
        self.call(
            lambda: self._agents.run(
                dom.UUIDString(), lambda leased: leased.setGuestVcpus(cpulist, int(online), 0)
            ),
            context=f"domain '{dom.name()}'",
        )

    def set_vcpus(self, dom: Domain, count: int, *, live: bool, config: bool) -> None:
        """Hot-plug or unplug vCPUs (live) and/or change the persistent count (config)."""
        libvirt = libvirt_module()
        flags = _affect_flags(libvirt, live=live, config=config)
        self.call(lambda: dom.setVcpusFlags(count, flags), context=f"domain '{dom.name()}'")


def _affect_flags(libvirt: Any, *, live: bool, config: bool) -> int:
    live_flag = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0
    return int(live_flag | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))


def _last_error(libvirt: Any, context: str) -> errors.VirtHotplugError:
    """Build the exception from the thread's last libvirt error (read in the same thread)."""
    last = libvirt.virGetLastError()
    if not last:
        return errors.AgentError(f"{context}: guest agent call failed")
    code, domain, message = last[0], last[1], _one_line(str(last[2] or "unknown error"))
    cls = _exception_class(libvirt, code, domain, message)
    return cls(f"{context}: {message}", code=code)
