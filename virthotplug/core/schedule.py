"""Per-domain reconcile scheduling: level-triggered, coalescing, one at a time per domain.

Pure bookkeeping (no threads, no libvirt), driven by the daemon's main loop:

* ``request`` asks for a reconcile of a domain at ``due`` and, separately, no earlier than
  ``not_before`` (a grace period, a retry delay). Requests for a domain that already has one
  pending merge into it: the earliest ``due`` and the latest ``not_before`` win, so a tick
  never cuts a grace period short and a domain flooding events cannot push its own job
  back (each event's settle delay would otherwise move it later); reasons and hot-added
  CPUs accumulate.
* ``pop_due`` hands out pending jobs whose time has come, skipping domains with a job
  still running; a request that arrives while one runs waits as the next pending job.
  Event-driven jobs go before resync-only ones, so a hot-add is never queued behind a
  thousand-domain resync that happened to be due a moment earlier.
* ``finish`` marks a domain's job done; ``forget`` drops pending work for a gone domain.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Optional

from virthotplug.core.events import DomainRef

Key = tuple[str, str]  # (host URI, domain UUID)
MAX_REASONS = 8  # a burst of a thousand events still makes one short job description
RESYNC_REASON = "host"  # requests from the periodic or reconnect resync (HostEvent "listed")


@dataclass
class Job:
    ref: DomainRef
    due: float
    first_request: float  # monotonic time of the earliest event behind this job
    reasons: list[str] = field(default_factory=list)
    hotadded: set[int] = field(default_factory=set)
    coalesced: int = 1
    not_before: float = 0.0  # a grace period or retry delay: never earlier than this

    @property
    def ready_at(self) -> float:
        return max(self.due, self.not_before)

    @property
    def resync_only(self) -> bool:
        """Nothing but the resync asked for this job: it waits behind event-driven ones."""
        return all(reason == RESYNC_REASON for reason in self.reasons)

    def merge(
        self, due: float, at: float, reason: str, hotadded: frozenset[int], not_before: float = 0.0
    ) -> None:
        self.due = min(self.due, due)
        self.not_before = max(self.not_before, not_before)
        self.first_request = min(self.first_request, at)
        if reason not in self.reasons and len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)
        self.hotadded |= hotadded
        self.coalesced += 1


class ReconcileQueue:
    def __init__(self) -> None:
        self._pending: dict[Key, Job] = {}
        self._running: set[Key] = set()
        # Domains whose jobs wait whatever they are asked for (an agent circuit breaker),
        # until this time; ``release`` ends it early.
        self._held: dict[Key, float] = {}

    def request(
        self,
        ref: DomainRef,
        *,
        due: float,
        at: float,
        reason: str,
        hotadded: frozenset[int] = frozenset(),
        not_before: float = 0.0,
    ) -> None:
        job = self._pending.get(ref.key)
        if job is None:
            job = Job(ref, due, at, [reason], set(hotadded), not_before=not_before)
            self._pending[ref.key] = job
        else:
            job.ref = ref  # the newest name wins (domains can be renamed)
            job.merge(due, at, reason, hotadded, not_before)

    def forget(self, key: Key) -> None:
        self._pending.pop(key, None)
        self._held.pop(key, None)

    def hold(self, key: Key, until: float) -> None:
        """No job of this domain starts before ``until`` (requests still merge meanwhile)."""
        self._held[key] = until

    def release(self, key: Key) -> None:
        self._held.pop(key, None)

    def _ready_at(self, key: Key, job: Job) -> float:
        held = self._held.get(key)
        return job.ready_at if held is None else max(job.ready_at, held)

    def pop_due(self, now: float, limit: int) -> list[Job]:
        """Up to ``limit`` jobs due by ``now``, event-driven ones first, then earliest first;
        they are marked running."""
        # nsmallest: the same as sorted()[:limit], without sorting every pending job.
        ready = heapq.nsmallest(
            max(0, limit),
            (
                job
                for key, job in self._pending.items()
                if self._ready_at(key, job) <= now and key not in self._running
            ),
            key=lambda job: (job.resync_only, job.ready_at),
        )
        for job in ready:
            del self._pending[job.ref.key]
            self._running.add(job.ref.key)
        return ready

    def finish(self, key: Key) -> None:
        self._running.discard(key)

    def next_due(self) -> Optional[float]:
        dues = [
            self._ready_at(key, job)
            for key, job in self._pending.items()
            if key not in self._running
        ]
        return min(dues) if dues else None

    def due_or_running(self, now: float) -> int:
        """Jobs due by ``now`` (waiting for a worker) and jobs running: the queue's depth.
        Safe from another thread: it reads a snapshot (a list made under the GIL)."""
        pending = list(self._pending.items())
        held = dict(self._held)

        def ready_at(key: Key, job: Job) -> float:
            until = held.get(key)
            return job.ready_at if until is None else max(job.ready_at, until)

        running = set(self._running)
        due = sum(1 for key, job in pending if key not in running and ready_at(key, job) <= now)
        return due + len(running)

    @property
    def running(self) -> int:
        return len(self._running)

    def __len__(self) -> int:
        return len(self._pending)
