"""Everything the daemon keeps about one domain, in one record, and the one place that
forgets it.

A ``DomainRecord`` holds what the reconcile jobs remember between runs (``DomainJobs``: the
judge's observations, with the guest CPUs the daemon onlined, and the findings last
reported), what the metrics show (the last view, when it was read, the effective policy
mode, pending hot-adds) and what the agent circuit breaker counts. The state that must stay
with the thread that owns it — the flood guard's counters (libvirt's event thread), a
host's monitor registrations (its subscription thread), the scheduler's queued jobs (the
main loop) — is forgotten through the same call: each of those stores hands the registry
its ``forget``.

A domain is forgotten on its FORGET events (stopped, crashed, the hook's release; never
undefined, which a running domain outlives as a transient one) and whenever a resync's
listing of a host's running domains no longer has it (``prune``): an event lost in a
reconnect gap, or a domain undefined while stopped, leaves nothing behind for longer than
one resync. One lock guards the registry and every record's fields: workers, the main loop, a
resync thread and metrics scrapes all read and write them.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterable,
    Iterator,
    MutableMapping,
    NamedTuple,
    Optional,
    Sequence,
)

from virthotplug.core.judge import Observations
from virthotplug.core.observed import EventReader

if TYPE_CHECKING:
    from virthotplug.core.view import VcpuView

Key = tuple[str, str]  # (host URI, domain UUID)

MAX_FORGOTTEN = 4096  # forgotten domains remembered (see ``DomainRegistry.forgotten_since``)


class Hotadd(NamedTuple):
    """When a pending hot-add's OST event came: monotonic (for the latency, immune to
    clock steps) and Unix time (for the since-timestamp a scrape shows)."""

    mono: float
    wall: float


@dataclass(slots=True)
class DomainJobs:
    """What the reconcile jobs (``jobs.JobRunner``) keep of one domain between its jobs.

    ``observations`` is the one owner of what the judge needs, our own writes included
    (``Observations.ours``: guest CPUs this daemon onlined, never the guest's credit); it
    has its own lock. ``findings`` is read and written under the registry's lock.
    """

    observations: Observations = field(default_factory=Observations)
    reader: EventReader = field(default_factory=EventReader)  # its monitor events, in order
    findings: Optional[tuple[str, ...]] = None  # codes last reported: a routine resync or news
    # This daemon began the domain's vCPU record when QEMU started and has missed none of
    # its monitor events since (``History.since_start``: the TCG thread count is proven).
    since_start: bool = False


@dataclass(slots=True)
class DomainRecord:
    """One domain, as the daemon knows it. Fields are read and written under the
    registry's ``lock``."""

    host: str
    uuid: str
    touched: float  # monotonic time anything last looked the domain up (see ``prune``)
    # The reconcile jobs' memory of the domain.
    jobs: DomainJobs = field(default_factory=DomainJobs)
    # A mark the main loop leaves for the next job, which applies it to ``jobs``: the time
    # the domain flooded its monitor events (what it sent before then is void).
    distrusted_at: Optional[float] = None
    # Another: the time QEMU started afresh (booted, restored, migrated in) as its lifecycle
    # event said; the next job whose connection receives the domain's monitor events begins
    # the record since the start.
    started_at: Optional[float] = None
    # The metrics: the domain as its last reconcile or resync left it, when (Unix time),
    # its effective policy mode then (None: invalid or not known), and the hot-adds
    # (vCPU id → OST event) the guest has not shown online yet.
    view: Optional[VcpuView] = None
    view_at: float = 0.0
    policy_mode: Optional[str] = None
    hotadds: dict[int, Hotadd] = field(default_factory=dict)
    # The agent circuit breaker: reconciles in a row that found the agent unresponsive.
    agent_failures: int = 0

    @property
    def key(self) -> Key:
        return (self.host, self.uuid)


class DomainRegistry:
    """The records of every watched domain, by host."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.RLock()  # reentrant: a store's forget may look records up
        self._clock = clock
        self._hosts: dict[str, dict[str, DomainRecord]] = {}
        self._forgotten: dict[Key, float] = {}  # key → when it was forgotten; oldest first
        self._on_forget: list[Callable[[Key], None]] = []

    def on_forget(self, forget: Callable[[Key], None]) -> None:
        """A store kept elsewhere (on the thread that owns it): told of each forgotten
        domain. It must be quick and never block (it runs on the main loop)."""
        self._on_forget.append(forget)

    # --- records -----------------------------------------------------------------------

    def record(self, key: Key) -> DomainRecord:
        """The domain's record, made on first use; marks it as in use now."""
        host, uuid = key
        now = self._clock()
        with self.lock:
            records = self._hosts.setdefault(host, {})
            found = records.get(uuid)
            if found is None:
                found = records[uuid] = DomainRecord(host, uuid, now)
            else:
                found.touched = now
            return found

    def records_of(self, host: str, uuids: Sequence[str]) -> list[Optional[DomainRecord]]:
        """``record`` for many domains of one host at once (a resync's), in order; None for
        a domain that was forgotten (its state must not come back from an older read)."""
        now = self._clock()
        found: list[Optional[DomainRecord]] = []
        with self.lock:
            records = self._hosts.setdefault(host, {})
            for uuid in uuids:
                rec = records.get(uuid)
                if rec is not None:
                    rec.touched = now
                elif (host, uuid) not in self._forgotten:
                    rec = records[uuid] = DomainRecord(host, uuid, now)
                found.append(rec)
        return found

    def get(self, key: Key) -> Optional[DomainRecord]:
        with self.lock:
            records = self._hosts.get(key[0])
            return records.get(key[1]) if records is not None else None

    def records(self, host: Optional[str] = None) -> Iterator[DomainRecord]:
        """A snapshot of the records (of one host); call under ``lock`` to read fields."""
        with self.lock:
            hosts = [self._hosts.get(host, {})] if host is not None else self._hosts.values()
            found = [rec for records in hosts for rec in records.values()]
        return iter(found)

    # --- forgetting: here only ---------------------------------------------------------

    def forget(self, key: Key) -> None:
        """The domain stopped or went away: drop its record and tell every store."""
        with self.lock:
            records = self._hosts.get(key[0])
            if records is not None:
                records.pop(key[1], None)
                if not records:
                    del self._hosts[key[0]]
            self._forgotten.pop(key, None)
            self._forgotten[key] = self._clock()
            while len(self._forgotten) > MAX_FORGOTTEN:
                del self._forgotten[next(iter(self._forgotten))]
        for forget in self._on_forget:
            forget(key)

    def prune(self, host: str, running: Iterable[str], listed_since: float) -> list[Key]:
        """A listing of ``host``'s running domains (UUIDs), begun at ``listed_since``
        (monotonic): forget every domain of the host it did not list, unless something
        looked the domain up after the listing began (a domain started meanwhile).
        Returns the keys forgotten."""
        keep = set(running)
        with self.lock:
            records = self._hosts.get(host, {})
            gone = [
                rec.key
                for uuid, rec in records.items()
                if uuid not in keep and rec.touched < listed_since
            ]
        for key in gone:
            self.forget(key)
        return gone

    def forgotten_within(self, key: Key, seconds: float = math.inf) -> bool:
        """Whether the domain was forgotten within the last ``seconds`` (a reconcile that
        began before it stopped must not bring its state back); by default, at all."""
        with self.lock:
            when = self._forgotten.get(key)
        return when is not None and when >= self._clock() - seconds

    def revived(self, key: Key) -> None:
        """The domain is back (a reconcile that began after it was forgotten)."""
        with self.lock:
            self._forgotten.pop(key, None)


class AgentFailures(MutableMapping[Key, int]):
    """The agent circuit breaker's counts (``core.breaker.AgentBreaker``), kept in the
    domains' records: a domain with no count is absent."""

    def __init__(self, registry: DomainRegistry) -> None:
        self._registry = registry

    def __getitem__(self, key: Key) -> int:
        rec = self._registry.get(key)
        if rec is None or not rec.agent_failures:
            raise KeyError(key)
        return rec.agent_failures

    def __setitem__(self, key: Key, failures: int) -> None:
        self._registry.record(key).agent_failures = failures

    def __delitem__(self, key: Key) -> None:
        rec = self._registry.get(key)
        if rec is None or not rec.agent_failures:
            raise KeyError(key)
        rec.agent_failures = 0

    def __iter__(self) -> Iterator[Key]:
        return iter([rec.key for rec in self._registry.records() if rec.agent_failures])

    def __len__(self) -> int:
        return sum(1 for _ in self)
