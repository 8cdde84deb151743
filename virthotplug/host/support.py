"""What one libvirt connection can do, read once when it opens.

Every decision that depends on the stack — the driver, libvirt's and the hypervisor's
versions, whether the guest-agent vCPU API and QEMU monitor events exist — reads this
record instead of probing per call. Versions are kept only
to be shown as the host reports them; behaviour is decided from what is observed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from virthotplug.host.libvirt_types import VirConnect

# Drivers whose domains can have a QEMU guest agent and QEMU monitor events (getType()).
QEMU_DRIVERS = frozenset({"QEMU"})


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
        }


def read_capabilities(uri: str, conn: VirConnect, libvirt: Any) -> Capabilities:
    """Three cheap calls at open. A version the driver does not report is None."""
    return Capabilities(
        uri=uri,
        driver=str(conn.getType()),
        libvirt_version=_optional(conn.getLibVersion, libvirt),
        hypervisor_version=_optional(conn.getVersion, libvirt),
    )


def _optional(call: Any, libvirt: Any) -> Optional[int]:
    try:
        return int(call())
    except libvirt.libvirtError:
        return None
