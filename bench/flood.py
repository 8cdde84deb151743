"""A hostile guest floods ACPI_DEVICE_OST: what happens to libvirtd, a subscriber, and the
other domains of the host.

A lab guest writes QEMU's CPU-hotplug OST registers at full speed (tests/lab/flood) for N
seconds, faking vcpu1's hot-add success; QEMU emits one ACPI_DEVICE_OST per write and does not
rate-limit it. Always on a private libvirtd (tests/lab/private_libvirtd.py: session mode as
the lab user), never the host's system daemon, a fresh one per case:

    none    nothing subscribed to QEMU monitor events: does libvirtd itself hold?
    virsh   ``virsh qemu-monitor-event --loop`` subscribed (all domains)
    watch   ``virthotplug watch --json`` running against that daemon

Per case: virConnectListAllDomains latency sampled every 0.25 s (its own connection),
libvirtd RSS growth and CPU, events/s delivered to the subscriber, its output lines/s and
bytes/s and CPU, and whether another domain's hot-adds are still onlined (three during the
flood; by watch with policy online, without watch by this benchmark through the agent at the
domain's OST event) and how long hot-add -> online took. A daemon that does not answer
within 5 s is recorded as wedged, killed by PID, and the next case starts on a fresh one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from common import ROOT, child_env, median, proc_cpu_seconds, watch_env

sys.path.insert(0, str(ROOT / "tests" / "lab"))

CASES = ("none", "virsh", "watch")
DAEMON_NAME = "bench"
WEDGE_SECONDS = 5.0
# A wedged daemon is given this long after the flood stopped to answer again before the kill.
RECOVER_SECONDS = 20.0
DRAIN_SECONDS = 20.0  # after the flood: until the subscriber's output stops, at most this
HOTADDS = 3  # on the other domain during the flood, evenly spread
CALL_TIMEOUT = 15.0
ONLINE_TIMEOUT = 20.0
MIB = 1024 * 1024
# The module, not the console script: the measured code is the checkout's.
VIRTHOTPLUG = [sys.executable, "-m", "virthotplug"]


@dataclass
class HotaddOutcome:
    started: float  # seconds into the flood
    onlined: bool = False
    seconds: Optional[float] = None  # hot-add returned -> online in the guest's sysfs
    error: str = ""


@dataclass
class CaseResult:
    case: str
    flood_seconds: float
    emitted_per_s: float = 0.0  # the guest's own count of OST writes
    wedged: bool = False
    wedged_after: Optional[float] = None  # seconds into the flood
    recovered_after: Optional[float] = None  # seconds after the flood stopped; None: never
    list_max: float = 0.0
    list_p50: float = float("nan")
    list_samples: int = 0
    list_over_1s: int = 0
    rss_start_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_end_mib: float = 0.0  # after the drain
    libvirtd_cpu_percent: float = 0.0
    delivered_per_s: Optional[float] = None  # events the subscriber received, during the flood
    delivered_after: Optional[int] = None  # ... and after it stopped (libvirtd's backlog)
    drain_seconds: Optional[float] = None
    lines_per_s: Optional[float] = None  # subscriber output during the flood
    bytes_per_s: Optional[float] = None
    subscriber_cpu_percent: Optional[float] = None
    hotadds: list[HotaddOutcome] = field(default_factory=list)
    error: str = ""

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_max_mib - self.rss_start_mib

    def hotadd_p50(self) -> float:
        return median([h.seconds for h in self.hotadds if h.seconds is not None])

    def onlined(self) -> str:
        if self.wedged and not self.hotadds:
            return "- (wedged first)"
        return f"{sum(h.onlined for h in self.hotadds)}/{len(self.hotadds)}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rss_growth_mib"] = self.rss_growth_mib
        data["hotadd_p50"] = self.hotadd_p50()
        return data


class Subscriber:
    """A subscriber process; counts its output lines and bytes (stdout and stderr) with
    arrival times, and the lines that report one event."""

    def __init__(
        self,
        argv: list[str],
        is_event: Callable[[str], bool],
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else child_env(),
        )
        self._is_event = is_event
        self._lock = threading.Lock()
        self.lines: list[tuple[float, int, bool]] = []  # (arrival, bytes, is an event)
        self.text: list[str] = []  # the first lines of stderr, for errors
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace")
            with self._lock:
                self.lines.append((time.monotonic(), len(raw), self._is_event(line)))
                if len(self.text) < 50:
                    self.text.append(line.rstrip())

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in t for t in list(self.text)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"subscriber not ready: {' | '.join(self.text[-5:])}")
            time.sleep(0.1)

    def window(self, since: float, until: float) -> tuple[int, int, int]:
        """(lines, bytes, events) that arrived in [since, until)."""
        with self._lock:
            hits = [(n, e) for t, n, e in self.lines if since <= t < until]
        return len(hits), sum(n for n, _ in hits), sum(e for _, e in hits)

    def last_arrival(self) -> float:
        with self._lock:
            return self.lines[-1][0] if self.lines else 0.0

    def cpu_seconds(self) -> float:
        try:
            return proc_cpu_seconds(self.proc.pid)
        except OSError:
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_subscriber(case: str, uri: str, tmp: Path) -> Optional[Subscriber]:
    if case == "virsh":
        sub = Subscriber(
            ["virsh", "-c", uri, "qemu-monitor-event", "--loop", "--event", "ACPI_DEVICE_OST"],
            lambda line: line.startswith("event "),
        )
        time.sleep(1.0)  # virsh prints nothing until the first event
        return sub
    if case == "watch":
        config = tmp / "virthotplug.conf"
        config.write_text("[defaults]\nmode = report\n", encoding="utf-8")
        config.chmod(0o600)
        argv = [*VIRTHOTPLUG, "--config-file", str(config), "-c", uri]
        # Its lock in a run directory of its own: never in the way of the host's daemon.
        sub = Subscriber(
            [*argv, "watch", "--json", "--no-hook-socket"],
            lambda line: '"event":"ost"' in line,
            env=watch_env(tmp),
        )
        sub.wait_for("connected", 60.0)
        return sub
    return None


class Flood:
    def __init__(self, seconds: float, cases: tuple[str, ...] = CASES) -> None:
        self.seconds = seconds
        self.cases = cases

    def run(self, log: Callable[[str], None]) -> list[CaseResult]:
        results = []
        for case in self.cases:
            log(f"  flood, {case}: {self.seconds:.0f} s at full speed on a private libvirtd")
            result = CaseResult(case, self.seconds)
            try:
                self._case(result, log)
            except Exception as exc:  # keep the other cases
                result.error = str(exc)
                log(f"  flood, {case}: failed: {exc}")
            results.append(result)
        return results

    def _case(self, result: CaseResult, log: Callable[[str], None]) -> None:
        from domains import MANUAL
        from lab import Lab, VMRequest
        from private_libvirtd import PrivateLibvirtd, Responsiveness

        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vhp-flood-"))
            daemon = stack.enter_context(PrivateLibvirtd.first_free(DAEMON_NAME))
            lab = stack.enter_context(Lab(uri=daemon.uri, log_dir=daemon.log_dir, ost=False))
            flooder, other = lab.start_many(
                [
                    VMRequest(MANUAL, label="flood"),
                    VMRequest(MANUAL, max_vcpus=HOTADDS + 1, label="other"),
                ]
            )
            # vcpu1 plugged: the fake names a real device, as a hot-add's event does.
            flooder.hot_add(2)
            if result.case == "watch":
                _set_policy_online(daemon.uri, other.name)
            sub = _start_subscriber(result.case, daemon.uri, Path(tmp))
            probe = Responsiveness(daemon.uri).start()
            try:
                self._flood(result, daemon, lab, flooder, other, sub, probe, log)
            finally:
                if sub is not None:
                    sub.stop()
                probe.stop()
            if result.wedged:
                # Killed by PID; a fresh daemon on the same socket lets the lab close.
                daemon.restart()

    def _flood(
        self,
        result: CaseResult,
        daemon: Any,
        lab: Any,
        flooder: Any,
        other: Any,
        sub: Optional[Subscriber],
        probe: Any,
        log: Callable[[str], None],
    ) -> None:
        time.sleep(2.0)  # a few quiet samples first
        rss = [daemon.rss_bytes()]
        result.rss_start_mib = rss[0] / MIB
        cpu0, sub_cpu0 = daemon.cpu_seconds(), sub.cpu_seconds() if sub else 0.0
        hotadder = _Hotadder(lab, other, result, watch=result.case == "watch")
        flooder.flood_start(0, int(self.seconds) + 5)
        started = time.monotonic()
        hotadder.start(started, self.seconds)
        while time.monotonic() - started < self.seconds and not self._wedged(
            result, probe, started, log
        ):
            rss.append(daemon.rss_bytes())
            time.sleep(0.5)
        ended = time.monotonic()
        sent = flooder.flood_stop()  # the control channel does not go through libvirtd
        result.emitted_per_s = sent.rate
        window = ended - started
        result.libvirtd_cpu_percent = (daemon.cpu_seconds() - cpu0) / window * 100
        if sub is not None:
            result.subscriber_cpu_percent = (sub.cpu_seconds() - sub_cpu0) / window * 100
            lines, size, events = sub.window(started, ended)
            result.lines_per_s, result.bytes_per_s = lines / window, size / window
            result.delivered_per_s = events / window
        hotadder.join(0 if result.wedged else CALL_TIMEOUT + ONLINE_TIMEOUT + 5)
        for outcome in result.hotadds:
            if not outcome.onlined and not outcome.error:
                outcome.error = "unfinished"
        self._drain(result, daemon, sub, probe, ended, rss, log)
        if result.wedged:
            result.recovered_after = _recovery(daemon, time.monotonic())
        result.rss_max_mib = max(rss) / MIB
        result.list_max, result.list_p50 = probe.max_seconds(), probe.p50_seconds()
        result.list_samples, result.list_over_1s = probe.count(), probe.over(1.0)
        log(
            f"  flood, {result.case}: {result.emitted_per_s:.0f} events/s sent, "
            f"list max {result.list_max:.2f} s, RSS +{result.rss_growth_mib:.0f} MiB, "
            f"hot-adds onlined {result.onlined()}" + (", WEDGED" if result.wedged else "")
        )

    def _drain(
        self,
        result: CaseResult,
        daemon: Any,
        sub: Optional[Subscriber],
        probe: Any,
        ended: float,
        rss: list[int],
        log: Callable[[str], None],
    ) -> None:
        """After the flood: until the subscriber has had nothing for 2 s (libvirtd's
        backlog drained), at most DRAIN_SECONDS; a wedge ends it."""
        deadline = ended + DRAIN_SECONDS
        while time.monotonic() < deadline and not result.wedged:
            if self._wedged(result, probe, ended - self.seconds, log):
                break
            rss.append(daemon.rss_bytes())
            quiet = sub is None or time.monotonic() - max(sub.last_arrival(), ended) > 2.0
            if quiet and time.monotonic() - ended > 2.0:
                break
            time.sleep(0.5)
        if sub is not None:
            last = max(sub.last_arrival(), ended)
            result.drain_seconds = last - ended
            result.delivered_after = sub.window(ended, time.monotonic() + 1)[2]
        if not result.wedged:
            result.rss_end_mib = daemon.rss_bytes() / MIB

    @staticmethod
    def _wedged(result: CaseResult, probe: Any, started: float, log: Callable[[str], None]) -> bool:
        if result.wedged or probe.stalled() <= WEDGE_SECONDS:
            return result.wedged
        result.wedged = True
        result.wedged_after = time.monotonic() - WEDGE_SECONDS - started
        log(f"  flood, {result.case}: libvirtd has not answered for {WEDGE_SECONDS:.0f} s")
        return True


def _recovery(daemon: Any, since: float) -> Optional[float]:
    """Seconds until a wedged daemon answers again (the flood is stopped), None if it does
    not within RECOVER_SECONDS."""
    while time.monotonic() - since < RECOVER_SECONDS:
        left = max(0.1, RECOVER_SECONDS - (time.monotonic() - since))
        if daemon.list_latency(timeout=left) is not None:
            return time.monotonic() - since
    return None


def _set_policy_online(uri: str, domain: str) -> None:
    argv = [*VIRTHOTPLUG, "-c", uri, "policy", domain, "--set", "online"]
    subprocess.run(argv, env=child_env(), check=True, capture_output=True, timeout=60)


class _Hotadder:
    """Hot-adds on the other domain during the flood, each bounded (libvirtd may wedge)."""

    def __init__(self, lab: Any, vm: Any, result: CaseResult, watch: bool) -> None:
        self._lab, self._vm, self._result, self._watch = lab, vm, result, watch
        self._thread: Optional[threading.Thread] = None
        # Without watch this benchmark onlines at the OST event: only this domain's events.
        self._ost = None if watch else lab.monitor("ACPI_DEVICE_OST", vm)

    def start(self, started: float, seconds: float) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(started, seconds), name="flood-hotadd", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, started: float, seconds: float) -> None:
        for n in range(1, HOTADDS + 1):
            at = started + seconds * n / (HOTADDS + 1)
            time.sleep(max(0.0, at - time.monotonic()))
            if self._result.wedged:
                return  # the daemon is killed: nothing more to learn
            outcome = HotaddOutcome(time.monotonic() - started)
            self._result.hotadds.append(outcome)
            try:
                self._one(n, outcome)
            except Exception as exc:  # recorded: libvirtd wedged, agent call failed, ...
                outcome.error = str(exc) or type(exc).__name__

    def _one(self, cpu: int, outcome: HotaddOutcome) -> None:
        from private_libvirtd import bounded

        since = time.monotonic()
        ok, _ = bounded(lambda: self._vm.hot_add(cpu + 1), CALL_TIMEOUT)
        if not ok:
            raise TimeoutError(f"hot-add did not return within {CALL_TIMEOUT:.0f} s")
        returned = time.monotonic()
        if self._ost is not None:
            self._ost.wait_for(self._vm.name, since=since, timeout=CALL_TIMEOUT)
            ok, _ = bounded(lambda: self._vm.dom.setGuestVcpus(str(cpu), 1, 0), CALL_TIMEOUT)
            if not ok:
                raise TimeoutError(f"setGuestVcpus did not return within {CALL_TIMEOUT:.0f} s")
        deadline = returned + ONLINE_TIMEOUT
        while time.monotonic() < deadline:
            if cpu in self._vm.cpu_state().online:
                outcome.onlined, outcome.seconds = True, time.monotonic() - returned
                return
            time.sleep(0.05)
        outcome.error = f"not online within {ONLINE_TIMEOUT:.0f} s"


def flood_available() -> Optional[str]:
    """Why the flood benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a private libvirtd of the lab user)"
    return None


