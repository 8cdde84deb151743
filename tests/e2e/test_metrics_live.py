"""``watch --metrics-listen`` on a real VM: the scrape follows a hot-add through OST, the
onlining and the guest's layers, and the hot-add-to-online histogram gets its sample."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest
from lab import LabVM
from watchproc import WatchProcess, for_domain, host_event, scoped_config

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

HOST = "qemu:///system"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def watch(tmp_path: Path, vm_manual: LabVM) -> Iterator[tuple[WatchProcess, int]]:
    vm_manual.wait_agent()
    config = scoped_config(tmp_path, {vm_manual.name: "mode = online"})
    proc = WatchProcess(config, "--metrics-listen", "127.0.0.1:0")  # on qemu:///system
    try:
        proc.wait_for(host_event("connected"), timeout=30)
        yield proc, proc.metrics_port()
    finally:
        proc.stop()


def test_scrape_follows_a_hotadd_to_online(
    vm_manual: LabVM, watch: tuple[WatchProcess, int]
) -> None:
    proc, port = watch
    dom = {"host": HOST, "domain": vm_manual.name}
    # The start-up resync has seen the pristine guest: one vCPU everywhere, agent up.
    proc.wait_for(for_domain(vm_manual.name, "reconcile"), timeout=30)
    before = scrape(port)
    assert get(before, "virthotplug_host_connected", host=HOST) == 1
    assert get(before, "virthotplug_domain_vcpus", layer="guest", **dom) == 1
    assert get(before, "virthotplug_domain_agent_connected", **dom) == 1
    hotadds_before = get(before, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) or 0

    since = time.monotonic()
    vm_manual.hot_add(2)
    vm_manual.wait_cpu_state(lambda s: 1 in s.online, timeout=10)
    online_after = time.monotonic() - since
    proc.wait_for(
        lambda r: (
            r["domain"] == vm_manual.name
            and r["event"] == "reconcile"
            and "onlined" in r["outcome"]
        ),
        since=since,
        timeout=15,
    )
    deadline = time.monotonic() + 10
    while True:  # the metrics are updated right after the reconcile record is written
        after = scrape(port)
        count = get(after, "virthotplug_hotadd_online_latency_seconds_count", host=HOST) or 0
        if count > hotadds_before or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert count == hotadds_before + 1
    latency_sum = get(after, "virthotplug_hotadd_online_latency_seconds_sum", host=HOST) or 0
    previous_sum = get(before, "virthotplug_hotadd_online_latency_seconds_sum", host=HOST) or 0
    # From the OST event to the reconcile that saw the CPU online: under the time the guest
    # took from the hot-add call to online, plus a reconcile's worth of slack.
    assert 0 < latency_sum - previous_sum < online_after + 2.0
    for layer in ("config", "live", "hypervisor", "guest"):
        expected = 1 if layer == "config" else 2
        assert get(after, "virthotplug_domain_vcpus", layer=layer, **dom) == expected, layer
    assert get(after, "virthotplug_domain_guest_cpus", state="online", **dom) == 2
    assert get(after, "virthotplug_domain_guest_cpus", state="offline", **dom) == 0
    hotadd_ost = {"device": "cpu", "source": "device check", "status": "success"}
    assert (get(after, "virthotplug_ost_events_total", host=HOST, **hotadd_ost) or 0) >= 1
    assert (get(after, "virthotplug_actions_total", host=HOST, outcome="onlined") or 0) >= 1
    offline = {"code": "guest-cpu-offline", "severity": "warning", **dom}
    assert get(after, "virthotplug_domain_finding", **offline) is None
    assert vm_manual.taints() == []
