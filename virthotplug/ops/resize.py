"""A safe, verified ``virsh setvcpus``.

Grow (live): preflight → hot-add (``setVcpusFlags``) → wait for the guest agent to list the
new CPUs → online them (policy, or ``--online``/``--no-online``) → verify every layer.
Shrink (live): unplug → wait for the guest to drop the CPUs → verify every layer.

Decided from what this host shows, never from a version number:

- libvirt waits a few seconds for QEMU's DEVICE_DELETED and, when it does not come (under
  TCG it never comes for the vCPU itself), fails (VIR_ERR_OPERATION_TIMEOUT) and keeps
  counting the vCPU although the guest ejected it: a *stale* vCPU. When the guest has
  ejected it (its OST eject report, or its agent no longer lists it), the same unplug
  request is repeated once (``core.judge.repeat_unplug``: error codes and observed state,
  never libvirt's message text): some hosts accept it and correct
  libvirt's count, others refuse it; either way the outcome is read back and reported, with
  the remedy that works on this host.
- A hot-add while a stale vCPU cannot be repaired is known to crash QEMU, and under TCG a
  plug that would make QEMU create more vCPUs in the domain's life than its maximum aborts
  QEMU. Only these are refused (``--force`` skips the check); a stale vCPU is repaired
  first where the host accepts the repeated request.
- A hot-add whose OST device check came but that the guest never lists was rejected by the
  guest (``guest-rejected-vcpu``): reported, with its own exit status.

Where the connection has libvirt 12.4's async unplug (its capability record: binding and
daemon), a shrink fires the unplug and completes it from what it observes instead of
waiting out libvirt's timeout: once the guest has ejected the vCPUs (its agent no longer
lists them, or its OST eject reports when there is no agent) while libvirt still counts
them, the same request is repeated (libvirt drops an ejected vCPU on a repeat, then
emits vcpu-removed, the confirmation), at most once per vCPU, within the command's timeout.
An async unplug the guest has not completed when the command ends is recorded in the
domain's history (``unplug-requested``) and reported as ``unplug-pending``. Without the
capability the shrink is the synchronous one above.

What is seen — unplug timeouts, QEMU's eject and plug reports, rejected hot-adds — is judged
by ``core.judge`` from the events seen during the command and goes into the domain's history
(``host.history``), which later commands read. Apart from that single
repeat, nothing is retried: a hot(un)plug request is not idempotent, and its outcome is read
back from every layer instead.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core import resizeplan as plan
from virthotplug.core.config import HostConfig
from virthotplug.core.events import Event
from virthotplug.core.judge import (
    EJECT,
    HOTADD_WAIT,
    PLUG,
    PLUG_REQUEST,
    REMOVED,
    UNPLUG_REQUEST,
    GuestSeen,
    Observations,
    Observed,
    judge,
    repeat_unplug,
)
from virthotplug.core.observed import EventReader
from virthotplug.core.policy import EffectivePolicy, Policy
from virthotplug.core.resizeplan import LayerCheck, Request
from virthotplug.core.view import (
    HISTORY_UNPLUG_REQUESTED,
    GuestLayer,
    HistoryEntry,
    VcpuView,
    parse_guest_reply,
)
from virthotplug.core.workpool import CallTimeout, call_with_timeout
from virthotplug.host import collect, history
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import parse_domain_xml
from virthotplug.host.policysource import effective_policy
from virthotplug.ops.reconcile import ReconcileResult, guest_seen, libvirt_seen, reconcile

POLL_INTERVAL = 0.075  # seconds between guest-agent polls while waiting
ASYNC_POLL_INTERVAL = 0.025  # ... while an async unplug waits for the guest's eject
# How long a completed async unplug waits for libvirt's vcpu-removed (its confirmation; it
# follows the accepted repeat within milliseconds in the lab).
CONFIRM_WAIT = 0.5
SOURCE = "setvcpus"  # who wrote a history entry
# Stop polling the agent at once on these: waiting cannot change them.
_PERMANENT = (
    errors.UnsupportedError,
    errors.AgentNotConfiguredError,
    errors.NotRunningError,
    errors.GuestDataError,
)


@dataclass(frozen=True)
class ResizeResult:
    name: str
    request: Request
    before: VcpuView
    after: VcpuView
    checks: tuple[LayerCheck, ...]
    error: Optional[str] = None  # what setVcpusFlags reported, if it failed
    reconcile: Optional[ReconcileResult] = None
    notes: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds since the request
    rejected: frozenset[int] = frozenset()  # vCPUs the guest did not take (OST said success)
    repeated: Optional[str] = None  # the repeated unplug: "accepted" or libvirt's error
    requests: tuple[Observed, ...] = ()  # the (un)plug requests made, for the judge

    @property
    def complete(self) -> bool:
        return all(check.ok for check in self.checks)


EventsFn = Callable[[], Sequence[Event]]  # the domain's QEMU monitor events since the start


@dataclass(frozen=True)
class Failure:
    """A request libvirt failed: its message (for people) and virErrorNumber (for us)."""

    text: str
    code: Optional[int]


def resize(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    request: Request,
    events: Optional[EventsFn] = None,
) -> ResizeResult:
    """Change the vCPU count as ``request`` says and verify every affected layer.
    ``events``: the domain's QEMU monitor events seen since the command started (optional:
    they tell a rejected hot-add and an eject, and they go into the domain's history)."""
    timeout = config.watch.agent_timeout
    seen = _Seen(events)
    context = history.contexts(config)
    before = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
    current = before.live.current if before.live is not None else 0
    # A count libvirt already reaches is a grow too while it counts vCPUs the guest has not
    # (the preflight unplugs those first).
    repairs = plan.needs_repair(before, request) and not request.force
    grows = request.live and (request.count > current or repairs)
    # A grow ends in a reconcile under the domain's policy: an invalid one (metadata or the
    # configuration file) is refused here, before anything changes, not after the hot-add.
    effective = effective_policy(conn, dom, config) if grows else None
    notes: list[str] = []
    if request.live:
        before = _preflight(conn, dom, config, before, request, notes, seen)
    seen.observations.present = before.guest.present if before.guest is not None else None
    shrinks = request.live and request.count < current
    async_flag = conn.support.async_unplug_flag if shrinks else None
    started = time.monotonic()
    with _qemu_watched(dom, before, request, grows):
        failure = _set_vcpus(conn, dom, before, request, async_flag or 0)
        if failure is not None:
            _raise_if_stopped(dom, before, request, grows, failure.text)
    timings = {"request": time.monotonic() - started}
    outcome: Optional[ReconcileResult] = None
    repeated: Optional[str] = None
    pending: frozenset[int] = frozenset()
    if effective is not None:
        seen.plug_requested(plan.plugged(before, request.count), started)
        with _qemu_watched(dom, before, request, grows):
            outcome = _after_grow(
                conn, dom, config, effective, request, before, started, timings, seen
            )
    elif shrinks and async_flag is not None:
        unplugged = plan.unplugged(before, request.count)
        seen.requested(unplugged, started, failure)
        shrink = _AsyncShrink(conn, dom, before, request, seen, async_flag, started)
        repeated, pending = shrink.run(failure, timings, notes)
        _record(dom, before, seen, pending)
    elif shrinks:
        seen.requested(plan.unplugged(before, request.count), started, failure)
        repeated = _after_shrink(conn, dom, before, request, started, notes, seen)
        _record(dom, before, seen)
    after = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
    if grows and not after.active:
        _raise_if_stopped(dom, before, request, grows, None)
    policy = outcome.policy.policy if outcome is not None else None
    error = failure.text if failure is not None else None
    checks, more = plan.verify(
        conn.support.describe(), after, request, policy, error, repeated, before
    )
    notes.extend(more)
    if shrinks and checks and all(c.ok for c in checks):
        # Every layer at the target, read back: the async path timed it as it happened.
        timings.setdefault("all-layers", time.monotonic() - started)
    return ResizeResult(
        dom.name,
        request,
        before,
        after,
        checks,
        error,
        outcome,
        tuple(notes),
        timings,
        outcome.verdict.rejected if outcome is not None else frozenset(),
        repeated,
        seen.requests(),
    )


