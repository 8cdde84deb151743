"""Prometheus metrics: what the daemon's events and reconciles turn into, as scraped."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import urllib.error
import urllib.request
from typing import Any, Optional

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from virthotplug.core.errors import EXIT_FAILURE, UsageError, VirtHotplugError
from virthotplug.core.events import DomainRef, HostEvent, LifecycleEvent, OstMonitorEvent
from virthotplug.core.ost import parse_ost_details
from virthotplug.core.records import Record
from virthotplug.core.schedule import Job
from virthotplug.core.view import (
    AgentStatus,
    CountLayer,
    Finding,
    GuestLayer,
    HypervisorLayer,
    VcpuView,
)
from virthotplug.daemon import metrics, metricsserver
from virthotplug.daemon.results import JobResult

HOST = "qemu:///system"
REF = DomainRef(HOST, "9a2b0000-0000-4000-8000-000000000001", "web1")


def samples(m: metrics.Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) → value."""
    text = metrics.Metrics.text(m).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(m: metrics.Metrics, name: str, **labels: str) -> Optional[float]:
    return samples(m).get((name, frozenset(labels.items())))


def view(
    *,
    name: str = "web1",
    online: tuple[int, ...] = (0,),
    present: tuple[int, ...] = (0, 1),
    findings: tuple[Finding, ...] = (),
    agent: str = "connected",
    guest: bool = True,
) -> VcpuView:
    return VcpuView(
        host=HOST,
        name=name,
        uuid=REF.uuid,
        state="running",
        persistent=True,
        agent=AgentStatus(configured=True, state=agent),
        domain_id=3,
        config=CountLayer(current=1, maximum=4),
        live=CountLayer(current=2, maximum=4),
        hypervisor=HypervisorLayer(vcpus={0: "running", 1: "running"}),
        guest=GuestLayer(
            present=frozenset(present), online=frozenset(online), offlinable=frozenset({1})
        )
        if guest
        else None,
        findings=findings,
    )


def record(codes: Any) -> Record:
    return Record("2026-01-31T12:00:00.000Z", HOST, REF.name, REF.uuid, "reconcile", outcome=codes)


def outcome(
    v: Optional[VcpuView],
    codes: str = "unchanged",
    failed: bool = False,
    hotadds_online: frozenset[int] = frozenset(),
    mode: Optional[str] = None,
) -> JobResult:
    return JobResult(
        record=record(codes),
        line="",
        failed=failed,
        view=v,
        hotadds_online=hotadds_online,
        policy_mode=mode,
    )


def job(first: float = 0.0) -> Job:
    return Job(REF, due=first, first_request=first)


def ost(
    vcpu: int,
    source: int = 1,
    status: int = 0,
    mono: Optional[float] = None,
    at: Optional[float] = None,
) -> Any:
    details = json.dumps(
        {
            "info": {
                "device": f"vcpu{vcpu}",
                "source": source,
                "status": status,
                "slot": str(vcpu),
                "slot-type": "CPU",
            }
        }
    )
    extra = {} if mono is None else {"mono": mono}
    if at is not None:
        extra["at"] = at
    return OstMonitorEvent(REF, ost=parse_ost_details(details), **extra)


def pending_hotadds(m: metrics.Metrics) -> int:
    return sum(len(rec.hotadds) for rec in m.domains.records())


def stop(m: metrics.Metrics) -> None:
    """The domain stops (destroyed): the daemon's observer sees the event, and the domain
    is forgotten (``DomainRegistry.forget``, as ``Watch`` does on FORGET events)."""
    m.event(LifecycleEvent(REF, event=5, detail=1))
    m.domains.forget(REF.key)


@pytest.fixture
def m() -> metrics.Metrics:
    return metrics.Metrics()


def test_queue_depth_is_read_at_each_scrape(m: metrics.Metrics) -> None:
    depth = [4]
    m.track_queue(lambda: depth[0])
    assert m.registry.get_sample_value("virthotplug_reconcile_queue_depth") == 4
    depth[0] = 0
    assert m.registry.get_sample_value("virthotplug_reconcile_queue_depth") == 0


