"""Read the four vCPU layers of many domains with as few libvirt calls as possible.

    1 bulk call      state + vCPU stats of every domain (live and hypervisor layers)
    1 call           which domains are transient
    1 per domain     inactive XML (config layer, agent channel, metadata)
    1 per domain     live XML, only for active persistent domains where the driver has no
                     vCPU stats (the test driver); per-domain reads a few at a time in flight
    1 per domain     guest agent, only for running domains with an agent channel;
                     in parallel with a bounded pool and a bounded wait each; none once
                     the driver said it has no such API at all

Per-domain failures (bad XML, an agent that hangs or replies garbage) become findings or
entries in ``ReadResult.errors``; they never stop the other domains from being read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from virthotplug.core import errors
from virthotplug.core.drift import find_drift
from virthotplug.core.settings import AGENT_TIMEOUT
from virthotplug.core.shared import SharedValues
from virthotplug.core.view import (
    AGENT_BAD_REPLY,
    AGENT_CONNECTED,
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_CONNECTED,
    AGENT_NOT_QUERIED,
    AGENT_UNRESPONSIVE,
    AGENT_UNSUPPORTED,
    VCPU_STATES,
    AgentStatus,
    CountLayer,
    Finding,
    GuestLayer,
    HypervisorLayer,
    VcpuView,
    parse_guest_reply,
)
from virthotplug.core.workpool import CallResult, CallTimeout, bounded_map
from virthotplug.host.connection import DOMAIN_STATES, Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import DomainXML, parse_domain_xml
from virthotplug.host.errors import last_error
from virthotplug.host.history import ContextFn, DomainContext
from virthotplug.host.libvirt_types import Stats

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

DEFAULT_AGENT_TIMEOUT = AGENT_TIMEOUT.default  # the [watch] setting (core.settings)
DEFAULT_WORKERS = 8
DEFINITION_WORKERS = 4  # definition reads in flight at once (libvirtd serves 5 per client)
RUNS_PER_WORKER = 4  # _map_in_order hands each thread about this many runs of items
MAX_RUN = 64  # items in one run at most
MAX_HOSTS_AT_ONCE = 16  # hosts read in parallel by read_hosts


@dataclass(frozen=True)
class DomainError:
    host: str
    name: str
    error: str


@dataclass
class ReadResult:
    views: list[VcpuView] = field(default_factory=list)
    errors: list[DomainError] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # names not found (with ``missing_ok``)


@dataclass(frozen=True, slots=True)
class _Raw:
    """What was read for one domain before the guest layer."""

    dom: Domain
    xml: DomainXML
    view: VcpuView
    live: Optional[DomainXML] = None  # the live definition, when it was read
    context: Optional[DomainContext] = None  # policy and history (``history.contexts``)


def read_views(
    conn: Connection,
    names: Optional[Sequence[str]] = None,
    *,
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    missing_ok: bool = False,
    context: Optional[ContextFn] = None,
) -> ReadResult:
    """Views of the named domains (virsh-style identifiers), or of every domain.

    A name that matches no domain raises ``NoDomainError``; with ``missing_ok`` it goes
    into ``ReadResult.missing`` instead (several hosts: a domain lives on some of them).
    """
    result = ReadResult()
    domains = _unique(_lookup_all(conn, names, result.missing, missing_ok)) if names else None
    stats = conn.bulk_stats(domains)
    if domains is None:
        stats.sort(key=_listing_order)
    transient = conn.transient_uuids() if stats else set()
    raws = []
    read = _read_all_definitions(conn, stats, transient, workers_for(workers), context is not None)
    for item in read:
        if isinstance(item, DomainError):
            result.errors.append(item)
        elif item is not None:
            raws.append(item)
    raws = [_with_context(r, context) for r in raws]
    result.views = _with_guest_layers(conn, raws, agent_timeout, workers)
    return result


def _with_context(raw: _Raw, context: Optional[ContextFn]) -> _Raw:
    """The domain's policy and history, for findings (and 'ignore': no agent query)."""
    if context is None:
        return raw
    found = context(raw.dom, raw.xml, raw.view.active, raw.live)
    agent = raw.view.agent
    if not found.queries_agent and agent.configured:
        agent = dataclasses.replace(agent, error="policy 'ignore': the guest agent is not asked")
    view = dataclasses.replace(
        raw.view,
        history=found.history,
        domain_type=raw.xml.domain_type,
        qemu=found.qemu,
        agent=agent,
    )
    return _Raw(dom=raw.dom, xml=raw.xml, view=view, live=raw.live, context=found)


