"""The daemon's bulk resync on the test driver: first sight reconciles every running domain,
a quiet host then none; definitions come from the cache except what the stats cannot tell
(the test driver's live vCPU counts); events invalidate; agents are asked only where the
policy may act or the last guest reading had findings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from test_collect_calls import node

from virthotplug.core.config import HostConfig, WatchSettings, parse_config
from virthotplug.core.cpulist import parse_cpulist
from virthotplug.core.drift import (
    GUEST_CPU_KEPT_OFFLINE,
    GUEST_CPU_OFFLINE,
    GUEST_MISSING_VCPUS,
    GUEST_REJECTED_VCPU,
)
from virthotplug.core.view import (
    AGENT_CONNECTED,
    HISTORY_REJECTED,
    INFO,
    WARNING,
    AgentStatus,
    GuestLayer,
    History,
    HistoryEntry,
    VcpuView,
)
from virthotplug.daemon.resync import BulkResync
from virthotplug.host import collect
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
        assert second.definition_reads == 0  # the live counts (virDomainGetInfo) unchanged
        resync.invalidate(conn.uri, first.listed[0].uuid)
        third = resync.run(conn)
        assert third.definition_reads == 2 and third.reconcile == ()


def test_a_live_count_changed_without_an_event_is_read_again(tmp_path: Path) -> None:
    """The test driver's stats carry no vCPU counts: the live count from virDomainGetInfo
    is what tells the cached live definition is out of date."""
    uri = node(tmp_path / "node.xml", 3)
    resync = BulkResync(Holder())
    with Connection(uri) as conn:
        resync.run(conn)
        conn.lookup("d01").raw.setVcpusFlags(2, 1)  # live, and no event on this driver
        again = resync.run(conn)
        assert again.definition_reads == 2  # d01's two definitions, nothing else
        assert [ref.name for ref in again.reconcile] == ["d01"]  # its findings changed


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


def test_ignore_domains_agents_are_never_asked(tmp_path: Path) -> None:
    uri = node(tmp_path / "node.xml", 4)
    text = "[defaults]\nmode = ignore\n\n[domain:d00]\nmode = report\n"
    resync = BulkResync(Holder(config=parse_config(text, path=str(tmp_path / "conf"))))
    with Connection(uri) as conn:
        assert resync.run(conn).agents_asked == 1  # d00 only, even on first sight


def guest_answering(present: str, online: str) -> Callable[..., list[VcpuView]]:
    """``collect.guest_layers`` as if every agent had answered with these cpulists."""
    guest = GuestLayer(
        present=parse_cpulist(present),
        online=parse_cpulist(online),
        offlinable=parse_cpulist(present) - {0},
    )
    connected = AgentStatus(configured=True, state=AGENT_CONNECTED)

    def layers(_conn: Connection, raws: Any, **_kw: Any) -> list[VcpuView]:
        return [dataclasses.replace(r.view, guest=guest, agent=connected) for r in raws]

    return layers


def findings(result_views: list[VcpuView]) -> dict[str, set[tuple[str, str]]]:
    return {v.name: {(f.code, f.severity) for f in v.findings} for v in result_views}


def test_resync_findings_honour_the_policy(tmp_path: Path, monkeypatch: Any) -> None:
    uri = node(tmp_path / "node.xml", 2)  # 1 vCPU live each: the guest shows 2 present
    text = "[domain:d00]\nmode = match\ncount = 1\n\n[domain:d01]\nmode = report\n"
    seen: list[VcpuView] = []
    resync = BulkResync(
        Holder(config=parse_config(text, path=str(tmp_path / "conf"))),
        on_views=lambda _host, views, _modes: seen.extend(views),
    )
    monkeypatch.setattr(collect, "guest_layers", guest_answering("0-1", "0"))
    with Connection(uri) as conn:
        resync.run(conn)
    by_name = findings(seen)
    # match 1 keeps cpu1 offline on purpose: info; report leaves it offline: a warning.
    assert (GUEST_CPU_KEPT_OFFLINE, INFO) in by_name["d00"]
    assert not any(code == GUEST_CPU_OFFLINE for code, _ in by_name["d00"])
    assert (GUEST_CPU_OFFLINE, WARNING) in by_name["d01"]


def test_resync_judges_with_the_history_a_reconcile_left(tmp_path: Path, monkeypatch: Any) -> None:
    uri = node(tmp_path / "node.xml", 1)
    seen: list[VcpuView] = []
    resync = BulkResync(Holder(), on_views=lambda _host, views, _modes: seen.extend(views))
    monkeypatch.setattr(collect, "guest_layers", guest_answering("0", "0"))
    with Connection(uri) as conn:
        conn.lookup("d00").raw.setVcpusFlags(2, 1)  # live: 2 vCPUs, the guest lists one
        first = resync.run(conn)
        [view] = seen
        assert GUEST_MISSING_VCPUS in {f.code for f in view.findings}
        # A reconcile recorded that the guest rejected vCPU 1 (watch's history).
        rejected = HistoryEntry(kind=HISTORY_REJECTED, vcpu=1, time=1.0, source="watch")
        judged = dataclasses.replace(view, history=History(entries=(rejected,)))
        resync.reconciled(conn.uri, judged)
        seen.clear()
        resync.run(conn)
    assert first.running == 1
    [again] = seen
    codes = {f.code for f in again.findings}
    assert GUEST_REJECTED_VCPU in codes and GUEST_MISSING_VCPUS not in codes


def test_a_reconcile_ending_on_one_host_does_not_wait_for_another_hosts_resync(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A hot-add's reconcile on one host ends (``reconciled``) while a resync of another
    host is still judging its domains: nothing the two share is held across a resync."""
    import threading

    from virthotplug.daemon import resync as resync_module

    judging, release = threading.Event(), threading.Event()
    judge = resync_module.find_drift

    def slow_judge(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "busy-resync":
            judging.set()
            release.wait(10.0)
        return judge(*args, **kwargs)

    resync = BulkResync(Holder())
    with (
        Connection(node(tmp_path / "a.xml", 2)) as quiet,
        Connection(node(tmp_path / "b.xml", 3)) as busy,
    ):
        view = collect.read_views(quiet).views[0]
        resync.run(quiet)
        monkeypatch.setattr(resync_module, "find_drift", slow_judge)
        other = threading.Thread(target=resync.run, args=(busy,), name="busy-resync")
        other.start()
        try:
            assert judging.wait(10.0)
            ended = threading.Thread(target=resync.reconciled, args=(quiet.uri, view))
            ended.start()
            ended.join(2.0)
            assert not ended.is_alive(), "the reconcile waited for the other host's resync"
        finally:
            release.set()
            other.join(10.0)


def test_a_quiet_domain_is_judged_again_only_when_an_input_changes(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A resync judges a domain again only when its stats, definitions, guest layer,
    history or policy changed: a thousand quiet domains cost no judging. What it reports
    and the reconciles it picks are the same either way."""
    from virthotplug.daemon import resync as resync_module

    judged: list[str] = []
    real = resync_module.find_drift

    def counting(view: VcpuView, *args: Any, **kwargs: Any) -> Any:
        judged.append(view.name)
        return real(view, *args, **kwargs)

    monkeypatch.setattr(resync_module, "find_drift", counting)
    uri = node(tmp_path / "node.xml", 4)
    holder = Holder()
    seen: list[list[VcpuView]] = []
    resync = BulkResync(holder, on_views=lambda _host, views, _modes: seen.append(list(views)))
    with Connection(uri) as conn:
        first = resync.run(conn)  # first sight: every agent asked
        resync.run(conn)  # judged from the bulk read alone for the first time
        assert len(judged) == 8
        judged.clear()
        second = resync.run(conn)
        assert judged == [] and second.reconcile == ()
        assert {v.uuid: v for v in seen[-1]} == {v.uuid: v for v in seen[-2]}
        resync.invalidate(conn.uri, first.listed[0].uuid)  # an event named it
        resync.run(conn)
        assert judged == [first.listed[0].name]
        judged.clear()
        conn.lookup("d01").raw.setVcpusFlags(2, 1)  # no event on this driver: the stats tell
        assert [ref.name for ref in resync.run(conn).reconcile] == ["d01"]
        assert judged == ["d01"]
        judged.clear()
        holder.config = parse_config("[defaults]\nmode = ignore\n", path=str(tmp_path / "c"))
        resync.run(conn)  # SIGHUP with another policy: every domain judged under it
        assert sorted(judged) == sorted(ref.name for ref in first.listed)
        judged.clear()
        resync.run(conn)
        assert judged == []