# ---- report -------------------------------------------------------------------------------

LABELS = {
    "none": "nothing subscribed",
    "virsh": "virsh qemu-monitor-event",
    "watch": "virthotplug watch",
}
# What the e2e flood test asks of watch (tests/e2e/test_flood.py).
TARGET_LIST_SECONDS = 1.0
TARGET_RSS_GROWTH_MIB = 50.0
TARGET_WATCH_LINES = 50.0


def _opt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None or value != value else fmt.format(value)


def _answering(r: CaseResult) -> str:
    if r.wedged:
        again = _opt(r.recovered_after, "answered again {:.1f} s after the flood")
        again = again if r.recovered_after is not None else f"not {RECOVER_SECONDS:.0f} s after"
        return f"WEDGED {_opt(r.wedged_after, '{:.1f}')} s in; {again}; killed"
    return f"yes ({r.list_over_1s} calls over 1 s)"


ROWS: list[tuple[str, Callable[[CaseResult], str]]] = [
    ("events/s sent by the guest", lambda r: f"{r.emitted_per_s:,.0f}"),
    ("libvirtd answering", _answering),
    ("ListAllDomains max / p50", lambda r: f"{r.list_max:.2f} s / {r.list_p50 * 1000:.1f} ms"),
    (
        "libvirtd RSS start -> max (growth)",
        lambda r: f"{r.rss_start_mib:.0f} -> {r.rss_max_mib:.0f} MiB (+{r.rss_growth_mib:.0f})",
    ),
    ("libvirtd CPU", lambda r: f"{r.libvirtd_cpu_percent:.0f} %"),
    ("events/s delivered to the subscriber", lambda r: _opt(r.delivered_per_s, "{:,.0f}")),
    ("delivered after the flood (backlog)", lambda r: _opt(r.delivered_after, "{:,.0f}")),
    ("subscriber output lines/s", lambda r: _opt(r.lines_per_s, "{:,.0f}")),
    ("subscriber output bytes/s", lambda r: _opt(r.bytes_per_s, "{:,.0f}")),
    ("subscriber CPU", lambda r: _opt(r.subscriber_cpu_percent, "{:.0f} %")),
    ("other domain: hot-adds onlined", lambda r: r.onlined()),
    ("other domain: hot-add -> online p50", lambda r: _opt(r.hotadd_p50(), "{:.2f} s")),
]


