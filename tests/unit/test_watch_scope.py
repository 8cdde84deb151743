"""watch --domain GLOB / [watch] domains: the daemon acts only on the domains in its scope;
the others' events are dropped at once (no record, no job, no monitor registration) and
the resync does not read them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from virthotplug.core.config import WatchSettings, parse_config
from virthotplug.core.errors import ConfigError
from virthotplug.core.events import DomainRef, HookEvent, HostEvent, LifecycleEvent
from virthotplug.core.schedule import Job
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.results import JobResult
from virthotplug.daemon.watch import Watch

HOST = "test:///default"
UUID = "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01"
STARTED = 2


def _never(_conn: Any, _dom: Any, _job: Job) -> JobResult:
    raise AssertionError("not reached")


def test_domains_setting_is_parsed() -> None:
    config = parse_config(f"[watch]\ndomains = web-* db-1,\n  {UUID}\n", path="x.conf")
    assert config.watch.domains == ("web-*", "db-1", UUID)
    assert config.watch.watches("web-7", "u") and config.watch.watches("x", UUID.upper())
    assert not config.watch.watches("db-2", "u")
    assert WatchSettings().watches("anything", "u")  # no setting: every domain


def test_an_empty_list_is_every_domain_and_other_keys_still_fail() -> None:
    assert parse_config("[watch]\ndomains = ,\n", path="x.conf").watch.domains == ()
    with pytest.raises(ConfigError, match="domain"):
        parse_config("[watch]\ndomain = web-*\n", path="x.conf")


def _ref(name: str) -> DomainRef:
    return DomainRef(HOST, f"uuid-{name}", name)


def test_events_of_domains_out_of_scope_are_dropped() -> None:
    settings = dataclasses.replace(WatchSettings(), domains=("web-*",))
    seen: list[Any] = []
    watch = Watch([HOST], settings, _never, EventLog(None))
    watch._observer = type("O", (), {"event": lambda _s, ev: seen.append(ev)})()  # type: ignore[assignment]
    watch._event(LifecycleEvent(_ref("db-1"), event=STARTED, detail=0))
    watch._event(HookEvent(_ref("db-1"), operation="started", sub_operation="begin"))
    assert len(watch._sched) == 0 and seen == []
    watch._event(LifecycleEvent(_ref("web-1"), event=STARTED, detail=0))
    assert len(watch._sched) == 1


def test_the_resync_listing_is_filtered() -> None:
    settings = dataclasses.replace(WatchSettings(), domains=("web-*",))
    watch = Watch([HOST], settings, _never, EventLog(None))
    refs = (_ref("db-1"), _ref("web-1"), _ref("web-2"))
    watch._host_event(HostEvent(None, host=HOST, what="listed", domains=refs))
    assert sorted(j.ref.name for j in watch._sched.pop_due(1e12, 10)) == ["web-1", "web-2"]
