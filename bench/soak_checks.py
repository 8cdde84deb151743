"""The soak's invariants: what must hold after every step, and the record of what did not.

Each violation carries the time (seconds since the run's start), the invariant, the target,
a message and evidence (what was seen). The checks read the truth from the lab (the guest's
sysfs through the control channel, or its agent), the tool's verdict from a fresh
``virthotplug status --json`` and from ``watch``'s metrics endpoint, and never use a call
that taints a domain.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ONLINE_BOUND = 5.0  # a hot-added vCPU online where the policy says so
SUPPRESSED_BOUND = 20.0  # the same while the domain's monitor events are cut off (a flood)
REPORT_WATCH = 5.0  # how long a report-only guest is watched for a change after a hot-add
STATUS_TIMEOUT = 120.0
# Findings only the daemon can make (a fresh read cannot know them): left out of the comparison.
WATCH_ONLY_FINDINGS = frozenset({"ost-flood"})
_METRIC = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Violation:
    t: float
    invariant: str
    target: str
    message: str
    evidence: Any = None


@dataclass
class Ledger:
    """Violations and the step log, on the run's clock."""

    started: float = field(default_factory=time.monotonic)
    violations: list[Violation] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def violate(self, invariant: str, target: str, message: str, evidence: Any = None) -> None:
        violation = Violation(self.now(), invariant, target, message, evidence)
        self.violations.append(violation)
        print(f"  VIOLATION {violation.t:8.1f} s {invariant} {target}: {message}", flush=True)

    def record(self, entry: dict[str, Any]) -> None:
        self.log.append({"t": self.now(), **entry})

    def violations_dicts(self) -> list[dict[str, Any]]:
        return [asdict(v) for v in self.violations]


def poll(bound: float, done: Callable[[], bool], interval: float = 0.05) -> Optional[float]:
    """Seconds until ``done()`` held, None if it did not within ``bound``."""
    started = time.monotonic()
    while True:
        if done():
            return time.monotonic() - started
        if time.monotonic() - started > bound:
            return None
        time.sleep(interval)


def status(uri: str, name: str) -> Optional[dict[str, Any]]:
    """One domain's ``virthotplug status --json`` document, None if it could not be read."""
    done = subprocess.run(
        [sys.executable, "-m", "virthotplug", "-c", uri, "status", name, "--json"],
        capture_output=True,
        text=True,
        timeout=STATUS_TIMEOUT,
        check=False,
    )
    try:
        domains = json.loads(done.stdout).get("domains") or []
    except json.JSONDecodeError:
        return None
    return domains[0] if domains else None


def domain_metrics(port: int, name: str) -> dict[str, Any]:
    """watch's per-domain series for ``name``: live vCPUs, guest online count, finding codes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found: dict[str, Any] = {"findings": set(), "live": None, "online": None}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match is None:
            continue
        metric, labels = match.group(1), dict(_LABEL.findall(match.group(2)))
        if labels.get("domain") != name:
            continue
        if metric == "virthotplug_domain_finding":
            found["findings"].add(labels["code"])
        elif metric == "virthotplug_domain_vcpus" and labels.get("layer") == "live":
            found["live"] = int(float(match.group(3)))
        elif metric == "virthotplug_domain_guest_cpus" and labels.get("state") == "online":
            found["online"] = int(float(match.group(3)))
    return found


def findings_agree(seen: dict[str, Any], doc: dict[str, Any]) -> bool:
    """watch's view (metrics) says what a fresh read says: counts and finding codes."""
    guest = doc.get("guest") or {}
    live = (doc.get("live") or {}).get("current")
    codes = {f["code"] for f in doc.get("findings", [])}
    online = len(guest["online"]) if guest else None
    ours = set(seen["findings"]) - WATCH_ONLY_FINDINGS
    return bool(seen["live"] == live and seen["online"] == online and ours == codes)


def tracebacks(stderr: Path) -> list[str]:
    """Tracebacks in watch's stderr (each with the line after it)."""
    lines = stderr.read_text(errors="replace").splitlines()
    return [" | ".join(lines[i : i + 4]) for i, line in enumerate(lines) if "Traceback" in line]