# --- --metrics-listen ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9177", ("127.0.0.1", 9177)),
        (":9177", ("127.0.0.1", 9177)),
        ("0.0.0.0:9177", ("0.0.0.0", 9177)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9177", ("::1", 9177)),
        (" 10.0.0.5:80 ", ("10.0.0.5", 80)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert metricsserver.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "http", "1.2.3.4:", "65536", "::1:9177", "a:-1", "1:2x"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--metrics-listen"):
        metricsserver.parse_listen(text)


def test_without_prometheus_client_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with pytest.raises(UsageError) as info:
        metricsserver.start("9177")
    assert "pip install 'virthotplug[metrics]'" in str(info.value)
    assert "\n" not in str(info.value)


# --- per-domain gauges ---------------------------------------------------------------------


def test_reconcile_sets_layers_guest_agent_and_findings(m: metrics.Metrics) -> None:
    offline = Finding("guest-cpu-offline", "warning", "CPU 1 offline", (1,))
    m.reconciled(job(), outcome(view(findings=(offline,))), 0.02)
    dom = {"host": HOST, "domain": "web1"}
    for layer, count in (("config", 1), ("live", 2), ("hypervisor", 2), ("guest", 2)):
        assert value(m, "virthotplug_domain_vcpus", layer=layer, **dom) == count
    assert value(m, "virthotplug_domain_vcpus_maximum", **dom) == 4
    assert value(m, "virthotplug_domain_guest_cpus", state="online", **dom) == 1
    assert value(m, "virthotplug_domain_guest_cpus", state="offline", **dom) == 1
    assert value(m, "virthotplug_domain_agent_connected", **dom) == 1
    finding = {"code": "guest-cpu-offline", "severity": "warning", **dom}
    assert value(m, "virthotplug_domain_finding", **finding) == 1
    assert value(m, "virthotplug_reconciles_total", host=HOST, result="ok") == 1
    assert value(m, "virthotplug_actions_total", host=HOST, outcome="unchanged") == 1
    assert value(m, "virthotplug_reconcile_duration_seconds_count", host=HOST) == 1
    assert (value(m, "virthotplug_domain_last_reconcile_timestamp_seconds", **dom) or 0) > 0


def test_findings_and_guest_series_go_when_they_clear(m: metrics.Metrics) -> None:
    offline = Finding("guest-cpu-offline", "warning", "CPU 1 offline", (1,))
    m.reconciled(job(), outcome(view(findings=(offline,))), 0.01)
    m.reconciled(job(), outcome(view(online=(0, 1), agent="not-connected", guest=False)), 0.01)
    dom = {"host": HOST, "domain": "web1"}
    names = {name for name, _ in samples(m)}
    assert "virthotplug_domain_finding" not in names
    assert "virthotplug_domain_guest_cpus" not in names
    assert value(m, "virthotplug_domain_vcpus", layer="guest", **dom) is None
    assert value(m, "virthotplug_domain_vcpus", layer="live", **dom) == 2
    assert value(m, "virthotplug_domain_agent_connected", **dom) == 0


def test_stopped_domain_series_are_dropped(m: metrics.Metrics) -> None:
    m.reconciled(job(), outcome(view()), 0.01)
    stop(m)  # stopped (destroyed)
    assert not [name for name, _ in samples(m) if name.startswith("virthotplug_domain_")]
    assert value(m, "virthotplug_events_total", host=HOST, kind="lifecycle") == 1


def test_reconcile_begun_before_the_stop_does_not_bring_series_back(m: metrics.Metrics) -> None:
    stop(m)
    m.reconciled(job(), outcome(view()), 5.0)  # started 5 s ago, before the stop
    assert not [name for name, _ in samples(m) if name.startswith("virthotplug_domain_")]
    m.reconciled(job(), outcome(view()), 0.0)  # a later start: back
    assert value(m, "virthotplug_domain_vcpus", host=HOST, domain="web1", layer="live") == 2


def test_renamed_domain_keeps_one_set_of_series(m: metrics.Metrics) -> None:
    m.reconciled(job(), outcome(view(name="old")), 0.01)
    m.reconciled(job(), outcome(view(name="new")), 0.01)
    domains = {dict(labels).get("domain") for name, labels in samples(m) if "domain_" in name}
    assert domains == {"new"}


def test_deferred_and_failed_outcomes_are_counted(m: metrics.Metrics) -> None:
    m.reconciled(job(), outcome(None, codes="deferred"), 0.001)
    m.reconciled(job(), outcome(view(), codes="onlined,failed", failed=True), 0.3)
    m.failed(job(), 0.1)
    for code in ("deferred", "onlined", "failed"):
        assert value(m, "virthotplug_actions_total", host=HOST, outcome=code) == 1
    assert value(m, "virthotplug_reconciles_total", host=HOST, result="failed") == 1
    assert value(m, "virthotplug_reconciles_total", host=HOST, result="error") == 1
    assert value(m, "virthotplug_reconcile_duration_seconds_count", host=HOST) == 3


def modes(m: metrics.Metrics) -> dict[str, str]:
    """domain → policy mode, from the policy info series (one per domain, or it fails)."""
    found: dict[str, str] = {}
    for name, labels in samples(m):
        if name == "virthotplug_domain_policy_info":
            as_dict = dict(labels)
            assert as_dict["domain"] not in found, "two modes for one domain"
            found[as_dict["domain"]] = as_dict["mode"]
    return found


def test_policy_mode_of_the_last_reconcile(m: metrics.Metrics) -> None:
    m.reconciled(job(), outcome(view(), mode="report"), 0.01)
    assert modes(m) == {"web1": "report"}
    assert value(m, "virthotplug_domain_policy_info", host=HOST, domain="web1", mode="report")
    m.reconciled(job(), outcome(view(), mode="online"), 0.01)
    assert modes(m) == {"web1": "online"}  # the old mode's series is gone


def test_policy_mode_of_a_resync(m: metrics.Metrics) -> None:
    m.reconciled(job(), outcome(view(), mode="online"), 0.01)
    m.resynced(HOST, [view()], {REF.uuid: "match"})
    assert modes(m) == {"web1": "match"}
    # The policy became invalid (the resync has no mode for it): no mode series, the
    # domain's other series stay.
    m.resynced(HOST, [view()], {})
    assert modes(m) == {}
    assert value(m, "virthotplug_domain_agent_connected", host=HOST, domain="web1") == 1


def test_policy_mode_goes_with_the_domain(m: metrics.Metrics) -> None:
    m.resynced(HOST, [view()], {REF.uuid: "ignore"})
    assert modes(m) == {"web1": "ignore"}
    stop(m)  # stopped (destroyed)
    assert modes(m) == {}


# --- events, OST and hot-add latency -------------------------------------------------------


def test_ost_events_counted_by_decoded_names(m: metrics.Metrics) -> None:
    m.event(ost(1))
    m.event(ost(1, source=3, status=0x84))
    labels = {"host": HOST, "device": "cpu"}
    hotadd = {"source": "device check", "status": "success", **labels}
    assert value(m, "virthotplug_ost_events_total", **hotadd) == 1
    eject = {"source": "eject request", "status": "ejection in progress", **labels}
    assert value(m, "virthotplug_ost_events_total", **eject) == 1


def test_hostile_ost_codes_cannot_create_series_at_will(m: metrics.Metrics) -> None:
    for code in range(0x20, 0x60):
        m.event(ost(1, source=code, status=code))
    ost_series = [labels for name, labels in samples(m) if name == "virthotplug_ost_events_total"]
    assert len(ost_series) <= 2
    statuses = {dict(labels)["status"] for labels in ost_series}
    assert statuses == {"reserved"}


def test_hotadd_latency_from_ost_to_the_reconcile_that_sees_it_online(m: metrics.Metrics) -> None:
    m.event(ost(1, mono=100.0))
    m.clock = lambda: 100.2
    m.reconciled(job(), outcome(view(online=(0,))), 0.01)  # not online yet: no sample
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) in (None, 0)
    m.clock = lambda: 100.45
    # The reconcile says which OST hot-adds it found online (mapped through the guest).
    m.reconciled(job(), outcome(view(online=(0, 1)), hotadds_online=frozenset({1})), 0.01)
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) == 1
    assert value(m, "virthotplug_hotadd_online_latency_seconds_sum", host=HOST) == pytest.approx(
        0.45
    )
    bucket = {"host": HOST, "le": "0.5"}
    assert value(m, "virthotplug_hotadd_online_latency_seconds_bucket", **bucket) == 1
    m.reconciled(job(), outcome(view(online=(0, 1)), hotadds_online=frozenset({1})), 0.01)
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) == 1  # once
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) == 1


