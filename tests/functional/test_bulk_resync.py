"""The daemon's bulk resync on the test driver: first sight reconciles every running domain,
a quiet host then none; definitions come from the cache except what the stats cannot tell
(the test driver's live vCPU counts); events invalidate; agents are asked only where the
policy may act or the last guest reading had findings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from test_collect_calls import node

from virthotplug.core.config import HostConfig, WatchSettings, parse_config
from virthotplug.daemon.resync import BulkResync
from virthotplug.host.connection import Connection


@dataclass
class Holder:
    config: HostConfig = field(default_factory=HostConfig)
    settings: WatchSettings = field(default_factory=WatchSettings)


def test_a_quiet_host_gets_no_reconcile_after_the_first_resync(tmp_path: Path) -> None:
    uri = node(tmp_path / "node.xml", 12)
    resync = BulkResync(Holder())
    with Connection(uri) as conn:
        first = resync.run(conn)
        assert first.running == 12 and len(first.reconcile) == 12  # first sight
        assert first.definition_reads == 24  # inactive and live, each domain
        second = resync.run(conn)
        assert second.reconcile == ()
        assert second.definition_reads == 12  # only the live XML: no vCPU counts in stats
        resync.invalidate(conn.uri, first.listed[0].uuid)
        third = resync.run(conn)
        assert third.definition_reads == 13 and third.reconcile == ()


def test_agents_asked_only_where_the_policy_acts(tmp_path: Path) -> None:
    uri = node(tmp_path / "node.xml", 6)
    text = "[defaults]\nmode = report\n\n[domain:d0[01]]\nmode = online\n"
    holder = Holder(config=parse_config(text, path=str(tmp_path / "conf")))
    resync = BulkResync(holder)
    with Connection(uri) as conn:
        assert resync.run(conn).agents_asked == 6  # nothing known yet
        # The test driver's agent is unsupported (no guest layer): only the acting ones.
        assert resync.run(conn).agents_asked == 2


def test_a_new_connection_starts_afresh(tmp_path: Path) -> None:
    uri = node(tmp_path / "node.xml", 3)
    resync = BulkResync(Holder())
    with Connection(uri) as conn:
        resync.run(conn)
    with Connection(uri) as conn:
        again = resync.run(conn)
    assert len(again.reconcile) == 3 and again.definition_reads == 6
