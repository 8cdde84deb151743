"""Small helpers shared by the benchmarks: paths, process statistics, tables, call counts."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
NODES_DIR = RESULTS / "nodes"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")

# Public libvirt API entry points that never reach the daemon (local getters, reference
# counting, registration): left out of the call counts. Everything else is one request.
LOCAL_APIS = frozenset(
    {
        "virGlobalInit",
        "virRegisterConnectDriver",
        "virRegisterStateDriver",
        "virConnectOpenInternal",
        "virConnectRef",
        "virConnectIsAlive",
        "virConnectSetKeepAlive",
        "virConnectRegisterCloseCallback",
        "virConnectUnregisterCloseCallback",
        "virDomainRef",
        "virDomainFree",
        "virDomainGetConnect",
        "virDomainGetName",
        "virDomainGetID",
        "virDomainGetUUID",
        "virDomainGetUUIDString",
        "virDomainStatsRecordListFree",
        "virEventRegisterDefaultImpl",
        "virEventRunDefaultImpl",
    }
)


def virthotplug_command() -> list[str]:
    """The installed entry point next to this interpreter, else ``python -m virthotplug``."""
    script = Path(sys.executable).parent / "virthotplug"
    return [str(script)] if script.exists() else [sys.executable, "-m", "virthotplug"]


def byte_compile_virthotplug() -> None:
    """Byte-compile virthotplug's modules, as installing a package does (pip and dh_python3
    compile at install time, and libvirt-python's modules, which the floor imports, are
    compiled so). Where PYTHONDONTWRITEBYTECODE is set every run would otherwise compile
    the sources again, a cost no installed copy has."""
    import compileall

    import virthotplug

    compileall.compile_dir(str(Path(virthotplug.__file__).parent), quiet=1)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBVIRT_")}
    env.update(extra)
    return env


def watch_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``watch`` under test: its one-per-host lock in a run directory of
    its own (``VIRTHOTPLUG_RUN_DIR``, virthotplug(1)), never the host's /run/virthotplug, so
    a real daemon and a benchmark never block each other."""
    run_dir = tmp / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    return child_env(VIRTHOTPLUG_RUN_DIR=str(run_dir), **extra)


def count_calls(argv: Sequence[str]) -> tuple[int, Counter[str]]:
    """Run ``argv`` once with libvirt's public-API debug log on; count the calls it made.

    libvirt logs every public API entry point at debug level (filter ``1:libvirt``); the
    counts are those entries minus ``LOCAL_APIS``. Only for counting: the log slows calls.
    """
    with tempfile.TemporaryDirectory(prefix="vhp-calls-") as tmp:
        log = Path(tmp) / "libvirt.log"
        env = child_env(LIBVIRT_LOG_FILTERS="1:libvirt 4:*", LIBVIRT_LOG_OUTPUTS=f"1:file:{log}")
        subprocess.run(argv, env=env, capture_output=True, check=False, timeout=1800)
        calls: Counter[str] = Counter()
        if log.exists():
            with log.open(encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    marker = line.find(": debug : ")
                    if marker < 0:
                        continue
                    name = line[marker + 10 :].split(":", 1)[0].strip()
                    if name.startswith("vir") and name not in LOCAL_APIS:
                        calls[name] += 1
    return sum(calls.values()), calls


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc/PID/status."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def daemon_restarted(message: str) -> bool:
    """Whether a failure looks like libvirtd going away (restarted by other work)."""
    text = message.lower()
    return any(
        hint in text
        for hint in (
            "failed to connect",
            "cannot connect",
            "cannot recv data",
            "end of file",
            "connection reset",
            "is libvirtd running",
            "client socket is closed",
        )
    )


def wait_for_daemon(uri: str, timeout: float = 180.0) -> None:
    """Until ``virsh -c URI version`` answers again (then a little more, to settle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["virsh", "-c", uri, "version"], capture_output=True, check=False, timeout=60
        )
        if done.returncode == 0:
            time.sleep(2.0)
            return
        time.sleep(1.0)
    raise RuntimeError(f"libvirtd did not come back within {timeout:.0f} s")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_seconds(value: Optional[float]) -> str:
    if value is None or value != value:
        return "-"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.0f} ms"


def fmt_ms(value: Optional[float]) -> str:
    if value is None or value != value:
        return "-"
    return f"{value * 1000:.2f} ms" if value < 0.1 else f"{value * 1000:.0f} ms"


def fmt_ratio(value: Optional[float]) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A plain fixed-width table; columns from ``right`` on are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).rjust(w) if i >= right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
