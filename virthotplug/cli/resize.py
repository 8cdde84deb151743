"""A safe, verified ``virsh setvcpus``.

Grow (live): preflight → hot-add (``setVcpusFlags``) → wait for the guest agent to see the
new CPUs → online them (policy, or ``--online``/``--no-online``) → verify every layer.
Shrink (live): unplug → wait for the guest to drop the CPUs → verify every layer, and
explain the drift libvirt 9.0 + QEMU 7.2 leave behind: libvirt reports "vcpu unplug request
timed out" and keeps counting a vCPU the guest really ejected; a later hot-add of that vCPU
crashes QEMU. So every change is refused while the view shows ``guest-missing-vcpus``,
unless forced.

Nothing is retried here: a hot(un)plug request is not idempotent, and its outcome is read
back from every layer instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from virthotplug.core import errors
from virthotplug.core.config import HostConfig
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.drift import GUEST_MISSING_VCPUS
from virthotplug.core.policy import Policy, decide
from virthotplug.core.view import GuestLayer, VcpuView, parse_guest_reply
from virthotplug.core.workpool import CallTimeout, call_with_timeout
from virthotplug.host import collect
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import parse_domain_xml
from virthotplug.host.reconcile import ReconcileResult, reconcile

POLL_INTERVAL = 0.075  # seconds between guest-agent polls while waiting
DEFAULT_TIMEOUT = 10.0
# Stop polling the agent at once on these: waiting cannot change them.
_PERMANENT = (
    errors.UnsupportedError,
    errors.AgentNotConfiguredError,
    errors.NotRunningError,
    errors.GuestDataError,
)


@dataclass(frozen=True)
class Request:
    count: int
    live: bool
    config: bool
    timeout: float = DEFAULT_TIMEOUT
    mode: Optional[str] = None  # "online" (--online), "report" (--no-online), None: policy
    force: bool = False


@dataclass(frozen=True)
class LayerCheck:
    layer: str
    now: str
    target: str
    ok: bool


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

    @property
    def complete(self) -> bool:
        return all(check.ok for check in self.checks)


def resize(conn: Connection, dom: Domain, config: HostConfig, request: Request) -> ResizeResult:
    """Change the vCPU count as ``request`` says and verify every affected layer."""
    timeout = config.watch.agent_timeout
    before = collect.read_view(conn, dom, agent_timeout=timeout)
    if request.live:
        _preflight(conn, dom, before, request)
    started = time.monotonic()
    error = _set_vcpus(conn, dom, before, request)
    timings = {"request": time.monotonic() - started}
    outcome: Optional[ReconcileResult] = None
    current = before.live.current if before.live is not None else 0
    if request.live and request.count > current:
        outcome = _after_grow(conn, dom, config, request, before, started, timings)
    elif request.live and request.count < current:
        _wait_guest(conn, dom, before, lambda g: len(g.present) <= request.count, started, request)
    after = outcome.after if outcome is not None and outcome.after is not None else None
    if after is None:
        after = collect.read_view(conn, dom, agent_timeout=timeout)
    checks, notes = _verify(after, request, outcome, error)
    return ResizeResult(dom.name, request, before, after, checks, error, outcome, notes, timings)


# --- preflight -----------------------------------------------------------------------------


def _preflight(conn: Connection, dom: Domain, view: VcpuView, request: Request) -> None:
    if view.state != "running" or view.live is None:
        raise errors.NotRunningError(
            f"domain '{view.name}' is {view.state}: a live change needs a running domain "
            "(use --config to change the persistent definition only)"
        )
    if request.count > view.live.maximum:
        raise errors.InvalidRequestError(
            f"domain '{view.name}': {request.count} vCPUs requested, the maximum is "
            f"{view.live.maximum} (raise <vcpu> in the persistent definition and restart)"
        )
    if _stale_unplug(view) and not request.force:
        present = len(view.guest.present) if view.guest is not None else 0
        raise errors.UnsupportedError(
            f"domain '{view.name}': refusing to change vCPUs: libvirt counts "
            f"{view.live.current} live vCPUs but the guest has only {present}, so an unplug "
            "libvirt gave up on has completed in the guest. On QEMU 7.2 a hot-add in this "
            "state crashes QEMU. Restart the domain (shut down, then start) to resync; "
            "--force skips this check"
        )
    if request.count > view.live.current:
        _check_hotpluggable(conn, dom, view, request.count - view.live.current)


def _stale_unplug(view: VcpuView) -> bool:
    return any(f.code == GUEST_MISSING_VCPUS for f in view.findings)


def _check_hotpluggable(conn: Connection, dom: Domain, view: VcpuView, needed: int) -> None:
    xml = parse_domain_xml(dom.xml(inactive=False), domain=view.name)
    if not xml.vcpus:  # no per-vCPU detail (older libvirt, test driver): libvirt decides
        return
    free = [v.id for v in xml.vcpus if not v.enabled and v.hotpluggable]
    if len(free) < needed:
        raise errors.InvalidRequestError(
            f"domain '{view.name}': {needed} more vCPUs needed, only {len(free)} are "
            f"hotpluggable and disabled ({format_cpulist(free) or 'none'}); mark vCPUs "
            "hotpluggable='yes' in the persistent definition and restart"
        )


# --- the change ----------------------------------------------------------------------------


def _set_vcpus(conn: Connection, dom: Domain, before: VcpuView, request: Request) -> Optional[str]:
    """Ask libvirt; a failed shrink (or a grow that changed something) is verified, not
    raised: the unplug timeout of libvirt 9.0 + QEMU 7.2 fails although the guest ejected."""
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
) -> ReconcileResult:
    guest = _wait_guest(
        conn, dom, before, lambda g: len(g.present) >= request.count, started, request
    )
    hotadded: frozenset[int] = frozenset()
    if guest is not None and before.guest is not None:
        hotadded = guest.present - before.guest.present
        timings["guest-detected"] = time.monotonic() - started
    if hotadded and request.mode is None:
        _grace(conn, dom, config, before, hotadded, started, request)
    result = reconcile(conn, dom, config, trigger="setvcpus", hotadded=hotadded, mode=request.mode)
    after = result.after.guest if result.after is not None else None
    if after is not None and hotadded and hotadded <= after.online:
        timings["guest-online"] = time.monotonic() - started
    return result


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
) -> Optional[GuestLayer]:
    """Poll the guest agent until ``done`` or the request's timeout; the last guest seen."""
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
        if (last is not None and done(last)) or time.monotonic() >= deadline:
            return last
        time.sleep(POLL_INTERVAL)