class _Seen:
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

    def requested(self, vcpus: list[int], at: float, failure: Optional[Failure]) -> None:
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


# --- QEMU stopping under a hot-add ---------------------------------------------------------

STOP_WAIT = 1.0  # libvirt marks the domain shut off once it has read QEMU's monitor EOF


@contextlib.contextmanager
def _qemu_watched(dom: Domain, before: VcpuView, request: Request, grows: bool) -> Iterator[None]:
    """An error of a hot-add's step whose domain has stopped meanwhile is QEMU's crash."""
    try:
        yield
    except (errors.ConnectError, errors.QemuStoppedError):
        raise
    except errors.VirtHotplugError as exc:
        _raise_if_stopped(dom, before, request, grows, str(exc))
        raise


def _raise_if_stopped(
    dom: Domain, before: VcpuView, request: Request, grows: bool, said: Optional[str]
) -> None:
    """Raise ``QemuStoppedError`` when the domain, running before the hot-add, has stopped
    (looked at for up to ``STOP_WAIT`` seconds: libvirt notices QEMU's end a moment after
    the request that made it fail)."""
    if not grows:
        return
    deadline = time.monotonic() + STOP_WAIT
    while _running(dom):
        if time.monotonic() >= deadline:
            return
        time.sleep(POLL_INTERVAL)
    raise errors.QemuStoppedError(plan.qemu_stopped_text(before, request.count, said))


