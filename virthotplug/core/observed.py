"""A domain's events as the judge's observations (``core.judge.Observed``).

Which monitor events and libvirt events say something about one vCPU, and which vCPU:
QEMU's OST reports (a plug, an eject), QEMU's DEVICE_DELETED for the vCPU itself (never a
child such as its lapic), libvirt's device removal of a ``vcpuN`` alias.
"""

from __future__ import annotations

from typing import Iterable, Optional

from virthotplug.core.cpulist import MAX_CPU_ID
from virthotplug.core.events import (
    DeviceDeletedMonitorEvent,
    DeviceRemovalEvent,
    Event,
    OstMonitorEvent,
    VcpuRemovedEvent,
)
from virthotplug.core.judge import DELETED, EJECT, PLUG, REMOVED, Observed
from virthotplug.core.ost import SOURCE_DEVICE_CHECK, SOURCE_EJECT_REQUEST, STATUS_SUCCESS

_PERIPHERAL = "/machine/peripheral/vcpu"


class EventReader:
    """Turns one domain's events, in order, into observations.

    - OST device check (source 1) success for ``vcpuN``: QEMU plugged vcpuN (the guest's
      ACPI accepted it; whether the guest lists a CPU is another question).
    - OST eject request (source 3) success for ``vcpuN``: the guest ejected it. Linux sends
      the final report without a ``device`` field; it belongs to the vCPU of the eject
      report (status 0x84, in progress) just before it.
    - DEVICE_DELETED for ``vcpuN`` itself (device ``vcpuN`` with its own path, or exactly
      ``/machine/peripheral/vcpuN``): QEMU removed vcpuN. Never a sub-path such as
      ``…/vcpuN/lapic``, which QEMU sends under TCG although the vCPU is never finalized.
    - libvirt's device-removed for alias ``vcpuN``, or its vcpu-removed for vCPU N (libvirt
      12.4 or later): libvirt removed it.
    """

    def __init__(self) -> None:
        self._ejecting: Optional[int] = None

    def read(self, ev: Event) -> Optional[Observed]:
        if isinstance(ev, OstMonitorEvent):
            return self._ost(ev)
        if isinstance(ev, DeviceDeletedMonitorEvent) and ev.deleted is not None:
            vcpu = ev.deleted.vcpu_id
            vcpu = vcpu if vcpu is not None else deleted_vcpu(ev.deleted.path)
            return Observed(DELETED, vcpu, ev.mono, ev.at) if vcpu is not None else None
        if isinstance(ev, VcpuRemovedEvent) and 0 <= ev.vcpu <= MAX_CPU_ID:
            return Observed(REMOVED, ev.vcpu, ev.mono, ev.at)
        if isinstance(ev, DeviceRemovalEvent) and not ev.failed:
            vcpu = vcpu_from_alias(ev.alias)
            return Observed(REMOVED, vcpu, ev.mono, ev.at) if vcpu is not None else None
        return None

    def read_all(self, events: Iterable[Event]) -> list[Observed]:
        return [o for o in (self.read(ev) for ev in events) if o is not None]

    def _ost(self, ev: OstMonitorEvent) -> Optional[Observed]:
        ost = ev.ost
        if ost is None or not ost.is_cpu:
            return None
        vcpu = ost.vcpu_id
        if ost.source == SOURCE_EJECT_REQUEST:
            vcpu = vcpu if vcpu is not None else self._ejecting
            self._ejecting = vcpu
            if ost.status == STATUS_SUCCESS and vcpu is not None:
                self._ejecting = None
                return Observed(EJECT, vcpu, ev.mono, ev.at)
        elif (ost.source, ost.status) == (SOURCE_DEVICE_CHECK, STATUS_SUCCESS) and vcpu is not None:
            return Observed(PLUG, vcpu, ev.mono, ev.at)
        return None


def deleted_vcpu(path: str) -> Optional[int]:
    """``/machine/peripheral/vcpu3`` -> 3; None for anything else, sub-paths included."""
    if not path.startswith(_PERIPHERAL):
        return None
    return vcpu_from_alias("vcpu" + path[len(_PERIPHERAL) :])


def vcpu_from_alias(alias: str) -> Optional[int]:
    """``vcpu3`` -> 3; None for anything else (``vcpu03``, ``vcpu3/lapic``, too high)."""
    digits = alias[4:] if alias.startswith("vcpu") else ""
    if not digits.isascii() or not digits.isdigit() or len(digits) > 5:
        return None
    if digits != "0" and digits.startswith("0"):
        return None
    vcpu = int(digits)
    return vcpu if vcpu <= MAX_CPU_ID else None
