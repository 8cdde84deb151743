"""The reconcile scheduler: coalescing, one job per domain at a time, due times."""

from __future__ import annotations

from virthotplug.core.events import DomainRef
from virthotplug.core.schedule import MAX_REASONS, ReconcileQueue

A = DomainRef("qemu:///system", "uuid-a", "a")
B = DomainRef("qemu:///system", "uuid-b", "b")


def test_request_then_pop_when_due() -> None:
    q = ReconcileQueue()
    q.request(A, due=10.0, at=9.0, reason="ost")
    assert q.pop_due(9.99, limit=8) == []
    assert q.next_due() == 10.0
    (job,) = q.pop_due(10.0, limit=8)
    assert job.ref == A and job.reasons == ["ost"] and job.first_request == 9.0
    assert len(q) == 0 and q.running == 1


def test_burst_coalesces_into_one_job() -> None:
    q = ReconcileQueue()
    for i in range(1000):
        q.request(A, due=1.0, at=float(i) / 1000, reason="lifecycle" if i % 2 else "agent")
    (job,) = q.pop_due(2.0, limit=8)
    assert job.coalesced == 1000
    assert set(job.reasons) == {"lifecycle", "agent"}
    assert job.first_request == 0.0


def test_a_tick_never_cuts_grace_short() -> None:
    q = ReconcileQueue()
    q.request(A, due=0.0, at=0.0, reason="grace", hotadded=frozenset({1}), not_before=5.0)
    q.request(A, due=1.0, at=1.0, reason="host")
    assert q.pop_due(4.0, limit=8) == []
    assert q.next_due() == 5.0
    (job,) = q.pop_due(5.0, limit=8)
    assert job.hotadded == {1}


def test_a_flood_of_requests_cannot_push_its_own_job_back() -> None:
    # Each OST asks for a reconcile 0.1 s after it; a guest sending one every 10 ms must
    # not keep its job 0.1 s in the future for ever.
    q = ReconcileQueue()
    for i in range(1000):
        q.request(A, due=i / 100 + 0.1, at=i / 100, reason="ost")
    (job,) = q.pop_due(0.1, limit=8)
    assert job.coalesced == 1000


def test_one_job_per_domain_at_a_time() -> None:
    q = ReconcileQueue()
    q.request(A, due=0.0, at=0.0, reason="ost")
    assert len(q.pop_due(1.0, limit=8)) == 1
    q.request(A, due=0.0, at=0.5, reason="agent")  # arrives while the first one runs
    assert q.pop_due(1.0, limit=8) == []
    assert q.next_due() is None  # a running domain's pending job is not "due" yet
    q.finish(A.key)
    (job,) = q.pop_due(1.0, limit=8)
    assert job.reasons == ["agent"]


def test_limit_bounds_parallel_jobs_earliest_first() -> None:
    q = ReconcileQueue()
    refs = [DomainRef("h", f"u{i}", f"d{i}") for i in range(5)]
    for i, ref in enumerate(refs):
        q.request(ref, due=float(5 - i), at=0.0, reason="tick")
    jobs = q.pop_due(10.0, limit=2)
    assert [j.ref.name for j in jobs] == ["d4", "d3"]
    assert q.pop_due(10.0, limit=0) == []


def test_forget_drops_pending_work() -> None:
    q = ReconcileQueue()
    q.request(A, due=0.0, at=0.0, reason="ost")
    q.request(B, due=0.0, at=0.0, reason="ost")
    q.forget(A.key)
    assert [j.ref for j in q.pop_due(1.0, limit=8)] == [B]


def test_reasons_are_bounded() -> None:
    q = ReconcileQueue()
    for i in range(50):
        q.request(A, due=0.0, at=0.0, reason=f"r{i}")
    (job,) = q.pop_due(1.0, limit=8)
    assert len(job.reasons) == MAX_REASONS


def test_event_driven_jobs_go_before_a_resync_backlog() -> None:
    # A resync of 1000 domains is due first; a hot-add arriving 0.1 s later still goes first.
    q = ReconcileQueue()
    refs = [DomainRef("h", f"u{i}", f"d{i}") for i in range(1000)]
    for ref in refs:
        q.request(ref, due=0.0, at=0.0, reason="host")
    q.request(A, due=0.1, at=0.1, reason="ost", hotadded=frozenset({1}))
    (first,) = q.pop_due(1.0, limit=1)
    assert first.ref == A
    # A resync request merged into an event-driven job keeps the job's priority.
    q.request(B, due=0.5, at=0.5, reason="agent")
    q.request(B, due=0.5, at=0.5, reason="host")
    (second,) = q.pop_due(1.0, limit=1)
    assert second.ref == B
    assert [j.ref.name for j in q.pop_due(1.0, limit=2)] == ["d0", "d1"]
