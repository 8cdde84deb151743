"""Per-domain QEMU monitor registrations of one host, added and dropped on a thread of their
own.

Never on libvirt's event thread: removing a registration from inside a callback can deadlock
or be refused, and it is a call to libvirtd, which must not hold up event dispatch. Never on
the daemon's main loop either: a call to a busy libvirtd would stall every host. Removals go
first (a flooding domain is cut off before any pending additions are made).

The wanted set is the host's running domains, less those the ``FloodGuard`` holds
suppressed: added on start/resume and whenever a resync lists the running domains (at
session start, after a reconnect, and periodically), dropped on stop, crash or undefine, and
at once when a domain floods (``drop_now``). A suppressed domain comes back through
``probe``: past its back-off, its vCPU times are read on each probe, and once its busiest
vCPU used less than ``BUSY_FRACTION`` of a CPU since the previous read it is registered
again. Registrations belong to one connection: after a reconnect the new connection has
none until the reconnect's resync lists the running domains.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from virthotplug.core import errors
from virthotplug.daemon.flood import BUSY_FRACTION, FloodGuard
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain

log = logging.getLogger(__name__)

_DROP, _ADD, _PROBE, _SYNC, _STOP = 0, 1, 2, 3, 4  # priorities: lower runs first
# How long the event thread waits for a flooding domain's removal to be under way.
HANDOFF_WAIT = 0.2  # seconds
# The shortest time between two vCPU-time reads that can tell busy from idle: the times move
# in clock ticks (10 ms), and a probe queued behind a slow answer runs right after it (two
# reads 2 ms apart showed a flooding vCPU as idle).
MIN_WINDOW = 0.5  # seconds


_Request = tuple[int, int, tuple[str, ...], float, threading.Event]


class MonitorSubscriptions:
    """Keeps one host's per-domain monitor registrations on ``current()``'s connection."""

    def __init__(
        self,
        host: str,
        current: Callable[[], Optional[Connection]],
        guard: FloodGuard,
        clock: Callable[[], float] = time.monotonic,  # for the vCPU-time reads
    ):
        self.host = host
        self._clock = clock
        self._current = current
        self._guard = guard
        # (priority, sequence, UUIDs, when requested, set once the request is under way)
        self._queue: queue.PriorityQueue[_Request] = queue.PriorityQueue()
        self._seq = itertools.count()
        # Suppressed domains' last vCPU times, for quiet probes.
        self._cpu: dict[str, _Reading] = {}
        self._thread = threading.Thread(target=self._loop, name=f"monitor {host}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._put(_STOP, ())

    # requests (any thread; never block)

    def add(self, uuid: str) -> None:
        self._put(_ADD, (uuid,))

    def drop(self, uuid: str) -> None:
        self._put(_DROP, (uuid,))

    def drop_now(self, uuid: str) -> None:
        """``drop``, then wait (up to ``HANDOFF_WAIT``) until the removal is sent. For the
        event thread when a domain floods: the flooding events it would read meanwhile
        would hold the GIL and a CPU the removal needs, and every millisecond of delay is
        more events libvirtd queues for us."""
        self._put(_DROP, (uuid,)).wait(HANDOFF_WAIT)

    def probe(self, uuid: str) -> None:
        """A suppressed domain past its back-off: re-subscribe it if its vCPUs are idle
        (``FloodGuard`` says why). Each probe reads the vCPU times; the next one decides."""
        self._put(_PROBE, (uuid,))

    def sync(self, running: Iterable[str]) -> None:
        """The host's running domains, as a resync listed them."""
        self._put(_SYNC, tuple(running))

    def _put(self, priority: int, uuids: tuple[str, ...]) -> threading.Event:
        under_way = threading.Event()
        self._queue.put((priority, next(self._seq), uuids, time.monotonic(), under_way))
        return under_way

    # the thread

    def _loop(self) -> None:
        while True:
            priority, _seq, uuids, requested, under_way = self._queue.get()
            under_way.set()  # this thread has it: a waiting event thread may go on
            if priority == _STOP:
                return
            conn = self._current()
            if conn is None:
                continue  # the reconnect's resync lists every running domain again
            if not conn.monitoring and priority != _DROP:
                continue  # a driver without monitor events: nothing to look up or register
            try:
                self._do(conn, priority, uuids, requested)
            except errors.ConnectError as exc:
                log.debug("%s: monitor registration: %s", self.host, exc)
            except Exception:  # a bug here must not end the thread
                log.exception("%s: monitor registration failed", self.host)

    def _do(
        self, conn: Connection, priority: int, uuids: tuple[str, ...], requested: float
    ) -> None:
        if priority == _DROP:
            self._cpu.pop(uuids[0], None)  # its vCPU times, read by quiet probes
            started = time.monotonic()
            if conn.unmonitor_domain(uuids[0]):
                log.debug(
                    "%s: monitor events of %s dropped (asked %.1f ms after the request, "
                    "answered %.1f ms later)",
                    self.host,
                    uuids[0],
                    (started - requested) * 1000,
                    (time.monotonic() - started) * 1000,
                )
        elif priority == _ADD:
            self._add(conn, uuids[0])
        elif priority == _PROBE:
            self._probe(conn, uuids[0])
        else:
            # Only additions: a domain started after the listing was taken would be dropped
            # again. A stopped domain's registration is dropped by its stop event (one that
            # stays because that event was lost delivers nothing: it is filtered by UUID).
            for uuid in sorted(set(uuids) - conn.monitored()):
                self._add(conn, uuid)

    def _probe(self, conn: Connection, uuid: str) -> None:
        key = (self.host, uuid)
        dom: Optional[Domain] = None
        try:
            dom = conn.domain_by_uuid(uuid)
            busy = self._busy(key, dom)
        except errors.NoDomainError:  # gone: no more probes of it
            self._cpu.pop(uuid, None)
            self._guard.forget(key)
            return
        except errors.ConnectError:
            raise
        except errors.VirtHotplugError as exc:  # no vCPU times here: the back-off alone
            log.debug("%s: %s; re-subscribing on the back-off alone", self.host, exc)
            busy = False
        if busy:
            return
        self._cpu.pop(uuid, None)
        ref = self._guard.resubscribe(key)
        if ref is not None:
            log.info("domain '%s': quiet again: listening to its monitor events", ref.name)
            self._add(conn, uuid, dom)

    def _busy(self, key: tuple[str, str], dom: Domain) -> bool:
        """Reads the domain's vCPU times: whether it stays off for now (its first read, or a
        vCPU above ``BUSY_FRACTION`` of a CPU since the previous read)."""
        asked = self._clock()
        times = dom.vcpu_times()
        sample = _Reading(asked, self._clock(), times)
        before = self._cpu.get(dom.uuid)
        if before is not None and sample.asked - before.answered < MIN_WINDOW:
            return True  # too close to the previous read to measure: it stays the baseline
        self._cpu[dom.uuid] = sample
        if before is None:
            return True  # the next probe decides
        busiest, vcpu = _busiest(before, sample)
        if busiest < BUSY_FRACTION:
            return False
        if self._guard.still_busy(key):
            log.info(
                "domain '%s': monitor events still off: vcpu%d is %.0f %% busy",
                dom.name,
                vcpu,
                busiest * 100,
            )
        return True

    def _add(self, conn: Connection, uuid: str, dom: Optional[Domain] = None) -> None:
        if self._guard.is_suppressed((self.host, uuid)) or uuid in conn.monitored():
            return
        try:
            conn.monitor_domain(dom if dom is not None else conn.domain_by_uuid(uuid))
        except errors.NoDomainError:
            return
        except errors.ConnectError:
            raise
        except errors.VirtHotplugError as exc:
            log.warning("%s: no QEMU monitor events for %s: %s", self.host, uuid, exc)


@dataclass(frozen=True)
class _Reading:
    """A domain's vCPU times (ns per vCPU) and when the call that read them was made and
    answered: libvirtd took them at some moment in between."""

    asked: float
    answered: float
    times: dict[int, int]


def _busiest(before: _Reading, after: _Reading) -> tuple[float, int]:
    """(the largest share of one CPU a vCPU used between two reads, that vCPU); vCPUs
    plugged or unplugged in between are left out.

    Divided by the shortest time the two reads can be apart: under a flood libvirtd may
    answer seconds late, and timing a read from when it was asked would spread the vCPU time
    over seconds it was not measured in (a busy vCPU taken for an idle one)."""
    seconds = max(after.asked - before.answered, 1e-3)
    shares = [
        ((ns - before.times[vcpu]) / 1e9 / seconds, vcpu)
        for vcpu, ns in after.times.items()
        if vcpu in before.times
    ]
    return max(shares, default=(0.0, 0))
