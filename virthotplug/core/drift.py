"""Drift findings: where the four layers of a domain's vCPU view disagree.

A pure function of a ``VcpuView``. Codes are stable (they appear in JSON output, metrics and
monitoring checks); messages are one line for humans.
"""

from __future__ import annotations

from typing import Callable, Iterable

from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.view import (
    AGENT_BAD_REPLY,
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_CONNECTED,
    AGENT_UNRESPONSIVE,
    AGENT_UNSUPPORTED,
    CRITICAL,
    INFO,
    WARNING,
    Finding,
    VcpuView,
)

GUEST_CPU_OFFLINE = "guest-cpu-offline"
GUEST_MISSING_VCPUS = "guest-missing-vcpus"
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
    OST_FLOOD,
)


def find_drift(view: VcpuView) -> tuple[Finding, ...]:
    """Every finding for ``view``, most fundamental first."""
    if not view.active:
        return (Finding(DOMAIN_NOT_RUNNING, INFO, f"domain is {view.state}: only config known"),)
    checks: tuple[Callable[[VcpuView], Iterable[Finding]], ...] = (
        _config_vs_live,
        _hypervisor_vs_live,
        _agent,
        _guest_count,
        _guest_offline,
    )
    return tuple(finding for check in checks for finding in check(view))


def _config_vs_live(view: VcpuView) -> Iterable[Finding]:
    if view.config is None or view.live is None:
        return
    if view.config.current != view.live.current:
        yield Finding(
            CONFIG_LIVE_MISMATCH,
            INFO,
            f"live definition has {view.live.current} vCPUs, persistent config "
            f"{view.config.current}: the change is lost at the next cold boot",
        )


def _hypervisor_vs_live(view: VcpuView) -> Iterable[Finding]:
    if view.hypervisor is None or view.live is None:
        return
    if view.hypervisor.count != view.live.current:
        yield Finding(
            HYPERVISOR_LIVE_MISMATCH,
            WARNING,
            f"libvirt counts {view.live.current} live vCPUs, the hypervisor reports "
            f"{view.hypervisor.count}",
        )


_AGENT_FINDINGS = {
    AGENT_NOT_CONNECTED: (AGENT_NOT_CONNECTED_CODE, WARNING, "guest agent is not connected"),
    AGENT_UNRESPONSIVE: (AGENT_UNRESPONSIVE_CODE, WARNING, "guest agent does not respond"),
    AGENT_BAD_REPLY: (AGENT_BAD_REPLY_CODE, CRITICAL, "guest agent replied garbage"),
    AGENT_UNSUPPORTED: (AGENT_UNSUPPORTED_CODE, INFO, "this driver cannot query guest agents"),
}


def _agent(view: VcpuView) -> Iterable[Finding]:
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


def _guest_count(view: VcpuView) -> Iterable[Finding]:
    if view.guest is None or view.live is None:
        return
    present, counted = len(view.guest.present), view.live.current
    if present < counted:
        yield Finding(
            GUEST_MISSING_VCPUS,
            CRITICAL,
            f"libvirt counts {counted} live vCPUs but the guest has only {present} "
            f"({format_cpulist(view.guest.present)}): an unplug libvirt gave up on may have "
            "completed; restart the domain to resync and do not hot-add before",
        )
    elif present > counted:
        extra = sorted(view.guest.present)[counted:]
        yield Finding(
            GUEST_EXTRA_VCPUS,
            WARNING,
            f"the guest has {present} CPUs but libvirt counts {counted} live vCPUs",
            tuple(extra),
        )


def _guest_offline(view: VcpuView) -> Iterable[Finding]:
    offline = view.guest.offline if view.guest is not None else frozenset()
    if offline:
        yield Finding(
            GUEST_CPU_OFFLINE,
            WARNING,
            f"CPU {format_cpulist(offline)} present in the guest but offline",
            tuple(sorted(offline)),
        )