def read_hosts(
    uris: Sequence[Optional[str]],
    names: Optional[Sequence[str]],
    *,
    readonly: bool = False,
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    context: Optional[ContextFn] = None,
) -> ReadResult:
    """Read several hosts at once, results in the order of ``uris``.

    With one host its errors propagate (like virsh). With several, a host that is down or
    fails is reported in ``errors`` and the others still are read, and a named domain needs
    to exist on one host only: a name found on none of the hosts read is an error.
    """
    if len(uris) == 1:
        with Connection(uris[0], readonly=readonly).open() as conn:
            return read_views(
                conn, names, agent_timeout=agent_timeout, workers=workers, context=context
            )

    def one(uri: Optional[str]) -> Union[ReadResult, DomainError]:
        conn = Connection(uri, readonly=readonly)
        try:
            with conn.open():
                return read_views(
                    conn,
                    names,
                    agent_timeout=agent_timeout,
                    workers=workers,
                    missing_ok=True,
                    context=context,
                )
        except errors.VirtHotplugError as exc:
            return DomainError(conn.uri, "", str(exc))

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(uris), MAX_HOSTS_AT_ONCE)) as pool:
        parts = list(pool.map(one, uris))
    result = ReadResult()
    found: set[str] = set()
    for part in parts:
        if isinstance(part, DomainError):
            result.errors.append(part)
            continue
        result.views.extend(part.views)
        result.errors.extend(part.errors)
        found.update(name for name in names or () if name not in part.missing)
    nowhere = [name for name in dict.fromkeys(names or ()) if name not in found]
    where = "any host" if len(result.errors) == 0 else "any host that could be read"
    for name in nowhere:
        result.errors.append(DomainError("", name, f"no such domain on {where}"))
    return result


def _lookup_all(
    conn: Connection, names: Sequence[str], missing: list[str], missing_ok: bool
) -> list[Domain]:
    domains = []
    for name in names:
        try:
            domains.append(conn.lookup(name))
        except errors.NoDomainError:
            if not missing_ok:
                raise
            missing.append(name)
    return domains


def read_view(
    conn: Connection, dom: Domain, *, agent_timeout: float, context: Optional[ContextFn] = None
) -> VcpuView:
    """One domain's view (the reconciler's read path)."""
    stats = conn.bulk_stats([dom])
    if not stats:
        raise errors.NoDomainError(f"domain '{dom.name}' disappeared")
    _, record = stats[0]
    persistent = dom.is_persistent()
    raw = _read_definitions(conn, dom, record, persistent, context is not None)
    raw = _with_context(raw, context)
    return _with_guest_layers(conn, [raw], agent_timeout, 1)[0]


def _read_all_definitions(
    conn: Connection,
    stats: list[tuple[Domain, Stats]],
    transient: set[str],
    workers: int,
    live_wanted: bool,
) -> list[Union[_Raw, DomainError, None]]:
    """``_read_definitions`` of every domain, in order; a few calls in flight at once.

    libvirt calls on one connection may be in flight concurrently (and the binding releases
    the GIL while one waits), so a small pool hides most of the per-call round trip. The
    daemon serves a few requests per client at once (``max_client_requests``, default 5):
    more threads would only queue there. Per-domain failures come back as ``DomainError``
    (or None for a domain undefined meanwhile); anything else, such as a lost connection,
    is raised.
    """

    def one(item: tuple[Domain, Stats]) -> Union[_Raw, DomainError, None]:
        dom, record = item
        try:
            return _read_definitions(conn, dom, record, dom.uuid not in transient, live_wanted)
        except errors.NoDomainError:
            return None  # undefined between the listing and now
        except (errors.ConfigError, errors.UnsupportedError) as exc:
            return DomainError(conn.uri, dom.name, str(exc))

    return _map_in_order(one, stats, workers)


def _unique(domains: list[Domain]) -> list[Domain]:
    """Drop repeats (the same domain named by name and by id), keeping the given order."""
    seen: set[str] = set()
    unique = []
    for dom in domains:
        if dom.uuid not in seen:
            seen.add(dom.uuid)
            unique.append(dom)
    return unique


