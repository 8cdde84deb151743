"""The read path's call budget on the test driver: definition reads a few at a time, in
order; one agent call per read, on the shared connection, where the capability record says
the driver has no such API; names missing on a host.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from tdriver import MIXED

from virthotplug.core import errors
from virthotplug.host import collect
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.support import Capabilities

AGENT = '<devices><channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0"/>'
AGENT += "</channel></devices>"


def node(path: Path, count: int) -> str:
    domains = "".join(
        f'<domain type="test"><name>d{i:02d}</name>'
        f"<uuid>6b0e4c1a-0000-4000-8000-{i:012d}</uuid>"
        f'<memory unit="MiB">64</memory><vcpu current="1">4</vcpu>'
        f'<os><type arch="x86_64">hvm</type></os>{AGENT}</domain>'
        for i in range(count)
    )
    path.write_text(f'<?xml version="1.0"?><node>{domains}</node>')
    return f"test://{path}"


@pytest.fixture
def many(tmp_path: Path) -> str:
    return node(tmp_path / "many.xml", 30)


def test_no_agent_calls_once_the_driver_lacks_the_api(
    many: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    leased: list[str] = []
    real = Connection.agent_call

    def counted(self: Connection, uuid: str, fn: Any) -> Any:
        leased.append(uuid)
        return real(self, uuid, fn)

    monkeypatch.setattr(Connection, "agent_call", counted)
    with Connection(many) as conn:
        result = collect.read_views(conn, None, workers=4)
    assert len(result.views) == 30 and not result.errors
    # One call on the shared connection answers for every domain: no agent lease opened.
    assert leased == []
    for view in result.views:
        assert view.agent.state == "unsupported"
        assert view.agent.error == (
            f"domain '{view.name}': this function is not supported by the connection "
            "driver: virDomainGetGuestVcpus"
        )


def test_definitions_read_concurrently_and_in_order(
    many: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    real = Domain.xml

    def xml(self: Domain, *, inactive: bool) -> str:
        threads.add(threading.current_thread().name)
        return real(self, inactive=inactive)

    monkeypatch.setattr(Domain, "xml", xml)
    with Connection(many) as conn:
        views = collect.read_views(conn, None).views
    assert [v.name for v in views] == [f"d{i:02d}" for i in range(30)]
    assert 1 < len(threads) <= collect.DEFINITION_WORKERS


def test_a_lost_connection_during_the_reads_is_raised(
    many: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(self: Domain, *, inactive: bool) -> str:
        raise errors.ConnectError("connection lost")

    monkeypatch.setattr(Domain, "xml", gone)
    with Connection(many) as conn, pytest.raises(errors.ConnectError):
        collect.read_views(conn, None)


def test_missing_names_are_collected_with_missing_ok() -> None:
    with Connection(MIXED) as conn:
        result = collect.read_views(conn, ["nosuch", "fixed-noagent"], missing_ok=True)
        assert [v.name for v in result.views] == ["fixed-noagent"]
        assert result.missing == ["nosuch"]
        with pytest.raises(errors.NoDomainError):
            collect.read_views(conn, ["nosuch", "fixed-noagent"])


def test_the_capability_record_is_read_once_at_open() -> None:
    with Connection(MIXED) as conn:
        support = conn.support
        assert support.driver == "TEST"
        assert not support.guest_agent_api and not support.monitor_events
        assert support.libvirt_version is not None and support.libvirt_version > 0
        assert support.describe().startswith("libvirt ")
        assert conn.support is support


def test_a_driver_with_the_api_gets_every_agent_asked_without_a_batch_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def reply(self: Domain) -> dict[str, str]:
        asked.append(self.name)
        return {"vcpus": "0", "online": "0", "offlinable": ""}

    monkeypatch.setattr(Capabilities, "guest_agent_api", property(lambda _self: True))
    monkeypatch.setattr(Domain, "guest_vcpus", reply)
    with Connection(MIXED) as conn:
        views = {v.name: v for v in collect.read_views(conn, None).views}
    assert asked == ["hotplug-agent"]  # the one running domain with an agent channel
    assert views["hotplug-agent"].agent.state == "connected"
