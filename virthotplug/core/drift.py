"""Drift findings: where the four layers of a domain's vCPU view disagree.

A pure function of a ``VcpuView`` (its history included), the domain's effective policy and
whether the guest is still settling. Codes are stable (they appear in JSON output, metrics
and monitoring checks); messages are one line for humans.

The policy decides what is drift: CPUs it keeps offline on purpose (``exclude``, every CPU
under ``ignore``, those beyond a ``match`` count) are reported at info level as
``guest-cpu-kept-offline``, never as a warning; a ``match`` target the guest cannot reach is
``match-unreachable``. The history tells a stale vCPU (an unplug libvirt gave up on that the
guest completed) from a hot-add the guest did not take, and both from a pending unplug
(``unplug-pending``): an async unplug libvirt has not completed, a vCPU the guest ejected
while libvirt still counts it with no timed-out request on record, or a vCPU the guest took
and no longer has although nobody saw it unplugged (``virsh setvcpus --async``). While
``settling`` (right after a resume, restore or hot-add), findings that depend on the guest
are at most warnings.
"""

from __future__ import annotations

import datetime
from typing import Callable, Iterable, Mapping, Optional

from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.errors import quote
from virthotplug.core.policy import MODE_IGNORE, Policy, kept_offline, unreachable
from virthotplug.core.shared import SharedValues
from virthotplug.core.view import (
    AGENT_BAD_REPLY,
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_CONNECTED,
    AGENT_UNRESPONSIVE,
    AGENT_UNSUPPORTED,
    CRITICAL,
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_REQUESTED,
    HISTORY_UNPLUG_TIMEOUT,
    INFO,
    WARNING,
    Finding,
    History,
    HistoryEntry,
    VcpuView,
)

GUEST_CPU_OFFLINE = "guest-cpu-offline"
GUEST_CPU_KEPT_OFFLINE = "guest-cpu-kept-offline"
GUEST_MISSING_VCPUS = "guest-missing-vcpus"
GUEST_REJECTED_VCPU = "guest-rejected-vcpu"
UNPLUG_PENDING = "unplug-pending"
MATCH_UNREACHABLE = "match-unreachable"
GUEST_EXTRA_VCPUS = "guest-extra-vcpus"
CONFIG_LIVE_MISMATCH = "config-live-mismatch"
HYPERVISOR_LIVE_MISMATCH = "hypervisor-live-mismatch"
AGENT_NOT_CONFIGURED_CODE = "agent-not-configured"
AGENT_NOT_CONNECTED_CODE = "agent-not-connected"
AGENT_UNRESPONSIVE_CODE = "agent-unresponsive"
AGENT_BAD_REPLY_CODE = "agent-bad-reply"
AGENT_UNSUPPORTED_CODE = "agent-unsupported"
DOMAIN_NOT_RUNNING = "domain-not-running"
# Not from the view: the daemon stopped listening to a domain's QEMU monitor events because
# the guest flooded them (daemon/flood.py); only watch's records and metrics carry it.
OST_FLOOD = "ost-flood"
# The domain's policy (its metadata, or the configuration file's section for it) is invalid:
# nothing is done to the guest. status and check report it (host/policysource resolves it).
INVALID_POLICY = "invalid-policy"

ALL_CODES = (
    GUEST_CPU_OFFLINE,
    GUEST_MISSING_VCPUS,
    GUEST_EXTRA_VCPUS,
    CONFIG_LIVE_MISMATCH,
    HYPERVISOR_LIVE_MISMATCH,
    AGENT_NOT_CONFIGURED_CODE,
    AGENT_NOT_CONNECTED_CODE,
    AGENT_UNRESPONSIVE_CODE,
    AGENT_BAD_REPLY_CODE,
    AGENT_UNSUPPORTED_CODE,
    DOMAIN_NOT_RUNNING,
    GUEST_CPU_KEPT_OFFLINE,
    GUEST_REJECTED_VCPU,
    MATCH_UNREACHABLE,
    OST_FLOOD,
    INVALID_POLICY,
    UNPLUG_PENDING,
)


