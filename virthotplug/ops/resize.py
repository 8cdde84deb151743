"""A safe, verified ``virsh setvcpus``.

Grow (live): preflight → hot-add (``setVcpusFlags``) → wait for the guest agent to list the
new CPUs → online them (policy, or ``--online``/``--no-online``) → verify every layer.
Shrink (live): unplug → wait for the guest to drop the CPUs → verify every layer.

Decided from what this host shows, never from a version number:

- libvirt waits a few seconds for QEMU's DEVICE_DELETED and, when it does not come (under
  TCG it never comes for the vCPU itself), fails with "vcpu unplug request timed out" and
  keeps counting the vCPU although the guest ejected it: a *stale* vCPU. When the guest has
  ejected it, the same unplug request is repeated once: some hosts accept it and correct
  libvirt's count, others refuse it; either way the outcome is read back and reported, with
  the remedy that works on this host.
- A hot-add while a stale vCPU cannot be repaired is known to crash QEMU, and under TCG a
  plug that would make QEMU create more vCPUs in the domain's life than its maximum aborts
  QEMU. Only these are refused (``--force`` skips the check); a stale vCPU is repaired
  first where the host accepts the repeated request.
- A hot-add whose OST device check came but that the guest never lists was rejected by the
  guest (``guest-rejected-vcpu``): reported, with its own exit status.

What is seen — unplug timeouts, QEMU's eject and plug reports, rejected hot-adds — goes into
the domain's history (``host.history``), which later commands read. Apart from that single
repeat, nothing is retried: a hot(un)plug request is not idempotent, and its outcome is read
back from every layer instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core import resizeplan as plan
from virthotplug.core.config import HostConfig
from virthotplug.core.events import Event
from virthotplug.core.resizeplan import LayerCheck, Request
from virthotplug.core.view import (
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_TIMEOUT,
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
from virthotplug.ops.reconcile import ReconcileResult, reconcile

POLL_INTERVAL = 0.075  # seconds between guest-agent polls while waiting
# A guest lists a hot-added CPU well under 0.1 s after its OST device check (lab); one that
# has not 3 s after it never will (the daemon waits as long: daemon.jobs.HOTADD_WAIT).
REJECT_AFTER_OST = 3.0
UNPLUG_TIMEOUT_TEXT = "unplug request timed out"  # libvirt's message when it gives up
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

    @property
    def complete(self) -> bool:
        return all(check.ok for check in self.checks)


EventsFn = Callable[[], Sequence[Event]]  # the domain's QEMU monitor events since the start


def resize(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    request: Request,
    events: Optional[EventsFn] = None,
) -> ResizeResult:
    """Change the vCPU count as ``request`` says and verify every affected layer.
    ``events``: the domain's QEMU monitor events seen since the command started (optional:
    they tell a rejected hot-add, and they go into the domain's history)."""
    timeout = config.watch.agent_timeout
    seen: EventsFn = events if events is not None else (lambda: ())
    context = history.contexts(config)
    before = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
    notes: list[str] = []
    if request.live:
        before = _preflight(conn, dom, config, before, request, notes)
    started = time.monotonic()
    error = _set_vcpus(conn, dom, before, request)
    timings = {"request": time.monotonic() - started}
    outcome: Optional[ReconcileResult] = None
    rejected: frozenset[int] = frozenset()
    repeated: Optional[str] = None
    current = before.live.current if before.live is not None else 0
    if request.live and request.count > current:
        outcome, rejected = _after_grow(conn, dom, config, request, before, started, timings, seen)
    elif request.live and request.count < current:
        repeated = _after_shrink(conn, dom, before, request, error, started, notes)
    _record(dom, before, request, error, rejected, seen)
    after = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
    policy = outcome.policy.policy if outcome is not None else None
    checks, more = plan.verify(conn.support.describe(), after, request, policy, error, repeated)
    notes.extend(more)
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
        rejected,
        repeated,
    )


# --- preflight -----------------------------------------------------------------------------


