"""Tests for virthotplug.host.actions: writes with bounded retries, and outcome codes."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Optional

import pytest

from virthotplug.core import errors
from virthotplug.core.cpulist import format_cpulist, parse_cpulist
from virthotplug.core.policy import Plan, Policy, decide
from virthotplug.core.view import (
    AGENT_CONNECTED,
    AGENT_NOT_CONNECTED,
    AgentStatus,
    CountLayer,
    GuestLayer,
    VcpuView,
)
from virthotplug.host import actions
from virthotplug.host.actions import (
    EXCLUDED,
    FAILED,
    OFFLINED,
    ONLINED,
    ONLINED_BY_GUEST,
    SKIPPED,
    UNCHANGED,
    CpuOutcome,
    WriteResult,
    execute,
    outcomes,
)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actions, "RETRY_INITIAL", 0.0)
    monkeypatch.setattr(actions, "RETRY_MAX", 0.0)


class FakeDom:
    """The ``host.domain.Domain`` calls actions makes, answered by a FakeGuest."""

    name = "dom"

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest

    def guest_vcpus(self) -> dict[str, str]:
        return self.guest.guest_vcpus(self)

    def set_guest_vcpus(self, cpulist: str, online: bool) -> None:
        self.guest.set_guest_vcpus(self, cpulist, online)


class FakeGuest:
    """A guest behind a fake connection: scripted failures, partial successes, hangs."""

    def __init__(self, present: str, online: str) -> None:
        self.present = set(parse_cpulist(present))
        self.online = set(parse_cpulist(online))
        self.calls: list[tuple[str, str]] = []
        self.failures: list[Exception] = []  # raised by the next writes, in order
        self.apply_before_failing = False  # a failure after the guest changed (partial)
        self.hang: Optional[threading.Event] = None

    # what FakeDom forwards
    def guest_vcpus(self, _dom: Any) -> dict[str, str]:
        self.calls.append(("read", ""))
        return {
            "vcpus": format_cpulist(self.present),
            "online": format_cpulist(self.online),
            "offlinable": format_cpulist(self.present - {0}),
        }

    def set_guest_vcpus(self, _dom: Any, cpulist: str, online: bool) -> None:
        self.calls.append(("online" if online else "offline", cpulist))
        if self.hang is not None:
            hang, self.hang = self.hang, None
            self._apply(cpulist, online)  # the write lands, the answer never comes
            hang.wait(5)
            return
        if self.failures:
            if self.apply_before_failing:
                self._apply(cpulist, online)
            raise self.failures.pop(0)
        self._apply(cpulist, online)

    def _apply(self, cpulist: str, online: bool) -> None:
        cpus = parse_cpulist(cpulist)
        if online:
            self.online |= cpus
        else:
            self.online -= cpus

    @property
    def writes(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] != "read"]


def plan(online: str = "", offline: str = "") -> Plan:
    return Plan(online=parse_cpulist(online), offline=parse_cpulist(offline))


def run(guest: FakeGuest, the_plan: Plan, retries: int = 3, timeout: float = 2.0) -> Any:
    return execute(
        FakeDom(guest),  # type: ignore[arg-type]
        the_plan,
        policy=Policy(mode="online", retries=retries),
        agent_timeout=timeout,
        maximum=8,
    )


def test_success_needs_one_write_and_no_read() -> None:
    guest = FakeGuest("0-3", "0")
    (result,) = run(guest, plan(online="1-3"))
    assert result == WriteResult(online=True, cpus=frozenset({1, 2, 3}), attempts=1)
    assert guest.calls == [("online", "1-3")]


def test_online_then_offline() -> None:
    guest = FakeGuest("0-3", "0-1")
    results = run(guest, plan(online="2", offline="1"))
    assert [r.online for r in results] == [True, False]
    assert guest.writes == [("online", "2"), ("offline", "1")]


def test_transient_error_is_retried_after_a_reread() -> None:
    guest = FakeGuest("0-3", "0")
    guest.failures = [errors.AgentUnavailableError("agent not connected")]
    (result,) = run(guest, plan(online="1-3"))
    assert result.error is None and result.attempts == 2
    assert guest.calls == [("online", "1-3"), ("read", ""), ("online", "1-3")]


def test_retry_writes_only_what_a_partial_success_left() -> None:
    guest = FakeGuest("0-3", "0")
    guest.failures = [errors.TransientError("cannot acquire state change lock")]
    guest.apply_before_failing = True
    (result,) = run(guest, plan(online="1-3"))
    # The failed write changed the guest: the re-read finds nothing left to do.
    assert result.error is None and result.attempts == 2
    assert guest.writes == [("online", "1-3")]


def test_timeout_during_a_write_rereads_before_anything_else() -> None:
    guest = FakeGuest("0-3", "0")
    guest.hang = release = threading.Event()
    try:
        (result,) = run(guest, plan(online="2-3"), timeout=0.2)
    finally:
        release.set()
    assert result.error is None and result.attempts == 2
    # The write landed although it never answered: the re-read shows it, no second write.
    assert guest.calls == [("online", "2-3"), ("read", "")]


@pytest.mark.parametrize(
    "permanent",
    [
        errors.UnsupportedError("not supported"),
        errors.InvalidRequestError("vCPU '0' is not offlinable"),
        errors.NotRunningError("domain is not running"),
        errors.NoDomainError("no domain"),
        errors.AgentNotConfiguredError("guest agent is not configured"),
        errors.GuestDataError("garbage"),
    ],
)
def test_permanent_errors_are_never_retried(permanent: Exception) -> None:
    guest = FakeGuest("0-3", "0")
    guest.failures = [permanent, permanent]
    (result,) = run(guest, plan(online="1"))
    assert result.attempts == 1 and result.error == str(permanent)
    assert guest.calls == [("online", "1")]


def test_retries_are_bounded() -> None:
    guest = FakeGuest("0-3", "0")
    guest.failures = [errors.AgentUnavailableError("down")] * 10
    (result,) = run(guest, plan(online="1"), retries=2)
    assert result.attempts == 3 and result.error == "down"


def test_retries_zero_means_one_attempt() -> None:
    guest = FakeGuest("0-3", "0")
    guest.failures = [errors.AgentUnavailableError("down")]
    (result,) = run(guest, plan(online="1"), retries=0)
    assert result.attempts == 1 and result.error == "down"


@pytest.mark.parametrize(
    "host_error", [errors.ConnectError("lost"), errors.PermissionDeniedError("read only")]
)
def test_host_errors_propagate(host_error: Exception) -> None:
    guest = FakeGuest("0-3", "0")
    guest.failures = [host_error]
    with pytest.raises(type(host_error)):
        run(guest, plan(online="1"))


# --- outcomes -------------------------------------------------------------------------------


def view(online: str, present: str = "0-3", agent: str = AGENT_CONNECTED) -> VcpuView:
    guest = None
    if agent == AGENT_CONNECTED:
        ids = parse_cpulist(present)
        guest = GuestLayer(present=ids, online=parse_cpulist(online), offlinable=ids - {0})
    return VcpuView(
        host="h",
        name="dom",
        uuid="u",
        state="running",
        persistent=True,
        agent=AgentStatus(configured=True, state=agent, error=None),
        live=CountLayer(current=4, maximum=4),
        guest=guest,
    )


def codes(found: tuple[CpuOutcome, ...]) -> dict[str, tuple[int, ...]]:
    return {o.code: o.cpus for o in found}


def test_outcome_onlined() -> None:
    policy = Policy(mode="online")
    before = view("0")
    the_plan = decide(before, policy)
    write = WriteResult(True, the_plan.online, 1)
    assert codes(outcomes(policy, the_plan, before, view("0-3"), (write,))) == {ONLINED: (1, 2, 3)}


def test_outcome_failed_with_decoded_reason_and_partial_success() -> None:
    policy = Policy(mode="online")
    before = view("0")
    the_plan = decide(before, policy)
    write = WriteResult(True, the_plan.online, 4, "guest agent is not connected")
    found = outcomes(policy, the_plan, before, view("0-1"), (write,))
    assert codes(found) == {ONLINED: (1,), FAILED: (2, 3)}
    assert [o.reason for o in found if o.code == FAILED] == ["guest agent is not connected"]


def test_outcome_unverifiable_write_fails() -> None:
    policy = Policy(mode="online")
    before = view("0")
    the_plan = decide(before, policy)
    write = WriteResult(True, the_plan.online, 1)
    found = outcomes(policy, the_plan, before, view("", agent=AGENT_NOT_CONNECTED), (write,))
    assert codes(found) == {FAILED: (1, 2, 3)} and "cannot verify" in found[0].reason


def test_outcome_offlined() -> None:
    policy = Policy(mode="match", count=2)
    before = view("0-3")
    the_plan = decide(before, policy)
    write = WriteResult(False, the_plan.offline, 1)
    assert codes(outcomes(policy, the_plan, before, view("0-1"), (write,))) == {OFFLINED: (2, 3)}


def test_outcome_onlined_by_guest_means_no_write() -> None:
    policy = Policy(mode="online")
    before = view("0-1", present="0-1")  # the guest's own rule onlined hot-added CPU 1
    the_plan = decide(before, policy)
    found = outcomes(policy, the_plan, before, before, (), hotadded=frozenset({1}))
    assert the_plan.is_noop
    assert codes(found) == {ONLINED_BY_GUEST: (1,), UNCHANGED: ()}


def test_outcome_onlined_by_guest_next_to_our_writes() -> None:
    policy = Policy(mode="online")
    before = view("0-1")
    the_plan = decide(before, policy)
    write = WriteResult(True, the_plan.online, 1)
    found = outcomes(policy, the_plan, before, view("0-3"), (write,), hotadded=frozenset({1, 2}))
    assert codes(found) == {ONLINED_BY_GUEST: (1,), ONLINED: (2, 3)}


def test_outcome_hotadded_but_offline_is_ours() -> None:
    policy = Policy(mode="online")
    before = view("0")
    the_plan = decide(before, policy)
    write = WriteResult(True, the_plan.online, 1)
    found = outcomes(policy, the_plan, before, view("0-3"), (write,), hotadded=frozenset({1}))
    assert codes(found) == {ONLINED: (1, 2, 3)}


def test_outcome_skipped_for_report_ignore_and_no_guest() -> None:
    for policy, before in (
        (Policy(mode="report"), view("0")),
        (Policy(mode="ignore"), view("0")),
        (Policy(mode="online"), view("", agent=AGENT_NOT_CONNECTED)),
    ):
        the_plan = decide(before, policy)
        (found,) = outcomes(policy, the_plan, before, before, ())
        assert found.code == SKIPPED and found.reason == the_plan.note


def test_outcome_excluded_and_unchanged() -> None:
    policy = Policy(mode="online", exclude=frozenset({3}))
    before = view("0-2")
    the_plan = decide(before, policy)
    assert codes(outcomes(policy, the_plan, before, before, ())) == {
        EXCLUDED: (3,),
        UNCHANGED: (),
    }


def test_outcome_dry_run_reports_only_observations() -> None:
    policy = Policy(mode="online", exclude=frozenset({3}))
    before = view("0")
    the_plan = decide(before, policy)
    assert codes(outcomes(policy, the_plan, before, None, ())) == {EXCLUDED: (3,)}


def test_outcome_to_dict() -> None:
    assert CpuOutcome(ONLINED, (1, 2), "").to_dict() == {
        "code": "onlined",
        "cpus": [1, 2],
        "reason": "",
    }
    assert replace(CpuOutcome(FAILED), reason="x").to_dict()["reason"] == "x"
