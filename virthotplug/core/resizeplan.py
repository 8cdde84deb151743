"""The pure half of a verified ``setvcpus``: what a request may do, and whether it did.

``ops.resize`` talks to libvirt and the guest agent; this module only looks at views:

- preflight: a live change needs a running domain and a count within the maximum; a hot-add
  while a stale vCPU counts in libvirt needs a repair first; under TCG a plug that would make
  QEMU create more vCPUs in the domain's life than its maximum aborts QEMU; a grow needs
  enough hotpluggable, disabled vCPUs;
- verification: each layer against the target, and notes that name what was observed (a
  stale vCPU, a rejected hot-add, a refused repeat) with the remedy that works on this host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from virthotplug.core import errors
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.drift import (
    GUEST_MISSING_VCPUS,
    GUEST_REJECTED_VCPU,
    UNPLUG_PENDING,
    gone_text,
)
from virthotplug.core.policy import Policy, decide
from virthotplug.core.view import VcpuEntry, VcpuView

DEFAULT_TIMEOUT = 10.0
REPEAT_ACCEPTED = "accepted"


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


# --- preflight -----------------------------------------------------------------------------


def check_live_request(view: VcpuView, request: Request) -> None:
    """A live change needs a running domain and a count within its maximum."""
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


def guest_present(view: VcpuView) -> int:
    """The guest's present CPUs; libvirt's count where the guest is not known."""
    if view.guest is not None:
        return len(view.guest.present)
    return view.live.current if view.live is not None else 0


def needs_repair(view: VcpuView, request: Request) -> bool:
    """A stale vCPU counts in libvirt although the guest gave it up: a request for more CPUs
    than the guest has is a hot-add even when libvirt's count already reaches it."""
    return stale(view) and request.count > guest_present(view)


def stale(view: VcpuView) -> bool:
    """libvirt counts a vCPU the guest does not have, and no rejected hot-add explains it;
    a pending unplug too (the hot-add that follows one is what crashes QEMU 7.2)."""
    return any(f.code in (GUEST_MISSING_VCPUS, UNPLUG_PENDING) for f in view.findings)


def stale_reason(view: VcpuView) -> str:
    """The observation a stale vCPU rests on, from the domain's history."""
    parts = [f"vcpu{v}: {gone_text(view.history, v)}" for v in sorted(view.history.gone)]
    return "; ".join(parts) or "no unplug on record; the guest has fewer CPUs than libvirt counts"


def check_thread_budget(view: VcpuView, needed: int) -> None:
    """Under TCG QEMU aborts a plug that would create more vCPUs in the domain's life than
    its maximum (``tcg_register_thread`` assertion). Only known from the domain's history."""
    created = view.history.created
    if view.domain_type != "qemu" or created is None or view.live is None or needed <= 0:
        return
    if created + needed <= view.live.maximum:
        return
    raise errors.UnsupportedError(
        f"domain '{view.name}': refusing to hot-add {needed} vCPU(s): under TCG (domain type "
        f"'qemu') QEMU aborts a plug that would create more vCPUs than the domain's maximum "
        f"({view.live.maximum}) in its life, and it has created {created} "
        f"(the domain's history: {view.history.initial} at the start of the record, "
        f"{view.history.plugged} plugged since). Restart the domain to reset it; --force "
        "skips this check"
    )


def check_hotpluggable(view: VcpuView, vcpus: Sequence[VcpuEntry], needed: int) -> None:
    """Enough hotpluggable, disabled vCPUs in the live definition (``vcpus``; empty: no
    per-vCPU detail, libvirt decides)."""
    if not vcpus:
        return
    free = [v.id for v in vcpus if not v.enabled and v.hotpluggable]
    if len(free) < needed:
        raise errors.InvalidRequestError(
            f"domain '{view.name}': {needed} more vCPUs needed, only {len(free)} are "
            f"hotpluggable and disabled ({format_cpulist(free) or 'none'}); mark vCPUs "
            "hotpluggable='yes' in the persistent definition and restart"
        )


def unplugged(before: VcpuView, count: int) -> list[int]:
    """The vCPUs libvirt unplugs to reach ``count``: the highest-numbered enabled ones."""
    live = before.live
    assert live is not None
    enabled = [v.id for v in live.vcpus if v.enabled] or list(range(live.current))
    hypervisor = sorted(before.hypervisor.vcpus) if before.hypervisor is not None else []
    ids = hypervisor or enabled
    return sorted(ids)[count:]


# --- verification --------------------------------------------------------------------------


def verify(
    host: str,
    after: VcpuView,
    request: Request,
    policy: Optional[Policy],
    error: Optional[str],
    repeated: Optional[str],
) -> tuple[tuple[LayerCheck, ...], tuple[str, ...]]:
    """Each layer against the target, and notes. ``host``: this host's description (libvirt
    and QEMU versions); ``policy``: the one the grow onlined under (None: no grow)."""
    checks: list[LayerCheck] = []
    notes: list[str] = []
    target = str(request.count)
    if request.config and after.config is not None:
        now = after.config.current
        checks.append(
            LayerCheck("config", _counts(now, after.config.maximum), target, now == request.count)
        )
    if request.live:
        checks.extend(live_checks(after, request.count))
        if policy is not None:
            checks.extend(online_check(after, policy, notes))
        notes.extend(drift_notes(host, after, error, repeated))
    return tuple(checks), tuple(notes)


def _counts(current: int, maximum: int) -> str:
    return f"{current}/{maximum}"


def live_checks(after: VcpuView, count: int) -> list[LayerCheck]:
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


def online_check(after: VcpuView, policy: Policy, notes: list[str]) -> list[LayerCheck]:
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


def drift_notes(
    host: str, after: VcpuView, error: Optional[str], repeated: Optional[str]
) -> list[str]:
    notes = []
    if error is not None:
        notes.append(f"libvirt reported: {error}")
    if repeated not in (None, REPEAT_ACCEPTED):
        notes.append(f"this host ({host}) refused the repeated unplug request: {repeated}")
    if after.guest is None:
        detail = f": {after.agent.error}" if after.agent.error else ""
        notes.append(f"the guest cannot be verified: guest agent {after.agent.state}{detail}")
    for finding in after.findings:
        if finding.code in (GUEST_REJECTED_VCPU, UNPLUG_PENDING):
            notes.append(f"{finding.code}: {finding.message}")
        elif finding.code == GUEST_MISSING_VCPUS and after.live is not None:
            notes.append(stale_note(after, repeated))
    return notes


def stale_note(after: VcpuView, repeated: Optional[str]) -> str:
    assert after.live is not None
    present = len(after.guest.present) if after.guest is not None else 0
    head = (
        f"the guest has {present} CPUs but libvirt still counts {after.live.current} "
        f"({stale_reason(after)}): a stale vCPU"
    )
    if repeated is not None and repeated != REPEAT_ACCEPTED:
        return (
            f"{head}; this host cannot repair it, so restart the domain (shut down, then "
            "start) to resync, and do not hot-add before: a hot-add while a stale vCPU "
            "cannot be repaired is known to crash QEMU"
        )
    return (
        f"{head}; 'virthotplug setvcpus {after.name} {present}' repeats the unplug "
        "request where this host accepts it, else restart the domain; do not hot-add before"
    )
