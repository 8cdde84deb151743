"""The stale unplug of libvirt 9.0 + QEMU 7.2, reproduced (see the lab notes).

The guest ejects the CPU and QEMU removes it, but QEMU never sends DEVICE_DELETED for the
vCPU itself: libvirt times out, keeps counting the vCPU, and the next hot-add of it crashes
QEMU. This is drift that virthotplug must detect and guard against. The lab refuses that
hot-add, and power-cycles the shared scratch VM before anyone uses it again.
"""

from __future__ import annotations

import time

import pytest
from lab import EJECT_REQUEST, SUCCESS, Lab, LabError, LabVM, MonitorEvent


def is_eject_done(event: MonitorEvent) -> bool:
    return event.source == EJECT_REQUEST and event.status == SUCCESS


def test_failed_unplug_leaves_a_stale_vcpu(lab: Lab, vm_scratch: LabVM) -> None:
    vm = vm_scratch
    vm.hot_add(2)
    vm.wait_cpu_state(lambda s: s.present == {0, 1}, what="cpu1 present")

    deleted = lab.monitor("DEVICE_DELETED", vm)
    since = time.monotonic()
    error = vm.unplug(1)

    lab.ost.wait_for(vm.name, since=since, where=is_eject_done)
    vm.wait_cpu_state(lambda s: s.present == {0}, what="cpu1 ejected")
    assert vm.guest_vcpus().vcpus == {0}
    if error is None:
        # A stack where unplug works: every layer agrees.
        assert vm.live_vcpus() == 1
        return
    assert "vcpu unplug request timed out" in str(error)
    assert vm.live_vcpus() == 2, "libvirt should still count the ejected vCPU"
    # The root cause: QEMU reports the deletion of the vCPU's LAPIC but not of the vCPU.
    paths = [e.details.get("path") for e in deleted.events()]
    assert any(str(p).endswith("/lapic") for p in paths)
    assert "vcpu1" not in [e.details.get("device") for e in deleted.events()]
    with pytest.raises(LabError, match="failed unplug"):
        vm.hot_add(3)
    assert vm.dom.isActive()
