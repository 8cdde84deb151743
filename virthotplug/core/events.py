"""Small immutable event records, and what each one means for the reconciler.

libvirt callbacks (see ``listener``) only turn their arguments into these records and
enqueue them; every decision is taken later, off the event thread. Pure: no libvirt import,
so the records and their decoding are unit-tested directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from virthotplug.core.ost import DeviceDeleted, OstEvent

# virDomainEventType → name, and per event the detail names (libvirt-domain.h).
LIFECYCLE_EVENTS = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)
LIFECYCLE_DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from snapshot", "wakeup"),
    "suspended": (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from snapshot",
        "api error",
        "postcopy",
        "postcopy failed",
    ),
    "resumed": ("unpaused", "migrated", "from snapshot", "postcopy", "postcopy failed"),
    "stopped": (
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from snapshot",
    ),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}
AGENT_STATES = {1: "connected", 2: "disconnected"}
AGENT_REASONS = {0: "unknown", 1: "domain started", 2: "channel event"}

# What an event asks of the reconciler.
RECONCILE = "reconcile"  # re-read the domain and apply its policy
FORGET = "forget"  # the domain is gone or stopped: drop pending work
REPORT = "report"  # worth reporting, nothing to reconcile


@dataclass(frozen=True, slots=True)
class DomainRef:
    host: str
    uuid: str
    name: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.uuid)


@dataclass(frozen=True)
class Event:
    """Base record. ``at`` is wall-clock time (for reports); ``mono`` orders and times."""

    domain: Optional[DomainRef]
    at: float = field(default_factory=time.time, compare=False)
    mono: float = field(default_factory=time.monotonic, compare=False)

    kind = "event"

    @property
    def intent(self) -> str:
        return REPORT

    def describe(self) -> str:
        return self.kind

    def details(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class LifecycleEvent(Event):
    event: int = 0
    detail: int = 0

    kind = "lifecycle"

    @property
    def event_name(self) -> str:
        if 0 <= self.event < len(LIFECYCLE_EVENTS):
            return LIFECYCLE_EVENTS[self.event]
        return f"event {self.event}"

    @property
    def detail_name(self) -> str:
        names = LIFECYCLE_DETAILS.get(self.event_name, ())
        return names[self.detail] if 0 <= self.detail < len(names) else f"detail {self.detail}"

    @property
    def intent(self) -> str:
        # "undefined" is no end: a running domain undefined goes on, transient (its QEMU
        # monitor registration and record must stay), and one that was not running was
        # forgotten when it stopped. The reconcile re-reads it (its persistent policy is gone).
        if self.event_name in ("started", "resumed", "defined", "undefined"):
            return RECONCILE
        if self.event_name in ("stopped", "crashed"):
            return FORGET
        return REPORT

    def describe(self) -> str:
        return f"{self.event_name} ({self.detail_name})"

    def details(self) -> dict[str, Any]:
        return {"event": self.event_name, "detail": self.detail_name}


@dataclass(frozen=True)
class AgentEvent(Event):
    state: int = 0
    reason: int = 0

    kind = "agent"

    @property
    def connected(self) -> bool:
        return self.state == 1

    @property
    def intent(self) -> str:
        # A (re)connected agent is when a 'match' policy gets re-applied, e.g. after a
        # guest reboot; a disconnect is only reported.
        return RECONCILE if self.connected else REPORT

    def describe(self) -> str:
        state = AGENT_STATES.get(self.state, f"state {self.state}")
        return f"guest agent {state} ({AGENT_REASONS.get(self.reason, self.reason)})"

    def details(self) -> dict[str, Any]:
        return {
            "state": AGENT_STATES.get(self.state, str(self.state)),
            "reason": AGENT_REASONS.get(self.reason, str(self.reason)),
        }


@dataclass(frozen=True)
class DeviceRemovalEvent(Event):
    alias: str = ""
    failed: bool = False

    kind = "device-removal"

    @property
    def intent(self) -> str:
        return RECONCILE if self.alias.startswith("vcpu") else REPORT

    def describe(self) -> str:
        return f"device {self.alias} {'removal failed' if self.failed else 'removed'}"

    def details(self) -> dict[str, Any]:
        return {"alias": self.alias, "failed": self.failed}


@dataclass(frozen=True)
class OstMonitorEvent(Event):
    """ACPI_DEVICE_OST from the QEMU monitor: a hint, never the truth about onlining."""

    ost: Optional[OstEvent] = None
    error: Optional[str] = None  # the details could not be parsed (untrusted input)

    kind = "ost"

    @property
    def hotadd_vcpu(self) -> Optional[int]:
        """The vCPU a successful hot-add detection is about, if this is one."""
        ost = self.ost
        if ost is None or not ost.is_cpu or (ost.source, ost.status) != (1, 0):
            return None
        return ost.vcpu_id

    @property
    def intent(self) -> str:
        return RECONCILE if self.ost is not None and self.ost.is_cpu else REPORT

    def describe(self) -> str:
        if self.ost is None:
            return f"unparsable ACPI_DEVICE_OST: {self.error}"
        return self.ost.describe()

    def details(self) -> dict[str, Any]:
        if self.ost is None:
            return {"error": self.error}
        ost = self.ost
        return {
            "device": ost.device,
            "slot": ost.slot,
            "slot_type": ost.slot_type,
            "source": ost.source,
            "source_name": ost.source_name,
            "status": ost.status,
            "status_name": ost.status_name,
        }


@dataclass(frozen=True)
class DeviceDeletedMonitorEvent(Event):
    deleted: Optional[DeviceDeleted] = None
    error: Optional[str] = None

    kind = "device-deleted"

    @property
    def intent(self) -> str:
        # QEMU 7.2 reports only the vCPU's child (…/vcpu1/lapic), never vcpu1 itself.
        deleted = self.deleted
        if deleted is not None and (deleted.vcpu_id is not None or deleted.is_vcpu_child):
            return RECONCILE
        return REPORT

    def describe(self) -> str:
        if self.deleted is None:
            return f"unparsable DEVICE_DELETED: {self.error}"
        return f"QEMU deleted {self.deleted.device or self.deleted.path}"

    def details(self) -> dict[str, Any]:
        if self.deleted is None:
            return {"error": self.error}
        return {"device": self.deleted.device, "path": self.deleted.path}


@dataclass(frozen=True)
class VcpuRemovedEvent(Event):
    """libvirt's vcpu-removed (libvirt 12.4 or later): libvirt dropped ``<vcpu id=vcpu>``
    from the live definition. The confirmation of an unplug; QEMU 11.1 under TCG also makes
    libvirt send one, late, when the slot is plugged again (the judge tells them apart)."""

    vcpu: int = -1

    kind = "vcpu-removed"

    @property
    def intent(self) -> str:
        return RECONCILE

    def describe(self) -> str:
        return f"libvirt removed vcpu{self.vcpu}"

    def details(self) -> dict[str, Any]:
        return {"vcpu": self.vcpu}


METADATA_TYPES = {0: "description", 1: "title", 2: "element"}


@dataclass(frozen=True)
class MetadataEvent(Event):
    """METADATA_CHANGE: a domain's metadata was written. ``ours``: virthotplug's policy
    element (the listener matches the namespace; only those are recorded at all)."""

    mtype: int = 0
    namespace: str = ""
    ours: bool = False

    kind = "metadata"

    @property
    def intent(self) -> str:
        # A policy set on a running domain applies at once, not at the next resync.
        return RECONCILE if self.ours else REPORT

    def describe(self) -> str:
        return f"metadata changed ({self.namespace or METADATA_TYPES.get(self.mtype, '?')})"

    def details(self) -> dict[str, Any]:
        return {
            "type": METADATA_TYPES.get(self.mtype, str(self.mtype)),
            "namespace": self.namespace,
        }


@dataclass(frozen=True)
class HookEvent(Event):
    """A message from the libvirt hook script (``hooks/qemu``)."""

    operation: str = ""
    sub_operation: str = ""

    kind = "hook"

    @property
    def intent(self) -> str:
        # 'started' also ends an incoming migration on the destination host.
        if self.operation in ("started", "reconnect", "restore"):
            return RECONCILE
        if self.operation in ("stopped", "release"):
            return FORGET
        return REPORT

    def describe(self) -> str:
        return f"hook {self.operation} {self.sub_operation}".rstrip()

    def details(self) -> dict[str, Any]:
        return {"operation": self.operation, "sub_operation": self.sub_operation}


@dataclass(frozen=True)
class HostEvent(Event):
    """Connection-level happenings: connected, lost, and the resync's list of running domains."""

    host: str = ""
    what: str = ""  # "connected", "lost", "gone" (the session ended), "listed"
    reason: str = ""
    domains: tuple[DomainRef, ...] = ()  # with "listed": the running domains
    # With "listed": the ones to reconcile (a bulk resync picks them); None: all of them.
    reconcile: Optional[tuple[DomainRef, ...]] = None

    kind = "host"

    @property
    def intent(self) -> str:
        return RECONCILE if self.what == "listed" else REPORT

    def describe(self) -> str:
        return f"{self.what} {self.reason}".rstrip()

    def details(self) -> dict[str, Any]:
        return {"what": self.what, "reason": self.reason}


CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client closed"}
