"""``virthotplug watch --metrics-listen`` on the test driver: the endpoint is served on the
loopback address only, its values follow the reconciles, and a second host that is down
neither stops the watch nor the metrics of the first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from tdriver import MIXED

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

# Running (or paused) domains of mixed.xml with a valid policy: each gets a reconcile record.
# bad-metadata's invalid policy makes its reconcile an "error" one, with a record of its own
# (outcome invalid-policy) and the invalid-policy finding among its metrics.
RECONCILED = ("hotplug-agent", "fixed-noagent", "growable-noagent", "paused-agent")
SERVING = re.compile(r"metrics: serving http://(\S+):(\d+)/metrics")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class WatchProcess:
    def __init__(self, tmp_path: Path, uris: list[str], *watch_args: str) -> None:
        config = tmp_path / "virthotplug.conf"
        config.write_text("[defaults]\nmode = report\n")
        config.chmod(0o600)
        self.stderr_path = tmp_path / "watch.stderr"
        argv = [sys.executable, "-m", "virthotplug", "--config-file", str(config)]
        argv += [arg for uri in uris for arg in ("-c", uri)]
        argv += ["watch", "--json", "--no-hook-socket", "--resync-interval", "3600", *watch_args]
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"},
            )
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.records.append(json.loads(line))

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, what: str, ready: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {what}; stderr:\n{self.stderr}")
            time.sleep(0.05)

    def endpoint(self) -> tuple[str, int]:
        match = self.wait("metrics address", lambda: SERVING.search(self.stderr))
        return match.group(1), int(match.group(2))

    def reconciled(self) -> set[str]:
        with self._lock:
            return {r["domain"] for r in self.records if r["event"] == "reconcile"}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


@pytest.fixture
def processes() -> Iterator[list[WatchProcess]]:
    started: list[WatchProcess] = []
    yield started
    for proc in started:
        proc.stop()


def scrape(port: int, address: str = "127.0.0.1") -> Samples:
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def get(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_endpoint_follows_the_reconciles(
    tmp_path: Path, processes: list[WatchProcess]
) -> None:
    watch = WatchProcess(tmp_path, [MIXED], "--metrics-listen", "127.0.0.1:0")
    processes.append(watch)
    address, port = watch.endpoint()
    assert address == "127.0.0.1" and port > 0
    watch.wait("start-up resync", lambda: watch.reconciled() >= set(RECONCILED))

    def every_reconcile_counted() -> Samples:
        found = scrape(port)
        ok = get(found, "virthotplug_reconciles_total", host=MIXED, result="ok")
        error = get(found, "virthotplug_reconciles_total", host=MIXED, result="error")
        return found if (ok, error) == (len(RECONCILED), 1) else {}

    samples = watch.wait("metrics of every running domain", every_reconcile_counted)
    dom = {"host": MIXED, "domain": "hotplug-agent"}
    assert get(samples, "virthotplug_host_connected", host=MIXED) == 1
    for layer, count in (("config", 1), ("live", 1), ("hypervisor", 1)):
        assert get(samples, "virthotplug_domain_vcpus", layer=layer, **dom) == count
    assert get(samples, "virthotplug_domain_vcpus", layer="guest", **dom) is None
    assert get(samples, "virthotplug_domain_vcpus_maximum", **dom) == 4
    assert get(samples, "virthotplug_domain_agent_connected", **dom) == 0
    unsupported = {"code": "agent-unsupported", "severity": "info", **dom}
    assert get(samples, "virthotplug_domain_finding", **unsupported) == 1
    growable = {"host": MIXED, "domain": "growable-noagent"}
    warning = {"code": "agent-not-configured", "severity": "warning", **growable}
    assert get(samples, "virthotplug_domain_finding", **warning) == 1
    assert get(samples, "virthotplug_reconcile_duration_seconds_count", host=MIXED) == 5
    skipped = get(samples, "virthotplug_actions_total", host=MIXED, outcome="skipped")
    assert skipped == len(RECONCILED)
    assert (get(samples, "virthotplug_events_total", host=MIXED, kind="host") or 0) >= 1
    assert (get(samples, "process_resident_memory_bytes") or 0) > 0
    assert get(samples, "virthotplug_reconcile_queue_depth") == 0  # every reconcile done
    assert watch.stop() == 0


def test_port_alone_binds_loopback_only(tmp_path: Path, processes: list[WatchProcess]) -> None:
    watch = WatchProcess(tmp_path, [MIXED], "--metrics-listen", "0")
    processes.append(watch)
    address, port = watch.endpoint()
    assert address == "127.0.0.1"
    assert scrape(port)  # served on loopback
    listening = Path("/proc/net/tcp").read_text()
    # 0100007F = 127.0.0.1 (little-endian hex) in /proc/net/tcp, state 0A = LISTEN
    assert re.search(rf" 0100007F:{port:04X} 00000000:0000 0A ", listening), listening


def test_bad_address_is_a_one_line_usage_error(tmp_path: Path) -> None:
    watch = WatchProcess(tmp_path, [MIXED], "--metrics-listen", "::1:9100")
    assert watch.proc.wait(30) == 2
    lines = watch.stderr.splitlines()
    assert lines[-1] == (
        "virthotplug: error: --metrics-listen '::1:9100': write an IPv6 address as [ADDR]:PORT"
    )


def test_one_host_down_does_not_stop_watching_the_other(
    tmp_path: Path, processes: list[WatchProcess]
) -> None:
    down = f"qemu+unix:///system?socket={tmp_path / 'nonexistent' / 'sock'}"
    watch = WatchProcess(tmp_path, [down, MIXED], "--metrics-listen", "127.0.0.1:0")
    processes.append(watch)
    _, port = watch.endpoint()
    watch.wait("reconciles on the host that is up", lambda: watch.reconciled() >= set(RECONCILED))
    samples = scrape(port)
    assert get(samples, "virthotplug_host_connected", host=MIXED) == 1
    assert get(samples, "virthotplug_host_connected", host=down) is None  # never connected
    assert (
        get(samples, "virthotplug_domain_vcpus", host=MIXED, domain="fixed-noagent", layer="live")
        == 2
    )
    # The down host is retried in the background, with a warning naming it.
    watch.wait("a warning about the host that is down", lambda: down in watch.stderr)
    assert watch.proc.poll() is None
    assert watch.stop() == 0


def test_an_invalid_policy_is_a_record_and_a_metric(
    tmp_path: Path, processes: list[WatchProcess]
) -> None:
    """Not only a line on stderr: a watch --json record (fitting its schema) and the
    domain's invalid-policy finding series, with no policy mode series for it."""
    from jsonschemas import validate

    watch = WatchProcess(tmp_path, [MIXED], "--metrics-listen", "127.0.0.1:0")
    processes.append(watch)
    _address, port = watch.endpoint()
    watch.wait("bad-metadata's record", lambda: "bad-metadata" in watch.reconciled())
    with watch._lock:
        (record,) = [r for r in watch.records if r["domain"] == "bad-metadata"]
    validate("watch-record", record)
    assert (record["event"], record["outcome"], record["action"]) == (
        "reconcile",
        "invalid-policy",
        "none",
    )
    assert "invalid policy in metadata" in record["details"]["policy_error"]
    assert record["findings"][0]["code"] == "invalid-policy"
    bad = {"host": MIXED, "domain": "bad-metadata"}
    finding = {"code": "invalid-policy", "severity": "warning", **bad}

    def with_the_finding() -> Samples:
        found = scrape(port)
        return found if get(found, "virthotplug_domain_finding", **finding) == 1 else {}

    samples = watch.wait("the invalid-policy series", with_the_finding)
    assert get(samples, "virthotplug_domain_vcpus", layer="live", **bad) == 1
    modes = [
        labels
        for name, labels in samples
        if name == "virthotplug_domain_policy_info" and ("domain", "bad-metadata") in labels
    ]
    assert modes == []
    assert watch.stderr.count("domain 'bad-metadata': invalid policy") == 1  # logged once
    assert watch.stop() == 0
