"""Closing a connection drops its registrations also when the daemon has gone away: each
holds a reference to the virConnect (libvirt drops it locally before the call to the daemon
fails), and one left behind keeps the closed connection, and its client's eventfd, for ever:
one file descriptor leaked per reconnect (found by the soak, bench/soak.py)."""

from __future__ import annotations

from typing import Any

import libvirt_qemu
import pytest

from virthotplug.host.connection import Connection


class DeadConnection:
    """A virConnect whose daemon is gone: every call to it fails, as libvirt's do."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def isAlive(self) -> int:
        return 0

    def domainEventDeregisterAny(self, callback_id: int) -> None:
        self.calls.append(("domain", callback_id))
        raise RuntimeError("Cannot write data: Broken pipe")

    def unregisterCloseCallback(self) -> None:
        self.calls.append("close-callback")

    def close(self) -> int:
        self.calls.append("closed")
        return 1


def test_a_dead_connection_still_drops_every_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor: list[int] = []
    monkeypatch.setattr(
        libvirt_qemu, "qemuMonitorEventDeregister", lambda _conn, i: monitor.append(i)
    )
    raw = DeadConnection()
    conn = Connection("qemu+unix:///system")
    conn._conn = raw
    conn._domain_callbacks = [3, 4]
    conn._monitor_callbacks = {"uuid-a": [7, 8]}
    conn._close_registered = True

    conn.close()

    assert raw.calls == [("domain", 3), ("domain", 4), "close-callback", "closed"]
    assert monitor == [7, 8]
    assert conn._domain_callbacks == [] and conn._monitor_callbacks == {}
    assert not conn._close_registered and conn.monitoring is False
