"""What a ``setvcpus`` command sees of its domain while it changes it: the QEMU monitor
events since it started and the requests it made (``Seen``, the judge's
``Observations``), libvirt's failure of a request (``Failure``), libvirt's live count, and
the guest agent's list polled until a condition holds.

Shared by the grow (``ops.resize``) and the shrink (``ops.shrink``); nothing here changes
the domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core.events import Event
from virthotplug.core.judge import (
    HOTADD_WAIT,
    PLUG,
    PLUG_REQUEST,
    UNPLUG_REQUEST,
    Observations,
    Observed,
)
from virthotplug.core.observed import EventReader
from virthotplug.core.resizeplan import Request
from virthotplug.core.view import GuestLayer, VcpuView
from virthotplug.core.workpool import CallTimeout
from virthotplug.host.agentread import read_guest
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain

POLL_INTERVAL = 0.075  # seconds between guest-agent polls while waiting
# Stop polling the agent at once on these: waiting cannot change them.
PERMANENT = (
    errors.UnsupportedError,
    errors.AgentNotConfiguredError,
    errors.NotRunningError,
    errors.GuestDataError,
)

EventsFn = Callable[[], Sequence[Event]]  # the domain's QEMU monitor events since the start


@dataclass(frozen=True)
class Failure:
    """A request libvirt failed: its message (for people) and virErrorNumber (for us)."""

    text: str
    code: Optional[int]


class Seen:
    """What this command observed of the domain: its monitor events since the start (read
    as they come) and the requests it made, as the judge's ``Observations``."""

    def __init__(self, events: Optional[EventsFn]) -> None:
        self._events: EventsFn = events if events is not None else (lambda: ())
        self._read = 0
        self._reader = EventReader()
        self.observations = Observations()

    def update(self) -> Observations:
        """Take in the events that came since the last look; a plug is a hot-add hint."""
        events = list(self._events())
        fresh = self._reader.read_all(events[self._read :])
        self._read = len(events)
        self.observations.add(fresh)
        for plug in (o for o in fresh if o.kind == PLUG):
            self.observations.hinted([plug.vcpu], plug.at)
        return self.observations

    def requested(self, vcpus: Sequence[int], at: float, failure: Optional[Failure]) -> None:
        """An unplug of ``vcpus`` (the highest enabled ones, libvirt's order): when it
        failed, only the first one is known to have been tried (libvirt stops there)."""
        tried = vcpus[-1:] if failure is not None else vcpus
        code = failure.code if failure is not None else None
        wall = time.time()
        self.observations.add(
            Observed(UNPLUG_REQUEST, v, at, wall, code) for v in sorted(tried, reverse=True)
        )

    def plug_requested(self, vcpus: list[int], at: float) -> None:
        """A grow asked libvirt to plug ``vcpus`` at ``at``: a removal of one of them after
        that is the late event of its slot's previous vCPU."""
        wall = time.time()
        self.observations.add(Observed(PLUG_REQUEST, v, at, wall) for v in vcpus)

    def requests(self) -> tuple[Observed, ...]:
        kinds = (PLUG_REQUEST, UNPLUG_REQUEST)
        return tuple(o for o in self.observations.snapshot().events if o.kind in kinds)

    def plugs_are_old(self, needed: int) -> bool:
        """Every hot-add QEMU reported is ``HOTADD_WAIT`` old: a guest that has not listed
        its CPU by then never will."""
        plugs = [o.at for o in self.update().events if o.kind == PLUG]
        if needed <= 0 or len(plugs) < needed:
            return False
        return time.monotonic() - max(plugs) >= HOTADD_WAIT


def live_count(conn: Connection, dom: Domain) -> int:
    """libvirt's live vCPU count of ``dom`` now; -1 when the stats do not say."""
    stats = conn.bulk_stats([dom])
    value = stats[0][1].get("vcpu.current") if stats else None
    return value if isinstance(value, int) else -1


def wait_guest(
    conn: Connection,
    dom: Domain,
    before: VcpuView,
    done: Callable[[GuestLayer], bool],
    started: float,
    request: Request,
    give_up: Callable[[], bool] = lambda: False,
) -> Optional[GuestLayer]:
    """Poll the guest agent until ``done``, ``give_up`` or the request's timeout; the last
    guest seen."""
    if not before.agent.configured:
        return None
    deadline = started + request.timeout
    maximum = before.live.maximum if before.live is not None else 1
    last: Optional[GuestLayer] = None
    while True:
        remaining = deadline - time.monotonic()
        try:
            last = read_guest(conn, dom, maximum=maximum, timeout=max(0.05, remaining))
        except PERMANENT:
            return last
        except (errors.AgentError, errors.TransientError, CallTimeout):
            pass  # the agent may be busy with the hot-add: keep polling until the deadline
        if (last is not None and done(last)) or time.monotonic() >= deadline or give_up():
            return last
        time.sleep(POLL_INTERVAL)
