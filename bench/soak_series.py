"""The soak's series (sampled every 10 s), its pass criteria and its plot.

A sample holds ``watch``'s RSS, open fds, threads and CPU seconds from /proc, its reconcile
queue depth and the reconciles and hot-add → online latencies of the last interval from its
metrics endpoint, and each libvirtd's RSS. The criteria, computed after a warm-up (watch
reads every domain, the pools fill, the first resyncs allocate what later ones reuse):

* RSS slope under 1 MiB/h (least squares over the samples after the warm-up); a run shorter
  than 30 minutes cannot tell that from noise, and bounds the RSS growth after the warm-up
  (last sample minus first) to 16 MiB instead;
* open fds and threads flat: the median of the last third of the samples no more than
  ``FLAT_TOLERANCE`` above the median of the first third (a reconnect's socket comes and goes;
  a leak only grows);
* hot-add → online p99 under 2 s, from the harness's own measurements (hot-add call
  returning to the guest listing the CPU online, where the policy onlines it).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

MIB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 10.0
RSS_SLOPE_MAX_MIB_PER_H = 1.0
# A slope of 1 MiB/h cannot be told from noise in minutes (one resync of 1,000 domains moves
# RSS by more): runs shorter than this bound the growth after the warm-up instead.
SLOPE_MIN_SECONDS = 1800.0
SHORT_RUN_RSS_GROWTH_MIB = 16.0
HOTADD_P99_MAX = 2.0
FLAT_TOLERANCE = 4  # the agent connection pools grow to their bound (8 idle per host)
# The first samples are not judged: the longer of a minute and a fifth of the run.
WARMUP_MIN_SECONDS = 60.0
WARMUP_FRACTION = 0.2


@dataclass
class Sample:
    t: float  # seconds since the run's start
    rss_mib: float
    fds: int
    threads: int
    cpu_seconds: float
    queue_depth: Optional[float]
    reconciles: float  # in the interval
    reconcile_mean_s: Optional[float]  # mean reconcile duration in the interval
    hotadd_online_mean_s: Optional[float]  # from the metrics histogram, in the interval
    libvirtd_rss_mib: dict[str, float] = field(default_factory=dict)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def proc_rss_mib(pid: int) -> float:
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def proc_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def scrape(port: int) -> dict[str, float]:
    """The metrics endpoint's samples as {name{labels}: value}, summed over hosts."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("host", "domain")}
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))
            values[key] = values.get(key, 0.0) + sample.value
    return values


def _delta_mean(now: dict[str, float], before: dict[str, float], base: str) -> tuple[float, Any]:
    count = now.get(f"{base}_count", 0.0) - before.get(f"{base}_count", 0.0)
    total = now.get(f"{base}_sum", 0.0) - before.get(f"{base}_sum", 0.0)
    return count, (total / count if count > 0 else None)


class Sampler:
    """Samples every ``interval`` seconds on a thread of its own until stopped."""

    def __init__(
        self,
        watch_pid: int,
        metrics_port: int,
        libvirtds: Callable[[], dict[str, Optional[int]]],
        interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self._pid = watch_pid
        self._port = metrics_port
        self._libvirtds = libvirtds
        self._interval = interval
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._last: dict[str, float] = {}
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self) -> Sampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while True:
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a sample lost is reported, never the end of the run
                self.errors.append(f"{time.monotonic() - self._started:.0f} s: {exc!r}")
            if self._stop.wait(self._interval):
                return

    def sample(self) -> Sample:
        metrics = scrape(self._port)
        reconciles, reconcile_mean = _delta_mean(
            metrics, self._last, "virthotplug_reconcile_duration_seconds"
        )
        _, hotadd_mean = _delta_mean(
            metrics, self._last, "virthotplug_hotadd_online_latency_seconds"
        )
        self._last = metrics
        status = proc_status(self._pid)
        return Sample(
            t=round(time.monotonic() - self._started, 2),
            rss_mib=int(status["VmRSS"].split()[0]) / 1024,
            fds=len(os.listdir(f"/proc/{self._pid}/fd")),
            threads=int(status["Threads"]),
            cpu_seconds=proc_cpu_seconds(self._pid),
            queue_depth=metrics.get("virthotplug_reconcile_queue_depth"),
            reconciles=reconciles,
            reconcile_mean_s=reconcile_mean,
            hotadd_online_mean_s=hotadd_mean,
            libvirtd_rss_mib={
                name: proc_rss_mib(pid)
                for name, pid in self._libvirtds().items()
                if pid is not None and Path(f"/proc/{pid}").exists()
            },
        )


