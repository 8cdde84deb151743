"""The shrink of a verified ``setvcpus`` (live): unplug, wait for the guest to drop the
CPUs, and repeat the unplug request where libvirt gave up although the guest ejected.

Decided from what this host shows, never from a version number:

- libvirt waits a few seconds for QEMU's DEVICE_DELETED and, when it does not come (under
  TCG it never comes for the vCPU itself), fails (VIR_ERR_OPERATION_TIMEOUT) and keeps
  counting the vCPU although the guest ejected it: a *stale* vCPU. When the guest has
  ejected it (its OST eject report, or its agent no longer lists it), the same unplug
  request is repeated (``core.judge.repeat_unplug``: error codes and observed state, never
  libvirt's message text): some hosts accept it and correct libvirt's count, others refuse
  it; either way the outcome is read back and reported, with the remedy that works on this
  host (``after_shrink``).
- Where the connection has libvirt 12.4's async unplug (its capability record: binding and
  daemon), a shrink fires the unplug and completes it from what it observes instead of
  waiting out libvirt's timeout: once the guest has ejected the vCPUs (its agent no longer
  lists them, or its OST eject reports when there is no agent) while libvirt still counts
  them, the same request is repeated (libvirt drops an ejected vCPU on a repeat, then emits
  vcpu-removed, the confirmation), at most once per vCPU, within the command's timeout
  (``AsyncShrink``). An async unplug the guest has not completed when the command ends is
  reported as pending (the caller records it: ``unplug-requested``).

A repeat is the only request made twice: a hot(un)plug request is not idempotent, and its
outcome is read back from libvirt's count, never from its message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

from virthotplug.core import errors
from virthotplug.core import resizeplan as plan
from virthotplug.core.judge import EJECT, REMOVED, UNPLUG_REQUEST, GuestSeen, repeat_unplug
from virthotplug.core.resizeplan import Request
from virthotplug.core.view import VcpuView
from virthotplug.core.workpool import CallTimeout
from virthotplug.host.agentread import read_guest
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.ops.seen import PERMANENT, Failure, Seen, live_count, wait_guest

ASYNC_POLL_INTERVAL = 0.025  # seconds between looks while an async unplug waits for the eject
GUEST_READ_TIMEOUT = 1.0  # seconds one look waits for the guest agent's list
# How long a completed async unplug waits for libvirt's vcpu-removed (its confirmation; it
# follows the accepted repeat within milliseconds in the lab), looking this often.
CONFIRM_WAIT = 0.5
CONFIRM_POLL_INTERVAL = 0.01


def after_shrink(
    conn: Connection,
    dom: Domain,
    before: VcpuView,
    request: Request,
    started: float,
    notes: list[str],
    seen: Seen,
) -> Optional[str]:
    """Wait for the guest to drop the CPUs; when libvirt failed the unplug although the
    guest ejected, repeat the same unplug request. libvirt unplugs one vCPU at a time and
    stops at the first it gives up on, so a repeat may correct the count for that one and
    give up on the next: repeated while each one corrects libvirt's count (at most once per
    vCPU). Returns "accepted", libvirt's error of a repeat that changed nothing, or None
    when nothing was repeated."""
    current = before.live.current if before.live is not None else request.count
    for _ in range(max(1, current - request.count)):
        guest = wait_guest(
            conn, dom, before, lambda g: len(g.present) <= request.count, started, request
        )
        observations = seen.update()
        answer = GuestSeen(guest.present, guest.online, time.monotonic()) if guest else None
        requests = [o for o in observations.events if o.kind == UNPLUG_REQUEST]
        if not repeat_unplug(requests, observations.events, answer, request.count):
            return None  # accepted, or the guest has not ejected: repeating would time out
        repeated = repeat_request(conn, dom, before, request, seen, [r.vcpu for r in requests])
        if repeated.accepted:
            notes.append(
                f"libvirt gave up on the unplug although the guest ejected the CPU; the "
                f"repeated unplug request was accepted by this host ({conn.support.describe()})"
            )
            return plan.REPEAT_ACCEPTED
        if not repeated.corrected:
            return repeated.error
    return None


@dataclass(frozen=True)
class Repeated:
    """What a repeated unplug request did, read from libvirt's count (never its message)."""

    error: Optional[str] = None  # libvirt's error to it; None: accepted
    # It failed but libvirt's count dropped: it removed some vCPUs and gave up on the next.
    corrected: bool = False

    @property
    def accepted(self) -> bool:
        return self.error is None


def repeat_request(
    conn: Connection,
    dom: Domain,
    before: VcpuView,
    request: Request,
    seen: Seen,
    asked: Sequence[int],
    async_flag: int = 0,
) -> Repeated:
    """Repeat the unplug request once (``async_flag``: as the async unplug, returning at
    once); ``asked``: the vCPUs it asks for again, recorded as requested in ``seen``. Which
    vCPUs it removed and which one it gave up on is read from libvirt's count before and
    after, never from its message: a failure that left the count as it was is a refusal
    (recorded on the highest vCPU asked, the first libvirt tries)."""
    counted = live_count(conn, dom)
    again = time.monotonic()
    try:
        dom.set_vcpus(request.count, live=True, config=False, async_flag=async_flag)
    except (errors.ConnectError, errors.PermissionDeniedError):
        raise
    except errors.VirtHotplugError as exc:
        failure = Failure(str(exc), exc.code)
        now = live_count(conn, dom)
        if now < 0 or counted < 0 or now >= counted:
            seen.requested(sorted(asked)[-1:], again, failure)
            return Repeated(failure.text)
        unplugged = plan.unplugged(before, request.count)
        seen.requested(unplugged[now - request.count : counted - request.count], again, None)
        seen.requested(unplugged[: now - request.count], again, failure)
        return Repeated(failure.text, corrected=True)
    seen.requested(sorted(set(asked)), again, None)
    return Repeated()


