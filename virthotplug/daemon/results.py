"""What the daemon's main loop and its parts hand each other: the settings it reads, an
extra event source, the reconcile function and what one job did, the observer of it all,
and the daemon's counters."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from virthotplug.core.events import Event
from virthotplug.core.records import Record
from virthotplug.core.schedule import Job, Key
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain

if TYPE_CHECKING:
    from virthotplug.core.view import VcpuView


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
    # True: nothing runs before the retry (a grace period). False: it is only a look again
    # (a hot-added CPU not listed yet, a finding held while the guest settles), and an event
    # that comes meanwhile runs the domain's job at once.
    retry_holds: bool = True
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


class NoObserver:
    def event(self, ev: Event) -> None:
        pass

    def reconciled(self, job: Job, result: JobResult, seconds: float) -> None:
        pass

    def failed(self, job: Job, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class JobDone:
    """A worker's word to the main loop that a job ended, and what to do next."""

    key: Key
    retry_after: Optional[float] = None
    job: Optional[Job] = None
    reason: str = "grace"
    # Whether the reconcile found the guest agent not answering; None: it says nothing of
    # the agent (no reconcile ran, or its connection was lost meanwhile).
    unresponsive: Optional[bool] = None
    holds: bool = True  # JobResult.retry_holds


@dataclass
class WatchStats:
    events: int = 0
    reconciles: int = 0
    failures: int = 0
    coalesced: int = 0
    # Workers count too: without a lock an increment is a read-modify-write that only
    # happens to be atomic on today's CPython (and is not with free threading).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                setattr(self, name, getattr(self, name) + n)
