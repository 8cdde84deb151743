"""The vCPU view of one domain: what each of the four layers says, as plain data.

    config      persistent definition (inactive XML)
    live        running definition (bulk stats, or live XML where the driver has no vCPU stats)
    hypervisor  per-vCPU state of what QEMU has plugged (bulk stats ``vcpu.N.state``)
    guest       what the guest OS has present / online / offlinable (guest agent)

Plus the domain's ``History`` (what the host itself does not keep: unplug requests that timed
out, ejects QEMU reported, hot-adds the guest did not take, vCPUs plugged since the domain
started; kept in the live definition's metadata by ``host.history``) and the drift findings
computed from all of it (``drift.find_drift``). Nothing here talks to libvirt; ``collect``
fills these objects and ``to_dict`` gives the stable JSON form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class VcpuEntry:
    """One ``<vcpus><vcpu .../></vcpus>`` entry (parsed by ``host.domxml``)."""

    id: int
    enabled: bool
    hotpluggable: bool
    order: Optional[int] = None


@dataclass(frozen=True, slots=True)
class CountLayer:
    """Counts of one definition layer (config or live), with per-vCPU detail when known."""

    current: int
    maximum: int
    vcpus: tuple[VcpuEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class HypervisorLayer:
    """vCPU id → state ("running", "blocked", "offline") for the vCPUs QEMU has plugged."""

    vcpus: Mapping[int, str]

    @property
    def count(self) -> int:
        return len(self.vcpus)


@dataclass(frozen=True, slots=True)
class QemuCpus:
    """QEMU's own answer (``query-hotpluggable-cpus``; only with ``status --qemu-monitor``,
    which taints the domain): its CPU slots, and the QOM paths of those with a CPU."""

    slots: int
    plugged: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GuestLayer:
    """What the guest kernel reports through the agent (guest logical CPU ids)."""

    present: frozenset[int]
    online: frozenset[int]
    offlinable: frozenset[int]

    @property
    def offline(self) -> frozenset[int]:
        return self.present - self.online


# History entry kinds (stable strings: they appear in JSON output and in the metadata).
HISTORY_UNPLUG_TIMEOUT = "unplug-timeout"  # libvirt gave up waiting for an unplug
HISTORY_EJECTED = "ejected"  # QEMU reported the vCPU ejected (OST or DEVICE_DELETED)
HISTORY_REJECTED = "rejected"  # QEMU's OST said success, the guest never listed a new CPU
HISTORY_PLUGGED = "plugged"  # a hot-add QEMU reported (OST device check success)
# An async unplug was fired (libvirt 12.4 or later) and libvirt still counted the vCPU when
# the command ended: pending until libvirt drops it.
HISTORY_UNPLUG_REQUESTED = "unplug-requested"
HISTORY_KINDS = (
    HISTORY_UNPLUG_TIMEOUT,
    HISTORY_EJECTED,
    HISTORY_REJECTED,
    HISTORY_PLUGGED,
    HISTORY_UNPLUG_REQUESTED,
)
MAX_HISTORY_ENTRIES = 32  # the latest are kept; counts survive in ``plugged``


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One thing seen about one vCPU (libvirt's vCPU id), at ``time`` (Unix seconds)."""

    kind: str
    vcpu: int
    time: float
    source: str = ""  # how it was seen: "ost", "device-deleted", "setvcpus", ...