class AsyncShrink:
    """An async unplug completed from what is observed (see the module's docstring)."""

    def __init__(
        self,
        conn: Connection,
        dom: Domain,
        before: VcpuView,
        request: Request,
        seen: Seen,
        async_flag: int,
        started: float,
    ) -> None:
        assert before.live is not None
        self.conn, self.dom, self.before, self.request = conn, dom, before, request
        self.seen, self.flag, self.started = seen, async_flag, started
        self.unplugged = plan.unplugged(before, request.count)
        self.deadline = started + request.timeout
        self.repeats_left = len(self.unplugged)
        self.accepted = 0
        self.refused: Optional[str] = None

    def run(
        self, failure: Optional[Failure], timings: dict[str, float], notes: list[str]
    ) -> tuple[Optional[str], frozenset[int]]:
        """Wait for the guest's eject, repeat the request while libvirt still counts what
        the guest gave up; (the repeat's outcome for ``ResizeResult.repeated``, the vCPUs
        libvirt still counts at the end)."""
        if failure is not None:  # not fired: nothing to complete
            return None, frozenset()
        live = self._complete(timings)
        if live <= self.request.count:
            self._confirm(timings)
        repeated = self.refused
        if self.accepted and repeated is None:
            repeated = plan.REPEAT_ACCEPTED
            notes.append(
                f"async unplug: the guest ejected the vCPUs; the repeated request completed "
                f"it on this host ({self.conn.support.describe()})"
            )
        still = max(0, live - self.request.count)
        return repeated, frozenset(sorted(self.unplugged)[-still:]) if still else frozenset()

    def _complete(self, timings: dict[str, float]) -> int:
        """Look at the layers every ``ASYNC_POLL_INTERVAL`` seconds until every layer is at
        the target, a repeat fails, or the deadline (the request's timeout); libvirt's live
        count at the end. Bounded: the first look past the deadline that repeats nothing
        is the last; a look is one stats call and one agent read (at most
        ``GUEST_READ_TIMEOUT``); a repeat, looked at again at once, is made at most once
        per unplugged vCPU.

        Polled, not waited on: the guest's list comes from its agent and libvirt's count
        from its stats, and neither announces a change (under TCG libvirt's vcpu-removed
        follows the repeat, not the eject); the monitor events are a list read at each
        look, with nothing to wake a waiter."""
        target = self.request.count
        while True:
            live = live_count(self.conn, self.dom)
            present = self._guest_present()
            if present is not None and present <= target and "guest-ejected" not in timings:
                timings["guest-ejected"] = time.monotonic() - self.started
            if live <= target and (present is None or present <= target):
                timings["all-layers"] = time.monotonic() - self.started
                return live
            if self._ejected_more_than_dropped(live, present) and self.repeats_left > 0:
                if not self._repeat():
                    return live_count(self.conn, self.dom)
                continue
            if time.monotonic() >= self.deadline:
                return live
            time.sleep(ASYNC_POLL_INTERVAL)

    def _guest_present(self) -> Optional[int]:
        """How many CPUs the guest lists now; None without an answer."""
        if not self.before.agent.configured:
            return None
        assert self.before.live is not None
        try:
            maximum = self.before.live.maximum
            guest = read_guest(self.conn, self.dom, maximum=maximum, timeout=GUEST_READ_TIMEOUT)
        except (errors.AgentError, errors.TransientError, CallTimeout, *PERMANENT):
            return None
        return len(guest.present)

    def _ejected_more_than_dropped(self, live: int, present: Optional[int]) -> bool:
        """The guest gave up a vCPU libvirt still counts: its agent lists fewer CPUs than
        libvirt counts, or (no answer) its OST reports ejected more than libvirt dropped."""
        if present is not None:
            return present < live
        assert self.before.live is not None
        ejected = {
            o.vcpu
            for o in self.seen.update().events
            if o.kind == EJECT and o.at >= self.started and o.vcpu in self.unplugged
        }
        return len(ejected) > self.before.live.current - live

    def _repeat(self) -> bool:
        """Repeat the request (async again: it returns at once); False when it failed."""
        self.repeats_left -= 1
        repeated = repeat_request(
            self.conn, self.dom, self.before, self.request, self.seen, self.unplugged, self.flag
        )
        if not repeated.accepted:
            self.refused = repeated.error
            return False
        self.accepted += 1
        return True

    def _confirm(self, timings: dict[str, float]) -> None:
        """Wait briefly for libvirt's vcpu-removed of the unplugged vCPUs: the confirmation
        (it goes into the observations; the layers were verified already)."""
        if not self.conn.support.vcpu_removed_event:
            return
        wanted = set(self.unplugged)
        limit = time.monotonic() + CONFIRM_WAIT
        while time.monotonic() < limit:
            removed = {
                o.vcpu
                for o in self.seen.update().events
                if o.kind == REMOVED and o.at >= self.started
            }
            if wanted <= removed:
                timings["vcpu-removed"] = time.monotonic() - self.started
                return
            time.sleep(CONFIRM_POLL_INTERVAL)
