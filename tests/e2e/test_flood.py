"""A hostile guest floods ACPI_DEVICE_OST while ``watch`` runs: the host must hold.

The guest writes QEMU's CPU-hotplug OST registers at full speed for 60 s (tests/lab/flood);
QEMU emits one event per write, tens of thousands per second. With ``watch`` subscribed,
libvirtd must keep answering (virConnectListAllDomains within 1 s throughout), grow less than
50 MiB, still let another domain's hot-add be onlined, and ``watch`` must write fewer than
50 lines/s and report the flooding domain with the finding ``ost-flood``. Past its 30 s
back-off, watch probes the flooding domain, finds its vCPU busy and keeps its monitor events
off (re-subscribing into a flood that never stopped is what could wedge libvirtd).

Never against the host's system daemon: on stack 1 a private session-mode libvirtd of the
lab user (tests/lab/private_libvirtd.py), and stack 2 (tests/lab/stacks.py, built if missing).
A daemon that stops answering is killed by PID (stack 1) or restarted (stack 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from domains import MANUAL
from lab import Lab, LabVM, VMRequest
from private_libvirtd import PrivateLibvirtd, Responsiveness, bounded
from watchproc import WatchProcess, host_event, scoped_config

FLOOD_SECONDS = 60.0
WEDGE_SECONDS = 5.0
MAX_LIST_SECONDS = 1.0
MAX_RSS_GROWTH_MIB = 50.0
MAX_WATCH_LINES_PER_S = 50.0
HOTADDS = 3
CALL_TIMEOUT = 15.0
ONLINE_TIMEOUT = 20.0
MIB = 1024 * 1024


@dataclass
class Target:
    """A libvirtd the test may flood: its URI, its PID and what to do when it wedges."""

    name: str
    uri: str
    pid: Callable[[], int]
    recover: Callable[[], object]
    # Lab arguments: where the daemon's QEMU writes serial logs (stack 2: the lab knows).
    lab_args: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(params=["stack1", "stack2"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "stack1":
        with PrivateLibvirtd.first_free("e2e") as daemon:
            yield Target(
                "stack1",
                daemon.uri,
                lambda: daemon.pid or 0,
                daemon.restart,
                {"log_dir": daemon.log_dir},
            )
        return
    yield from _stack2()


def _stack2() -> Iterator[Target]:
    import stacks  # tests/lab: a stack that cannot be built fails the test, never skips

    # Built when missing (about a minute; the matrix tests of the same run need it anyway).
    found = stacks.ensure_stack2()
    users = stacks.Users(stacks.STACK2)
    started = False
    try:
        # Stopped at the end only if started here: another run may use it without the lock.
        started = found.start()

        def pid() -> int:
            return int(found.host_path(stacks.LIBVIRTD_PID).read_text().strip())

        yield Target("stack2", found.uri, pid, found.restart_libvirtd)
    finally:
        if users.leave() and started:
            found.stop()


@dataclass
class Measured:
    emitted_per_s: float = 0.0
    wedged_after: Optional[float] = None
    list_max: float = 0.0
    rss_start_mib: float = 0.0
    rss_max_mib: float = 0.0
    watch_lines_per_s: float = 0.0
    watch_bytes_per_s: float = 0.0
    hotadds: list[str] = field(default_factory=list)  # "onlined 0.62 s" or the failure
    ost_flood_finding: bool = False
    probe: str = ""  # what watch said of the flooding domain's quiet probe

    def failures(self) -> list[str]:
        problems = []
        if self.wedged_after is not None:
            problems.append(f"libvirtd stopped answering {self.wedged_after:.1f} s into the flood")
        if self.list_max > MAX_LIST_SECONDS:
            problems.append(f"ListAllDomains took up to {self.list_max:.2f} s")
        if self.rss_max_mib - self.rss_start_mib >= MAX_RSS_GROWTH_MIB:
            problems.append(f"libvirtd RSS grew {self.rss_max_mib - self.rss_start_mib:.0f} MiB")
        if len(self.hotadds) < HOTADDS or not all(h.startswith("onlined") for h in self.hotadds):
            problems.append(f"other domain's hot-adds: {self.hotadds}")
        if self.watch_lines_per_s >= MAX_WATCH_LINES_PER_S:
            problems.append(f"watch wrote {self.watch_lines_per_s:.0f} lines/s")
        if not self.ost_flood_finding:
            problems.append("no ost-flood finding for the flooding domain")
        if "still off" not in self.probe or "quiet again" in self.probe:
            problems.append(f"the quiet probe did not hold the flooding domain off: {self.probe!r}")
        return problems


def test_flood_under_watch(target: Target, tmp_path: Path) -> None:
    measured = Measured()
    with Lab(uri=target.uri, ost=False, **target.lab_args) as lab:
        flooder, other = lab.start_many(
            [VMRequest(MANUAL, label="flood"), VMRequest(MANUAL, label="other")]
        )
        flooder.hot_add(2)  # the fake then names vcpu1, as a real hot-add's event does
        _cli(target.uri, "policy", other.name, "--set", "online")
        watch = WatchProcess(scoped_config(tmp_path, {}), env={"LIBVIRT_DEFAULT_URI": target.uri})
        probe = Responsiveness(target.uri).start()
        try:
            watch.wait_for(host_event("connected"), timeout=60)
            _flood(target, flooder, other, watch, probe, measured)
            wedged = measured.wedged_after is not None
            measured.ost_flood_finding = _has_ost_flood(target.uri, flooder.name, watch, wedged)
        finally:
            probe.stop()
            watch.stop()
            if measured.wedged_after is not None:
                target.recover()
    print(f"{target.name}: {measured}")
    problems = measured.failures()
    assert not problems, f"{target.name}: " + "; ".join(problems) + f"\nmeasured: {measured}"


def _flood(
    target: Target,
    flooder: LabVM,
    other: LabVM,
    watch: WatchProcess,
    probe: Responsiveness,
    measured: Measured,
) -> None:
    time.sleep(2.0)
    rss = [_rss(target.pid())]
    lines_before, bytes_before = _watch_output(watch)
    flooder.flood_start(0, int(FLOOD_SECONDS) + 5)
    started = time.monotonic()
    next_hotadd = 1
    while time.monotonic() - started < FLOOD_SECONDS:
        if probe.stalled() > WEDGE_SECONDS:
            measured.wedged_after = time.monotonic() - started - WEDGE_SECONDS
            break
        rss.append(_rss(target.pid()))
        if next_hotadd <= HOTADDS and time.monotonic() - started > next_hotadd * 15.0:
            measured.hotadds.append(_hotadd(other, next_hotadd))
            next_hotadd += 1
        time.sleep(0.5)
    window = time.monotonic() - started
    measured.emitted_per_s = flooder.flood_stop().rate
    lines_after, bytes_after = _watch_output(watch)
    measured.watch_lines_per_s = (lines_after - lines_before) / window
    measured.watch_bytes_per_s = (bytes_after - bytes_before) / window
    measured.rss_start_mib, measured.rss_max_mib = rss[0] / MIB, max(rss) / MIB
    measured.list_max = probe.max_seconds()
    measured.probe = _probe_lines(watch, flooder.name)


def _probe_lines(watch: WatchProcess, domain: str) -> str:
    """watch's log lines on the flooding domain's quiet probe, during the flood."""
    text = watch.stderr_path.read_text(errors="replace")
    said = ("monitor events still off", "quiet again")
    return "; ".join(
        line.split(" ", 3)[-1]
        for line in text.splitlines()
        if domain in line and any(s in line for s in said)
    )


def _hotadd(vm: LabVM, cpu: int) -> str:
    """One hot-add on the other domain; watch (policy online) must online it."""
    try:
        ok, _ = bounded(lambda: vm.hot_add(cpu + 1), CALL_TIMEOUT)
    except Exception as exc:
        return f"hot-add failed: {exc}"
    if not ok:
        return f"hot-add did not return within {CALL_TIMEOUT:.0f} s"
    returned = time.monotonic()
    while time.monotonic() - returned < ONLINE_TIMEOUT:
        if cpu in vm.cpu_state().online:
            return f"onlined {time.monotonic() - returned:.2f} s"
        time.sleep(0.05)
    return f"cpu{cpu} not online within {ONLINE_TIMEOUT:.0f} s"


def _watch_output(watch: WatchProcess) -> tuple[int, int]:
    """Lines and bytes watch has written so far: JSON records on stdout, log on stderr."""
    records = list(watch.records)
    size = sum(len(json.dumps(r)) + 1 for _, r in records)
    text = watch.stderr_path.read_bytes()
    return len(records) + text.count(b"\n"), size + len(text)


def _has_ost_flood(uri: str, domain: str, watch: WatchProcess, wedged: bool) -> bool:
    """In watch's JSON records, or else in ``status DOM --json`` (not asked of a wedged
    daemon: it would not answer)."""
    for _, record in list(watch.records):
        if record.get("domain") == domain and _names_ost_flood(record.get("findings")):
            return True
    if wedged:
        return False
    try:
        status = json.loads(_cli(uri, "status", domain, "--json", timeout=30))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
        return False
    return "ost-flood" in json.dumps(status)


def _names_ost_flood(findings: Any) -> bool:
    return isinstance(findings, list) and any(
        isinstance(f, dict) and f.get("code") == "ost-flood" for f in findings
    )


def _cli(uri: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "virthotplug", "-c", uri, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
