"""Event records: decoding and what each asks of the reconciler."""

from __future__ import annotations

import json

import pytest

from virthotplug.core.events import (
    FORGET,
    RECONCILE,
    REPORT,
    AgentEvent,
    DeviceDeletedMonitorEvent,
    DeviceRemovalEvent,
    DomainRef,
    HookEvent,
    HostEvent,
    LifecycleEvent,
    OstMonitorEvent,
)
from virthotplug.core.ost import parse_device_deleted, parse_ost_details
from virthotplug.daemon.listener import Listener

REF = DomainRef("qemu:///system", "9a2b", "guest1")


@pytest.mark.parametrize(
    ("event", "detail", "text", "intent"),
    [
        (2, 0, "started (booted)", RECONCILE),
        (4, 0, "resumed (unpaused)", RECONCILE),
        (5, 1, "stopped (destroyed)", FORGET),
        (1, 0, "undefined (removed)", RECONCILE),  # a running domain goes on, transient
        (3, 0, "suspended (paused)", REPORT),
        (6, 1, "shutdown (guest)", REPORT),
        (42, 7, "event 42 (detail 7)", REPORT),
    ],
)
def test_lifecycle(event: int, detail: int, text: str, intent: str) -> None:
    ev = LifecycleEvent(REF, event=event, detail=detail)
    assert ev.describe() == text
    assert ev.intent == intent


def test_agent_connect_reconciles_disconnect_reports() -> None:
    assert AgentEvent(REF, state=1, reason=2).intent == RECONCILE
    disconnected = AgentEvent(REF, state=2, reason=2)
    assert disconnected.intent == REPORT
    assert disconnected.details() == {"state": "disconnected", "reason": "channel event"}


def test_ost_hotadd_success_names_the_vcpu() -> None:
    details = json.dumps(
        {"info": {"device": "vcpu2", "source": 1, "status": 0, "slot": "2", "slot-type": "CPU"}}
    )
    ev = OstMonitorEvent(REF, ost=parse_ost_details(details))
    assert ev.hotadd_vcpu == 2
    assert ev.intent == RECONCILE
    assert "vcpu2" in ev.describe() and "not yet listed" in ev.describe()
    assert ev.details()["source_name"] == "device check"


def test_ost_eject_in_progress_is_not_a_hotadd() -> None:
    details = {"info": {"device": "vcpu3", "source": 3, "status": 0x84, "slot-type": "CPU"}}
    ev = OstMonitorEvent(REF, ost=parse_ost_details(details))
    assert ev.hotadd_vcpu is None
    assert ev.intent == RECONCILE
    assert "in progress" in ev.describe()


def test_ost_for_memory_is_only_reported() -> None:
    details = {"info": {"device": "dimm0", "source": 1, "status": 0, "slot-type": "DIMM"}}
    assert OstMonitorEvent(REF, ost=parse_ost_details(details)).intent == REPORT


def test_device_deleted_lapic_child_reconciles() -> None:
    deleted = parse_device_deleted({"path": "/machine/peripheral/vcpu1/lapic"})
    assert DeviceDeletedMonitorEvent(REF, deleted=deleted).intent == RECONCILE
    other = parse_device_deleted({"device": "net0", "path": "/machine/peripheral/net0"})
    assert DeviceDeletedMonitorEvent(REF, deleted=other).intent == REPORT


def test_device_removal_of_vcpu_reconciles() -> None:
    assert DeviceRemovalEvent(REF, alias="vcpu1").intent == RECONCILE
    assert DeviceRemovalEvent(REF, alias="net0", failed=True).intent == REPORT


@pytest.mark.parametrize(
    ("op", "intent"),
    [
        ("started", RECONCILE),
        ("reconnect", RECONCILE),
        ("restore", RECONCILE),
        ("stopped", FORGET),
        ("prepare", REPORT),
        ("migrate", REPORT),
    ],
)
def test_hook_operations(op: str, intent: str) -> None:
    assert HookEvent(REF, operation=op, sub_operation="begin").intent == intent


def test_host_listed_reconciles() -> None:
    assert HostEvent(None, host="h", what="listed", domains=(REF,)).intent == RECONCILE
    assert HostEvent(None, host="h", what="lost", reason="end of file").intent == REPORT


def test_records_are_immutable() -> None:
    ev = AgentEvent(REF, state=1, reason=1)
    with pytest.raises(AttributeError):
        ev.state = 2  # type: ignore[misc]


class FakeDomain:
    """The listener only uses the local getters of a virDomain."""

    def name(self) -> str:
        return REF.name

    def UUIDString(self) -> str:
        return REF.uuid


def test_listener_translates_and_survives_garbage() -> None:
    got: list[object] = []
    lost: list[bool] = []
    listener = Listener(REF.host, got.append, lambda: lost.append(True))
    dom = FakeDomain()
    listener.on_monitor(
        dom,
        "ACPI_DEVICE_OST",
        '{"info": {"source": 1, "status": 0, "device": "vcpu1", "slot-type": "CPU"}}',
    )
    listener.on_monitor(dom, "ACPI_DEVICE_OST", "{not json" * 5000)
    listener.on_monitor(dom, "DEVICE_DELETED", '{"path": "/machine/peripheral/vcpu1/lapic"}')
    listener.on_monitor(dom, "SOMETHING_ELSE", None)
    listener.on_agent(dom, 1, 2)
    listener.on_close(1)
    ost, garbage, deleted, agent, host = got
    assert isinstance(ost, OstMonitorEvent) and ost.hotadd_vcpu == 1 and ost.domain == REF
    assert isinstance(garbage, OstMonitorEvent) and garbage.ost is None and garbage.error
    assert garbage.intent == REPORT
    assert isinstance(deleted, DeviceDeletedMonitorEvent) and deleted.intent == RECONCILE
    assert isinstance(agent, AgentEvent) and agent.connected
    assert isinstance(host, HostEvent) and host.what == "lost" and host.reason == "end of file"
    assert lost == [True]


def test_listener_never_raises_into_libvirt() -> None:
    def broken_enqueue(_ev: object) -> None:
        raise RuntimeError("queue broken")

    listener = Listener(REF.host, broken_enqueue, lambda: None)
    listener.on_lifecycle(FakeDomain(), 2, 0)  # logged, not raised
