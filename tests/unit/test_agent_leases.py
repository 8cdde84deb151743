"""Agent calls get a connection of their own (a hung guest must not hold up other calls)."""

from __future__ import annotations

import threading

from virthotplug.host.connection import _AgentLeases


class FakeConnection:
    opened = 0

    def __init__(self) -> None:
        FakeConnection.opened += 1
        self.closed = False

    def lookupByUUIDString(self, uuid: str) -> tuple[FakeConnection, str]:
        return (self, uuid)

    def close(self) -> None:
        self.closed = True


def test_a_stuck_call_keeps_its_connection_to_itself() -> None:
    leases = _AgentLeases(FakeConnection)
    stuck_in, release = threading.Event(), threading.Event()
    used: list[FakeConnection] = []

    def hang(dom: tuple[FakeConnection, str]) -> None:
        used.append(dom[0])
        stuck_in.set()
        release.wait(5)

    thread = threading.Thread(target=leases.run, args=("u1", hang))
    thread.start()
    stuck_in.wait(5)
    # While one call hangs, the next one runs at once on another connection.
    other = leases.run("u2", lambda dom: dom[0])
    assert other is not used[0]
    release.set()
    thread.join(5)
    # Both connections are kept for reuse; a new call needs no new connection.
    before = FakeConnection.opened
    assert leases.run("u3", lambda dom: dom[1]) == "u3"
    assert FakeConnection.opened == before


def test_idle_connections_are_bounded_and_closed() -> None:
    leases = _AgentLeases(FakeConnection)
    conns = [leases._lease() for _ in range(_AgentLeases.MAX_IDLE + 2)]
    for conn in conns:
        leases._release(conn)
    assert sum(c.closed for c in conns) == 2
    leases.close()
    assert all(c.closed for c in conns)
