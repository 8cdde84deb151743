"""The vCPU view of one domain: what each of the four layers says, as plain data.

    config      persistent definition (inactive XML)
    live        running definition (bulk stats, or live XML where the driver has no vCPU stats)
    hypervisor  per-vCPU state of what QEMU has plugged (bulk stats ``vcpu.N.state``)
    guest       what the guest OS has present / online / offlinable (guest agent)

Plus the drift findings computed from them (``drift.find_drift``). Nothing here talks to
libvirt; ``collect`` fills these objects and ``to_dict`` gives the stable JSON form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from virthotplug.core.cpulist import MAX_CPU_ID, CpulistError, format_cpulist, parse_cpulist
from virthotplug.core.errors import GuestDataError

# Agent states (stable strings: they appear in JSON output).
AGENT_CONNECTED = "connected"
AGENT_NOT_CONFIGURED = "not-configured"
AGENT_NOT_CONNECTED = "not-connected"
AGENT_UNRESPONSIVE = "unresponsive"
AGENT_BAD_REPLY = "bad-reply"
AGENT_UNSUPPORTED = "unsupported"  # the driver cannot query guest agents (e.g. test driver)
AGENT_NOT_QUERIED = "not-queried"  # domain not running, or a read-only connection

# Severities, from least to most severe.
INFO = "info"
WARNING = "warning"
CRITICAL = "critical"
SEVERITY_RANK = {INFO: 0, WARNING: 1, CRITICAL: 2}

# libvirt's virVcpuState, as reported in bulk stats ``vcpu.N.state``.
VCPU_STATES = {0: "offline", 1: "running", 2: "blocked"}

# The guest agent answers with a few short cpulists; anything much longer is garbage.
MAX_GUEST_REPLY_KEYS = 16


@dataclass(frozen=True)
class VcpuEntry:
    """One ``<vcpus><vcpu .../></vcpus>`` entry (parsed by ``host.domxml``)."""

    id: int
    enabled: bool
    hotpluggable: bool
    order: Optional[int] = None


@dataclass(frozen=True)
class CountLayer:
    """Counts of one definition layer (config or live), with per-vCPU detail when known."""

    current: int
    maximum: int
    vcpus: tuple[VcpuEntry, ...] = ()


@dataclass(frozen=True)
class HypervisorLayer:
    """vCPU id → state ("running", "blocked", "offline") for the vCPUs QEMU has plugged."""

    vcpus: Mapping[int, str]

    @property
    def count(self) -> int:
        return len(self.vcpus)


@dataclass(frozen=True)
class GuestLayer:
    """What the guest kernel reports through the agent (guest logical CPU ids)."""

    present: frozenset[int]
    online: frozenset[int]
    offlinable: frozenset[int]

    @property
    def offline(self) -> frozenset[int]:
        return self.present - self.online


@dataclass(frozen=True)
class AgentStatus:
    configured: bool
    state: str
    error: Optional[str] = None


@dataclass(frozen=True)
class Finding:
    """One drift finding: a stable ``code``, a severity and a one-line explanation."""

    code: str
    severity: str
    message: str
    cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class VcpuView:
    host: str
    name: str
    uuid: str
    state: str  # "running", "paused", "shutoff", ... (see collect.DOMAIN_STATES)
    persistent: bool
    agent: AgentStatus
    domain_id: Optional[int] = None
    config: Optional[CountLayer] = None
    live: Optional[CountLayer] = None
    hypervisor: Optional[HypervisorLayer] = None
    guest: Optional[GuestLayer] = None
    findings: tuple[Finding, ...] = ()

    @property
    def active(self) -> bool:
        return self.live is not None

    @property
    def worst_severity(self) -> Optional[str]:
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__)


def parse_guest_reply(reply: Any, *, maximum: int, domain: str) -> GuestLayer:
    """Validate ``virDomainGetGuestVcpus``' reply. The guest is untrusted: be strict.

    Ids must lie below the domain's vCPU maximum; online and offlinable CPUs must be present.
    """
    if not isinstance(reply, Mapping) or len(reply) > MAX_GUEST_REPLY_KEYS:
        raise GuestDataError(f"domain '{domain}': guest agent reply is not a small mapping")
    sets = {key: _guest_cpulist(reply, key, maximum, domain) for key in ("vcpus", "online")}
    offlinable = _guest_cpulist(reply, "offlinable", maximum, domain, required=False)
    present = sets["vcpus"]
    stray = (sets["online"] | offlinable) - present
    if stray:
        raise GuestDataError(
            f"domain '{domain}': guest agent lists CPUs {format_cpulist(stray)} "
            "as online or offlinable but not present"
        )
    return GuestLayer(present=present, online=sets["online"], offlinable=offlinable)


def _guest_cpulist(
    reply: Mapping[Any, Any], key: str, maximum: int, domain: str, *, required: bool = True
) -> frozenset[int]:
    value = reply.get(key)
    if value is None and not required:
        return frozenset()
    if not isinstance(value, str):
        raise GuestDataError(f"domain '{domain}': guest agent reply has no cpulist '{key}'")
    try:
        # Capped: a huge maximum must not let the guest make us build a huge set.
        return parse_cpulist(value, max_id=min(max(maximum - 1, 0), MAX_CPU_ID))
    except CpulistError as exc:
        raise GuestDataError(f"domain '{domain}': guest agent '{key}': {exc}") from None


def to_dict(view: VcpuView) -> dict[str, Any]:
    """The stable JSON form of a view (schema documented in virthotplug(1))."""
    return {
        "host": view.host,
        "name": view.name,
        "uuid": view.uuid,
        "id": view.domain_id,
        "state": view.state,
        "persistent": view.persistent,
        "agent": {
            "configured": view.agent.configured,
            "state": view.agent.state,
            "error": view.agent.error,
        },
        "config": _count_dict(view.config),
        "live": _count_dict(view.live),
        "hypervisor": _hypervisor_dict(view.hypervisor),
        "guest": _guest_dict(view.guest),
        "findings": [
            {"code": f.code, "severity": f.severity, "message": f.message, "cpus": list(f.cpus)}
            for f in view.findings
        ],
    }


def _count_dict(layer: Optional[CountLayer]) -> Optional[dict[str, Any]]:
    if layer is None:
        return None
    return {
        "current": layer.current,
        "maximum": layer.maximum,
        "vcpus": [
            {"id": v.id, "enabled": v.enabled, "hotpluggable": v.hotpluggable, "order": v.order}
            for v in layer.vcpus
        ],
    }


def _hypervisor_dict(layer: Optional[HypervisorLayer]) -> Optional[dict[str, Any]]:
    if layer is None:
        return None
    return {
        "count": layer.count,
        "vcpus": [{"id": i, "state": s} for i, s in sorted(layer.vcpus.items())],
    }


def _guest_dict(layer: Optional[GuestLayer]) -> Optional[dict[str, Any]]:
    if layer is None:
        return None
    return {
        "present": sorted(layer.present),
        "online": sorted(layer.online),
        "offline": sorted(layer.offline),
        "offlinable": sorted(layer.offlinable),
    }