def _preflight(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    view: VcpuView,
    request: Request,
    notes: list[str],
) -> VcpuView:
    """Refuse what cannot or must not be done; repair a stale vCPU first where the host
    lets us. Returns the view to start from (re-read after a repair)."""
    plan.check_live_request(view, request)
    if request.force:
        return view
    if plan.needs_repair(view, request):
        view = _repair_before_grow(conn, dom, config, view, request, notes)
    needed = request.count - (view.live.current if view.live is not None else request.count)
    if needed > 0:
        plan.check_thread_budget(view, needed)
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
) -> VcpuView:
    """Repeat the unplug that left the stale vCPU; refuse the grow if the host will not."""
    assert view.live is not None
    present = len(view.guest.present) if view.guest is not None else 0
    target = max(present, 1)
    try:
        dom.set_vcpus(target, live=True, config=False)
    except (errors.ConnectError, errors.PermissionDeniedError):
        raise
    except errors.VirtHotplugError as exc:
        raise errors.UnsupportedError(
            f"domain '{view.name}': refusing to hot-add: libvirt counts {view.live.current} "
            f"live vCPUs but the guest has only {present} (a stale vCPU: "
            f"{plan.stale_reason(view)}), and this host ({conn.support.describe()}) refused "
            f"the repeated unplug request ({exc}). A hot-add while a stale vCPU cannot be "
            "repaired is known to crash QEMU. Restart the domain (shut down, then start) to "
            "resync; --force skips this check"
        ) from None
    repaired = collect.read_view(
        conn, dom, agent_timeout=config.watch.agent_timeout, context=history.contexts(config)
    )
    count = repaired.live.current if repaired.live is not None else -1
    notes.append(
        f"repaired first: libvirt counted {view.live.current} live vCPUs, the guest "
        f"{present} ({plan.stale_reason(view)}); the repeated unplug request was accepted "
        f"by this host ({conn.support.describe()}), libvirt now counts {count}"
    )
    if plan.stale(repaired):
        raise errors.UnsupportedError(
            f"domain '{view.name}': refusing to hot-add: the repeated unplug request was "
            f"accepted but libvirt still counts {count} live vCPUs for a guest with "
            f"{present}. Restart the domain (shut down, then start) to resync; --force "
            "skips this check"
        )
    return repaired


# --- the change ----------------------------------------------------------------------------


def _set_vcpus(conn: Connection, dom: Domain, before: VcpuView, request: Request) -> Optional[str]:
    """Ask libvirt; a failed shrink (or a grow that changed something) is verified, not
    raised: libvirt's unplug timeout is an error although the guest may have ejected."""
    try:
        dom.set_vcpus(request.count, live=request.live, config=request.config)
    except (errors.ConnectError, errors.PermissionDeniedError):
        raise
    except errors.VirtHotplugError as exc:
        current = before.live.current if before.live is not None else 0
        if request.live and request.count < current:
            return str(exc)
        if not request.live or _live_count(conn, dom) == current:
            raise  # nothing changed: the error says it all
        return str(exc)
    return None


def _live_count(conn: Connection, dom: Domain) -> int:
    stats = conn.bulk_stats([dom])
    value = stats[0][1].get("vcpu.current") if stats else None
    return value if isinstance(value, int) else -1


def _after_grow(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    request: Request,
    before: VcpuView,
    started: float,
    timings: dict[str, float],
    seen: EventsFn,
) -> tuple[ReconcileResult, frozenset[int]]:
    """Wait for the guest to list the new CPUs (or for the OST device checks to be a few
    seconds old with no new CPU: rejected), online them, and name what the guest rejected."""
    needed = request.count - (before.live.current if before.live is not None else 0)
    guest = _wait_guest(
        conn,
        dom,
        before,
        lambda g: len(g.present) >= request.count,
        started,
        request,
        give_up=lambda: _plugs_are_old(seen(), needed),
    )
    hotadded: frozenset[int] = frozenset()
    if guest is not None and before.guest is not None:
        hotadded = guest.present - before.guest.present
    if hotadded:  # only what the guest lists is "detected"
        timings["guest-detected"] = time.monotonic() - started
    rejected = _rejected(seen(), hotadded, needed)
    if hotadded and request.mode is None:
        _grace(conn, dom, config, before, hotadded, started, request)
    result = reconcile(conn, dom, config, trigger="setvcpus", hotadded=hotadded, mode=request.mode)
    after = result.after.guest if result.after is not None else None
    if after is not None and hotadded and hotadded <= after.online:
        timings["guest-online"] = time.monotonic() - started
    return result, rejected