def test_hotadd_latency_follows_the_guest_cpu_not_the_vcpu_id(m: metrics.Metrics) -> None:
    # virsh setvcpu DOM 3 --enable --live: OST names vcpu3, the guest calls it cpu1. A guest
    # that happens to have a cpu3 online must not end the measurement; the mapping does.
    m.event(ost(3, mono=100.0))
    m.clock = lambda: 100.3
    m.reconciled(job(), outcome(view(online=(0, 1))), 0.01)
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) in (None, 0)
    m.reconciled(job(), outcome(view(online=(0, 1)), hotadds_online=frozenset({3})), 0.01)
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) == 1


def test_pending_hotadds_from_the_ost_event_until_the_guest_has_them_online(
    m: metrics.Metrics,
) -> None:
    dom = {"host": HOST, "domain": "web1"}
    m.reconciled(job(), outcome(view(), mode="report"), 0.01)
    assert value(m, "virthotplug_domain_hotadds_pending", **dom) is None
    m.event(ost(1, mono=100.0, at=1_700_000_000.0))
    m.event(ost(2, mono=105.0, at=1_700_000_005.0))
    m.event(ost(1, mono=110.0, at=1_700_000_010.0))  # the same vCPU again: still the first
    assert value(m, "virthotplug_domain_hotadds_pending", **dom) == 2
    since = "virthotplug_domain_hotadd_pending_since_timestamp_seconds"
    assert value(m, since, **dom) == 1_700_000_000.0  # Unix time, not the monotonic clock
    m.clock = lambda: 100.5
    m.reconciled(job(), outcome(view(online=(0, 1)), hotadds_online=frozenset({1})), 0.01)
    assert value(m, "virthotplug_domain_hotadds_pending", **dom) == 1
    assert value(m, since, **dom) == 1_700_000_005.0
    # The latency still runs on the monotonic clock.
    latency = "virthotplug_hotadd_online_latency_seconds_sum"
    assert value(m, latency, host=HOST) == pytest.approx(0.5)
    m.reconciled(job(), outcome(view(online=(0, 1, 2)), hotadds_online=frozenset({2})), 0.01)
    names = {name for name, _ in samples(m)}
    assert "virthotplug_domain_hotadds_pending" not in names
    assert since not in names