def _listing_order(item: tuple[Domain, Stats]) -> tuple[int, int, str]:
    """Like ``virsh list --all``: running domains by id, then the others by name."""
    dom, _ = item
    dom_id = dom.id()
    return (0, dom_id, "") if dom_id is not None else (1, 0, dom.name)


def _read_definitions(
    conn: Connection, dom: Domain, stats: Stats, persistent: bool, live_wanted: bool
) -> _Raw:
    """The definitions and stats of one domain as a view without its guest layer. The live
    definition of a running persistent domain is read when the stats lack vCPU counts (the
    test driver) or ``live_wanted`` (its metadata: the live policy and the history)."""
    name = dom.name
    state = int(stats.get("state.state", 0))
    domain_id = dom.id()
    active = domain_id is not None
    xml = parse_domain_xml(dom.xml(inactive=persistent), domain=name)
    config = _count_layer(xml) if persistent else None
    live: Optional[CountLayer] = None
    hypervisor: Optional[HypervisorLayer] = None
    live_xml: Optional[DomainXML] = None
    if active:
        live, hypervisor = _live_from_stats(stats), _hypervisor_from_stats(stats)
        if not persistent:
            live_xml = xml
        elif live is None or live_wanted:
            live_xml = _live_xml(conn, dom, name)
        if live is None:  # this driver has no vCPU stats (the test driver)
            assert live_xml is not None
            hypervisor = _hypervisor_from_xml(live_xml)
            live = CountLayer(current=live_xml.vcpu_current, maximum=live_xml.vcpu_max)
        if not persistent:
            live = dataclasses.replace(live, vcpus=xml.vcpus)
    view = VcpuView(
        host=conn.uri,
        name=name,
        uuid=dom.uuid,
        domain_id=domain_id,
        state=DOMAIN_STATES.get(state, "unknown"),
        persistent=persistent,
        agent=AgentStatus(
            configured=xml.agent_channel,
            state=AGENT_NOT_QUERIED if xml.agent_channel else AGENT_NOT_CONFIGURED,
        ),
        config=config,
        live=live,
        hypervisor=hypervisor,
    )
    return _Raw(dom=dom, xml=xml, view=view, live=live_xml)


# Equal layers of different domains are one object (``core.shared``): every view of every
# domain holds its layers until the next read.
_layers = SharedValues()


def _count_layer(xml: DomainXML) -> CountLayer:
    return _layers.get(
        ("count", xml.vcpu_current, xml.vcpu_max, xml.vcpus),
        lambda: CountLayer(current=xml.vcpu_current, maximum=xml.vcpu_max, vcpus=xml.vcpus),
    )


def _live_from_stats(stats: Stats) -> Optional[CountLayer]:
    current, maximum = stats.get("vcpu.current"), stats.get("vcpu.maximum")
    if not isinstance(current, int) or not isinstance(maximum, int):
        return None
    return _layers.get(
        ("live", current, maximum), lambda: CountLayer(current=current, maximum=maximum)
    )


def _hypervisor_from_stats(stats: Stats) -> HypervisorLayer:
    """``vcpu.N.state`` entries; sparse after hotplug, so N comes from the key."""
    vcpus = {}
    for key, value in stats.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "vcpu" and parts[2] == "state" and parts[1].isdigit():
            vcpus[int(parts[1])] = VCPU_STATES.get(int(value), "unknown")
    return _layers.get(("stats", *vcpus.items()), lambda: HypervisorLayer(vcpus=vcpus))


def _live_xml(conn: Connection, dom: Domain, name: str) -> DomainXML:
    """The running definition: one call (``virDomainGetVcpus`` through libvirt-python is
    three: it asks for the node's CPU map and the domain's info first)."""
    return parse_domain_xml(dom.xml(inactive=False), domain=name)


def _hypervisor_from_xml(live: DomainXML) -> HypervisorLayer:
    """Without vCPU stats, the vCPUs the running definition has enabled (libvirt's own view
    of what is plugged, as in the design's table), reported running like the test driver's
    ``virDomainGetVcpus`` does. With no ``<vcpus>`` element, vCPUs 0..current-1 are on."""
    enabled = [v.id for v in live.vcpus if v.enabled] if live.vcpus else []
    ids = enabled or list(range(live.vcpu_current))
    return _layers.get(
        ("xml", *ids), lambda: HypervisorLayer(vcpus=dict.fromkeys(ids, VCPU_STATES[1]))
    )