# --- verification --------------------------------------------------------------------------


def _verify(
    after: VcpuView, request: Request, outcome: Optional[ReconcileResult], error: Optional[str]
) -> tuple[tuple[LayerCheck, ...], tuple[str, ...]]:
    checks: list[LayerCheck] = []
    notes: list[str] = []
    target = str(request.count)
    if request.config and after.config is not None:
        now = after.config.current
        checks.append(
            LayerCheck("config", _counts(now, after.config.maximum), target, now == request.count)
        )
    if request.live:
        checks.extend(_live_checks(after, request.count))
        if outcome is not None:
            checks.extend(_online_check(after, outcome.policy.policy, notes))
        notes.extend(_drift_notes(after, error))
    return tuple(checks), tuple(notes)


def _counts(current: int, maximum: int) -> str:
    return f"{current}/{maximum}"


def _live_checks(after: VcpuView, count: int) -> list[LayerCheck]:
    target = str(count)
    checks = []
    if after.live is not None:
        live = after.live.current
        checks.append(LayerCheck("live", _counts(live, after.live.maximum), target, live == count))
    if after.hypervisor is not None:
        plugged = after.hypervisor.count
        checks.append(LayerCheck("hypervisor", str(plugged), target, plugged == count))
    guest = after.guest
    if guest is None:
        checks.append(LayerCheck("guest present", f"unknown ({after.agent.state})", target, False))
    else:
        present = len(guest.present)
        checks.append(LayerCheck("guest present", str(present), target, present == count))
    return checks


def _online_check(after: VcpuView, policy: Policy, notes: list[str]) -> list[LayerCheck]:
    guest = after.guest
    if guest is None:
        return []
    now = f"{len(guest.online)} ({format_cpulist(guest.online)})"
    if not policy.acts:
        if guest.offline:
            notes.append(
                f"CPU {format_cpulist(guest.offline)} present in the guest but offline "
                f"(policy {policy.mode}): use --online, or set a policy and run "
                "'virthotplug apply'"
            )
        return []
    remaining = decide(after, policy)
    target = f"policy {policy.mode}" + (f" {policy.count}" if policy.count else "")
    return [LayerCheck("guest online", now, target, remaining.is_noop)]


def _drift_notes(after: VcpuView, error: Optional[str]) -> list[str]:
    notes = []
    if error is not None:
        notes.append(f"libvirt reported: {error}")
    if after.guest is None:
        detail = f": {after.agent.error}" if after.agent.error else ""
        notes.append(f"the guest cannot be verified: guest agent {after.agent.state}{detail}")
    for finding in after.findings:
        if finding.code == GUEST_MISSING_VCPUS and after.live is not None:
            present = len(after.guest.present) if after.guest is not None else 0
            notes.append(
                f"the guest has {present} CPUs but libvirt still counts {after.live.current}: "
                "the unplug completed in the guest although libvirt gave up on it. Restart "
                "the domain (shut down, then start) to resync, and do not hot-add before: "
                "on QEMU 7.2 a hot-add in this state crashes QEMU"
            )
    return notes


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
        "reconcile": result.reconcile.to_dict() if result.reconcile is not None else None,
    }