# Findings whose truth depends on the guest having caught up with the host.
GUEST_DEPENDENT = frozenset(
    {GUEST_CPU_OFFLINE, GUEST_MISSING_VCPUS, GUEST_EXTRA_VCPUS, GUEST_REJECTED_VCPU}
)

# One line on what makes a guest kernel refuse a hot-added CPU although its ACPI accepted
# it (lab notes: the Debian 13 guest under TCG).
REJECTION_CAUSES = (
    "known causes: a guest kernel with no room in its possible-CPU mask — Linux 6.12.75 or "
    "later with no detected hypervisor on firmware older than ACPI 6.3 (as under TCG), or a "
    "guest booted with nr_cpus=/maxcpus="
)

# What completes a pending unplug. libvirt 11.3 and 12.8 accept the same unplug request
# again once the guest has ejected the vCPU and drop it then (lab: 21 of 21); libvirt 9.0
# refuses it, and setvcpus then reports the remedy that is left.
PENDING_REMEDY = (
    "'virthotplug setvcpus {name} {count}' repeats the unplug request, which completes it "
    "once the guest has ejected the vCPU on a host that accepts a repeat (libvirt 11.3 and "
    "later); on one that refuses it only a restart of the domain resyncs libvirt; do not "
    "hot-add before"
)
# Where this host was seen to refuse a repeated unplug request of the domain.
REFUSED_REMEDY = (
    "this host refused a repeated unplug request of this domain ({when}): only a restart "
    "of the domain (shut down, then start) resyncs libvirt; do not hot-add before"
)

Check = Callable[[VcpuView, Optional[Policy]], Iterable[Finding]]


def find_drift(
    view: VcpuView,
    policy: Optional[Policy] = None,
    *,
    settling: bool = False,
    now: Optional[float] = None,
) -> tuple[Finding, ...]:
    """Every finding for ``view`` under ``policy`` (None: unknown, judged like 'report'),
    most fundamental first. ``now`` (Unix seconds) gives a pending unplug its age; without
    it the time it was seen is named."""
    if not view.active:
        return (Finding(DOMAIN_NOT_RUNNING, INFO, f"domain is {view.state}: only config known"),)
    checks: tuple[Check, ...] = (
        _config_vs_live,
        _hypervisor_vs_live,
        _agent,
        lambda v, p: _guest_count(v, p, now),
        _guest_offline,
        _match,
    )
    found = tuple(_findings.one(f) for check in checks for f in check(view, policy))
    return tuple(_settle(f) for f in found) if settling else found


# Most domains of a host share their findings word for word ("the guest agent is not
# connected; ..."): one object each, however many views hold it.
_findings = SharedValues()


def _settle(finding: Finding) -> Finding:
    if finding.code not in GUEST_DEPENDENT or finding.severity != CRITICAL:
        return finding
    return Finding(
        finding.code,
        WARNING,
        f"{finding.message} (the guest may still be catching up)",
        finding.cpus,
    )


def _config_vs_live(view: VcpuView, _policy: Optional[Policy]) -> Iterable[Finding]:
    if view.config is None or view.live is None:
        return
    if view.config.current != view.live.current:
        yield Finding(
            CONFIG_LIVE_MISMATCH,
            INFO,
            f"live definition has {view.live.current} vCPUs, persistent config "
            f"{view.config.current}: the change is lost at the next cold boot",
        )


