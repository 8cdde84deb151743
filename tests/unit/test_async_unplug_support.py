"""libvirt 12.4's async unplug and vcpu-removed event: decided once per connection from the
binding's constants and the daemon (its capability record), subscribed where both have it,
and delivered as an observation with its vCPU id."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest

from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.events import DomainRef, Event, VcpuRemovedEvent
from virthotplug.core.judge import REMOVED
from virthotplug.core.observed import EventReader
from virthotplug.daemon.jobs import JobRunner
from virthotplug.daemon.listener import Listener
from virthotplug.daemon.monitorlog import MonitorLog, event_name
from virthotplug.host import connection as connection_module
from virthotplug.host.support import Capabilities, read_capabilities

LIBVIRT_12_8, LIBVIRT_9_0, LIBVIRT_12_3 = 12_008_000, 9_000_000, 12_003_000
ASYNC_FLAG, VCPU_REMOVED = 32, 28  # libvirt-domain.h (12.4)


class FakeLibvirtError(Exception):
    pass


def binding(*, new: bool) -> Any:
    """A libvirt module: built against 12.4 or later (``new``: it has the constants) or not."""
    names: dict[str, Any] = {"libvirtError": FakeLibvirtError}
    if new:
        names["VIR_DOMAIN_VCPU_ASYNC_UNPLUG"] = ASYNC_FLAG
        names["VIR_DOMAIN_EVENT_ID_VCPU_REMOVED"] = VCPU_REMOVED
    return SimpleNamespace(**names)


class FakeConnect:
    def __init__(self, driver: str, version: int) -> None:
        self.driver, self.version = driver, version

    def getType(self) -> str:
        return self.driver

    def getLibVersion(self) -> int:
        return self.version

    def getVersion(self) -> int:
        return 11_001_002


def capabilities(*, new_binding: bool, driver: str = "QEMU", daemon: int) -> Capabilities:
    conn = FakeConnect(driver, daemon)
    return read_capabilities("qemu:///system", conn, binding(new=new_binding))  # type: ignore[arg-type]


def test_a_new_binding_on_a_new_qemu_daemon_has_both() -> None:
    caps = capabilities(new_binding=True, daemon=LIBVIRT_12_8)
    assert caps.async_unplug and caps.vcpu_removed_event
    assert (caps.async_unplug_flag, caps.vcpu_removed_event_id) == (ASYNC_FLAG, VCPU_REMOVED)
    assert caps.to_dict()["async_unplug"] is True
    assert caps.to_dict()["vcpu_removed_event"] is True


@pytest.mark.parametrize(
    ("new_binding", "driver", "daemon"),
    [
        (False, "QEMU", LIBVIRT_12_8),  # PyPI's binding built on libvirt 9.0, daemon 12.8
        (True, "QEMU", LIBVIRT_9_0),  # forky's binding against an old daemon
        (True, "QEMU", LIBVIRT_12_3),
        (True, "Test", LIBVIRT_12_8),  # the test driver has no vCPU unplug to fire
    ],
    ids=["old-binding", "old-daemon", "daemon-12.3", "test-driver"],
)
def test_without_either_the_path_stays_as_it_was(
    new_binding: bool, driver: str, daemon: int
) -> None:
    caps = capabilities(new_binding=new_binding, driver=driver, daemon=daemon)
    assert not caps.async_unplug and not caps.vcpu_removed_event
    assert caps.async_unplug_flag is None and caps.vcpu_removed_event_id is None


def test_an_unknown_daemon_version_has_neither() -> None:
    class NoVersion(FakeConnect):
        def getLibVersion(self) -> int:
            raise FakeLibvirtError("no version")

    conn = NoVersion("QEMU", 0)
    caps = read_capabilities("qemu:///system", conn, binding(new=True))  # type: ignore[arg-type]
    assert caps.libvirt_version is None and not caps.async_unplug


# ---- the subscription ---------------------------------------------------------------------


class RecordingConnect:
    """Records domainEventRegisterAny; keeps the callbacks to fire them."""

    def __init__(self) -> None:
        self.registered: dict[int, Callable[..., None]] = {}

    def domainEventRegisterAny(
        self, _dom: Any, event_id: int, callback: Callable[..., None], _opaque: Any
    ) -> int:
        self.registered[event_id] = callback
        return len(self.registered)

    def registerCloseCallback(self, *_args: Any) -> None:
        pass

    def setKeepAlive(self, *_args: Any) -> None:
        pass


class FakeDomain:
    def name(self) -> str:
        return "web1"

    def UUIDString(self) -> str:
        return "u-1"


def subscribed(caps: Capabilities) -> tuple[RecordingConnect, list[Event]]:
    conn = connection_module.Connection("qemu:///system")
    raw = RecordingConnect()
    conn._conn = raw  # type: ignore[assignment]
    conn._support = caps
    events: list[Event] = []
    conn.subscribe(Listener("qemu:///system", events.append, lambda: None))
    return raw, events


def test_watch_subscribes_vcpu_removed_where_the_connection_has_it() -> None:
    caps = Capabilities("qemu:///system", "Test", LIBVIRT_12_8, None, None, VCPU_REMOVED)
    raw, events = subscribed(caps)
    assert VCPU_REMOVED in raw.registered
    raw.registered[VCPU_REMOVED](raw, FakeDomain(), 2, None)
    assert len(events) == 1 and isinstance(events[0], VcpuRemovedEvent)
    removed = events[0]
    assert removed.vcpu == 2 and removed.domain == DomainRef("qemu:///system", "u-1", "web1")
    assert removed.kind == "vcpu-removed" and removed.details() == {"vcpu": 2}


def test_no_vcpu_removed_registration_without_the_capability() -> None:
    caps = Capabilities("qemu:///system", "Test", LIBVIRT_12_8, None)
    raw, _events = subscribed(caps)
    assert VCPU_REMOVED not in raw.registered
    assert len(raw.registered) >= 4  # lifecycle, agent, device removed, removal failed


@pytest.mark.parametrize("garbage", ["2", None, True, 2.0])
def test_a_vcpu_id_that_is_not_an_int_is_no_vcpu(garbage: Any) -> None:
    events: list[Event] = []
    Listener("h", events.append, lambda: None).on_vcpu_removed(FakeDomain(), garbage)  # type: ignore[arg-type]
    assert isinstance(events[0], VcpuRemovedEvent) and events[0].vcpu == -1
    assert EventReader().read(events[0]) is None


def test_vcpu_removed_is_the_observation_removed_with_its_vcpu() -> None:
    ev = VcpuRemovedEvent(DomainRef("h", "u", "web1"), vcpu=3)
    found: Optional[Any] = EventReader().read(ev)
    assert found is not None and (found.kind, found.vcpu) == (REMOVED, 3)
    assert ev.intent == "reconcile"


def test_setvcpus_keeps_and_prints_vcpu_removed() -> None:
    log = MonitorLog("u")
    ev = VcpuRemovedEvent(DomainRef("h", "u", "web1"), vcpu=1, mono=10.0)
    log.put(ev)
    log.put(VcpuRemovedEvent(DomainRef("h", "other", "db1"), vcpu=1, mono=10.0))
    assert log.events() == [ev]
    assert (event_name(ev), ev.describe()) == ("vcpu-removed", "libvirt removed vcpu1")
    assert log.wait_for(lambda e: isinstance(e, VcpuRemovedEvent), since=9.0, limit=0.0)
    assert not log.wait_for(lambda e: False, since=9.0, limit=0.01)


def test_watch_keeps_vcpu_removed_for_the_domains_next_judgement() -> None:
    runner = JobRunner(HostConfig(), WatchSettings())
    ref = DomainRef("h", "u", "web1")
    runner.observe(VcpuRemovedEvent(ref, vcpu=2, mono=5.0, at=1005.0))
    observations = runner.domains.record(ref.key).jobs.observations.snapshot()
    assert [(o.kind, o.vcpu, o.at) for o in observations.events] == [(REMOVED, 2, 5.0)]