def _running(dom: Domain) -> bool:
    try:
        return dom.is_active()
    except errors.NoDomainError:
        return False  # a transient domain is gone with its QEMU


# --- preflight -----------------------------------------------------------------------------


def _preflight(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    view: VcpuView,
    request: Request,
    notes: list[str],
    seen: Optional[_Seen] = None,
) -> VcpuView:
    """Refuse what cannot or must not be done; first unplug what libvirt counts beyond the
    guest's CPUs where the host lets us. Returns the view to start from (re-read after a
    repair). ``seen``: where the repair's requests and events go (this command's)."""
    plan.check_live_request(view, request)
    if request.force:
        return view
    counted = view.live.current if view.live is not None else 0  # vCPUs QEMU made, at least
    if plan.needs_repair(view, request):
        seen = seen if seen is not None else _Seen(None)
        view = _repair_before_grow(conn, dom, config, view, request, notes, seen)
    needed = request.count - (view.live.current if view.live is not None else request.count)
    if needed > 0:
        plan.check_thread_budget(view, needed, at_least=counted)
        xml = parse_domain_xml(dom.xml(inactive=False), domain=view.name)
        plan.check_hotpluggable(view, xml.vcpus, needed)
    return view


def _repair_before_grow(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    view: VcpuView,
    request: Request,
    notes: list[str],
    seen: Optional[_Seen] = None,
) -> VcpuView:
    """Unplug the vCPUs libvirt counts beyond the guest's CPUs, as a shrink to the guest's
    count does; refuse the grow if libvirt still counts more after that.

    Where the domain's history has their unplug already (a stale vCPU), this request is the
    repeat, and a failure is the host refusing it. Otherwise (nothing on record, or a
    hot-add the guest did not take) it is a first unplug: a timeout is then libvirt giving
    up waiting as usual, and the request is repeated once the guest ejected, where the host
    accepts it."""
    assert view.live is not None
    seen = seen if seen is not None else _Seen(None)
    present = len(view.guest.present) if view.guest is not None else 0
    target = max(present, 1)
    shrink = Request(target, True, False, request.timeout)
    vcpus = plan.unplugged(view, target)
    started = time.monotonic()
    failure = _set_vcpus(conn, dom, view, shrink)
    if failure is not None and set(vcpus) & view.history.gone:
        # The unplug was asked before (a stale vCPU): this was the repeat, and it failed.
        raise _not_repaired(conn, view, present, failure.text)
    repeated: Optional[str] = None
    if failure is not None:
        seen.requested(vcpus, started, failure)
        repeated = _after_shrink(conn, dom, view, shrink, started, [], seen)
        if repeated != plan.REPEAT_ACCEPTED:
            raise _not_repaired(conn, view, present, repeated)
    repaired = collect.read_view(
        conn, dom, agent_timeout=config.watch.agent_timeout, context=history.contexts(config)
    )
    count = repaired.live.current if repaired.live is not None else -1
    how = "the unplug request was" if repeated is None else "the repeated unplug request was"
    notes.append(
        f"repaired first: libvirt counted {view.live.current} live vCPUs, the guest "
        f"{present} ({plan.stale_reason(view)}); {how} accepted by this host "
        f"({conn.support.describe()}), libvirt now counts {count}"
    )
    if count > target:
        raise errors.UnsupportedError(
            f"domain '{view.name}': refusing to hot-add: the unplug request was accepted "
            f"but libvirt still counts {count} live vCPUs for a guest with {present}. "
            "Restart the domain (shut down, then start) to resync; --force skips this check"
        )
    return repaired


