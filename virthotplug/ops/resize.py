"""A safe, verified ``virsh setvcpus``: the entry point and the grow.

Grow (live): preflight → hot-add (``setVcpusFlags``) → wait for the guest agent to list the
new CPUs → online them (policy, or ``--online``/``--no-online``) → verify every layer.
Shrink (live): unplug → wait for the guest to drop the CPUs → verify every layer; the
waiting and the repeated unplug request, synchronous or async, are ``ops.shrink``'s.

Decided from what this host shows, never from a version number:

- A hot-add while a stale vCPU (one libvirt counts although the guest ejected it, see
  ``ops.shrink``) cannot be repaired is known to crash QEMU, and under TCG a plug that
  would make QEMU create more vCPUs in the domain's life than its maximum aborts QEMU.
  Only these are refused (``--force`` skips the check); a stale vCPU is repaired first
  where the host accepts the repeated request.
- A hot-add whose OST device check came but that the guest never lists was rejected by the
  guest (``guest-rejected-vcpu``): reported, with its own exit status.
- An async unplug the guest has not completed when the command ends is recorded in the
  domain's history (``unplug-requested``) and reported as ``unplug-pending``.

What is seen — unplug timeouts, QEMU's eject and plug reports, rejected hot-adds — is judged
by ``core.judge`` from the events seen during the command (``ops.seen``) and goes into the
domain's history (``host.history``), which later commands read. Apart from the repeated
unplug request, nothing is retried: a hot(un)plug request is not idempotent, and its outcome
is read back from every layer instead.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

from virthotplug.core import errors
from virthotplug.core import resizeplan as plan
from virthotplug.core.config import HostConfig
from virthotplug.core.judge import Observed, judge
from virthotplug.core.policy import EffectivePolicy, Policy
from virthotplug.core.resizeplan import LayerCheck, Request
from virthotplug.core.view import HISTORY_UNPLUG_REQUESTED, HistoryEntry, VcpuView
from virthotplug.host import collect, history
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import parse_domain_xml
from virthotplug.host.policysource import effective_policy
from virthotplug.ops.reconcile import ReconcileResult, guest_seen, libvirt_seen, reconcile
from virthotplug.ops.seen import POLL_INTERVAL, EventsFn, Failure, Seen, live_count, wait_guest
from virthotplug.ops.shrink import AsyncShrink, after_shrink

SOURCE = "setvcpus"  # who wrote a history entry


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
    seen = Seen(events)
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
        shrink = AsyncShrink(conn, dom, before, request, seen, async_flag, started)
        repeated, pending = shrink.run(failure, timings, notes)
        _record(dom, before, seen, pending)
    elif shrinks:
        seen.requested(plan.unplugged(before, request.count), started, failure)
        repeated = after_shrink(conn, dom, before, request, started, notes, seen)
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
    seen: Optional[Seen] = None,
) -> VcpuView:
    """Refuse what cannot or must not be done; first unplug what libvirt counts beyond the
    guest's CPUs where the host lets us. Returns the view to start from (re-read after a
    repair). ``seen``: where the repair's requests and events go (this command's)."""
    plan.check_live_request(view, request)
    if request.force:
        return view
    counted = view.live.current if view.live is not None else 0  # vCPUs QEMU made, at least
    if plan.needs_repair(view, request):
        seen = seen if seen is not None else Seen(None)
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
    seen: Optional[Seen] = None,
) -> VcpuView:
    """Unplug the vCPUs libvirt counts beyond the guest's CPUs, as a shrink to the guest's
    count does; refuse the grow if libvirt still counts more after that.

    Where the domain's history has their unplug already (a stale vCPU), this request is the
    repeat, and a failure is the host refusing it. Otherwise (nothing on record, or a
    hot-add the guest did not take) it is a first unplug: a timeout is then libvirt giving
    up waiting as usual, and the request is repeated once the guest ejected, where the host
    accepts it."""
    assert view.live is not None
    seen = seen if seen is not None else Seen(None)
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
        repeated = after_shrink(conn, dom, view, shrink, started, [], seen)
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
        if not request.live or live_count(conn, dom) == current:
            raise  # nothing changed: the error says it all
        return Failure(str(exc), exc.code)
    return None


def _after_grow(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    effective: EffectivePolicy,
    request: Request,
    before: VcpuView,
    started: float,
    timings: dict[str, float],
    seen: Seen,
) -> ReconcileResult:
    """Wait for the guest to list the new CPUs (or for the OST device checks to be a few
    seconds old with no new CPU), then the one reconcile: online them, judge what the guest
    took or rejected, record it."""
    needed = request.count - (before.live.current if before.live is not None else 0)
    guest = wait_guest(
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


def _record(
    dom: Domain, before: VcpuView, seen: Seen, pending: frozenset[int] = frozenset()
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
    if entries or verdict.repeat_refused is not None:
        history.record(
            dom,
            entries,
            live_count=before.live.current,
            repeat_refused=verdict.repeat_refused,
        )


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
    wait_guest(conn, dom, before, lambda g: hotadded <= g.online, time.monotonic(), shortened)


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
