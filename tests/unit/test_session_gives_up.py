"""Never live but blind: a host session that ends (a permanent error, or an exception that
is not ours) says so, and the daemon exits non-zero once no host is left (so that systemd's
Restart=on-failure fires) instead of running on without a connection."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import pytest

from virthotplug.core import errors
from virthotplug.core.config import WatchSettings
from virthotplug.core.events import HostEvent
from virthotplug.core.schedule import Job
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.results import JobResult
from virthotplug.daemon.session import HostSession
from virthotplug.daemon.watch import Watch

H1, H2 = "test:///default", "qemu+ssh://h2/system"


def _never(_conn: Any, _dom: Any, _job: Job) -> JobResult:
    raise AssertionError("not reached")


def _run_session(exc: BaseException) -> tuple[HostSession, list[Any]]:
    events: queue.Queue[Any] = queue.Queue()
    session = HostSession(H1, events.put, threading.Event())

    def fail() -> Any:
        raise exc

    session._open = fail  # type: ignore[method-assign]
    session._thread.start()
    session._thread.join(10)
    assert not session._thread.is_alive()
    return session, list(events.queue)


@pytest.mark.parametrize(
    "exc",
    [
        errors.PermissionDeniedError("cannot connect: access denied by policy"),
        errors.InvalidURIError("cannot connect: no connection driver available"),
        RuntimeError("a bug, or a binding that raised something unexpected"),
    ],
)
def test_a_session_that_ends_says_so(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        session, events = _run_session(exc)
    gone = [e for e in events if isinstance(e, HostEvent) and e.what == "gone"]
    assert len(gone) == 1 and gone[0].host == H1
    assert session.failure is not None and session.failure.exit_status != errors.EXIT_OK
    assert any(H1 in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_a_session_that_fails_while_connected_reports_the_loss_first() -> None:
    events: queue.Queue[Any] = queue.Queue()
    session = HostSession(H1, events.put, threading.Event())
    closed: list[bool] = []
    session._conn = type("C", (), {"close": lambda _s: closed.append(True)})()  # type: ignore[assignment]

    def crash() -> None:
        raise RuntimeError("unexpected")

    session._loop = crash  # type: ignore[method-assign]
    session._run()
    whats = [e.what for e in events.queue if isinstance(e, HostEvent)]
    assert whats == ["lost", "gone"] and closed == [True]


def test_the_daemon_exits_when_no_host_is_left(caplog: pytest.LogCaptureFixture) -> None:
    watch = Watch([H1, H2], WatchSettings(), _never, EventLog(None))
    first, second = watch.sessions[H1], watch.sessions[H2]
    first.failure = errors.PermissionDeniedError(f"{H1}: access denied")
    watch._host_event(HostEvent(None, host=H1, what="gone", reason="access denied"))
    assert not watch._stop.is_set()  # one host is still watched
    with caplog.at_level(logging.ERROR):
        watch._tick()  # and the lost one is named again, periodically
    assert any("not watched" in r.getMessage() and H1 in r.getMessage() for r in caplog.records)
    second.failure = errors.InvalidURIError(f"{H2}: bad URI")
    watch._host_event(HostEvent(None, host=H2, what="gone", reason="bad URI"))
    assert watch._stop.is_set()
    assert watch.failure is second.failure
