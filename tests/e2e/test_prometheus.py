"""A real Prometheus server (Debian's ``prometheus``) scrapes ``virthotplug watch
--metrics-listen`` with the shipped rules while a lab VM is hot-added under policy ``report``:
the seed alert goes pending, then firing, and resolves after ``virthotplug policy --set
online`` and ``virthotplug apply``. Everything is read through Prometheus' HTTP API.

The server listens on the loopback address only, keeps its configuration and TSDB in the
test's tmp directory and is stopped by PID. Its copy of the rules differs from the shipped
file only in the seed alert's ``for:`` (10 s instead of 10 minutes).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from lab import LabVM
from watchproc import WatchProcess, for_domain, host_event, scoped_config

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "virthotplug.rules.yml"
ALERT = "VirthotplugGuestCpuOffline"
ALERT_FOR = "10s"
INTERVAL = "1s"  # scrape and rule evaluation
# watch follows no METADATA_CHANGE event: a policy set on a running domain takes effect at
# its next resync, so a short one keeps the test quick.
RESYNC = "3"
STATE_TIMEOUT = 90.0  # loaded TCG host: generous


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_for(rules: str, alert: str, duration: str) -> str:
    """The rules text with ``alert``'s ``for:`` set to ``duration``."""
    lines = rules.splitlines(keepends=True)
    start = lines.index(f"      - alert: {alert}\n")
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("- "):
            break
        if lines[i].startswith("        for: "):
            lines[i] = f"        for: {duration}\n"
            return "".join(lines)
    raise AssertionError(f"no 'for:' for {alert} in {RULES}")


class Prometheus:
    """``prometheus`` on 127.0.0.1, scraping one target; its own tmp data directory."""

    def __init__(self, tmp: Path, target: str) -> None:
        tool = shutil.which("prometheus")
        assert tool, "prometheus is missing: install Debian's prometheus package (make host)"
        tmp.mkdir()
        (tmp / "rules.yml").write_text(with_for(RULES.read_text(), ALERT, ALERT_FOR))
        config = {
            "global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL},
            "rule_files": [str(tmp / "rules.yml")],
            "scrape_configs": [
                {"job_name": "virthotplug", "static_configs": [{"targets": [target]}]}
            ],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = free_port()
        self.log = tmp / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    tool,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.loads(reply.read()) if path.startswith("/api/") else reply.status

    def wait(self, what: str, ready: Callable[[], Any], timeout: float = STATE_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = ready()
            except OSError:  # not listening yet
                value = None
            if value:
                return value
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return list(reply["data"]["result"])

    def alert_state(self, alertname: str, domain: str) -> Optional[str]:
        """pending, firing, or None (inactive: resolved or never raised)."""
        for alert in self.get("/api/v1/alerts")["data"]["alerts"]:
            labels = alert["labels"]
            if labels.get("alertname") == alertname and labels.get("domain") == domain:
                return str(alert["state"])
        return None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID: our own child
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def watch_report(tmp_path: Path, vm_manual: LabVM) -> Iterator[tuple[WatchProcess, int]]:
    """watch with policy report for every domain, metrics on a free loopback port."""
    vm_manual.wait_agent()
    config = scoped_config(tmp_path, {vm_manual.name: "mode = report"})
    proc = WatchProcess(config, "--metrics-listen", "127.0.0.1:0", "--resync-interval", RESYNC)
    try:
        proc.wait_for(host_event("connected"), timeout=30)
        yield proc, proc.metrics_port()
    finally:
        proc.stop()


@pytest.fixture
def prometheus(tmp_path: Path, watch_report: tuple[WatchProcess, int]) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{watch_report[1]}")
    try:
        server.wait("prometheus ready", lambda: server.get("/-/ready") == 200, timeout=60)
        yield server
    finally:
        server.stop()
    assert server.proc.returncode is not None


def set_online_and_apply(config: Path, name: str) -> subprocess.CompletedProcess[str]:
    """The operator's fix: policy ``online`` in the running domain's metadata, then
    ``virthotplug apply`` (watch, on its next resync, finds the CPU online)."""
    base = [sys.executable, "-m", "virthotplug", "--config-file", str(config)]
    for args in (["policy", name, "--set", "online", "--live"], ["apply", name]):
        result = subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            return result
    return result


def test_offline_vcpu_alert_fires_and_resolves(
    tmp_path: Path,
    vm_manual: LabVM,
    watch_report: tuple[WatchProcess, int],
    prometheus: Prometheus,
) -> None:
    watch, _ = watch_report
    name = vm_manual.name
    watch.wait_for(for_domain(name, "reconcile"), timeout=30)
    # Prometheus scrapes watch and sees the pristine guest: one vCPU, nothing offline.
    prometheus.wait("a successful scrape", lambda: prometheus.query('up{job="virthotplug"} == 1'))
    guest = f'virthotplug_domain_vcpus{{domain="{name}",layer="guest"}}'
    prometheus.wait("the guest layer in Prometheus", lambda: prometheus.query(f"{guest} == 1"))
    assert prometheus.alert_state(ALERT, name) is None

    hot_added = time.monotonic()
    vm_manual.hot_add(2)
    prometheus.wait("the alert pending", lambda: prometheus.alert_state(ALERT, name))
    pending = time.monotonic() - hot_added
    prometheus.wait("the alert firing", lambda: prometheus.alert_state(ALERT, name) == "firing")
    firing = time.monotonic() - hot_added
    assert vm_manual.guest_vcpus().offline == {1}  # report: nobody onlined it
    firing_query = f'ALERTS{{alertname="{ALERT}",alertstate="firing",domain="{name}"}}'
    assert prometheus.query(firing_query), "the firing alert is not in ALERTS"

    applied = time.monotonic()
    result = set_online_and_apply(tmp_path / "virthotplug.conf", name)
    assert result.returncode == 0, result.stdout + result.stderr
    vm_manual.wait_cpu_state(lambda s: 1 in s.online, timeout=15)
    prometheus.wait("the alert resolved", lambda: prometheus.alert_state(ALERT, name) is None)
    resolved = time.monotonic() - applied
    assert not prometheus.query(firing_query)
    print(
        f"{ALERT} (for: {ALERT_FOR}): pending {pending:.1f} s and firing {firing:.1f} s "
        f"after the hot-add; resolved {resolved:.1f} s after apply"
    )
    assert vm_manual.taints() == []