def _hypervisor_vs_live(view: VcpuView, _policy: Optional[Policy]) -> Iterable[Finding]:
    if view.qemu is not None and view.live is not None:
        plugged = len(view.qemu.plugged)
        if plugged != view.live.current:
            yield Finding(
                HYPERVISOR_LIVE_MISMATCH,
                WARNING,
                f"libvirt counts {view.live.current} live vCPUs, QEMU itself reports "
                f"{plugged} plugged (query-hotpluggable-cpus)",
            )
            return
    if view.hypervisor is None or view.live is None:
        return
    if view.hypervisor.count != view.live.current:
        yield Finding(
            HYPERVISOR_LIVE_MISMATCH,
            WARNING,
            f"libvirt counts {view.live.current} live vCPUs but lists "
            f"{view.hypervisor.count} in its per-vCPU states",
        )


_AGENT_FINDINGS = {
    AGENT_NOT_CONNECTED: (AGENT_NOT_CONNECTED_CODE, WARNING, "guest agent is not connected"),
    AGENT_UNRESPONSIVE: (AGENT_UNRESPONSIVE_CODE, WARNING, "guest agent does not respond"),
    AGENT_BAD_REPLY: (AGENT_BAD_REPLY_CODE, CRITICAL, "guest agent replied garbage"),
    AGENT_UNSUPPORTED: (AGENT_UNSUPPORTED_CODE, INFO, "this driver cannot query guest agents"),
}


def _agent(view: VcpuView, _policy: Optional[Policy]) -> Iterable[Finding]:
    state = view.agent.state
    if state == AGENT_NOT_CONFIGURED:
        yield _agent_not_configured(view)
    elif state in _AGENT_FINDINGS:
        code, severity, text = _AGENT_FINDINGS[state]
        detail = f": {view.agent.error}" if view.agent.error else ""
        yield Finding(code, severity, f"{text}; the guest layer is unknown{detail}")


def _agent_not_configured(view: VcpuView) -> Finding:
    # Without an agent channel nobody on the host can see or fix offline vCPUs. That only
    # matters for a domain that can be hot-added to.
    can_grow = view.live is not None and view.live.current < view.live.maximum
    return Finding(
        AGENT_NOT_CONFIGURED_CODE,
        WARNING if can_grow else INFO,
        "no guest agent channel: the guest's online vCPUs cannot be read or changed",
    )


def _guest_count(
    view: VcpuView, _policy: Optional[Policy], now: Optional[float]
) -> Iterable[Finding]:
    if view.guest is None or view.live is None:
        return
    present, counted = len(view.guest.present), view.live.current
    requested = _requested(view)
    if present < counted:
        yield from _missing(view, counted, present, requested, now)
    elif requested:  # fired, the guest has not ejected yet
        yield _pending(view, requested, now, "the guest has not ejected it yet")
    if present > counted:
        extra = sorted(view.guest.present)[counted:]
        yield Finding(
            GUEST_EXTRA_VCPUS,
            WARNING,
            f"the guest has {present} CPUs but libvirt counts {counted} live vCPUs",
            tuple(extra),
        )


def _missing(
    view: VcpuView,
    counted: int,
    present: int,
    requested: Mapping[int, float],
    now: Optional[float],
) -> Iterable[Finding]:
    """The guest has fewer CPUs than libvirt counts: the history says why, when it can."""
    history = view.history
    rejected = sorted(history.vcpus(HISTORY_REJECTED))
    for vcpu in rejected:
        yield Finding(
            GUEST_REJECTED_VCPU,
            WARNING,
            f"vcpu{vcpu} was hot-added and QEMU's OST said the guest's ACPI accepted it "
            f"(success), but the guest lists no new CPU; {REJECTION_CAUSES}",
        )
    unexplained = counted - present - len(rejected)
    if unexplained <= 0:
        if requested:
            yield _pending(view, requested, now, "the guest has not ejected it yet")
        return
    ejected = {**_ejected_pending(view), **requested}
    if ejected:
        yield _pending(view, ejected, now, "the guest ejected it, libvirt still counts it")
        unexplained -= len(ejected)
    gone = history.gone - set(ejected)
    if unexplained > 0 and gone:
        head = f"libvirt counts {counted} live vCPUs but the guest has only {present} "
        head += f"({format_cpulist(view.guest.present) if view.guest else '-'})"
        yield Finding(GUEST_MISSING_VCPUS, CRITICAL, f"{head}: {_stale_text(view, gone)}")
        return
    if unexplained <= 0:
        return
    unobserved = _unobserved(view, unexplained, set(ejected))
    if unobserved:
        yield _pending(
            view,
            unobserved,
            now,
            "the guest took it and no longer has it; the unplug was not observed "
            "(e.g. virsh setvcpus --async)",
        )
        return
    head = f"libvirt counts {counted} live vCPUs but the guest has only {present} "
    head += f"({format_cpulist(view.guest.present) if view.guest else '-'})"
    yield Finding(
        GUEST_MISSING_VCPUS,
        CRITICAL,
        f"{head}: no unplug or hot-add of this domain is on record, so either an unplug "
        "libvirt gave up on completed in the guest (a stale vCPU), or the guest did not take a "
        "hot-added vCPU; do not hot-add before 'virthotplug setvcpus' or a restart resolves it",
    )