@dataclass(frozen=True, slots=True)
class History:
    """What virthotplug saw happen to a running domain's vCPUs during this run.

    ``initial`` is the live vCPU count when the record began and ``plugged`` the vCPUs
    plugged since, so ``initial + plugged`` is how many vCPUs QEMU has created in the
    domain's life as far as anyone recorded it (under TCG QEMU cannot create more than
    the maximum). That is a proof only when ``since_start``: the record began when QEMU
    started (a ``watch`` saw the start) and nothing was missed since; otherwise plugs made
    while nobody recorded are not in it. ``voucher`` names the watch run that vouches for
    ``since_start`` (its token): the mark holds only while that watch runs (``host.history``
    checks it on every read).
    """

    entries: tuple[HistoryEntry, ...] = ()
    plugged: int = 0
    initial: Optional[int] = None
    since_start: bool = False
    voucher: str = ""
    # Unix time this host refused a repeated unplug request of the domain (observed by
    # setvcpus): the remedy of a pending or stale unplug here is a restart, not a repeat.
    repeat_refused: Optional[float] = None

    @property
    def empty(self) -> bool:
        return not self.entries and self.plugged == 0 and self.initial is None

    def last_by_vcpu(self) -> dict[int, HistoryEntry]:
        """The latest entry per vCPU: what is known about it now."""
        latest: dict[int, HistoryEntry] = {}
        for entry in sorted(self.entries, key=lambda e: e.time):
            latest[entry.vcpu] = entry
        return latest

    def vcpus(self, kind: str) -> frozenset[int]:
        """vCPUs whose latest entry is ``kind``."""
        return frozenset(v for v, e in self.last_by_vcpu().items() if e.kind == kind)

    @property
    def gone(self) -> frozenset[int]:
        """vCPUs unplugged as far as the guest and QEMU go (ejected, or an unplug that timed
        out: libvirt may still count them)."""
        return self.vcpus(HISTORY_EJECTED) | self.vcpus(HISTORY_UNPLUG_TIMEOUT)

    @property
    def created(self) -> Optional[int]:
        """vCPUs QEMU has created in the domain's life, when the record knows its start."""
        return None if self.initial is None else self.initial + self.plugged

    def add(self, entry: HistoryEntry) -> History:
        """This history with ``entry``; a repeat of an entry already kept changes nothing
        (watch and setvcpus may both see the same QEMU event), and neither does a plug of a
        vCPU the record has plugged and not seen go since: QEMU plugs a vCPU only into an
        empty slot, so that report repeats one (a guest can send ACPI _OST reports of its
        own) and no vCPU was created."""
        if any(_same(entry, e) for e in self.entries) or self._plugged_already(entry):
            return self
        entries = tuple(sorted((*self.entries, entry), key=lambda e: e.time))
        plugged = self.plugged + (1 if entry.kind == HISTORY_PLUGGED else 0)
        return dataclasses.replace(self, entries=entries[-MAX_HISTORY_ENTRIES:], plugged=plugged)

    def _plugged_already(self, entry: HistoryEntry) -> bool:
        if entry.kind != HISTORY_PLUGGED:
            return False
        before = [e for e in self.entries if e.vcpu == entry.vcpu and e.time < entry.time]
        latest = max(before, key=lambda e: e.time, default=None)
        return latest is not None and latest.kind not in _SLOT_EMPTIED

    def with_initial(self, count: int) -> History:
        if self.initial is not None:
            return self
        return dataclasses.replace(self, initial=count)

    @property
    def proven_created(self) -> Optional[int]:
        """vCPUs QEMU has created in the domain's life, when the record proves it."""
        return self.created if self.since_start else None

    @property
    def unplugged(self) -> frozenset[int]:
        """vCPUs the record saw unplugged at some time (ejected or an unplug that timed
        out), whatever came after: their slots may have been plugged again."""
        kinds = (HISTORY_EJECTED, HISTORY_UNPLUG_TIMEOUT)
        return frozenset(e.vcpu for e in self.entries if e.kind in kinds)


# After these the vCPU's slot may be empty (the guest ejected it, or libvirt gave up on its
# unplug while the guest may have done it): a later plug of it is a new vCPU.
_SLOT_EMPTIED = frozenset({HISTORY_EJECTED, HISTORY_UNPLUG_TIMEOUT})


def _same(a: HistoryEntry, b: HistoryEntry) -> bool:
    # QEMU's event timestamp is the same for every observer; setvcpus' own records are
    # taken within the same second of the event they stand for.
    return a.kind == b.kind and a.vcpu == b.vcpu and abs(a.time - b.time) < 1.0


@dataclass(frozen=True, slots=True)
class AgentStatus:
    configured: bool
    state: str
    error: Optional[str] = None
    # False: the host did not ask the agent (every agent lease of its connection was out):
    # the state says nothing of the guest, and the daemon's agent circuit breaker ignores it.
    asked: bool = True


@dataclass(frozen=True, slots=True)
class Finding:
    """One drift finding: a stable ``code``, a severity and a one-line explanation."""

    code: str
    severity: str
    message: str
    cpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
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
    history: History = field(default_factory=History)
    domain_type: str = ""  # the definition's <domain type=...>: "kvm", "qemu" (TCG), "test"
    qemu: Optional[QemuCpus] = None  # asked of QEMU itself (status --qemu-monitor only)
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
        "hypervisor": _hypervisor_dict(view.hypervisor, view.history, view.qemu),
        "guest": _guest_dict(view.guest),
        "history": history_dict(view.history),
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


def _hypervisor_dict(
    layer: Optional[HypervisorLayer], history: History, qemu: Optional[QemuCpus]
) -> Optional[dict[str, Any]]:
    if layer is None:
        return None
    # The per-vCPU states are libvirt's bookkeeping, not a question put to QEMU; what QEMU
    # itself reported (ejects) comes from the domain's history.
    doc: dict[str, Any] = {
        "source": "libvirt",
        "count": layer.count,
        "vcpus": [{"id": i, "state": s} for i, s in sorted(layer.vcpus.items())],
        "ejected": sorted(history.vcpus(HISTORY_EJECTED)),
    }
    if qemu is not None:
        doc["qemu"] = {
            "source": "query-hotpluggable-cpus",
            "slots": qemu.slots,
            "count": len(qemu.plugged),
            "plugged": list(qemu.plugged),
        }
    return doc


def _guest_dict(layer: Optional[GuestLayer]) -> Optional[dict[str, Any]]:
    if layer is None:
        return None
    return {
        "present": sorted(layer.present),
        "online": sorted(layer.online),
        "offline": sorted(layer.offline),
        "offlinable": sorted(layer.offlinable),
    }


def history_dict(history: History) -> dict[str, Any]:
    return {
        "initial": history.initial,
        "plugged": history.plugged,
        "since_start": history.since_start,
        "repeat_refused": history.repeat_refused,
        "entries": [
            {"kind": e.kind, "vcpu": e.vcpu, "time": round(e.time, 3), "source": e.source}
            for e in history.entries
        ],
    }
