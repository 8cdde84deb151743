"""Every metric the shipped Prometheus rules use is one that ``virthotplug watch
--metrics-listen`` really exports: the rules are checked against a real scrape (on the test
driver), not against a list kept by hand."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "virthotplug.rules.yml"
SERVING = re.compile(r"metrics: serving http://127\.0\.0\.1:(\d+)/metrics")
# A metric name, not part of a recording rule's level:metric:operations name.
METRIC = re.compile(r"(?<![:\w])virthotplug_[a-z_]+(?![:\w])")
HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def exported_families(tmp_path: Path) -> set[str]:
    """The metric names (TYPE lines) of one scrape of watch on test:///default."""
    config = tmp_path / "virthotplug.conf"
    config.write_text("[defaults]\nmode = report\n")
    config.chmod(0o600)
    stderr_path = tmp_path / "watch.stderr"
    argv = [sys.executable, "-m", "virthotplug", "-c", "test:///default"]
    argv += ["--config-file", str(config), "watch", "--no-hook-socket"]
    argv += ["--metrics-listen", "127.0.0.1:0"]
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while not (found := SERVING.search(stderr_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        url = f"http://127.0.0.1:{found.group(1)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def used_by_rules() -> set[str]:
    """Metric names in the rules (comments aside)."""
    lines = RULES.read_text().splitlines()
    return {n for line in lines if not line.lstrip().startswith("#") for n in METRIC.findall(line)}


def family(name: str) -> str:
    for suffix in HISTOGRAM_SERIES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_rules_use_only_exported_metrics(tmp_path: Path) -> None:
    used = used_by_rules()
    assert "virthotplug_domain_finding" in used and len(used) >= 7, used
    exported = exported_families(tmp_path)
    missing = sorted(name for name in used if family(name) not in exported)
    assert not missing, f"rules use metrics watch does not export: {missing}"