# --- pending unplugs ------------------------------------------------------------------------


def _enabled(view: VcpuView) -> frozenset[int]:
    """The vCPU ids libvirt counts: the live definition's, else its per-vCPU states."""
    live = view.live
    if live is None:
        return frozenset()
    enabled = frozenset(v.id for v in live.vcpus if v.enabled)
    if not enabled and view.hypervisor is not None:
        enabled = frozenset(view.hypervisor.vcpus)
    return enabled or frozenset(range(live.current))


def _requested(view: VcpuView) -> dict[int, float]:
    """vCPU -> when: async unplugs fired (their latest entry) that libvirt still counts."""
    enabled = _enabled(view)
    return {
        v: e.time
        for v, e in view.history.last_by_vcpu().items()
        if e.kind == HISTORY_UNPLUG_REQUESTED and v in enabled
    }


def _ejected_pending(view: VcpuView) -> dict[int, float]:
    """vCPU -> when: ejected by the guest (their latest entry) and still counted by libvirt,
    with no request libvirt gave up on since their latest plug (that is a stale vCPU)."""
    enabled = _enabled(view)
    found: dict[int, float] = {}
    for vcpu, entry in view.history.last_by_vcpu().items():
        if entry.kind == HISTORY_EJECTED and vcpu in enabled and not _timed_out(view, vcpu):
            found[vcpu] = entry.time
    return found


def _timed_out(view: VcpuView, vcpu: int) -> bool:
    """An unplug request of ``vcpu`` timed out since its latest plug."""
    timed_out = False
    for entry in sorted((e for e in view.history.entries if e.vcpu == vcpu), key=_time):
        if entry.kind == HISTORY_PLUGGED:
            timed_out = False
        elif entry.kind == HISTORY_UNPLUG_TIMEOUT:
            timed_out = True
    return timed_out


def _time(entry: HistoryEntry) -> float:
    return entry.time


def _unobserved(view: VcpuView, missing: int, known: set[int]) -> dict[int, Optional[float]]:
    """The vCPUs a hot-add on record brought that the guest took (their latest entry is the
    plug: not rejected) and that libvirt still counts, when the guest has fewer CPUs: an
    unplug nobody here saw. The highest ones, as libvirt unplugs them."""
    plugged = sorted((view.history.vcpus(HISTORY_PLUGGED) & _enabled(view)) - known)
    return {vcpu: None for vcpu in plugged[-missing:]} if plugged and missing > 0 else {}


def _pending(
    view: VcpuView, vcpus: Mapping[int, Optional[float]], now: Optional[float], state: str
) -> Finding:
    assert view.live is not None
    parts = [f"vcpu{v} ({_age(vcpus[v], now)})" for v in sorted(vcpus)]
    count = max(1, view.live.current - len(vcpus))
    remedy = _refused_remedy(view) or PENDING_REMEDY.format(name=view.name, count=count)
    return Finding(
        UNPLUG_PENDING,
        WARNING,
        f"unplug pending: {', '.join(parts)}: {state}; {remedy}",
        tuple(sorted(vcpus)),
    )