def _with_guest_layers(
    conn: Connection, raws: list[_Raw], timeout: float, workers: int
) -> list[VcpuView]:
    """Query the agent of every running domain that has one, in parallel, then find drift."""
    queried = [
        r
        for r in raws
        if r.view.agent.configured
        and r.view.state == "running"
        and (r.context is None or r.context.queries_agent)
    ]
    outcomes = _query_agents(conn, queried, workers, timeout)
    agent_views = {}
    for raw, outcome in zip(queried, outcomes):
        error: Optional[BaseException] = outcome.error
        if outcome.timed_out:
            error = CallTimeout(f"no answer within {timeout:g} s")
        if isinstance(error, errors.AgentUnavailableError) and _channel_disconnected(raw.dom):
            error = errors.AgentNotConnectedError(str(error), code=error.code)
        agent_views[raw.view.uuid] = _guest_view(raw, outcome.value, error)
    views = [agent_views.get(r.view.uuid, r.view) for r in raws]
    return [dataclasses.replace(v, findings=_findings(v, r.context)) for v, r in zip(views, raws)]


def _findings(view: VcpuView, context: Optional[DomainContext]) -> tuple[Finding, ...]:
    if context is None:
        return find_drift(view)
    return find_drift(view, context.policy, settling=context.settling)


def _query_agents(
    conn: Connection, queried: Sequence[_Raw], workers: int, timeout: float
) -> list[CallResult[Any]]:
    """``guest_vcpus`` of every domain in ``queried``, ``workers`` at a time.

    A driver without the guest-agent API (the capability record says so: the test driver)
    is asked once, on the shared connection, not once per domain: every call would fail
    the same way without reaching a guest, so the driver's own answer for one (e.g. "read
    only access prevents ..." or "not supported") is every domain's. No guest is behind
    that call, so nothing can hang it, and no agent lease is opened for it (a lease is a
    connection of its own; the test driver re-reads its whole node file for each one).
    """
    if not queried:
        return []
    if conn.support.guest_agent_api:
        return bounded_map(
            conn.guest_vcpus, [r.dom for r in queried], workers=workers, timeout=timeout
        )
    ask = functools.partial(_driver_answer, conn)
    first = bounded_map(ask, [queried[0].dom], workers=1, timeout=timeout)[0]
    if first.error is None or first.timed_out:  # it answered after all: ask every domain
        rest = [r.dom for r in queried[1:]]
        return [first, *bounded_map(conn.guest_vcpus, rest, workers=workers, timeout=timeout)]
    asked = queried[0].view.name
    return [first] + [
        CallResult(error=_same_error(first.error, asked, raw.view.name)) for raw in queried[1:]
    ]


def _driver_answer(conn: Connection, dom: Domain) -> dict[str, str]:
    """``guestVcpus`` on the shared connection: only for a driver that the capability
    record says has no guest-agent API, so that no guest can hold the call up."""

    def query() -> dict[str, str]:
        reply = dom.raw.guestVcpus(0)
        if reply is None:  # the binding's quirk: the error is only in the last error
            raise last_error(conn.libvirt, dom.context)
        return reply

    return conn.call(query, context=dom.context)


def _same_error(error: BaseException, asked: str, other: str) -> BaseException:
    """The error one domain got, as another domain's (same class and code, its name)."""
    if not isinstance(error, errors.VirtHotplugError):
        return error
    message = error.message.replace(f"domain '{asked}': ", f"domain '{other}': ", 1)
    return type(error)(message, code=error.code)


def _guest_view(raw: _Raw, reply: Any, error: Optional[BaseException]) -> VcpuView:
    view = raw.view
    guest: Optional[GuestLayer] = None
    if error is None:
        maximum = view.live.maximum if view.live else raw.xml.vcpu_max
        try:
            guest = parse_guest_reply(reply, maximum=maximum, domain=view.name)
        except errors.GuestDataError as exc:
            log.warning("%s", exc)
            error = exc
    state = AGENT_CONNECTED if error is None else _agent_state_for(error)
    agent = AgentStatus(configured=True, state=state, error=str(error) if error else None)
    return dataclasses.replace(view, guest=guest, agent=agent)


