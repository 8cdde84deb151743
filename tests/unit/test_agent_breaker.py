"""A per-domain circuit breaker for guest agents that do not answer: after a few
reconciles in a row that found the agent unresponsive, the domain's jobs wait (with a
growing backoff) in the scheduler instead of taking a worker for another bounded wait each;
the agent connecting again (AGENT_LIFECYCLE connected) closes the breaker at once."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace
from typing import Any

import pytest

from virthotplug.core.breaker import AgentBreaker
from virthotplug.core.config import WatchSettings
from virthotplug.core.errors import AgentUnavailableError
from virthotplug.core.events import AgentEvent, DomainRef, LifecycleEvent, OstMonitorEvent
from virthotplug.core.schedule import Job
from virthotplug.core.view import AgentStatus, VcpuView
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.results import JobResult
from virthotplug.daemon.watch import Watch

HOST = "test:///default"
REF = DomainRef(HOST, "uuid-hung", "hung")
OTHER = DomainRef(HOST, "uuid-ok", "ok")


class FakeConn:
    uri = HOST

    def domain_by_uuid(self, uuid: str) -> Any:
        return uuid

    def is_alive(self) -> bool:
        return True


def _view(ref: DomainRef, state: str) -> VcpuView:
    agent = AgentStatus(configured=True, state=state)
    return VcpuView(
        host=HOST, name=ref.name, uuid=ref.uuid, state="running", persistent=True, agent=agent
    )


def _watch(calls: list[str]) -> Watch:
    def reconcile(_conn: Any, dom: Any, job: Job) -> JobResult:
        calls.append(job.ref.name)
        state = "unresponsive" if job.ref == REF else "connected"
        return JobResult(record={}, line="", view=_view(job.ref, state))

    watch = Watch([HOST], WatchSettings(), reconcile, EventLog(None))
    watch.sessions[HOST]._conn = FakeConn()  # type: ignore[assignment]
    return watch


def _round(watch: Watch, refs: tuple[DomainRef, ...]) -> None:
    """Each domain asks for a reconcile; run what is dispatched now, like the workers."""
    for ref in refs:
        watch._event(OstMonitorEvent(ref, error="a hint"))  # hostile guests can send these
        watch._event(LifecycleEvent(ref, event=4, detail=0))  # resumed: reconcile
    for job in watch._sched.pop_due(time.monotonic() + 1.0, 8):
        watch._run_job(job)
    while not watch._queue.empty():
        watch._handle(watch._queue.get_nowait())


def test_an_unresponsive_agent_stops_taking_workers_and_others_go_on() -> None:
    calls: list[str] = []
    watch = _watch(calls)
    for _ in range(10):
        _round(watch, (REF, OTHER))
    assert calls.count("ok") == 10
    assert calls.count("hung") == AgentBreaker.THRESHOLD  # then it waits, holding no worker
    assert watch._sched.next_due() is not None  # its job is kept, for later


def test_the_agent_connecting_closes_the_breaker() -> None:
    calls: list[str] = []
    watch = _watch(calls)
    for _ in range(AgentBreaker.THRESHOLD + 2):
        _round(watch, (REF,))
    before = calls.count("hung")
    watch._event(AgentEvent(REF, state=1, reason=2))  # connected
    for job in watch._sched.pop_due(time.monotonic() + 1.0, 8):
        watch._run_job(job)
    assert calls.count("hung") == before + 1


def test_a_lost_connection_does_not_count_against_the_agent() -> None:
    # Every agent call on a connection that is going away fails or times out: that says
    # nothing of the guest, and must not make it wait once the host is back.
    calls: list[str] = []
    watch = _watch(calls)
    session = watch.sessions[HOST]

    def lost_meanwhile(_conn: Any, _dom: Any, job: Job) -> JobResult:
        calls.append(job.ref.name)
        session.mark_lost(session.conn)  # its close callback, while the agent call hung
        return JobResult(record={}, line="", view=_view(job.ref, "unresponsive"))

    watch._worker._reconcile_fn = lost_meanwhile
    for _ in range(AgentBreaker.THRESHOLD + 2):
        session._lost.clear()
        _round(watch, (REF,))
    assert calls.count("hung") == AgentBreaker.THRESHOLD + 2
    assert watch._breaker.failures(REF.key) == 0


def test_backoff_grows_and_is_bounded() -> None:
    breaker = AgentBreaker()
    key = REF.key
    waits = []
    for i in range(20):
        until = breaker.record(key, unresponsive=True, now=100.0)
        if i + 1 < AgentBreaker.THRESHOLD:
            assert until is None
        else:
            assert until is not None
            waits.append(until - 100.0)
    assert waits[0] == AgentBreaker.FIRST_WAIT and waits[1] == 2 * AgentBreaker.FIRST_WAIT
    assert max(waits) == AgentBreaker.MAX_WAIT
    assert breaker.record(key, unresponsive=False, now=200.0) is None
    assert breaker.record(key, unresponsive=True, now=200.0) is None  # counting again


def test_no_agent_lease_on_the_host_does_not_count_against_the_agent() -> None:
    # Every agent lease of the host's connection was out (other hung guests): this guest's
    # agent was never asked, and its breaker must not open for a cap of the host.
    calls: list[str] = []
    watch = _watch(calls)

    def no_lease(_conn: Any, _dom: Any, job: Job) -> JobResult:
        calls.append(job.ref.name)
        agent = AgentStatus(configured=True, state="unresponsive", asked=False)
        view = dataclasses.replace(_view(job.ref, "unresponsive"), agent=agent)
        return JobResult(record={}, line="", view=view)

    watch._worker._reconcile_fn = no_lease
    for _ in range(AgentBreaker.THRESHOLD + 2):
        _round(watch, (REF,))
    assert calls.count("hung") == AgentBreaker.THRESHOLD + 2
    assert watch._breaker.failures(REF.key) == 0


def test_the_agent_read_says_when_the_host_had_no_lease_to_ask_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from virthotplug.core.workpool import CallResult
    from virthotplug.host import agentread
    from virthotplug.host.connection import NoLeaseError

    def read(ref: DomainRef) -> Any:
        return SimpleNamespace(view=_view(ref, "unknown"), context=None, dom=None)

    errors = {
        REF.uuid: NoLeaseError("guest agent not asked: 16 guest-agent calls are still out"),
        OTHER.uuid: AgentUnavailableError("domain 'ok': guest agent is not responding"),
    }
    monkeypatch.setattr(
        agentread,
        "_query_agents",
        lambda _c, raws, _w, _t: [CallResult(error=errors[r.view.uuid]) for r in raws],
    )
    monkeypatch.setattr(agentread, "_channel_disconnected", lambda _dom: False)
    views = agentread.guest_layers(None, [read(REF), read(OTHER)], agent_timeout=1, workers=2)  # type: ignore[arg-type, list-item]
    assert [(v.agent.state, v.agent.asked) for v in views] == [
        ("unresponsive", False),
        ("unresponsive", True),
    ]
