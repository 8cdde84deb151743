"""The one bulk reader: many domains' stats and definitions with as few libvirt calls as
possible, for ``status``/``check`` (every domain, or the named ones), a reconcile (one
domain) and the daemon's resync (every running domain, definitions cached between reads).

    1 bulk call      state + vCPU stats (live and hypervisor layers)
    1 call           which domains are transient
    1 per domain     inactive XML (config layer, agent channel, metadata)
    1 per domain     live XML, only for active domains where the driver has no vCPU stats
                     (the test driver) or the live metadata is wanted (the live policy and
                     the history); transient domains have only this one

Definition reads are a few at a time in flight. With a ``DefinitionCache`` only the domains
the cache cannot answer for are read. Per-domain failures (bad XML, a domain undefined
meanwhile) become ``DomainError`` entries or are skipped; a lost connection is raised.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from virthotplug.core import errors
from virthotplug.core.view import VcpuView
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import parse_domain_xml
from virthotplug.host.history import ContextFn, DomainContext
from virthotplug.host.libvirt_types import Stats
from virthotplug.host.views import Definitions, build_view, live_from_stats, signature

T = TypeVar("T")
R = TypeVar("R")

DEFINITION_WORKERS = 4  # definition reads in flight at once (libvirtd serves 5 per client)
RUNS_PER_WORKER = 4  # map_in_order hands each thread about this many runs of items
MAX_RUN = 64  # items in one run at most


@dataclass(frozen=True)
class DomainError:
    host: str
    name: str
    error: str


@dataclass(frozen=True, slots=True)
class DomainRead:
    """One domain as the bulk read saw it, before any guest-agent query."""

    dom: Domain
    definitions: Definitions
    view: VcpuView  # without the guest layer (agent not queried)
    cached: bool = False  # the definitions came from the cache
    reads: int = 0  # XMLDesc calls made for it
    context: Optional[DomainContext] = None  # policy and history (``history.contexts``)

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
    raws: list[DomainRead] = field(default_factory=list)
    errors: list[DomainError] = field(default_factory=list)
    definition_reads: int = 0  # XMLDesc calls made by this read


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

    Each entry also keeps the view built from it (``view``/``keep_view``): a view is made
    of the definitions, the stats the signature covers and the domain id alone, so while
    those are unchanged the same view object stands for the domain, and a resync can tell
    "nothing about this domain changed" by identity and skip judging it again.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._entries: dict[str, Definitions] = {}
        self._views: dict[str, tuple[Optional[int], VcpuView]] = {}  # uuid → (id, view)
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
                self._views.pop(uuid, None)

    def view(self, uuid: str, entry: Definitions, domain_id: Optional[int]) -> Optional[VcpuView]:
        """The view built from ``entry`` (the one ``get`` returned) for ``domain_id``."""
        with self._lock:
            kept = self._views.get(uuid)
            if kept is None or kept[0] != domain_id or self._entries.get(uuid) is not entry:
                return None
            return kept[1]

    def keep_view(
        self, uuid: str, entry: Definitions, domain_id: Optional[int], view: VcpuView
    ) -> None:
        with self._lock:
            if self._entries.get(uuid) is entry:
                self._views[uuid] = (domain_id, view)

    def invalidate(self, uuid: str) -> None:
        with self._lock:
            self._generations[uuid] = self._generations.get(uuid, 0) + 1
            self._entries.pop(uuid, None)
            self._views.pop(uuid, None)

    def retain(self, uuids: set[str]) -> None:
        """Forget domains no longer running (their generations too)."""
        with self._lock:
            for uuid in [u for u in self._entries if u not in uuids]:
                del self._entries[uuid]
            for uuid in [u for u in self._views if u not in uuids]:
                del self._views[uuid]
            for uuid in [u for u in self._generations if u not in uuids]:
                del self._generations[uuid]

    def expiry(self, now: float) -> float:
        import random  # the daemon's alone: status and check do not pay for the import

        return now + self.max_age * random.uniform(0.5, 1.0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclass(frozen=True, slots=True)
class _Item:
    """One domain of a bulk read, to be read (or answered by the cache)."""

    dom: Domain
    stats: Stats
    persistent: bool
    signature: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class _Reader:
    """What every definition read of one bulk read shares."""

    conn: Connection
    live_wanted: bool
    cache: Optional[DefinitionCache]
    now: float
    one: bool = False  # a single domain's read: its failure is raised, not listed
    context: Optional[ContextFn] = None  # each domain's policy and history

    def read(self, item: _Item) -> Union[DomainRead, DomainError, None]:
        """Read one domain's definitions (on a reader thread) and view them; store them in
        the cache. None: the domain was undefined between the listing and now."""
        dom = item.dom
        try:
            generation = self.cache.generation(dom.uuid) if self.cache is not None else 0
            domain_id = dom.id()
            inactive = None
            reads = 0
            if item.persistent:
                inactive = parse_domain_xml(dom.xml(inactive=True), domain=dom.name)
                reads += 1
            live = None
            if not item.persistent or (
                domain_id is not None and (self.live_wanted or live_from_stats(item.stats) is None)
            ):
                live = parse_domain_xml(dom.xml(inactive=False), domain=dom.name)
                reads += 1
            defs = Definitions(inactive=inactive, live=live)
            if self.cache is not None:
                expires = self.cache.expiry(self.now)
                defs = Definitions(inactive, live, signature=item.signature, expires=expires)
                self.cache.store(dom.uuid, generation, defs)
        except errors.NoDomainError:
            if self.one:
                raise
            return None
        except (errors.ConfigError, errors.UnsupportedError) as exc:
            if self.one:
                raise
            return DomainError(self.conn.uri, dom.name, str(exc))
        found = None
        if self.context is not None:
            found = self.context(dom, defs.main, domain_id is not None, defs.live)
        view = build_view(self.conn.uri, dom.name, dom.uuid, domain_id, item.stats, defs, found)
        if self.cache is not None and found is None:
            self.cache.keep_view(dom.uuid, defs, domain_id, view)
        return DomainRead(dom=dom, definitions=defs, view=view, reads=reads, context=found)

    def cached(self, item: _Item) -> Union[DomainRead, DomainError, _Item, None]:
        """One domain from the cache, or the item to read (with its signature)."""
        assert self.cache is not None
        dom = item.dom
        try:
            sign = signature(item.stats)
            if live_from_stats(item.stats) is None:
                # No vCPU counts in this driver's stats: the live count from virDomainGetInfo
                # stands in as the change signal of the live definition.
                sign += (dom.vcpu_count(),)
            found = self.cache.get(dom.uuid, sign, self.now)
            if found is None:
                return _Item(dom, item.stats, item.persistent, sign)
            domain_id = dom.id()
            view = self.cache.view(dom.uuid, found, domain_id)
            if view is None:
                view = build_view(self.conn.uri, dom.name, dom.uuid, domain_id, item.stats, found)
                self.cache.keep_view(dom.uuid, found, domain_id, view)
            return DomainRead(dom=dom, definitions=found, view=view, cached=True)
        except errors.NoDomainError:
            return None  # gone between the listing and now
        except (errors.ConfigError, errors.UnsupportedError) as exc:
            return DomainError(self.conn.uri, dom.name, str(exc))


def read_domains(
    conn: Connection,
    stats: Sequence[tuple[Domain, Stats]],
    *,
    transient: set[str],
    workers: int,
    live_wanted: bool,
    cache: Optional[DefinitionCache] = None,
    one: bool = False,
    context: Optional[ContextFn] = None,
) -> BulkRead:
    """The definitions and views of the domains in ``stats``, in their order.

    ``transient``: the UUIDs of the transient domains. ``live_wanted``: read the live
    definition of every active domain (its metadata), not only where the stats lack the
    live layer. With ``cache``, each domain is first checked against it, one after another:
    that costs no call when the stats carry the vCPU counts (QEMU) and one
    ``virDomainGetInfo`` when they do not (the test driver); only the misses are read.
    ``one``: a single domain is read, and its failures are raised (``NoDomainError`` for a
    domain undefined meanwhile) instead of being listed or skipped. ``context``: each
    domain's policy and history, asked on the reader threads as its definitions arrive.
    """
    reader = _Reader(conn, live_wanted, cache, time.monotonic(), one, context)
    items = [_Item(dom, record, dom.uuid not in transient) for dom, record in stats]
    looked_up: list[Union[DomainRead, DomainError, _Item, None]]
    looked_up = [reader.cached(item) for item in items] if cache is not None else list(items)
    misses = [item for item in looked_up if isinstance(item, _Item)]
    read = iter(map_in_order(reader.read, misses, workers_for(workers)))
    result = BulkRead()
    for entry in looked_up:
        if isinstance(entry, _Item):
            entry = next(read)  # in order: the misses' results, one for each
            if isinstance(entry, DomainRead):
                result.definition_reads += entry.reads
        if isinstance(entry, DomainError):
            result.errors.append(entry)
        elif entry is not None:
            result.raws.append(entry)
    return result


def workers_for(workers: int) -> int:
    """Threads for definition reads: the caller's ``workers``, at most DEFINITION_WORKERS."""
    return max(1, min(workers, DEFINITION_WORKERS))


def map_in_order(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``fn`` over ``items`` on a few threads, results in order; an exception (a lost
    connection) cancels what has not started and is raised.

    libvirt calls on one connection may be in flight concurrently (and the binding releases
    the GIL while one waits), so a small pool hides most of the per-call round trip. The
    daemon serves a few requests per client at once (``max_client_requests``, default 5):
    more threads would only queue there. Each thread takes a run of consecutive items (a
    few per thread and round, so that one slow domain holds up little): a future per item
    would cost more than a definition read.
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