# ---- pass criteria ------------------------------------------------------------------------


@dataclass
class Criterion:
    name: str
    value: Optional[float]
    limit: str
    passed: bool


def warmup_seconds(duration: float) -> float:
    return max(WARMUP_MIN_SECONDS, WARMUP_FRACTION * duration)


def slope_per_hour(points: list[tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of (seconds, value) points, per hour; None under 3 points."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / var * 3600


def growth(values: list[int]) -> Optional[float]:
    """Median of the last third minus median of the first third; None under 3 values."""
    if len(values) < 3:
        return None
    third = max(1, len(values) // 3)
    return statistics.median(values[-third:]) - statistics.median(values[:third])


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def criteria(
    samples: list[Sample], duration: float, hotadd_latencies: list[float]
) -> list[Criterion]:
    judged = [s for s in samples if s.t >= warmup_seconds(duration)]
    fds, threads = growth([s.fds for s in judged]), growth([s.threads for s in judged])
    p99 = percentile(hotadd_latencies, 99)
    return [
        _rss_criterion(judged, duration),
        Criterion(
            "fds_growth", fds, f"<= {FLAT_TOLERANCE}", fds is not None and fds <= FLAT_TOLERANCE
        ),
        Criterion(
            "threads_growth",
            threads,
            f"<= {FLAT_TOLERANCE}",
            threads is not None and threads <= FLAT_TOLERANCE,
        ),
        Criterion(
            "hotadd_online_p99_s",
            p99,
            f"< {HOTADD_P99_MAX}",
            p99 is not None and p99 < HOTADD_P99_MAX,
        ),
    ]


def _rss_criterion(judged: list[Sample], duration: float) -> Criterion:
    if duration >= SLOPE_MIN_SECONDS:
        slope = slope_per_hour([(s.t, s.rss_mib) for s in judged])
        passed = slope is not None and slope < RSS_SLOPE_MAX_MIB_PER_H
        return Criterion("rss_slope_mib_per_h", slope, f"< {RSS_SLOPE_MAX_MIB_PER_H}", passed)
    grown = judged[-1].rss_mib - judged[0].rss_mib if len(judged) >= 2 else None
    passed = grown is not None and grown < SHORT_RUN_RSS_GROWTH_MIB
    return Criterion("rss_growth_mib", grown, f"< {SHORT_RUN_RSS_GROWTH_MIB:g}", passed)


def criteria_table(found: list[Criterion]) -> str:
    lines = [f"{'criterion':<24} {'value':>10}  {'limit':<8} result"]
    for c in found:
        value = "-" if c.value is None else f"{c.value:.3f}"
        lines.append(f"{c.name:<24} {value:>10}  {c.limit:<8} {'pass' if c.passed else 'FAIL'}")
    return "\n".join(lines)


def samples_dicts(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


# ---- the plot (matplotlib: the bench extra) -----------------------------------------------


def plot(
    samples: list[Sample], latencies: list[tuple[float, float]], path: Path, title: str
) -> bool:
    """Draw the series as a PNG; False (nothing drawn) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    minutes = [s.t / 60 for s in samples]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    panels: list[tuple[Any, str, list[Any]]] = [
        (axes[0][0], "watch RSS (MiB)", [s.rss_mib for s in samples]),
        (axes[0][1], "watch open fds / threads", [s.fds for s in samples]),
        (axes[1][0], "watch CPU (s, cumulative)", [s.cpu_seconds for s in samples]),
        (axes[1][1], "reconcile queue depth", [s.queue_depth for s in samples]),
        (axes[2][0], "reconcile mean duration (s) per 10 s", [s.reconcile_mean_s for s in samples]),
    ]
    for ax, label, values in panels:
        ax.plot(minutes, [math.nan if v is None else v for v in values], marker=".")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][1].plot(minutes, [s.threads for s in samples], marker=".", label="threads")
    axes[0][1].legend(["fds", "threads"], fontsize=8)
    ax = axes[2][1]
    ax.scatter(
        [t / 60 for t, _ in latencies], [v for _, v in latencies], s=10, label="hot-add → online"
    )
    for name in sorted({n for s in samples for n in s.libvirtd_rss_mib}):
        values = [s.libvirtd_rss_mib.get(name, math.nan) / 100 for s in samples]
        ax.plot(minutes, values, label=f"{name} RSS (100 MiB)")
    ax.set_title("hot-add → online (s); libvirtd RSS (100 MiB)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax in axes[2]:
        ax.set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
