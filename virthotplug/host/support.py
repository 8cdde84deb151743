"""What one libvirt connection can do, read once when it opens.

Every decision that depends on the stack — the driver, libvirt's and the hypervisor's
versions, whether the guest-agent vCPU API, QEMU monitor events, the async unplug and the
vcpu-removed event exist — reads this record instead of probing per call. Versions are
kept to be shown as the host reports them; behaviour is decided from what is observed.

libvirt 12.4 added the async unplug (``VIR_DOMAIN_VCPU_ASYNC_UNPLUG`` for
``setVcpusFlags``, ``VIR_DOMAIN_SETVCPU_ASYNC_UNPLUG`` for ``setVcpu``) and the domain event
``VIR_DOMAIN_EVENT_ID_VCPU_REMOVED`` (28). Both need two things: a binding built against
libvirt 12.4 or later (it has the constants; PyPI's libvirt-python built on an older
libvirt has not, and its client library refuses event 28 even against a newer daemon), and
a daemon of 12.4 or later with the QEMU driver (an older daemon rejects the unknown flag and
event id). Both are known at open, so they are decided here once per connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from virthotplug.host.libvirt_types import VirConnect

# Drivers whose domains can have a QEMU guest agent and QEMU monitor events (getType()).
QEMU_DRIVERS = frozenset({"QEMU"})
# The libvirt release that added the async unplug and the vcpu-removed event.
ASYNC_UNPLUG_SINCE = 12_004_000
# Binding constants (libvirt-domain.h); absent from bindings built against libvirt < 12.4.
ASYNC_UNPLUG_FLAG = "VIR_DOMAIN_VCPU_ASYNC_UNPLUG"
VCPU_REMOVED_EVENT = "VIR_DOMAIN_EVENT_ID_VCPU_REMOVED"


def version_text(number: Optional[int]) -> Optional[str]:
    """libvirt's packed version (major * 1,000,000 + minor * 1,000 + release) as text."""
    if number is None or number <= 0:
        return None
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


@dataclass(frozen=True)
class Capabilities:
    """The capability record of one connection (virt-manager's support.py habit)."""

    uri: str
    driver: str  # getType(): "QEMU", "Test", ...
    libvirt_version: Optional[int]  # the daemon's (getLibVersion)
    hypervisor_version: Optional[int]  # QEMU's for the QEMU driver (getVersion)
    # The binding's flag values where the binding and the daemon both have them; else None.
    async_unplug_flag: Optional[int] = None  # setVcpusFlags' VIR_DOMAIN_VCPU_ASYNC_UNPLUG
    vcpu_removed_event_id: Optional[int] = None  # VIR_DOMAIN_EVENT_ID_VCPU_REMOVED

    @property
    def async_unplug(self) -> bool:
        """Whether ``setVcpusFlags`` can return once the unplug request is fired."""
        return self.async_unplug_flag is not None

    @property
    def vcpu_removed_event(self) -> bool:
        """Whether libvirt's vcpu-removed domain event can be subscribed."""
        return self.vcpu_removed_event_id is not None

    @property
    def guest_agent_api(self) -> bool:
        """Whether ``virDomainGetGuestVcpus`` and friends exist on this driver."""
        return self.driver in QEMU_DRIVERS

    @property
    def monitor_events(self) -> bool:
        """Whether QEMU monitor events can be subscribed (libvirt_qemu passthrough)."""
        return self.driver in QEMU_DRIVERS

    def describe(self) -> str:
        """``libvirt 9.0.0, QEMU 7.2.0`` — versions exactly as the host reported them."""
        parts = [f"libvirt {version_text(self.libvirt_version) or 'unknown'}"]
        hypervisor = version_text(self.hypervisor_version)
        if hypervisor:
            parts.append(f"{self.driver} {hypervisor}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "driver": self.driver,
            "libvirt": version_text(self.libvirt_version),
            "hypervisor": version_text(self.hypervisor_version),
            "guest_agent_api": self.guest_agent_api,
            "monitor_events": self.monitor_events,
            "async_unplug": self.async_unplug,
            "vcpu_removed_event": self.vcpu_removed_event,
        }


def read_capabilities(uri: str, conn: VirConnect, libvirt: Any) -> Capabilities:
    """Three cheap calls at open. A version the driver does not report is None."""
    driver = str(conn.getType())
    daemon = _optional(conn.getLibVersion, libvirt)
    newer = driver in QEMU_DRIVERS and daemon is not None and daemon >= ASYNC_UNPLUG_SINCE
    return Capabilities(
        uri=uri,
        driver=driver,
        libvirt_version=daemon,
        hypervisor_version=_optional(conn.getVersion, libvirt),
        async_unplug_flag=_binding_constant(libvirt, ASYNC_UNPLUG_FLAG) if newer else None,
        vcpu_removed_event_id=_binding_constant(libvirt, VCPU_REMOVED_EVENT) if newer else None,
    )


def _binding_constant(libvirt: Any, name: str) -> Optional[int]:
    """A constant of the binding, or None when it was built without it."""
    value = getattr(libvirt, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _optional(call: Any, libvirt: Any) -> Optional[int]:
    try:
        return int(call())
    except libvirt.libvirtError:
        return None