def test_pending_hotadds_go_with_the_domain(m: metrics.Metrics) -> None:
    m.reconciled(job(), outcome(view()), 0.01)
    m.event(ost(1))
    assert value(m, "virthotplug_domain_hotadds_pending", host=HOST, domain="web1") == 1
    stop(m)
    assert value(m, "virthotplug_domain_hotadds_pending", host=HOST, domain="web1") is None
    assert not pending_hotadds(m)


def test_describe_lists_every_domain_family(m: metrics.Metrics) -> None:
    collector = metrics._DomainCollector(m._snapshot)
    described = {family.name for family in collector.describe()}
    assert {
        "virthotplug_domain_policy_info",
        "virthotplug_domain_hotadds_pending",
        "virthotplug_domain_hotadd_pending_since_timestamp_seconds",
        "virthotplug_domain_finding",
    } <= described
    # A scrape of a daemon with no domain still declares them (HELP and TYPE lines).
    text = m.text().decode()
    for name in described:
        assert f"# TYPE {name} gauge" in text


def test_pending_hotadds_are_bounded(m: metrics.Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_PENDING_HOTADDS", 3)
    for vcpu in range(1, 10):
        m.event(ost(vcpu))
    assert pending_hotadds(m) == 3


def test_connections_and_reconnects(m: metrics.Metrics) -> None:
    m.event(HostEvent(None, host=HOST, what="connected"))
    assert value(m, "virthotplug_host_connected", host=HOST) == 1
    assert value(m, "virthotplug_reconnects_total", host=HOST) in (None, 0)
    m.event(HostEvent(None, host=HOST, what="lost", reason="end of file"))
    assert value(m, "virthotplug_host_connected", host=HOST) == 0
    m.event(HostEvent(None, host=HOST, what="connected"))
    assert value(m, "virthotplug_reconnects_total", host=HOST) == 1
    assert value(m, "virthotplug_events_total", host=HOST, kind="host") == 3


def test_a_host_whose_session_gave_up_stays_at_zero(m: metrics.Metrics) -> None:
    """ "gone" ends a session for good: the gauge is 0 even without a "lost" first, and a
    late "connected", reconcile or resync of that host brings nothing back."""
    other = "qemu+ssh://host2/system"
    m.event(HostEvent(None, host=HOST, what="connected"))
    m.event(HostEvent(None, host=other, what="connected"))
    m.reconciled(job(), outcome(view()), 0.01)
    m.event(ost(1))
    assert value(m, "virthotplug_domain_agent_connected", host=HOST, domain="web1") == 1
    m.event(HostEvent(None, host=HOST, what="gone", reason="host session failed"))
    assert value(m, "virthotplug_host_connected", host=HOST) == 0
    assert value(m, "virthotplug_domain_agent_connected", host=HOST, domain="web1") is None
    assert not pending_hotadds(m)
    m.event(HostEvent(None, host=HOST, what="connected"))  # queued before "gone"
    m.reconciled(job(), outcome(view()), 0.01)  # still running when the session ended
    m.resynced(HOST, [view()])
    assert value(m, "virthotplug_host_connected", host=HOST) == 0
    assert value(m, "virthotplug_domain_agent_connected", host=HOST, domain="web1") is None
    assert value(m, "virthotplug_reconnects_total", host=HOST) in (None, 0)
    assert value(m, "virthotplug_host_connected", host=other) == 1  # the other host is kept


def test_a_broken_record_never_raises(m: metrics.Metrics) -> None:
    bad = JobResult(record=record(42), line="", view=object())  # type: ignore[arg-type]
    m.reconciled(job(), bad, 0.01)  # logged, not raised


# --- serving ---------------------------------------------------------------------------------


def test_serves_the_registry_on_the_given_address_only(m: metrics.Metrics) -> None:
    server = metricsserver.MetricsServer(m)
    address, port = server.serve("127.0.0.1", 0)
    try:
        assert address == "127.0.0.1" and port > 0
        m.reconciled(job(), outcome(view()), 0.01)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert 'virthotplug_domain_vcpus{domain="web1",host="qemu:///system",layer="live"} 2.0' in (
            text
        )
    finally:
        server.close()


@pytest.mark.parametrize("path", ["/", "/metrics", "/metrics?name[]=x", "/other", "/metricsx"])
def test_serves_metrics_and_an_index_only(m: metrics.Metrics, path: str) -> None:
    server = metricsserver.MetricsServer(m)
    _, port = server.serve("127.0.0.1", 0)
    try:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                status, body = reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode()
    finally:
        server.close()
    if path == "/":
        assert status == 200 and 'href="/metrics"' in body
    elif path == "/metrics":
        assert status == 200 and "virthotplug_" in body
    elif path.startswith("/metrics?"):
        assert status == 200  # prometheus_client's own query (a filter by name)
    else:
        assert status == 404 and "virthotplug_" not in body


@pytest.mark.parametrize(
    ("address", "warned"),
    [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True), ("::", True)],
)
def test_a_bind_beyond_loopback_is_warned_about(
    address: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server = metricsserver.MetricsServer(metrics.Metrics())
    try:
        with caplog.at_level(logging.WARNING):
            try:
                server.serve(address, 0)
            except VirtHotplugError as exc:
                pytest.skip(f"no {address} here: {exc}")
    finally:
        server.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned, warnings
    if warned:
        assert "is not a loopback address" in warnings[0]


def test_the_wildcard_zero_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    address, port = metricsserver.parse_listen("0:0")  # "0:9177" binds every interface
    server = metricsserver.MetricsServer(metrics.Metrics())
    try:
        with caplog.at_level(logging.WARNING):
            server.serve(address, port)
    finally:
        server.close()
    assert any("is not a loopback address" in r.getMessage() for r in caplog.records)


def test_port_in_use_is_a_one_line_error_not_a_usage_error(m: metrics.Metrics) -> None:
    server = metricsserver.MetricsServer(m)
    _, port = server.serve("127.0.0.1", 0)
    try:
        other = metricsserver.MetricsServer(metrics.Metrics())
        with pytest.raises(VirtHotplugError, match=r"cannot listen on 127\.0\.0\.1:") as info:
            other.serve("127.0.0.1", port)
        assert info.value.exit_status == EXIT_FAILURE
    finally:
        server.close()


def test_a_resync_ends_a_hotadd_by_vcpu_ids_not_guest_cpu_ids(m: metrics.Metrics) -> None:
    # virsh setvcpu DOM 3 --enable --live: OST names vcpu3 (libvirt's id); the guest calls it
    # cpu1. A resync's view with guest CPUs 0 and 3 online (a guest with its own cpu3) while
    # libvirt counts 4 has not got every vCPU online: no sample from a guest id that happens
    # to equal the vCPU id.
    m.event(ost(3, mono=100.0))
    m.clock = lambda: 100.3
    partial = dataclasses.replace(
        view(online=(0, 3), present=(0, 1, 2, 3)),
        live=CountLayer(current=4, maximum=4),
        hypervisor=HypervisorLayer(vcpus=dict.fromkeys(range(4), "running")),
    )
    m.resynced(HOST, [partial])
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) in (None, 0)
    # Every vCPU libvirt counts is online in the guest: vcpu3's hot-add is done.
    done = dataclasses.replace(partial, guest=GuestLayer(*(frozenset(range(4)),) * 2, frozenset()))
    m.resynced(HOST, [done])
    assert value(m, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) == 1