def _channel_disconnected(dom: Domain) -> bool:
    """Whether the live definition says no agent is connected to the domain's channel.

    libvirt reports "not connected" and "no answer" with one code; the channel state tells
    them apart without reading its (translated) message. One call, only after a failure.
    """
    try:
        live = parse_domain_xml(dom.xml(inactive=False), domain=dom.name)
    except errors.VirtHotplugError:
        return False
    return live.agent_channel_state == "disconnected"


def _agent_state_for(error: BaseException) -> str:
    """Map an agent failure to an agent state; host-level failures are re-raised."""
    if isinstance(error, (errors.PermissionDeniedError, errors.ConnectError)):
        raise error
    if isinstance(error, errors.GuestDataError):
        return AGENT_BAD_REPLY
    if isinstance(error, errors.AgentNotConfiguredError):
        return AGENT_NOT_CONFIGURED
    if isinstance(error, errors.UnsupportedError):
        return AGENT_UNSUPPORTED
    if isinstance(error, errors.NotRunningError):
        return AGENT_NOT_QUERIED
    if isinstance(error, errors.AgentNotConnectedError):
        return AGENT_NOT_CONNECTED
    if isinstance(error, (errors.AgentUnavailableError, CallTimeout)):
        return AGENT_UNRESPONSIVE
    # The agent answered, with an error instead of the data asked for (its own words,
    # whatever they say), or the call failed in a way only this domain sees.
    return AGENT_BAD_REPLY


# --- the daemon's bulk resync: every running domain, definitions cached between reads ------


@dataclass(frozen=True, slots=True)
class Definitions:
    """One domain's parsed definitions as the bulk read last fetched them."""

    inactive: Optional[DomainXML]  # None for a transient domain
    live: Optional[DomainXML]  # None when the stats carry the live layer (QEMU)
    signature: tuple[Any, ...]  # what the stats said when they were read (see _signature)
    expires: float  # monotonic time after which they are read again anyway


class DefinitionCache:
    """Parsed definitions per domain UUID, between two bulk reads of one connection.

    libvirt has no cheap change signal for a definition (no generation counter, and
    ``virsh setvcpus --config`` or an edit of the persistent XML emit no event for the
    vCPU part), so an entry is read again when:

    * ``invalidate`` is called for the domain: the daemon does so for every event naming it
      (lifecycle, including "defined"; agent; device; metadata; OST; hook);
    * what the bulk stats say about it changed (run state, vCPU counts and states);
    * it is older than ``max_age`` (each entry's limit is drawn between half and all of it,
      so a whole host's entries do not all expire in the same resync).

    A read that began before an invalidation is not stored (a generation per domain), so
    an event racing with a resync never leaves a stale entry behind. Thread-safe.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._entries: dict[str, Definitions] = {}
        self._generations: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, uuid: str, signature: tuple[Any, ...], now: float) -> Optional[Definitions]:
        with self._lock:
            entry = self._entries.get(uuid)
        if entry is None or entry.signature != signature or now >= entry.expires:
            return None
        return entry

    def generation(self, uuid: str) -> int:
        with self._lock:
            return self._generations.get(uuid, 0)

    def store(self, uuid: str, generation: int, entry: Definitions) -> None:
        with self._lock:
            if self._generations.get(uuid, 0) == generation:
                self._entries[uuid] = entry

    def invalidate(self, uuid: str) -> None:
        with self._lock:
            self._generations[uuid] = self._generations.get(uuid, 0) + 1
            self._entries.pop(uuid, None)

    def retain(self, uuids: set[str]) -> None:
        """Forget domains no longer running (their generations too)."""
        with self._lock:
            for uuid in [u for u in self._entries if u not in uuids]:
                del self._entries[uuid]
            for uuid in [u for u in self._generations if u not in uuids]:
                del self._generations[uuid]

    def expiry(self, now: float) -> float:
        import random  # the daemon's alone: status and check do not pay for the import

        return now + self.max_age * random.uniform(0.5, 1.0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclass(frozen=True, slots=True)
class BulkRaw:
    """One running domain as the bulk read saw it, before any guest-agent query."""

    dom: Domain
    definitions: Definitions
    view: VcpuView  # without the guest layer (agent not queried)
    cached: bool  # the definitions came from the cache
    reads: int = 0  # XMLDesc calls made for it

    @property
    def policy_fields(self) -> Optional[tuple[bool, Any]]:
        """Our metadata element's raw fields, live definition first: (live?, fields)."""
        defs = self.definitions
        if defs.live is not None and defs.live.policy is not None:
            return True, defs.live.policy
        if defs.inactive is not None and defs.inactive.policy is not None:
            return False, defs.inactive.policy
        return None


