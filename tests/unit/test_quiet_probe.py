"""A suppressed domain is listened to again only once its vCPUs are idle: the quiet probe of
``MonitorSubscriptions`` (daemon/subscriptions.py), run on its thread against a fake host."""

from __future__ import annotations

import logging
from typing import Any, Optional

import pytest

from virthotplug.core import errors
from virthotplug.daemon.flood import FloodGuard
from virthotplug.daemon.subscriptions import MonitorSubscriptions, _busiest

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
        return dict(self._host.times)


class _Host:
    """What the probe uses of a Connection."""

    monitoring = True

    def __init__(self) -> None:
        self.times: Optional[dict[int, int]] = {0: 0, 1: 0}
        self.registered: list[str] = []

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


def test_busiest_leaves_out_vcpus_plugged_in_between() -> None:
    before = (0.0, {0: 0, 1: 0})
    after = (2.0, {0: SECOND // 10, 1: SECOND // 2, 2: 10 * SECOND})
    assert _busiest(before, after) == (0.25, 1)
    assert _busiest(before, (1.0, {})) == (0.0, 0)