def _plugged(events: Sequence[Event]) -> list[tuple[int, float]]:
    """(vCPU, monotonic time) of every OST device check success seen."""
    reader = history.EventHistory()
    return [
        (entry.vcpu, ev.mono)
        for ev in events
        for entry in reader.entries(ev)
        if entry.kind == HISTORY_PLUGGED
    ]


def _plugs_are_old(events: Sequence[Event], needed: int) -> bool:
    plugs = _plugged(events)
    if needed <= 0 or len(plugs) < needed:
        return False
    return time.monotonic() - max(at for _, at in plugs) >= REJECT_AFTER_OST


def _rejected(events: Sequence[Event], hotadded: frozenset[int], needed: int) -> frozenset[int]:
    """The vCPUs whose OST device check said success although the guest listed no new CPU
    for them (the highest ones when it listed some)."""
    vcpus = sorted({vcpu for vcpu, _ in _plugged(events)})
    missing = min(len(vcpus), needed) - len(hotadded)
    return frozenset(vcpus[-missing:]) if missing > 0 else frozenset()


def _after_shrink(
    conn: Connection,
    dom: Domain,
    before: VcpuView,
    request: Request,
    error: Optional[str],
    started: float,
    notes: list[str],
) -> Optional[str]:
    """Wait for the guest to drop the CPUs; when libvirt gave up although the guest did,
    repeat the same unplug request once. Returns "accepted", libvirt's error, or None when
    nothing was repeated."""
    guest = _wait_guest(
        conn, dom, before, lambda g: len(g.present) <= request.count, started, request
    )
    if error is None or UNPLUG_TIMEOUT_TEXT not in error:
        return None
    if guest is None or len(guest.present) > request.count:
        return None  # the guest has not ejected: repeating would only time out again
    try:
        dom.set_vcpus(request.count, live=True, config=False)
    except (errors.ConnectError, errors.PermissionDeniedError):
        raise
    except errors.VirtHotplugError as exc:
        return str(exc)
    notes.append(
        f"libvirt gave up on the unplug although the guest ejected the CPU; the repeated "
        f"unplug request was accepted by this host ({conn.support.describe()})"
    )
    return "accepted"


def _record(
    dom: Domain,
    before: VcpuView,
    request: Request,
    error: Optional[str],
    rejected: frozenset[int],
    seen: EventsFn,
) -> None:
    """Put what this command saw into the domain's history (live definition only)."""
    if not request.live or before.live is None:
        return
    at = history.now()
    entries = history.entries_from_events(list(seen()))
    if error is not None and UNPLUG_TIMEOUT_TEXT in error:
        entries += [
            HistoryEntry(HISTORY_UNPLUG_TIMEOUT, vcpu, at, "setvcpus")
            for vcpu in plan.unplugged(before, request.count)
        ]
    entries += [HistoryEntry(HISTORY_REJECTED, vcpu, at, "setvcpus") for vcpu in sorted(rejected)]
    if entries:
        history.record(dom, entries, live_count=before.live.current)


def _grace(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    before: VcpuView,
    hotadded: frozenset[int],
    started: float,
    request: Request,
) -> None:
    """Give the guest's own onlining rule the policy's grace period to win."""
    from virthotplug.host.policysource import effective_policy

    policy = effective_policy(conn, dom, config).policy
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
