"""Agent calls get a connection of their own (a hung guest must not hold up other calls),
at most ``limit`` of them out per host, each returned when its call really ends."""

from __future__ import annotations

import threading
import time

import pytest

from virthotplug.core import errors
from virthotplug.core.workpool import CallTimeout, call_with_timeout
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


def _hanging_calls(leases: _AgentLeases, count: int) -> tuple[threading.Event, threading.Event]:
    """``count`` calls that hang until released, each abandoned by its caller at 50 ms."""
    entered = threading.Semaphore(0)
    release = threading.Event()
    timed_out = threading.Event()

    def hang(_dom: tuple[FakeConnection, str]) -> None:
        entered.release()
        release.wait(5)

    def caller(index: int) -> None:
        try:
            call_with_timeout(lambda: leases.run(f"u{index}", hang), 0.05)
        except CallTimeout:
            timed_out.set()

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(count)]
    for thread in callers:
        thread.start()
    for _ in range(count):
        assert entered.acquire(timeout=5)
    for thread in callers:
        thread.join(5)
    return release, timed_out


def test_leases_out_at_once_are_capped_per_host() -> None:
    leases = _AgentLeases(FakeConnection, limit=3, wait=0.2)
    release, timed_out = _hanging_calls(leases, 3)
    assert timed_out.is_set() and leases.out == 3
    # Every lease is out on a hung call: the next call opens no connection and fails.
    before = FakeConnection.opened
    with pytest.raises(errors.AgentUnavailableError, match="3 guest-agent calls"):
        leases.run("u9", lambda dom: dom[1])
    assert FakeConnection.opened == before
    release.set()


def test_a_timed_out_call_returns_its_lease_when_the_call_ends() -> None:
    leases = _AgentLeases(FakeConnection, limit=2, wait=5.0)
    release, timed_out = _hanging_calls(leases, 2)
    # The callers gave up; the calls have not ended, so their leases are still out.
    assert timed_out.is_set() and leases.out == 2
    result: list[str] = []
    waiting = threading.Thread(target=lambda: result.append(leases.run("u7", lambda d: d[1])))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not result  # waits for a lease, opens no third connection
    release.set()  # the hung calls end: their leases come back, and the waiting call runs
    waiting.join(5)
    assert result == ["u7"]
    deadline = time.monotonic() + 5
    while leases.out and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leases.out == 0


def test_a_failed_open_takes_no_lease() -> None:
    def refuse() -> FakeConnection:
        raise errors.ConnectError("refused")

    leases = _AgentLeases(refuse, limit=1, wait=0.1)
    for _ in range(3):  # the one slot is free again after every failure
        with pytest.raises(errors.ConnectError):
            leases.run("u1", lambda dom: dom)
    assert leases.out == 0
