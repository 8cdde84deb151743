"""The pure half of a verified ``setvcpus``: what a request may do, and whether it did.

``ops.resize`` and ``ops.shrink`` talk to libvirt and the guest agent; this module only
looks at views:

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
from virthotplug.core.view import CountLayer, VcpuEntry, VcpuView

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
    maximum: bool = False  # --maximum: ``count`` is the persistent definition's new maximum
    hotpluggable: bool = False  # --hotpluggable: the vCPUs enabled are hotpluggable
    guest: bool = False  # --guest: ``count`` CPUs online in the guest, through its agent
    override_policy: bool = False  # --override-policy: --guest under 'report'/'ignore' too


@dataclass(frozen=True)
class LayerCheck:
    layer: str
    now: str
    target: str
    ok: bool


# --- preflight -----------------------------------------------------------------------------


def check_live_request(view: VcpuView, request: Request) -> None:
    """A live change needs an active domain and a count within its maximum. A paused one is
    changed as libvirt changes it (virsh does too); its guest cannot be verified until it
    resumes, which the verification says (``live_checks``)."""
    if view.state not in ("running", "paused") or view.live is None:
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


def check_thread_budget(view: VcpuView, needed: int, at_least: int = 0) -> None:
    """Under TCG QEMU aborts a plug that would create more vCPUs in the domain's life than
    its maximum (``tcg_register_thread`` assertion). The count is proven only by a record
    complete since QEMU's start; otherwise what is known is a lower bound (the live count,
    ``at_least`` — e.g. before this command unplugged some —, the record's count), and
    where the record shows vCPUs unplugged, their slots may have been plugged again while
    nobody recorded: the count is not known, and the plug is refused."""
    live = view.live
    if view.domain_type != "qemu" or live is None or needed <= 0:
        return
    history = view.history
    proven = history.proven_created
    lower = proven if proven is not None else max(live.current, at_least, history.created or 0)
    head = (
        f"domain '{view.name}': refusing to hot-add {needed} vCPU(s): under TCG (domain type "
        f"'qemu') QEMU aborts a plug that would create more vCPUs than the domain's maximum "
        f"({live.maximum}) in its life"
    )
    tail = "Restart the domain to reset it; --force skips this check"
    if lower + needed > live.maximum:
        how = "counted since QEMU's start" if proven is not None else "or more"
        raise errors.UnsupportedError(
            f"{head}, and it has created {lower} ({how}; the domain's record: "
            f"{history.initial} at its start, {history.plugged} plugged since). {tail}"
        )
    if proven is None and history.unplugged:
        raise errors.UnsupportedError(
            f"{head}, and how many it has created is not known: at least {lower}, but the "
            "domain's record is not complete since QEMU's start (no watch saw the start, or "
            "it stopped watching since) and it shows vCPU "
            f"{format_cpulist(history.unplugged)} unplugged: a slot unplugged may have been "
            f"plugged again while nobody recorded. {tail} (a watch running from the start "
            "counts them)"
        )


def qemu_stopped_text(before: VcpuView, count: int, said: Optional[str]) -> str:
    """What to say when the domain stopped during a hot-add to ``count`` vCPUs; ``said``:
    libvirt's error to the request, if any."""
    current = before.live.current if before.live is not None else 0
    text = (
        f"domain '{before.name}': QEMU stopped (crashed) during the hot-add ({current} -> "
        f"{count} vCPUs): the domain is not running any more"
    )
    if said:
        text += f"; libvirt reported: {said}"
    if before.domain_type == "qemu" and before.live is not None:
        created = before.history.proven_created
        known = (
            f"it had created {created} (counted since QEMU's start)"
            if created is not None
            else "how many it had created was not known (no record complete since its start)"
        )
        text += (
            f". Under TCG (domain type 'qemu') QEMU aborts a plug that would create more vCPUs "
            f"than the domain's maximum ({before.live.maximum}) in its life; {known}"
        )
    return text + ". Start the domain again"


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


def plugged(before: VcpuView, count: int) -> list[int]:
    """The vCPUs libvirt plugs to reach ``count``: the lowest-numbered disabled ones."""
    live = before.live
    if live is None or count <= live.current:
        return []
    disabled = [v.id for v in live.vcpus if not v.enabled] or range(live.current, live.maximum)
    return sorted(disabled)[: count - live.current]


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
    before: Optional[VcpuView] = None,
) -> tuple[tuple[LayerCheck, ...], tuple[str, ...]]:
    """Each layer against the target, and notes. ``host``: this host's description (libvirt
    and QEMU versions); ``policy``: the one the grow onlined under (None: no grow);
    ``before``: the view before the change (for ``--hotpluggable``)."""
    checks: list[LayerCheck] = []
    notes: list[str] = []
    if request.config and after.config is not None:
        checks.append(config_check(after.config, request))
        if request.hotpluggable and before is not None and before.config is not None:
            checks.extend(hotpluggable_check(before.config, after.config))
    if request.live:
        checks.extend(live_checks(after, request.count))
        if policy is not None:
            checks.extend(online_check(after, policy, notes))
        notes.extend(drift_notes(host, after, error, repeated))
    return tuple(checks), tuple(notes)


def config_check(config: CountLayer, request: Request) -> LayerCheck:
    """The persistent definition's count, or its maximum for ``--maximum`` (libvirt then
    lowers the count with it when it is above the new maximum)."""
    now = _counts(config.current, config.maximum)
    if request.maximum:
        return LayerCheck(
            "config maximum", now, f"-/{request.count}", config.maximum == request.count
        )
    return LayerCheck("config", now, str(request.count), config.current == request.count)


def hotpluggable_check(before: CountLayer, after: CountLayer) -> list[LayerCheck]:
    """``--hotpluggable``: every vCPU the change enabled in the persistent definition is
    marked hotpluggable (so that it can be unplugged live once the domain runs)."""
    was = _enabled(before)
    added = sorted(_enabled(after) - was)
    if not added:
        return []
    marked = {v.id for v in after.vcpus if v.hotpluggable}
    plain = [v for v in added if v not in marked]
    now = "yes" if not plain else f"not vCPU {format_cpulist(plain)}"
    return [LayerCheck("config hotpluggable", now, f"vCPU {format_cpulist(added)}", not plain)]


def _enabled(layer: CountLayer) -> frozenset[int]:
    """The enabled vCPU ids of a definition (the first ``current`` without detail)."""
    if layer.vcpus:
        return frozenset(v.id for v in layer.vcpus if v.enabled)
    return frozenset(range(layer.current))


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
        why = "paused" if after.state == "paused" else after.agent.state
        checks.append(LayerCheck("guest present", f"unknown ({why})", target, False))
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
    if after.guest is None and after.state == "paused":
        notes.append(
            "the domain is paused: its guest runs no code, so whether it sees the change is "
            f"not known until it resumes ('virthotplug status {after.name}' then verifies "
            "every layer)"
        )
    elif after.guest is None:
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
