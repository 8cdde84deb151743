"""Per-domain flood control for the events a guest can trigger at will.

A root process in a guest can make QEMU emit ``ACPI_DEVICE_OST`` as fast as it can write an
I/O port (60,000-100,000 events/s from one TCG vCPU); QEMU does not rate-limit the event and
libvirtd queues it for each subscriber without bound, so a subscriber that keeps listening
lets one tenant wedge libvirtd for the whole host. The guest agent's lifecycle events can be
toggled from inside the guest as well. ``FloodGuard`` is asked about each such event on
libvirt's event thread, before anything is parsed (a dict lookup and a few integer updates),
and answers:

``PASS``   make a record of it (log line, JSON line, reconcile request): at most
           ``PASS_PER_WINDOW`` events of a domain per ``WINDOW``;
``DROP``   count it only; once the window is over, one summary (``Summary``) says how many
           were dropped, and asks for one reconcile, so a hint that was dropped is not lost;
``FLOOD``  this domain's QEMU monitor events came in a burst or passed ``FLOOD_THRESHOLD``: stop
           listening to them now (the caller removes its monitor registrations from another
           thread), report the finding ``ost-flood``, and handle the domain through its
           lifecycle and agent events and a reconcile every ``SUPPRESSED_RESYNC`` seconds.

Two tests, either suppresses. First, by QEMU's own clock: each monitor event carries the
time QEMU emitted it, which the guest cannot set, so more than ``BURST_EVENTS`` emitted within
``BURST_SECONDS`` is a flood however slowly this process reads them (a loaded host, a
backlog). That bounds what libvirtd queues for us before the cut-off by a count, not by how
fast we happen to run: ``BURST_EVENTS`` events read, then one call. Second, by arrival, for
events without a timestamp and floods paced below the burst rate: more than
``FLOOD_THRESHOLD`` in one ``WINDOW``.

Why those numbers: a hot-add makes one device-check OST per vCPU and an unplug two or three
(a DEVICE_DELETED and its OSTs, microseconds apart), and libvirt plugs vCPUs one at a time,
each plug a QEMU command of its own (35-65 ms each in the lab; a few ms on a fast host), so
even a guest growing by hundreds of vCPUs sends at most a handful within 20 ms and a few
dozen a second. A flooding guest emits 32 within half a millisecond. Every event libvirtd
queues for us before the cut-off costs it memory (tens of KiB each: the e2e flood test saw
libvirtd grow 34 MiB for 760 events on a loaded host), so the cut-off must come early. A false
alarm costs only latency (hints arrive through the periodic reconcile) and a warning.

A suppressed domain is listened to again once it is quiet: nothing of it arrived for its
back-off (30 s, doubling with each new flood up to 30 min; libvirtd's backlog for us counts
as not quiet), and then its vCPUs were idle (none above ``BUSY_FRACTION`` of a CPU) between
two probes (``PROBE_INTERVAL`` apart, then every ``PROBE_RETRY`` while busy). Nothing arrives
while it is not subscribed, so the first test alone says nothing; the second is what a flood
cannot hide: writing the OST registers at tens of thousands a second keeps a vCPU busy, and
re-subscribing into a flood that never stopped is the dangerous moment for libvirtd (its
event queue for us is already full-rate before our first read). A guest that stays busy is
handled through its lifecycle and agent events and the periodic reconcile. If a flood does
start again, the burst test catches it after ``BURST_EVENTS``, and a domain that flooded
before is also on probation for paced floods: more than ``PROBATION_THRESHOLD`` monitor
events in one window suppress it again at once. After ``BACKOFF_MAX`` seconds subscribed
without a flood its history is forgotten, and so it is ``BACKOFF_MAX`` seconds after the
domain stopped or went away; a domain that is not running is neither probed nor reconciled.

Pure bookkeeping with an injected clock (no threads of its own, no libvirt); one lock,
because the event thread asks and the daemon's main loop collects.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from virthotplug.core.drift import OST_FLOOD
from virthotplug.core.events import RECONCILE, REPORT, DomainRef, Event
from virthotplug.core.view import WARNING, Finding

Key = tuple[str, str]  # (host URI, domain UUID)

BURST_EVENTS = 32  # QEMU monitor events of one domain emitted within BURST_SECONDS
BURST_SECONDS = 0.02  # by QEMU's timestamps: more than 1,600/s
WINDOW = 1.0  # seconds
FLOOD_THRESHOLD = 200  # QEMU monitor events of one domain in one window
PROBATION_THRESHOLD = 50  # the same, for a domain that flooded before (a re-subscription)
PASS_PER_WINDOW = 5  # events of one domain per window that become records
BACKOFF_FIRST = 30.0  # seconds without events before a suppressed domain is re-subscribed
BACKOFF_MAX = 1800.0
SUPPRESSED_RESYNC = 10.0  # reconcile a suppressed domain this often
PROBE_INTERVAL = 1.0  # seconds between the two vCPU-time reads of a quiet probe
PROBE_RETRY = 10.0  # seconds until the next probe of a domain whose vCPUs were busy
BUSY_FRACTION = 0.1  # of one CPU, for the busiest vCPU: above it, not quiet


class Verdict(enum.Enum):
    PASS = "pass"
    DROP = "drop"
    FLOOD = "flood"


@dataclass(frozen=True)
class FloodInfo:
    """A suppressed domain, for its ``ost-flood`` finding and records."""

    rate: float  # monitor events/s seen when it was suppressed
    events: int  # monitor events in that burst or window
    seconds: float  # how long that took (QEMU's clock for a burst, arrival for a window)
    floods: int  # times suppressed (each doubles the back-off)
    backoff: float  # quiet seconds needed before it is re-subscribed
    since: float  # clock time of the last suppression

    def describe(self) -> str:
        took = f"{self.seconds * 1000:.1f} ms" if self.seconds < 0.1 else f"{self.seconds:.2f} s"
        return (
            f"QEMU monitor events flooded: {self.events} in {took} "
            f"(~{self.rate:.0f}/s); not listening to them, re-subscribing after "
            f"{self.backoff:.0f} s without events"
        )


@dataclass(frozen=True)
class Summary:
    """What a domain's window dropped: one record instead of many."""

    ref: DomainRef
    dropped: dict[str, int]  # event kind -> count
    seconds: float
    suppressed: bool


