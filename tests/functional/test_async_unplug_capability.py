"""Without libvirt 12.4 on both ends (here: the test driver, through this machine's client
library) a shrink is the synchronous one it always was: no async flag, no vcpu-removed
registration; the capability record says so once, at open."""

from __future__ import annotations

from typing import Any

import pytest
from tdriver import MIXED, run_cli

from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain

Capsys = pytest.CaptureFixture[str]


def test_the_record_has_neither_without_libvirt_12_4() -> None:
    with Connection(MIXED) as conn:
        support = conn.support
        assert not support.async_unplug and not support.vcpu_removed_event
        assert support.to_dict()["async_unplug"] is False
        assert support.to_dict()["vcpu_removed_event"] is False


def test_a_shrink_without_the_capability_sends_no_async_flag(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, int]] = []
    original = Domain.set_vcpus

    def spy(self: Domain, count: int, **kwargs: Any) -> None:
        sent.append((count, kwargs.get("async_flag", 0)))
        original(self, count, **kwargs)

    monkeypatch.setattr(Domain, "set_vcpus", spy)
    grown = run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", "3", "--json")
    shrunk = run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", "2", "--json")
    doc = shrunk.json()
    live = doc["checks"][0]
    assert grown.json()["checks"][0]["ok"] and (live["layer"], live["ok"]) == ("live", True)
    assert sent == [(3, 0), (2, 0)]
    assert "guest-ejected" not in doc["timings"] and doc["repeated_unplug"] is None