@dataclass
class BulkRead:
    raws: list[BulkRaw] = field(default_factory=list)
    errors: list[DomainError] = field(default_factory=list)
    definition_reads: int = 0  # XMLDesc calls made by this read


def read_running(
    conn: Connection,
    cache: DefinitionCache,
    *,
    workers: int,
    include: Optional[Callable[[str, str], bool]] = None,
) -> BulkRead:
    """Every running domain in bulk: one ``getAllDomainStats`` for the running ones, one
    listing of the transient ones, and definitions only where the cache cannot answer.

    Each domain is first checked against the cache, one domain after another: that costs no
    call when the stats carry the vCPU counts (QEMU) and one ``virDomainGetInfo`` when they
    do not (the test driver). Only the misses are read, on a few threads; with QEMU the live
    definition is read on a miss for its metadata (the policy). Guest layers are not read
    here: see ``guest_layers``.
    """
    stats = _active_stats(conn)
    if include is not None:  # the daemon's scope: the others are not read any further
        stats = [(dom, record) for dom, record in stats if include(dom.name, dom.uuid)]
    transient = conn.transient_uuids() if stats else set()
    now = time.monotonic()
    cache.retain({dom.uuid for dom, _ in stats})
    result = BulkRead()
    looked_up = [
        _checked(conn, cache, dom, record, dom.uuid not in transient, now) for dom, record in stats
    ]
    misses = [item for item in looked_up if isinstance(item, _Miss)]
    read = iter(_map_in_order(_read_miss, misses, workers_for(workers)))
    for item in looked_up:
        if isinstance(item, _Miss):
            item = next(read)  # in order: the misses' results, one for each
            if isinstance(item, BulkRaw):
                result.definition_reads += item.reads
        if isinstance(item, DomainError):
            result.errors.append(item)
        elif item is not None:
            result.raws.append(item)
    return result


def workers_for(workers: int) -> int:
    """Threads for definition reads: the daemon's ``workers``, at most DEFINITION_WORKERS."""
    return max(1, min(workers, DEFINITION_WORKERS))


@dataclass(frozen=True, slots=True)
class _Miss:
    """A domain whose definitions the cache could not answer for."""

    conn: Connection
    cache: DefinitionCache
    dom: Domain
    stats: Stats
    signature: tuple[Any, ...]
    persistent: bool
    now: float


def _checked(
    conn: Connection,
    cache: DefinitionCache,
    dom: Domain,
    stats: Stats,
    persistent: bool,
    now: float,
) -> Union[BulkRaw, DomainError, _Miss, None]:
    """One domain from the cache, or the miss to read."""
    try:
        signature = _signature(stats)
        live_from_stats = _live_from_stats(stats)
        if live_from_stats is None:
            # No vCPU counts in this driver's stats: the live count from virDomainGetInfo
            # stands in as the change signal of the live definition.
            signature += (dom.vcpu_count(),)
        cached = cache.get(dom.uuid, signature, now)
        if cached is None:
            return _Miss(conn, cache, dom, stats, signature, persistent, now)
        view = _bulk_view(conn, dom, stats, cached, persistent, live_from_stats)
        return BulkRaw(dom=dom, definitions=cached, view=view, cached=True)
    except errors.NoDomainError:
        return None  # gone between the listing and now
    except (errors.ConfigError, errors.UnsupportedError) as exc:
        return DomainError(conn.uri, dom.name, str(exc))


