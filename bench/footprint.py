"""Daemon footprint: ``virthotplug watch`` over 1,000 test domains, idle and under a burst.

libvirtd's test driver gives every connection to a node *file* its own private copy of the
node, so events caused through one connection never reach another. Its built-in default
node (``test+unix:///default``) is shared by every client of the daemon instead; the
benchmark defines and starts its domains there (same layouts as the sweep's node files,
all running, names prefixed ``vhpbench-``) through a holder connection, and removes them
at the end.

    start-up   until the first resync has reconciled every domain
    idle       ``idle_seconds`` (120 by default) with no events at the default settings:
               RSS and CPU from /proc/PID; the default periodic resync (every 60 s) falls
               inside such a window twice, so the window's CPU includes the resyncs; each
               resync is also reported apart, from watch's own "listed" record (what it
               read, how many domains it reconciled, how long it took)
    burst      suspend, then resume, every domain through the holder connection: every
               lifecycle event must show up in ``watch --json`` and every domain must be
               reconciled after its resume; time to drain
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import nodes
from common import (
    ROOT,
    daemon_restarted,
    proc_cpu_seconds,
    proc_rss_bytes,
    virthotplug_command,
    wait_for_daemon,
    watch_env,
)

sys.path.insert(0, str(ROOT / "tests" / "lab"))

SHARED_URI = "test+unix:///default"
ATTEMPTS = 3


class DaemonRestarted(RuntimeError):
    """libvirtd went away during the measurement."""


PREFIX = "vhpbench-"
MIB = 1024 * 1024


@dataclass
class Line:
    mono: float
    record: dict[str, Any]


@dataclass
class Sample:
    mono: float
    cpu: float
    rss: int


@dataclass
class FootprintResult:
    domains: int
    uri: str = SHARED_URI
    extra_args: list[str] = field(default_factory=list)
    mix: str = nodes.MIX  # the layouts of the domains (nodes.MIXES), every one running
    startup_seconds: float = 0.0
    startup_rss_mib: float = 0.0
    idle_seconds: float = 0.0
    idle_cpu_percent: float = 0.0  # whole window, periodic resync included
    idle_between_resyncs_cpu_percent: Optional[float] = None
    idle_between_resyncs_seconds: float = 0.0
    resync_cpu_seconds: Optional[float] = None
    resync_seconds: Optional[float] = None
    resync_reconciles: int = 0
    resyncs: int = 0  # periodic resyncs that ended in the idle window
    resync_summary: str = ""  # the last one's "listed" record, as watch wrote it
    idle_rss_mib: float = 0.0
    burst_api_seconds: float = 0.0
    burst_drain_seconds: float = 0.0  # from the first suspend to the last reconcile
    burst_drain_after_last_event_seconds: float = 0.0
    burst_suspended_events: int = 0
    burst_resumed_events: int = 0
    burst_reconciled_domains: int = 0
    burst_cpu_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    lost_domains: list[str] = field(default_factory=list)
    metrics_series: Optional[int] = None  # samples in one scrape (with --metrics-listen)
    metrics_scrape_seconds: Optional[float] = None
    metrics_lifecycle_events: Optional[float] = None  # virthotplug_events_total, lifecycle

    @property
    def no_event_lost(self) -> bool:
        n = self.domains
        return (
            self.burst_suspended_events == n
            and self.burst_resumed_events == n
            and self.burst_reconciled_domains == n
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["no_event_lost"] = self.no_event_lost
        return data


class _Watcher:
    """The daemon under test, with a thread collecting its JSON lines as they arrive."""

    def __init__(self, argv: list[str], stderr_path: Path, env: dict[str, str]) -> None:
        self._stderr = stderr_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            bufsize=1,
        )
        from jsonfollow import JsonLineReader

        assert self.proc.stdout is not None
        self._json = JsonLineReader(self.proc.stdout)

    def snapshot(self) -> list[Line]:
        return [Line(arrived, record) for arrived, record in self._json.arrivals()]

    def sample(self) -> Sample:
        rss, _ = proc_rss_bytes(self.proc.pid)
        return Sample(time.monotonic(), proc_cpu_seconds(self.proc.pid), rss)

    def peak_rss(self) -> int:
        return proc_rss_bytes(self.proc.pid)[1]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._json.thread.join(timeout=5)
        self._stderr.close()


def _reconciled(lines: list[Line], since: float, names: set[str]) -> dict[str, float]:
    """Domain → arrival of its first reconcile line after ``since``."""
    seen: dict[str, float] = {}
    for line in lines:
        record = line.record
        name = record.get("domain")
        if line.mono >= since and record.get("event") == "reconcile" and name in names:
            seen.setdefault(name, line.mono)
    return seen


def _reconciled_all(lines: list[Line], since: float, names: set[str]) -> list[float]:
    """Arrival of every reconcile line of ``names`` after ``since``."""
    return [
        line.mono
        for line in lines
        if line.mono >= since
        and line.record.get("event") == "reconcile"
        and line.record.get("domain") in names
    ]


def _longest_quiet(samples: list[Sample], busy: list[tuple[float, float]]) -> list[Sample]:
    """The longest run of samples with no resync (``busy`` spans, widened by 0.5 s)."""
    best: list[Sample] = []
    run: list[Sample] = []
    for sample in samples:
        if any(begin - 0.5 <= sample.mono <= end + 0.5 for begin, end in busy):
            run = []
            continue
        run.append(sample)
        if len(run) > len(best):
            best = list(run)
    return best


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


class Footprint:
    def __init__(
        self,
        count: int,
        idle_seconds: float,
        extra_args: Optional[list[str]] = None,
        mix: str = nodes.MIX,
    ) -> None:
        self.count = count
        self.idle_seconds = idle_seconds
        self.extra_args = list(extra_args or [])
        self.mix = mix
        self.names = [PREFIX + layout.name for layout in nodes.layouts(count, mix=mix)]
        self._holder: Any = None

    # the domains, on the shared test node

    def _open_holder(self) -> Any:
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        return libvirt.open(SHARED_URI)

    def _remove_domains(self) -> None:
        conn = self._holder
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(PREFIX):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()

    def _create_domains(self) -> list[Any]:
        conn = self._holder
        domains = []
        for layout in nodes.layouts(self.count, mix=self.mix):
            running = dataclasses.replace(layout, name=PREFIX + layout.name, runstate=nodes.RUNNING)
            dom = conn.defineXML(nodes.domain_xml(running))
            dom.create()
            domains.append(dom)
        return domains

    # the measurement

    def run(self, log: Callable[[str], None]) -> FootprintResult:
        """Measure; start over when libvirtd restarts meanwhile (other work on a shared
        machine may restart it, and the shared node and its domains go with it)."""
        for attempt in range(ATTEMPTS):
            try:
                return self._run_once(log)
            except DaemonRestarted as exc:
                if attempt + 1 == ATTEMPTS:
                    raise
                log(f"  libvirtd went away ({exc}); waiting, then starting over")
                wait_for_daemon(SHARED_URI)
        raise AssertionError("not reached")

    def _run_once(self, log: Callable[[str], None]) -> FootprintResult:
        import libvirt

        result = FootprintResult(self.count, extra_args=self.extra_args, mix=self.mix)
        self._holder = self._open_holder()
        try:
            self._remove_domains()  # leftovers of an interrupted run
            domains = self._create_domains()
            log(f"  {self.count} domains defined and running on {SHARED_URI}")
            with tempfile.TemporaryDirectory(prefix="vhp-footprint-") as tmp:
                self._measure(domains, Path(tmp), result, log)
        except libvirt.libvirtError as exc:
            if not self._holder.isAlive() or daemon_restarted(str(exc)):
                raise DaemonRestarted(str(exc)) from None
            raise
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                self._remove_domains()
            with contextlib.suppress(libvirt.libvirtError):
                self._holder.close()
        return result

    def _measure(
        self, domains: list[Any], tmp: Path, result: FootprintResult, log: Callable[[str], None]
    ) -> None:
        config = tmp / "empty.conf"
        config.write_text("", encoding="utf-8")
        argv = [
            *virthotplug_command(),
            "--config-file",
            str(config),
            "-c",
            SHARED_URI,
            "watch",
            "--json",
            "--no-hook-socket",  # never the host's hook socket
            "--domain",  # only the domains this benchmark defined on the shared daemon
            f"{PREFIX}*",
            *self.extra_args,
        ]
        names = set(self.names)
        started = time.monotonic()
        watcher = _Watcher(argv, tmp / "watch.log", watch_env(tmp))
        try:
            _wait_until(
                lambda: (
                    len(_reconciled(watcher.snapshot(), started, names)) == self.count
                    or not watcher.alive()
                    or not self._holder.isAlive()
                ),
                300,
                "the start-up resync",
            )
            if not self._holder.isAlive():
                raise DaemonRestarted("the holder connection died during start-up")
            if not watcher.alive():
                raise RuntimeError(f"watch exited: {(tmp / 'watch.log').read_text()[-800:]}")
            result.startup_seconds = time.monotonic() - started
            result.startup_rss_mib = watcher.sample().rss / MIB
            log(f"  start-up resync done in {result.startup_seconds:.1f} s")
            self._idle(watcher, names, result)
            log(f"  idle: {result.idle_cpu_percent:.2f} % CPU, {result.idle_rss_mib:.1f} MiB")
            self._burst(watcher, domains, names, result)
            log(f"  burst drained in {result.burst_drain_seconds:.1f} s")
            if "--metrics-listen" in self.extra_args:
                self._scrape(tmp / "watch.log", result)
            result.peak_rss_mib = watcher.peak_rss() / MIB
            lost = [
                line
                for line in watcher.snapshot()
                if line.record.get("event") == "host"
                and (line.record.get("details") or {}).get("what") == "lost"
            ]
            if lost or not self._holder.isAlive():
                raise DaemonRestarted("the watch lost its connection during the measurement")
        finally:
            watcher.stop()

    def _idle(self, watcher: _Watcher, names: set[str], result: FootprintResult) -> None:
        time.sleep(1.0)  # let the start-up resync's last writes settle
        samples = [watcher.sample()]
        end = samples[0].mono + self.idle_seconds
        while time.monotonic() < end:
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            samples.append(watcher.sample())
        first, last = samples[0], samples[-1]
        result.idle_seconds = last.mono - first.mono
        result.idle_cpu_percent = 100 * (last.cpu - first.cpu) / result.idle_seconds
        result.idle_rss_mib = max(s.rss for s in samples) / MIB

        # Periodic resyncs in the window, from watch's "listed" records (a bulk resync
        # reconciles only the domains that need it, so reconcile lines do not mark it).
        def resyncs() -> list[tuple[float, float, str]]:
            found = []
            for line in watcher.snapshot():
                details = line.record.get("details") or {}
                if line.mono < first.mono or details.get("what") != "listed":
                    continue
                reason = str(details.get("reason") or "")
                took = re.search(r"([0-9.]+) s$", reason)
                found.append((line.mono, float(took.group(1)) if took else 0.0, reason))
            return found

        # One that began before the window's end: follow it and its reconciles to the end
        # (they are not counted in the window's figures).
        while True:
            lines = sorted(_reconciled_all(watcher.snapshot(), first.mono, names))
            if not lines or time.monotonic() - lines[-1] > 2.0:
                break
            time.sleep(0.5)
            samples.append(watcher.sample())
        spans = [
            (end - took, max([end, *[t for t in lines if t >= end]])) for end, took, _ in resyncs()
        ]
        result.resyncs = len(spans)
        result.resync_reconciles = len(lines)
        if resyncs():
            result.resync_summary = resyncs()[-1][2]
        quiet = _longest_quiet(samples, spans)
        if len(quiet) >= 2 and quiet[-1].mono - quiet[0].mono >= 5:
            span = quiet[-1].mono - quiet[0].mono
            result.idle_between_resyncs_seconds = span
            result.idle_between_resyncs_cpu_percent = 100 * (quiet[-1].cpu - quiet[0].cpu) / span
        if spans:
            begin, end = spans[-1]
            before = [s for s in samples if s.mono <= begin - 0.5]
            after = [s for s in samples if s.mono >= end]
            if before and after:
                result.resync_cpu_seconds = after[0].cpu - before[-1].cpu
            result.resync_seconds = end - begin

    @staticmethod
    def _scrape(log_path: Path, result: FootprintResult) -> None:
        found = re.search(r"metrics: serving (http://\S+/metrics)", log_path.read_text())
        if found is None:
            return
        start = time.monotonic()
        with urllib.request.urlopen(found.group(1), timeout=30) as reply:
            text = reply.read().decode()
        result.metrics_scrape_seconds = time.monotonic() - start
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        result.metrics_series = len(lines)
        lifecycle = re.search(
            r'^virthotplug_events_total\{[^}]*kind="lifecycle"[^}]*\} (\S+)$', text, re.M
        )
        if lifecycle is not None:
            result.metrics_lifecycle_events = float(lifecycle.group(1))

    def _burst(
        self, watcher: _Watcher, domains: list[Any], names: set[str], result: FootprintResult
    ) -> None:
        cpu_before = watcher.sample().cpu
        start = time.monotonic()
        for dom in domains:
            dom.suspend()
        for dom in domains:
            dom.resume()
        api_done = time.monotonic()
        result.burst_api_seconds = api_done - start

        def resumed_at() -> dict[str, float]:
            seen: dict[str, float] = {}
            for line in watcher.snapshot():
                record = line.record
                if line.mono >= start and record.get("event") == "lifecycle":
                    details = record.get("details") or {}
                    if details.get("event") == "resumed" and record.get("domain") in names:
                        seen.setdefault(record["domain"], line.mono)
            return seen

        def drained() -> bool:
            resumed = resumed_at()
            latest: dict[str, float] = {}  # domain → its latest reconcile line
            for line in watcher.snapshot():
                if line.record.get("event") == "reconcile":
                    latest[line.record.get("domain") or ""] = line.mono
            done = [n for n, t in resumed.items() if latest.get(n, -1.0) >= t]
            return len(done) == self.count

        with contextlib.suppress(TimeoutError):  # reported below as lost domains
            _wait_until(drained, 300, "every domain to be reconciled after the burst")
        time.sleep(2.0)  # late stragglers would show up as extra lines, not change counts
        lines = watcher.snapshot()
        events: dict[str, dict[str, int]] = {"suspended": {}, "resumed": {}}
        for line in lines:
            record = line.record
            if line.mono < start or record.get("event") != "lifecycle":
                continue
            kind = (record.get("details") or {}).get("event")
            if kind in events and record.get("domain") in names:
                events[kind][record["domain"]] = events[kind].get(record["domain"], 0) + 1
        resumed = resumed_at()
        reconciled_after: list[float] = []
        lost = []
        for name in self.names:
            arrival = resumed.get(name)
            times = [
                line.mono
                for line in lines
                if line.record.get("event") == "reconcile"
                and line.record.get("domain") == name
                and arrival is not None
                and line.mono >= arrival
            ]
            if times:
                reconciled_after.append(min(times))
            else:
                lost.append(name)
        result.burst_suspended_events = len(events["suspended"])
        result.burst_resumed_events = len(events["resumed"])
        result.burst_reconciled_domains = len(reconciled_after)
        result.lost_domains = lost[:20]
        last = max(reconciled_after) if reconciled_after else api_done
        result.burst_drain_seconds = last - start
        last_event = max(resumed.values()) if resumed else api_done
        result.burst_drain_after_last_event_seconds = max(0.0, last - last_event)
        result.burst_cpu_seconds = watcher.sample().cpu - cpu_before
