"""A loss counts only for the connection it came from (Nova's ``_dispatch_events`` habit).

After a reconnect, a close callback, a "lost" record still in the queue or a worker's
ConnectError from the old connection must not tear down the new one (and force another full
resync); agent connections leased from the old connection are closed, never pooled again.
"""

from __future__ import annotations

import threading
from typing import Any

from virthotplug.core import errors
from virthotplug.core.config import WatchSettings
from virthotplug.core.events import DomainRef, HostEvent
from virthotplug.core.schedule import Job
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.results import JobResult
from virthotplug.daemon.session import HostSession
from virthotplug.daemon.watch import Watch
from virthotplug.host.connection import _AgentLeases

HOST = "test:///default"


class FakeConn:
    uri = HOST

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def domain_by_uuid(self, uuid: str) -> Any:
        return uuid

    def lookupByUUIDString(self, uuid: str) -> Any:
        return uuid

    def close(self) -> None:
        self.closed = True


def _session() -> HostSession:
    return HostSession(HOST, lambda _item: None, threading.Event())


def test_a_loss_of_the_old_connection_leaves_the_new_one_alone() -> None:
    session = _session()
    old, new = FakeConn("old"), FakeConn("new")
    session._conn = new  # type: ignore[assignment]
    session.mark_lost(old)  # type: ignore[arg-type]
    assert not session._lost.is_set()
    session.mark_lost(new)  # type: ignore[arg-type]
    assert session._lost.is_set()


def test_a_queued_lost_record_does_not_mark_the_session_lost_again() -> None:
    # The close callback already marked its own connection lost; by the time the main loop
    # reads its record the session may be on a new connection.
    watch = Watch([HOST], WatchSettings(), _never, EventLog(None))
    session = watch.sessions[HOST]
    session._conn = FakeConn("new")  # type: ignore[assignment]
    watch._host_event(HostEvent(None, host=HOST, what="lost", reason="end of file"))
    assert not session._lost.is_set()


def test_a_workers_connect_error_from_the_old_connection_is_ignored() -> None:
    watch = Watch([HOST], WatchSettings(), _never, EventLog(None))
    session = watch.sessions[HOST]
    session._conn = FakeConn("old")  # type: ignore[assignment]

    def reconnect_meanwhile(_conn: Any, _dom: Any, _job: Job) -> JobResult:
        session._conn = FakeConn("new")  # type: ignore[assignment]
        raise errors.ConnectError("end of file while reading data")

    watch._worker._reconcile_fn = reconnect_meanwhile
    ref = DomainRef(HOST, "uuid-1", "dom1")
    watch._worker._reconcile(Job(ref, due=0.0, first_request=0.0, reasons=["ost"]))
    assert not session._lost.is_set()


def test_a_lease_returned_after_close_is_closed_not_pooled() -> None:
    leases = _AgentLeases(lambda: FakeConn("lease"))  # type: ignore[arg-type,return-value]
    inside, release = threading.Event(), threading.Event()
    used: list[FakeConn] = []

    def stuck(_dom: Any) -> None:
        inside.set()
        release.wait(5)

    def call() -> None:
        leases.run("u1", stuck)

    thread = threading.Thread(target=call)
    original_lease = leases._lease

    def record() -> Any:
        conn = original_lease()
        used.append(conn)  # type: ignore[arg-type]
        return conn

    leases._lease = record  # type: ignore[method-assign]
    thread.start()
    assert inside.wait(5)
    leases.close()  # the connection is being replaced
    release.set()
    thread.join(5)
    assert used and used[0].closed
    assert leases._idle == []


def _never(_conn: Any, _dom: Any, _job: Job) -> JobResult:
    raise AssertionError("not reached")