def _not_repaired(
    conn: Connection, view: VcpuView, present: int, refused: Optional[str]
) -> errors.UnsupportedError:
    """Why a grow is refused when libvirt still counts more vCPUs than the guest has:
    ``refused`` is libvirt's error to the repeated unplug request (None: nothing was
    repeated, the guest did not eject)."""
    assert view.live is not None
    head = (
        f"domain '{view.name}': refusing to hot-add: libvirt counts {view.live.current} live "
        f"vCPUs but the guest has only {present}"
    )
    if refused is None:
        return errors.UnsupportedError(
            f"{head}, and the guest did not eject the vCPU libvirt was asked to unplug "
            f"({plan.stale_reason(view)}). 'virthotplug setvcpus {view.name} {max(present, 1)}'"
            " unplugs it once the guest lets go; --force skips this check"
        )
    return errors.UnsupportedError(
        f"{head} (a stale vCPU: {plan.stale_reason(view)}), and this host "
        f"({conn.support.describe()}) refused the repeated unplug request ({refused}). A "
        "hot-add while a stale vCPU cannot be repaired is known to crash QEMU. Restart the "
        "domain (shut down, then start) to resync; --force skips this check"
    )


# --- the change ----------------------------------------------------------------------------


def _set_vcpus(
    conn: Connection, dom: Domain, before: VcpuView, request: Request, async_flag: int = 0
) -> Optional[Failure]:
    """Ask libvirt; a failed shrink (or a grow that changed something) is verified, not
    raised: libvirt's unplug timeout is an error although the guest may have ejected.
    ``async_flag``: the async unplug's flag (a shrink on a connection that has it)."""
    try:
        dom.set_vcpus(
            request.count,
            live=request.live,
            config=request.config,
            maximum=request.maximum,
            hotpluggable=request.hotpluggable,
            async_flag=async_flag,
        )
    except (errors.ConnectError, errors.PermissionDeniedError):
        raise
    except errors.VirtHotplugError as exc:
        current = before.live.current if before.live is not None else 0
        if request.live and request.count < current:
            return Failure(str(exc), exc.code)
        if not request.live or _live_count(conn, dom) == current:
            raise  # nothing changed: the error says it all
        return Failure(str(exc), exc.code)
    return None


def _live_count(conn: Connection, dom: Domain) -> int:
    stats = conn.bulk_stats([dom])
    value = stats[0][1].get("vcpu.current") if stats else None
    return value if isinstance(value, int) else -1