def flood_table(results: list[CaseResult]) -> str:
    from common import table

    seconds = results[0].flood_seconds if results else 0
    header = ["", *(LABELS.get(r.case, r.case) for r in results)]
    body = [[label, *(cell(r) for r in results)] for label, cell in ROWS]
    errors = [f"{r.case}: {r.error}" for r in results if r.error]
    notes = (
        "Other domain onlined by watch (policy online) in the watch case, else by this "
        "benchmark through the agent at the domain's OST event. Wedged: no answer within "
        f"{WEDGE_SECONDS:.0f} s; killed by PID, the next case on a fresh daemon."
    )
    text = (
        f"ACPI_DEVICE_OST flood from one guest, full speed for {seconds:.0f} s, on a private "
        f"libvirtd (session mode, lab user)\n{table(header, body)}\n{notes}"
    )
    return text + "".join(f"\nfailed: {e}" for e in errors)


def flood_targets(results: list[CaseResult]) -> list[dict[str, Any]]:
    """The e2e flood test's figures, for the watch case."""
    watch = next((r for r in results if r.case == "watch" and not r.error), None)
    if watch is None:
        return []
    label = f"flood {watch.flood_seconds:.0f} s under watch"
    return [
        {
            "target": f"{label}: libvirtd answers ListAllDomains within 1 s throughout",
            "value": "wedged" if watch.wedged else f"max {watch.list_max:.2f} s",
            "met": not watch.wedged and watch.list_max <= TARGET_LIST_SECONDS,
        },
        {
            "target": f"{label}: libvirtd RSS grows less than 50 MiB",
            "value": f"+{watch.rss_growth_mib:.0f} MiB",
            "met": watch.rss_growth_mib < TARGET_RSS_GROWTH_MIB,
        },
        {
            "target": f"{label}: another domain's hot-adds are onlined",
            "value": watch.onlined(),
            "met": bool(watch.hotadds) and all(h.onlined for h in watch.hotadds),
        },
        {
            "target": f"{label}: fewer than 50 log lines/s",
            "value": _opt(watch.lines_per_s, "{:.0f}/s"),
            "met": not watch.wedged
            and watch.lines_per_s is not None
            and watch.lines_per_s < TARGET_WATCH_LINES,
        },
    ]