@dataclass
class _Domain:
    ref: DomainRef
    window_start: float
    count: int = 0  # monitor events in this window
    passed: int = 0  # events in this window that became records
    dropped: dict[str, int] = field(default_factory=dict)
    last_monitor: float = 0.0
    burst_start: float = -1.0  # QEMU's timestamp of the first event of the current burst
    burst_count: int = 0
    suppressed: Optional[FloodInfo] = None
    floods: int = 0
    backoff: float = BACKOFF_FIRST
    subscribed_at: float = 0.0  # when it was last re-subscribed
    last_resync: float = 0.0
    probe_after: float = 0.0  # no quiet probe before this clock time
    busy_reported: bool = False  # "still busy" is logged once per suppression
    stopped_at: Optional[float] = None  # not running since then: no probe, no reconcile


class FloodGuard:
    """See the module doc. ``admit`` on the event thread; ``collect`` from the main loop."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        threshold: int = FLOOD_THRESHOLD,
        probation_threshold: int = PROBATION_THRESHOLD,
        burst_events: int = BURST_EVENTS,
        burst_seconds: float = BURST_SECONDS,
        window: float = WINDOW,
        per_window: int = PASS_PER_WINDOW,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        resync: float = SUPPRESSED_RESYNC,
        probe_interval: float = PROBE_INTERVAL,
        probe_retry: float = PROBE_RETRY,
    ) -> None:
        self._clock = clock
        self.threshold, self.window, self.per_window = threshold, window, per_window
        self.probation_threshold = probation_threshold
        self.burst_events, self.burst_seconds = burst_events, burst_seconds
        self.backoff_first, self.backoff_max, self.resync = backoff_first, backoff_max, resync
        self.probe_interval, self.probe_retry = probe_interval, probe_retry
        self._domains: dict[Key, _Domain] = {}
        self._summaries: list[Summary] = []
        self._lock = threading.Lock()

    # event thread

    def admit(
        self,
        key: Key,
        name: Callable[[], str],
        kind: str,
        *,
        monitor: bool,
        emitted: Optional[float] = None,
    ) -> Verdict:
        """One guest-triggerable event of ``kind``; ``monitor``: a QEMU monitor event,
        ``emitted`` when QEMU emitted it (its timestamp, seconds), if known. ``name`` is
        asked only for a domain seen for the first time."""
        now = self._clock()
        with self._lock:
            dom = self._domains.get(key)
            if dom is None:
                dom = self._domains[key] = _Domain(DomainRef(key[0], key[1], name()), now)
            elif now - dom.window_start >= self.window:
                self._close_window(dom, now)
            if monitor:
                dom.count += 1
                dom.last_monitor = now
                if dom.suppressed is None and self._flooding(dom, now, emitted):
                    return Verdict.FLOOD
                if dom.suppressed is not None:
                    dom.dropped[kind] = dom.dropped.get(kind, 0) + 1
                    return Verdict.DROP
            if dom.passed < self.per_window:
                dom.passed += 1
                return Verdict.PASS
            dom.dropped[kind] = dom.dropped.get(kind, 0) + 1
            return Verdict.DROP

    def _flooding(self, dom: _Domain, now: float, emitted: Optional[float]) -> bool:
        """Count one monitor event; suppress the domain if it floods (see the module doc)."""
        if emitted is not None:
            # A step of the host's clock (either way) starts a new burst.
            if not 0.0 <= emitted - dom.burst_start <= self.burst_seconds:
                dom.burst_start, dom.burst_count = emitted, 0
            dom.burst_count += 1
            if dom.burst_count > self.burst_events:
                span = max(emitted - dom.burst_start, 1e-6)
                self._suppress(dom, now, dom.burst_count, span)
                return True
        limit = self.probation_threshold if dom.floods else self.threshold
        if dom.count > limit:
            self._suppress(dom, now, dom.count, max(now - dom.window_start, 1e-3))
            return True
        return False

    def _suppress(self, dom: _Domain, now: float, events: int, seconds: float) -> None:
        if dom.floods:
            dom.backoff = min(dom.backoff * 2, self.backoff_max)
        dom.floods += 1
        dom.burst_start, dom.burst_count = -1.0, 0
        dom.probe_after, dom.busy_reported = 0.0, False
        dom.suppressed = FloodInfo(
            rate=events / seconds,
            events=events,
            seconds=seconds,
            floods=dom.floods,
            backoff=dom.backoff,
            since=now,
        )
        dom.last_resync = now

    def _close_window(self, dom: _Domain, now: float) -> None:
        if dom.dropped:
            seconds = min(now - dom.window_start, self.window)
            suppressed = dom.suppressed is not None
            self._summaries.append(Summary(dom.ref, dom.dropped, seconds, suppressed))
        dom.window_start, dom.count, dom.passed, dom.dropped = now, 0, 0, {}

    # main loop

    def collect(self) -> tuple[list[Summary], list[DomainRef], list[DomainRef]]:
        """(summaries of windows that ended, suppressed domains past their back-off due for
        a quiet probe, suppressed domains due for their periodic reconcile). Forgets domains
        that have been quiet a while, so memory follows the number of active domains."""
        now = self._clock()
        probe: list[DomainRef] = []
        resync: list[DomainRef] = []
        with self._lock:
            for key, dom in list(self._domains.items()):
                if now - dom.window_start >= self.window:
                    self._close_window(dom, now)
                    if self._idle(dom, now):
                        del self._domains[key]
                        continue
                if dom.suppressed is not None and dom.stopped_at is None:
                    if now - dom.last_monitor >= dom.backoff and now >= dom.probe_after:
                        dom.probe_after = now + self.probe_interval
                        probe.append(dom.ref)
                    if now - dom.last_resync >= self.resync:
                        dom.last_resync = now
                        resync.append(dom.ref)
            summaries, self._summaries = self._summaries, []
        return summaries, probe, resync

    # the probe (MonitorSubscriptions' thread)

    def resubscribe(self, key: Key) -> Optional[DomainRef]:
        """A probe found the domain's vCPUs idle: listen to it again, on probation. None
        if it is no longer suppressed, or events of it arrived since the back-off ended."""
        now = self._clock()
        with self._lock:
            dom = self._domains.get(key)
            if dom is None or dom.suppressed is None or now - dom.last_monitor < dom.backoff:
                return None
            dom.suppressed, dom.subscribed_at = None, now
            return dom.ref

    def still_busy(self, key: Key) -> bool:
        """A probe found a vCPU of the domain busy: probe again in ``probe_retry``. True the
        first time for this suppression (worth one log line)."""
        now = self._clock()
        with self._lock:
            dom = self._domains.get(key)
            if dom is None or dom.suppressed is None:
                return False
            dom.probe_after = now + self.probe_retry
            first, dom.busy_reported = not dom.busy_reported, True
            return first

    def _idle(self, dom: _Domain, now: float) -> bool:
        if dom.stopped_at is not None:  # its history is kept as long as a subscribed one's
            return now - dom.stopped_at >= self.backoff_max
        if dom.suppressed is not None or dom.passed or dom.count:
            return False
        # A domain that flooded keeps its back-off until it has behaved for backoff_max.
        return not dom.floods or now - dom.subscribed_at >= self.backoff_max

    # queries (any thread)

    def suppressed(self, key: Key) -> Optional[FloodInfo]:
        with self._lock:
            dom = self._domains.get(key)
            return dom.suppressed if dom is not None else None

    def is_suppressed(self, key: Key) -> bool:
        return self.suppressed(key) is not None

    def forget(self, key: Key) -> None:
        """The domain stopped or went away. Its flood history stays for ``backoff_max`` (a
        guest that floods, is restarted and floods again keeps doubling its back-off), but
        nothing is done for it meanwhile: no probe, no periodic reconcile of a domain that
        is not running (or no longer exists)."""
        with self._lock:
            dom = self._domains.get(key)
            if dom is not None and not dom.floods:
                del self._domains[key]
            elif dom is not None and dom.stopped_at is None:
                dom.stopped_at = self._clock()

    def running(self, host: str, uuids: Iterable[str]) -> None:
        """These domains of ``host`` run (started, resumed, or listed by a resync): a
        suppressed one among them is probed and reconciled again."""
        with self._lock:
            stopped = {
                uuid: dom
                for (where, uuid), dom in self._domains.items()
                if where == host and dom.stopped_at is not None
            }
            if not stopped:
                return
            for uuid in uuids:
                dom = stopped.get(uuid)
                if dom is not None:
                    dom.stopped_at = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._domains)


# --- the records ------------------------------------------------------------------------


@dataclass(frozen=True)
class FloodEvent(Event):
    """A domain's QEMU monitor events were suppressed (``watch --json`` event "flood")."""

    info: Optional[FloodInfo] = None

    kind = "flood"

    @property
    def intent(self) -> str:
        return RECONCILE  # its reconcile carries the ost-flood finding into records, metrics

    def describe(self) -> str:
        return self.info.describe() if self.info is not None else "QEMU monitor events flooded"

    def details(self) -> dict[str, Any]:
        info = self.info
        if info is None:
            return {}
        return {
            "rate": round(info.rate),
            "events": info.events,
            "seconds": round(info.seconds, 3),
            "floods": info.floods,
            "backoff": info.backoff,
        }


@dataclass(frozen=True)
class SuppressedEvent(Event):
    """Events of one domain that made no record of their own in one window (``watch
    --json`` event "suppressed"): counted by kind, reported once."""

    dropped: tuple[tuple[str, int], ...] = ()
    seconds: float = 0.0
    monitor_suppressed: bool = False

    kind = "suppressed"

    @property
    def intent(self) -> str:
        # A dropped event may have been a hint worth acting on; a suppressed domain's are
        # covered by its periodic reconcile.
        return REPORT if self.monitor_suppressed else RECONCILE

    def describe(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in self.dropped)
        return f"{counts} event(s) not logged in {self.seconds:.1f} s"

    def details(self) -> dict[str, Any]:
        return {
            "dropped": dict(self.dropped),
            "seconds": round(self.seconds, 3),
            "monitor_suppressed": self.monitor_suppressed,
        }


def summary_event(summary: Summary) -> SuppressedEvent:
    return SuppressedEvent(
        summary.ref,
        dropped=tuple(sorted(summary.dropped.items())),
        seconds=summary.seconds,
        monitor_suppressed=summary.suppressed,
    )


def flood_finding(info: FloodInfo) -> Finding:
    return Finding(OST_FLOOD, WARNING, info.describe())