def _after_grow(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    effective: EffectivePolicy,
    request: Request,
    before: VcpuView,
    started: float,
    timings: dict[str, float],
    seen: _Seen,
) -> ReconcileResult:
    """Wait for the guest to list the new CPUs (or for the OST device checks to be a few
    seconds old with no new CPU), then the one reconcile: online them, judge what the guest
    took or rejected, record it."""
    needed = request.count - (before.live.current if before.live is not None else 0)
    guest = _wait_guest(
        conn,
        dom,
        before,
        lambda g: len(g.present) >= request.count,
        started,
        request,
        give_up=lambda: seen.plugs_are_old(needed),
    )
    hotadded: frozenset[int] = frozenset()
    if guest is not None and before.guest is not None:
        hotadded = guest.present - before.guest.present
    if hotadded:  # only what the guest lists is "detected"
        timings["guest-detected"] = time.monotonic() - started
    if hotadded and request.mode is None:
        _grace(conn, dom, effective.policy, before, hotadded, started, request)
    result = reconcile(
        conn,
        dom,
        config,
        trigger=SOURCE,
        mode=request.mode,
        effective=effective,
        observations=seen.update(),
        source=SOURCE,
    )
    after = result.after.guest if result.after is not None else None
    if after is not None and hotadded and hotadded <= after.online:
        timings["guest-online"] = time.monotonic() - started
    return result


def _after_shrink(
    conn: Connection,
    dom: Domain,
    before: VcpuView,
    request: Request,
    started: float,
    notes: list[str],
    seen: _Seen,
) -> Optional[str]:
    """Wait for the guest to drop the CPUs; when libvirt failed the unplug although the
    guest ejected, repeat the same unplug request. libvirt unplugs one vCPU at a time and
    stops at the first it gives up on, so a repeat may correct the count for that one and
    give up on the next: repeated while each one corrects libvirt's count (at most once per
    vCPU). Returns "accepted", libvirt's error of a repeat that changed nothing, or None
    when nothing was repeated."""
    current = before.live.current if before.live is not None else request.count
    for _ in range(max(1, current - request.count)):
        guest = _wait_guest(
            conn, dom, before, lambda g: len(g.present) <= request.count, started, request
        )
        observations = seen.update()
        answer = GuestSeen(guest.present, guest.online, time.monotonic()) if guest else None
        requests = [o for o in observations.events if o.kind == UNPLUG_REQUEST]
        if not repeat_unplug(requests, observations.events, answer, request.count):
            return None  # accepted, or the guest has not ejected: repeating would time out
        refused = _repeat(conn, dom, before, request, seen, requests)
        if refused is None:
            notes.append(
                f"libvirt gave up on the unplug although the guest ejected the CPU; the "
                f"repeated unplug request was accepted by this host ({conn.support.describe()})"
            )
            return plan.REPEAT_ACCEPTED
        if refused.text is not None:
            return refused.text
    return None


@dataclass(frozen=True)
class _Refused:
    """A repeated unplug that failed: ``text`` is libvirt's error when it changed nothing,
    None when it corrected the count for some vCPUs and gave up on the next one."""

    text: Optional[str]


def _repeat(
    conn: Connection,
    dom: Domain,
    before: VcpuView,
    request: Request,
    seen: _Seen,
    requests: list[Observed],
) -> Optional[_Refused]:
    """Repeat the unplug request once; None when libvirt accepted it. Which vCPUs it
    removed and which one it gave up on is read from libvirt's count, never its message."""
    counted = _live_count(conn, dom)
    again = time.monotonic()
    try:
        dom.set_vcpus(request.count, live=True, config=False)
    except (errors.ConnectError, errors.PermissionDeniedError):
        raise
    except errors.VirtHotplugError as exc:
        now = _live_count(conn, dom)
        asked = plan.unplugged(before, request.count)
        if now < 0 or counted < 0 or now >= counted:
            seen.requested([r.vcpu for r in requests][:1], again, Failure(str(exc), exc.code))
            return _Refused(str(exc))
        seen.requested(asked[now - request.count : counted - request.count], again, None)
        seen.requested(asked[: now - request.count], again, Failure(str(exc), exc.code))
        return _Refused(None)
    seen.requested(sorted({r.vcpu for r in requests}), again, None)
    return None