def _read_miss(miss: _Miss) -> Union[BulkRaw, DomainError, None]:
    """Read a missed domain's definitions (on a reader thread), store and view them."""
    conn, dom = miss.conn, miss.dom
    try:
        generation = miss.cache.generation(dom.uuid)
        reads = 0
        inactive = None
        if miss.persistent:
            inactive = parse_domain_xml(dom.xml(inactive=True), domain=dom.name)
            reads += 1
        # The live definition: the live layer on a driver without vCPU stats, the live
        # metadata (the policy) with QEMU, the only definition of a transient domain.
        live = parse_domain_xml(dom.xml(inactive=False), domain=dom.name)
        reads += 1
        live_from_stats = _live_from_stats(miss.stats)
        defs = Definitions(
            inactive=inactive,
            live=live,
            signature=miss.signature,
            expires=miss.cache.expiry(miss.now),
        )
        miss.cache.store(dom.uuid, generation, defs)
        view = _bulk_view(conn, dom, miss.stats, defs, miss.persistent, live_from_stats)
    except errors.NoDomainError:
        return None
    except (errors.ConfigError, errors.UnsupportedError) as exc:
        return DomainError(conn.uri, dom.name, str(exc))
    return BulkRaw(dom=dom, definitions=defs, view=view, cached=False, reads=reads)


def _active_stats(conn: Connection) -> list[tuple[Domain, Stats]]:
    """State and vCPU stats of every active (running or paused) domain, in one call."""
    libvirt = conn.libvirt
    groups = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_VCPU
    active = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    rows = conn.call(lambda: conn.raw.getAllDomainStats(groups, active), context="stats")
    return [(conn.wrap(raw), record) for raw, record in rows]


def guest_layers(
    conn: Connection, raws: Sequence[BulkRaw], *, agent_timeout: float, workers: int
) -> list[VcpuView]:
    """The agent of each of ``raws`` asked (in parallel, bounded), findings added."""
    shaped = [_Raw(dom=r.dom, xml=_agent_xml(r.definitions), view=r.view) for r in raws]
    return _with_guest_layers(conn, shaped, agent_timeout, workers)


def _agent_xml(defs: Definitions) -> DomainXML:
    xml = defs.inactive if defs.inactive is not None else defs.live
    assert xml is not None  # a transient domain has its live definition read
    return xml


def _signature(stats: Stats) -> tuple[Any, ...]:
    """What the stats tell about a domain that a definition change would also change."""
    vcpus = tuple(
        sorted((k, v) for k, v in stats.items() if k.startswith("vcpu.") and k.endswith("state"))
    )
    return (stats.get("state.state"), stats.get("vcpu.current"), stats.get("vcpu.maximum"), vcpus)


def _bulk_view(
    conn: Connection,
    dom: Domain,
    stats: Stats,
    defs: Definitions,
    persistent: bool,
    live: Optional[CountLayer],
) -> VcpuView:
    state = int(stats.get("state.state", 0))
    hypervisor: Optional[HypervisorLayer] = None
    if live is not None:
        hypervisor = _hypervisor_from_stats(stats)
    else:
        assert defs.live is not None
        hypervisor = _hypervisor_from_xml(defs.live)
        live = CountLayer(current=defs.live.vcpu_current, maximum=defs.live.vcpu_max)
    if not persistent and defs.live is not None:
        live = dataclasses.replace(live, vcpus=defs.live.vcpus)
    xml = _agent_xml(defs)
    return VcpuView(
        host=conn.uri,
        name=dom.name,
        uuid=dom.uuid,
        domain_id=dom.id(),
        state=DOMAIN_STATES.get(state, "unknown"),
        persistent=persistent,
        agent=AgentStatus(
            configured=xml.agent_channel,
            state=AGENT_NOT_QUERIED if xml.agent_channel else AGENT_NOT_CONFIGURED,
        ),
        config=_count_layer(defs.inactive) if defs.inactive is not None else None,
        live=live,
        hypervisor=hypervisor,
    )


def _map_in_order(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``fn`` over ``items`` on a few threads, results in order; an exception (a lost
    connection) cancels what has not started and is raised.

    Each thread takes a run of consecutive items (a few per thread and round, so that one
    slow domain holds up little): a future per item would cost more than a definition read.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    size = max(1, min(MAX_RUN, -(-len(items) // (workers * RUNS_PER_WORKER))))
    runs = [items[i : i + size] for i in range(0, len(items), size)]

    def run(part: Sequence[T]) -> list[R]:
        return [fn(item) for item in part]

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
        try:
            return [result for part in pool.map(run, runs) for result in part]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # e.g. the connection is gone
            raise
