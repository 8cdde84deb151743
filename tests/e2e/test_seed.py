"""The observation that started virthotplug, on real guests.

A vCPU hot-add makes QEMU report ACPI_DEVICE_OST {source 1 (device check), status 0} as soon
as the guest kernel has *detected* the CPU. Whether it ever runs is up to the guest: without
an auto-online rule it stays offline, while every host-side view says "added".
"""

from __future__ import annotations

import time
from typing import Callable

from lab import DEVICE_CHECK, SUCCESS, Lab, LabVM, MonitorEvent

# Auto-onlining takes 0.3-0.55 s on TCG; staying offline is judged after well beyond that.
SETTLE = 2.0


def is_hot_add_ost(event: MonitorEvent) -> bool:
    return event.source == DEVICE_CHECK and event.info.get("slot-type") == "CPU"


def hot_add_ost_of(device: str) -> Callable[[MonitorEvent], bool]:
    return lambda event: is_hot_add_ost(event) and event.device == device


def hot_add_and_wait_ost(lab: Lab, vm: LabVM, count: int) -> MonitorEvent:
    since = time.monotonic()
    vm.hot_add(count)
    return lab.ost.wait_for(vm.name, since=since, where=is_hot_add_ost)


def test_hot_added_cpu_is_detected_but_stays_offline(lab: Lab, vm_manual: LabVM) -> None:
    event = hot_add_and_wait_ost(lab, vm_manual, 2)

    assert event.status == SUCCESS
    assert event.device == "vcpu1"
    time.sleep(SETTLE)
    guest = vm_manual.guest_vcpus()
    assert guest.vcpus == {0, 1}
    assert guest.online == {0}
    assert guest.offlinable == {1}
    assert vm_manual.cpu_state().online == {0}
    assert vm_manual.live_vcpus() == 2
    assert vm_manual.taints() == []


def test_hot_added_cpu_comes_online_with_the_udev_rule(lab: Lab, vm_auto: LabVM) -> None:
    event = hot_add_and_wait_ost(lab, vm_auto, 2)

    assert event.status == SUCCESS
    state = vm_auto.wait_cpu_state(lambda s: s.online == {0, 1}, what="cpu1 online")
    assert state.present == {0, 1}
    assert vm_auto.guest_vcpus().online == {0, 1}
    assert vm_auto.taints() == []


def test_each_hot_added_cpu_reports_its_own_ost(lab: Lab, vm_manual_8: LabVM) -> None:
    since = time.monotonic()
    vm_manual_8.hot_add(8)

    for n in range(1, 8):
        event = lab.ost.wait_for(vm_manual_8.name, since=since, where=hot_add_ost_of(f"vcpu{n}"))
        assert event.status == SUCCESS
    state = vm_manual_8.wait_cpu_state(lambda s: len(s.present) == 8, what="8 CPUs present")
    assert state.online == {0}
    assert vm_manual_8.live_vcpus() == 8
