"""Read the four vCPU layers of many domains: the entry points of the read path.

    read_views    ``status`` and ``check``: every domain, or the named ones, of one host
    read_hosts    the same over several hosts at once
    read_view     one domain (a reconcile's read and re-read)
    read_running  the daemon's resync: every running domain, definitions cached
    guest_layers  the resync's agent reads, for the domains it picked

Each is the same three steps: one bulk read of stats and definitions (``bulk``), which
builds each domain's view (``views``); the domain's policy and history (``history``); the
guest agents asked and the findings added (``agentread``). Per-domain failures (bad XML, an
agent that hangs or replies garbage) become findings or entries in ``ReadResult.errors``;
they never stop the other domains from being read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from virthotplug.core import errors
from virthotplug.core.settings import AGENT_TIMEOUT
from virthotplug.core.view import VcpuView
from virthotplug.host.agentread import guest_layers
from virthotplug.host.bulk import (
    DEFINITION_WORKERS,
    BulkRead,
    DefinitionCache,
    DomainError,
    DomainRead,
    read_domains,
    workers_for,
)
from virthotplug.host.connection import Connection, OpeningConnection
from virthotplug.host.domain import Domain
from virthotplug.host.history import ContextFn
from virthotplug.host.libvirt_types import Stats

__all__ = [
    "DEFAULT_AGENT_TIMEOUT",
    "DEFAULT_WORKERS",
    "DEFINITION_WORKERS",
    "BulkRaw",
    "BulkRead",
    "DefinitionCache",
    "DomainError",
    "DomainRead",
    "ReadResult",
    "guest_layers",
    "read_hosts",
    "read_running",
    "read_view",
    "read_views",
    "workers_for",
]

DEFAULT_AGENT_TIMEOUT = AGENT_TIMEOUT.default  # the [watch] setting (core.settings)
DEFAULT_WORKERS = 8
MAX_HOSTS_AT_ONCE = 16  # hosts read in parallel by read_hosts
BulkRaw = DomainRead  # the resync's name for one domain of its bulk read


@dataclass
class ReadResult:
    views: list[VcpuView] = field(default_factory=list)
    errors: list[DomainError] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # names not found (with ``missing_ok``)


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
    read = read_domains(
        conn,
        stats,
        transient=transient,
        workers=workers,
        live_wanted=context is not None,
        context=context,
    )
    result.errors.extend(read.errors)
    result.views = guest_layers(conn, read.raws, agent_timeout=agent_timeout, workers=workers)
    return result


def read_view(
    conn: Connection, dom: Domain, *, agent_timeout: float, context: Optional[ContextFn] = None
) -> VcpuView:
    """One domain's view (the reconciler's read path)."""
    stats = conn.bulk_stats([dom])
    if not stats:
        raise errors.NoDomainError(f"domain '{dom.name}' disappeared")
    transient = set() if dom.is_persistent() else {dom.uuid}
    read = read_domains(
        conn,
        stats[:1],
        transient=transient,
        workers=1,
        live_wanted=context is not None,
        one=True,
        context=context,
    )
    return guest_layers(conn, read.raws, agent_timeout=agent_timeout, workers=1)[0]


def read_running(
    conn: Connection,
    cache: DefinitionCache,
    *,
    workers: int,
    include: Optional[Callable[[str, str], bool]] = None,
) -> BulkRead:
    """Every running domain in bulk: one ``getAllDomainStats`` for the active ones, one
    listing of the transient ones, and definitions only where ``cache`` cannot answer (on
    a miss the live definition too, for its metadata: the policy). Guest layers are not
    read here: see ``guest_layers``. ``include``: the daemon's scope, by name and UUID.
    """
    stats = conn.bulk_stats(active=True)
    if include is not None:  # the daemon's scope: the others are not read any further
        stats = [(dom, record) for dom, record in stats if include(dom.name, dom.uuid)]
    transient = conn.transient_uuids() if stats else set()
    cache.retain({dom.uuid for dom, _ in stats})
    return read_domains(
        conn, stats, transient=transient, workers=workers, live_wanted=True, cache=cache
    )


def read_hosts(
    uris: Sequence[Optional[str]],
    names: Optional[Sequence[str]],
    *,
    readonly: bool = False,
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    context: Optional[ContextFn] = None,
    opening: Optional[OpeningConnection] = None,
) -> ReadResult:
    """Read several hosts at once, results in the order of ``uris``.

    With one host its errors propagate (like virsh). With several, a host that is down or
    fails is reported in ``errors`` and the others still are read, and a named domain needs
    to exist on one host only: a name found on none of the hosts read is an error.
    ``opening``: the one host's connection, already being opened (``OpeningConnection``).
    """
    if len(uris) == 1:
        if opening is not None:
            conn = opening.result()
        else:
            conn = Connection(uris[0], readonly=readonly).open()
        with conn:
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