def _age(since: Optional[float], now: Optional[float]) -> str:
    if since is None:
        return "age unknown"
    if now is None:
        return f"since {_utc(since)}"
    return f"for {max(0.0, now - since):.1f} s"


def _utc(seconds: float) -> str:
    """Unix seconds as an ISO 8601 UTC time, e.g. 2026-12-07T18:14:11Z."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _stale_text(view: VcpuView, gone: frozenset[int]) -> str:
    parts = [f"vcpu{vcpu}: {gone_text(view.history, vcpu)}" for vcpu in sorted(gone)]
    remedy = _refused_remedy(view) or (
        f"'virthotplug setvcpus {view.name} {len(view.guest.present) if view.guest else 1}' "
        "repeats the unplug request where this host accepts it, else restart the domain"
    )
    return "; ".join(parts) + f": libvirt still counts a vCPU the guest gave up (stale); {remedy}"


def _refused_remedy(view: VcpuView) -> Optional[str]:
    """The remedy where this host was seen to refuse a repeated unplug of the domain (no
    repeat: it would be refused again); None where that was not seen."""
    refused = view.history.repeat_refused
    if refused is None:
        return None
    return REFUSED_REMEDY.format(when=f"at {_utc(refused)}")


def gone_text(history: History, vcpu: int) -> str:
    """What the history saw of a vCPU's unplug since it was last plugged, e.g. "QEMU
    reported it ejected (ost); libvirt's unplug timed out"."""
    seen: list[str] = []
    for entry in sorted((e for e in history.entries if e.vcpu == vcpu), key=lambda e: e.time):
        if entry.kind == HISTORY_PLUGGED:
            seen = []
        elif entry.kind == HISTORY_EJECTED:
            seen.append(f"QEMU reported it ejected ({entry.source})")
        elif entry.kind == HISTORY_UNPLUG_TIMEOUT:
            seen.append("libvirt's unplug timed out")
    return "; ".join(dict.fromkeys(seen)) or "no unplug on record"


def _guest_offline(view: VcpuView, policy: Optional[Policy]) -> Iterable[Finding]:
    offline = view.guest.offline if view.guest is not None else frozenset()
    kept = kept_offline(view, policy) & offline
    pending = offline - kept
    if pending:
        yield Finding(
            GUEST_CPU_OFFLINE,
            WARNING,
            f"CPU {format_cpulist(pending)} present in the guest but offline",
            tuple(sorted(pending)),
        )
    if kept and policy is not None:
        why = "policy 'ignore'" if policy.mode == MODE_IGNORE else f"policy '{policy.mode}'"
        if policy.exclude & kept:
            why += f" (exclude {format_cpulist(policy.exclude & kept)})"
        yield Finding(
            GUEST_CPU_KEPT_OFFLINE,
            INFO,
            f"CPU {format_cpulist(kept)} offline on purpose: kept offline by {why}",
            tuple(sorted(kept)),
        )


def _match(view: VcpuView, policy: Optional[Policy]) -> Iterable[Finding]:
    why = unreachable(view, policy) if policy is not None else None
    if why is not None:
        yield Finding(MATCH_UNREACHABLE, WARNING, f"policy 'match' cannot be met: {why}")


def invalid_policy_finding(domain: str, error: str) -> Finding:
    """The finding of a domain whose policy is invalid; ``error``: the policy's error (its
    leading ``domain 'NAME': `` is dropped: the finding belongs to the domain already)."""
    prefix = f"domain {quote(domain)}: "
    message = error[len(prefix) :] if error.startswith(prefix) else error
    return Finding(INVALID_POLICY, WARNING, f"{message}; nothing is done to the guest")
