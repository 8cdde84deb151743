"""A suppressed domain is listened to again only once its vCPUs are idle: the quiet probe of
``MonitorSubscriptions`` (daemon/subscriptions.py), run on its thread against a fake host."""

from __future__ import annotations

import logging
from typing import Any, Optional

import pytest

from virthotplug.core import errors
from virthotplug.daemon.flood import FloodGuard
from virthotplug.daemon.subscriptions import MonitorSubscriptions, _busiest, _Reading

HOST = "qemu:///system"
UUID = "uuid-a"
SECOND = 10**9


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Domain:
    def __init__(self, host: _Host) -> None:
        self._host = host
        self.name, self.uuid = "dom-a", UUID

    def vcpu_times(self) -> dict[int, int]:
        if self._host.times is None:
            raise errors.UnsupportedError("domain 'dom-a' vCPU times: not supported")
        if self._host.clock is not None:  # libvirtd answers this late
            self._host.clock.now += self._host.answer_after
        return dict(self._host.times)


class _Host:
    """What the probe uses of a Connection."""

    monitoring = True

    def __init__(self, clock: Optional[_Clock] = None, answer_after: float = 0.0) -> None:
        self.times: Optional[dict[int, int]] = {0: 0, 1: 0}
        self.registered: list[str] = []
        self.clock, self.answer_after = clock, answer_after

    def domain_by_uuid(self, uuid: str) -> _Domain:
        return _Domain(self)

    def monitored(self) -> frozenset[str]:
        return frozenset(self.registered)

    def monitor_domain(self, dom: Any) -> bool:
        self.registered.append(dom.uuid)
        return True


def _suppressed(clock: _Clock) -> FloodGuard:
    guard = FloodGuard(clock, threshold=10, backoff_first=30.0)
    for _ in range(11):
        guard.admit((HOST, UUID), lambda: "dom-a", "ost", monitor=True)
    clock.now += 30.0
    assert guard.is_suppressed((HOST, UUID))
    return guard


def _probe(subs: MonitorSubscriptions, host: _Host, clock: _Clock, t: float) -> None:
    clock.now = t  # the same clock for the guard and the vCPU-time reads
    subs._probe(host, UUID)  # type: ignore[arg-type]


def test_a_busy_vcpu_keeps_monitor_events_off(caplog: pytest.LogCaptureFixture) -> None:
    clock, host = _Clock(), _Host()
    guard = _suppressed(clock)
    subs = MonitorSubscriptions(HOST, lambda: None, guard, clock)
    caplog.set_level(logging.INFO, logger="virthotplug.daemon.subscriptions")
    _probe(subs, host, clock, 1030.0)  # the first read decides nothing
    host.times = {0: SECOND // 100, 1: 97 * SECOND // 100}  # vcpu1 flooding: 97 %
    _probe(subs, host, clock, 1031.0)
    assert host.registered == [] and guard.is_suppressed((HOST, UUID))
    host.times = {0: SECOND // 50, 1: 2 * SECOND}
    _probe(subs, host, clock, 1032.0)  # still busy: said once only
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["domain 'dom-a': monitor events still off: vcpu1 is 97 % busy"]
    host.times = {0: SECOND // 50 + 1000, 1: 2 * SECOND + 1000}  # the flood stopped
    _probe(subs, host, clock, 1042.0)
    assert host.registered == [UUID] and not guard.is_suppressed((HOST, UUID))
    assert caplog.records[-1].getMessage() == (
        "domain 'dom-a': quiet again: listening to its monitor events"
    )


def test_without_vcpu_times_the_back_off_alone_decides() -> None:
    clock, host = _Clock(), _Host()
    guard = _suppressed(clock)
    host.times = None
    _probe(MonitorSubscriptions(HOST, lambda: None, guard, clock), host, clock, 1030.0)
    assert host.registered == [UUID]


class _Gone(_Host):
    def domain_by_uuid(self, uuid: str) -> _Domain:
        raise errors.NoDomainError(f"no domain with UUID {uuid}")


def test_a_probe_that_finds_no_domain_ends_the_probes() -> None:
    # A transient domain destroyed while its stop event was lost: probed once more, then
    # never again (it used to be probed every second, forever).
    clock = _Clock()
    guard = _suppressed(clock)
    _probe(MonitorSubscriptions(HOST, lambda: None, guard, clock), _Gone(), clock, 1030.0)
    probed = []
    for _ in range(600):
        clock.now += 1.0
        probed += guard.collect()[1]
    assert probed == []


def test_a_late_answer_does_not_make_a_busy_vcpu_look_idle() -> None:
    # Under a flood libvirtd answered the first read 11 s after it was asked; vcpu1 used
    # 0.97 s of CPU in the 1 s between that answer and the next read: busy, not 8 %.
    clock = _Clock()
    host = _Host(clock, answer_after=11.0)
    guard = _suppressed(clock)
    subs = MonitorSubscriptions(HOST, lambda: None, guard, clock)
    _probe(subs, host, clock, 1030.0)  # answered at 1041
    host.answer_after = 0.0
    host.times = {0: 0, 1: 97 * SECOND // 100}
    _probe(subs, host, clock, 1042.0)
    assert host.registered == [] and guard.is_suppressed((HOST, UUID))


def test_reads_too_close_together_decide_nothing() -> None:
    # Two probes queued behind a slow answer read the vCPU times 2 ms apart: the flooding
    # vCPU's time had not moved a clock tick, and it was taken for idle.
    clock, host = _Clock(), _Host()
    guard = _suppressed(clock)
    subs = MonitorSubscriptions(HOST, lambda: None, guard, clock)
    _probe(subs, host, clock, 1030.0)
    host.times = {0: 0, 1: 97 * SECOND // 100}
    _probe(subs, host, clock, 1031.0)  # busy: 97 %
    _probe(subs, host, clock, 1031.002)  # the same times, 2 ms later
    assert host.registered == [] and guard.is_suppressed((HOST, UUID))
    host.times = {0: 0, 1: 2 * 97 * SECOND // 100}
    _probe(subs, host, clock, 1032.0)  # measured from the read at 1031: still busy
    assert host.registered == [] and guard.is_suppressed((HOST, UUID))


def test_busiest_leaves_out_vcpus_plugged_in_between() -> None:
    before = _Reading(0.0, 0.0, {0: 0, 1: 0})
    after = _Reading(2.0, 2.0, {0: SECOND // 10, 1: SECOND // 2, 2: 10 * SECOND})
    assert _busiest(before, after) == (0.25, 1)
    assert _busiest(before, _Reading(1.0, 1.0, {})) == (0.0, 0)