class _AsyncShrink:
    """An async unplug completed from what is observed (see the module's docstring)."""

    def __init__(
        self,
        conn: Connection,
        dom: Domain,
        before: VcpuView,
        request: Request,
        seen: _Seen,
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
        """Poll until every layer is at the target, the deadline, or a refused repeat;
        libvirt's live count at the end."""
        target = self.request.count
        while True:
            live = _live_count(self.conn, self.dom)
            present = self._guest_present()
            if present is not None and present <= target and "guest-ejected" not in timings:
                timings["guest-ejected"] = time.monotonic() - self.started
            if live <= target and (present is None or present <= target):
                timings["all-layers"] = time.monotonic() - self.started
                return live
            if self._ejected_more_than_dropped(live, present) and self.repeats_left > 0:
                if not self._repeat():
                    return _live_count(self.conn, self.dom)
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
            reply = call_with_timeout(lambda: self.conn.guest_vcpus(self.dom), 1.0)
            guest = parse_guest_reply(
                reply, maximum=self.before.live.maximum, domain=self.before.name
            )
        except (errors.AgentError, errors.TransientError, CallTimeout, *_PERMANENT):
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
        """Repeat the request (async again: it returns at once); False when refused."""
        self.repeats_left -= 1
        again = time.monotonic()
        try:
            self.dom.set_vcpus(self.request.count, live=True, config=False, async_flag=self.flag)
        except (errors.ConnectError, errors.PermissionDeniedError):
            raise
        except errors.VirtHotplugError as exc:
            self.seen.requested(self.unplugged[-1:], again, Failure(str(exc), exc.code))
            self.refused = str(exc)
            return False
        self.seen.requested(self.unplugged, again, None)
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
            time.sleep(0.01)


def _record(
    dom: Domain, before: VcpuView, seen: _Seen, pending: frozenset[int] = frozenset()
) -> None:
    """Put what this command observed into the domain's history (live definition only): the
    judge's entries, never a guess; and the async unplugs libvirt still counts (pending)."""
    if before.live is None:
        return
    observations = seen.update()
    verdict = judge(
        observations.snapshot(),
        guest_seen(before),
        libvirt_seen(before),
        now=time.monotonic(),
        wall=time.time(),
        source=SOURCE,
    )
    wall = time.time()
    requested = tuple(HistoryEntry(HISTORY_UNPLUG_REQUESTED, v, wall, SOURCE) for v in pending)
    entries = verdict.entries + requested
    if entries:
        history.record(dom, entries, live_count=before.live.current)


def _grace(
    conn: Connection,
    dom: Domain,
    policy: Policy,
    before: VcpuView,
    hotadded: frozenset[int],
    started: float,
    request: Request,
) -> None:
    """Give the guest's own onlining rule the policy's grace period to win."""
    if not policy.acts or policy.grace <= 0:
        return
    limit = min(policy.grace, max(0.0, started + request.timeout - time.monotonic()))
    shortened = Request(request.count, request.live, request.config, limit)
    _wait_guest(conn, dom, before, lambda g: hotadded <= g.online, time.monotonic(), shortened)


def _wait_guest(
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
            reply = call_with_timeout(lambda: conn.guest_vcpus(dom), max(0.05, remaining))
            last = parse_guest_reply(reply, maximum=maximum, domain=before.name)
        except _PERMANENT:
            return last
        except (errors.AgentError, errors.TransientError, CallTimeout):
            pass  # the agent may be busy with the hot-add: keep polling until the deadline
        if (last is not None and done(last)) or time.monotonic() >= deadline or give_up():
            return last
        time.sleep(POLL_INTERVAL)


def to_dict(result: ResizeResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "count": result.request.count,
        "live": result.request.live,
        "config": result.request.config,
        "maximum": result.request.maximum,
        "guest": result.request.guest,
        "hotpluggable": result.request.hotpluggable,
        "complete": result.complete,
        "error": result.error,
        "checks": [
            {"layer": c.layer, "now": c.now, "target": c.target, "ok": c.ok} for c in result.checks
        ],
        "notes": list(result.notes),
        "timings": {key: round(value, 3) for key, value in result.timings.items()},
        "rejected_vcpus": sorted(result.rejected),
        "repeated_unplug": result.repeated,
        "reconcile": result.reconcile.to_dict() if result.reconcile is not None else None,
    }
