"""``make bench``: virthotplug's benchmarks, side by side, in one run.

    sweep       ``status --all --json`` vs the floor vs a virsh loop, N = 10 ... 5000
    footprint   ``watch`` with 1,000 domains: RSS and CPU idle, and a lifecycle-event burst
    hotadd      hot-add to online on lab VMs
    flood       a guest flooding ACPI_DEVICE_OST, on a private libvirtd: nothing subscribed,
                ``virsh qemu-monitor-event``, ``watch`` (also ``bench/results/flood.json``)
    shrink      a shrink on stack 3 (libvirt 12.8): ``setvcpus`` with the async unplug (in
                the root), ``setvcpus`` from a 9.0 client (sync), a plain ``virsh setvcpus``

Absolute times on a shared machine are noisy; the ratios are what count: every comparison
is measured in the same run, repetitions interleaved, medians. Prints tables and writes
``bench/results/bench-<time>.json`` (and ``latest.json``).

Needs libvirtd running (``make host`` / ``bash tests/lab/host-setup.sh`` starts it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from common import (
    RESULTS,
    byte_compile_virthotplug,
    fmt_ms,
    fmt_ratio,
    fmt_seconds,
    load_average,
    table,
)
from flood import Flood, flood_available, flood_table, flood_targets
from footprint import SHARED_URI, Footprint, FootprintResult
from hotadd import AGENT_POLL, DebianResult, Hotadd, HotaddResult, Latencies, debian12_cached
from hotadd import METHODS as HOTADD_METHODS
from nodes import AGENTS_COUNTS, MIX, MIXES
from shrink import Shrink, shrink_table, shrink_targets
from sweep import SizeResult, Sweep

TARGET_FLOOR_RATIO = 1.3  # status within 1.3x of the floor at 1,000 domains, every mix
TARGET_VIRSH_RATIO = 50.0  # at least 50x faster than the virsh loop
TARGET_RSS_MIB = 50.0
TARGET_IDLE_CPU = 0.3  # percent of one core, 120 s with 1,000 domains, resyncs included
TARGET_HOTADD_OVER_RULE = 0.030  # watch's hot-add to online p50 over the guest's own rule
TARGET_HOTADD_UNDER_RESYNC = 0.030  # ... and at most this much slower under a resync
TARGET_BURST_OVER_FLOOR = 1.05  # ten at once: OST to online p50 within 5 % of the floor


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,5000", help="domain counts")
    parser.add_argument("--repetitions", type=int, default=5, help="rounds per size")
    parser.add_argument("--virsh-sample", type=int, default=20, help="virsh loop sample size")
    parser.add_argument("--footprint-domains", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument(
        "--mix-sizes",
        default="1000",
        help="domain counts for the other mixes (all running with agents, none with agents, "
        "all shut off, all running with agents and every vCPU count of 4, 8 and 16)",
    )
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-footprint", action="store_true")
    parser.add_argument(
        "--footprint-mixes",
        default=f"{MIX},{AGENTS_COUNTS}",
        help="layouts (nodes.MIXES) plain watch's footprint runs over, every domain running "
        "(watch --metrics-listen runs over the mix)",
    )
    parser.add_argument(
        "--no-metrics-footprint", action="store_true", help="skip watch --metrics-listen"
    )
    parser.add_argument("--no-hotadd", action="store_true", help="skip the lab VM benchmarks")
    parser.add_argument("--hotadd-rounds", type=int, default=21, help="hot-adds per method")
    parser.add_argument("--burst-vms", type=int, default=10, help="VMs hot-added at once")
    parser.add_argument("--burst-rounds", type=int, default=2)
    parser.add_argument(
        "--watch-workers", type=int, help="watch --workers for the hot-add part (default: its own)"
    )
    parser.add_argument(
        "--hotadd-guest",
        choices=("busybox", "debian12", "both"),
        help="guests of the hot-add part: the lab's busybox guest, real Debian 12 guests, or "
        "both (default: both when the Debian 12 images are built, see make lab-images)",
    )
    parser.add_argument(
        "--hotadd-debian-rounds", type=int, default=14, help="hot-adds per method, Debian 12"
    )
    parser.add_argument(
        "--hotadd-resync-domains",
        type=int,
        default=1000,
        help="test-node domains resynced by the second watch on Debian 12 (0: no such case)",
    )
    parser.add_argument("--no-flood", action="store_true", help="skip the OST flood cases")
    parser.add_argument(
        "--no-shrink", action="store_true", help="skip the stack-3 shrink (builds stack 3)"
    )
    parser.add_argument("--shrink-rounds", type=int, default=5, help="shrinks per method")
    parser.add_argument(
        "--flood-seconds", type=float, default=60.0, help="length of each flood case"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small and short (a smoke test of the benchmark)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repetitions, args.virsh_sample = "10,100", 2, 5
        args.mix_sizes = "100"
        args.footprint_domains, args.idle_seconds = 100, 10.0
        args.hotadd_rounds, args.burst_vms, args.burst_rounds = 3, 3, 1
        args.hotadd_debian_rounds = 3
        args.hotadd_resync_domains = min(args.hotadd_resync_domains, 100)
        args.flood_seconds = min(args.flood_seconds, 10.0)
        args.shrink_rounds = min(args.shrink_rounds, 2)
    return args


def check_daemon() -> None:
    if shutil.which("virsh") is None:
        sys.exit("bench: virsh not found: run 'make host' first")
    done = subprocess.run(
        ["virsh", "-c", SHARED_URI, "version"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(
            "bench: cannot reach libvirtd's test driver "
            f"({done.stderr.strip()}): run 'bash tests/lab/host-setup.sh'"
        )


# --- the sweep ------------------------------------------------------------------------------


def run_sweep(args: argparse.Namespace) -> list[SizeResult]:
    results = []
    for size in (int(x) for x in args.sizes.split(",")):
        repetitions = args.repetitions if size < 5000 else max(2, args.repetitions - 2)
        sample = min(size, args.virsh_sample if size < 5000 else max(2, args.virsh_sample // 2))
        log(f"sweep: {size} domains, {repetitions} rounds, virsh over {sample} domains")
        results.append(Sweep(size, repetitions, sample).run(log))
    for mix in MIXES[1:]:
        for size in (int(x) for x in args.mix_sizes.split(",") if x):
            log(f"sweep: {size} domains, mix {mix}, {args.repetitions} rounds")
            results.append(Sweep(size, args.repetitions, 0, mix).run(log))
    return results


def paired_ratio(result: SizeResult, num: str, den: str, what: str = "seconds") -> float:
    """Median over rounds of num/den measured in the same round (robust to load drift)."""
    values = getattr(result, what)
    pairs = zip(values.get(num, []), values.get(den, []))
    ratios = sorted(a / b for a, b in pairs if b > 0)
    return ratios[len(ratios) // 2] if ratios else float("nan")


def sweep_tables(results: list[SizeResult]) -> str:
    rows = []
    for r in results:
        extrapolated = "*" if 0 < r.virsh_sample < r.domains else ""
        rows.append(
            [
                str(r.domains),
                r.mix,
                fmt_seconds(r.median("virthotplug")),
                fmt_seconds(r.median("floor")),
                fmt_seconds(r.median("virsh")) + extrapolated,
                fmt_seconds(r.median("connect")),
                fmt_ratio(paired_ratio(r, "virthotplug", "floor")),
                fmt_ratio(paired_ratio(r, "virthotplug", "floor", "cpu_seconds")),
                fmt_ratio(paired_ratio(r, "virsh", "virthotplug")),
            ]
        )
    times = table(
        [
            "N",
            "mix",
            "virthotplug",
            "floor",
            "virsh loop",
            "connect only",
            "vhp/floor",
            "CPU vhp/floor",
            "virsh/vhp",
        ],
        rows,
        right=2,
    )
    rows = []
    previous: Optional[SizeResult] = None
    for r in results:
        marginal = ["-", "-"]
        if previous is not None and previous.mix == r.mix:
            span = r.domains - previous.domains
            marginal = [
                fmt_ms((r.median(m) - previous.median(m)) / span) for m in ("virthotplug", "floor")
            ]
        rows.append(
            [
                str(r.domains),
                r.mix,
                fmt_ms(r.per_domain("virthotplug")),
                fmt_ms(r.per_domain("floor")),
                fmt_ms(r.per_domain("virsh")),
                *marginal,
            ]
        )
        previous = r
    per_domain = table(
        [
            "N",
            "mix",
            "vhp/domain",
            "floor/domain",
            "virsh/domain",
            "vhp marginal",
            "floor marginal",
        ],
        rows,
        right=2,
    )
    rows = []
    for r in results:
        calls = r.calls
        virsh = calls.get("virsh")
        rows.append(
            [
                str(r.domains),
                r.mix,
                str(calls.get("virthotplug", "-")),
                str(calls.get("floor", "-")),
                ("-" if virsh is None else str(virsh))
                + ("*" if 0 < r.virsh_sample < r.domains else ""),
                f"{calls.get('virthotplug', 0) / r.domains:.2f}",
                f"{calls.get('floor', 0) / r.domains:.2f}",
                "-" if virsh is None else f"{virsh / r.domains:.2f}",
            ]
        )
    calls_table = table(
        [
            "N",
            "mix",
            "virthotplug",
            "floor",
            "virsh loop",
            "vhp/domain",
            "floor/domain",
            "virsh/domain",
        ],
        rows,
        right=2,
    )
    return "\n\n".join(
        [
            "Sweep: wall time, medians of interleaved rounds (ratios: median of per-round "
            "ratios; CPU: the client process's own)",
            times,
            "Per-domain cost (total / N) and marginal cost between consecutive N of a mix",
            per_domain,
            "libvirt API calls that reach the daemon (from libvirt's public-API debug log)",
            calls_table,
            "* virsh loop over an evenly spread sample of domains, extrapolated linearly to N "
            "(the mix only).",
        ]
    )


def sweep_breakdown(results: list[SizeResult]) -> str:
    lines = ["Calls by API (virthotplug | floor), largest N of each mix:"]
    largest: dict[str, SizeResult] = {}
    for r in results:
        if r.mix not in largest or r.domains > largest[r.mix].domains:
            largest[r.mix] = r
    for mix, r in largest.items():
        lines.append(f"  {mix}, N={r.domains}")
        apis = sorted(set(r.call_breakdown.get("virthotplug", {})) | set(r.call_breakdown["floor"]))
        for api in apis:
            vhp = r.call_breakdown["virthotplug"].get(api, 0)
            floor = r.call_breakdown["floor"].get(api, 0)
            lines.append(f"    {api:<32} {vhp:>7} | {floor:>7}")
    return "\n".join(lines)


# --- the footprint --------------------------------------------------------------------------


def footprint_label(result: FootprintResult) -> str:
    return " ".join(["watch", *result.extra_args, f"({result.mix})"])


def footprint_table(results: list[FootprintResult]) -> str:
    def opt(value: Optional[float], unit: str, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}{unit}"

    rows: list[tuple[str, Callable[[FootprintResult], str]]] = [
        ("domains", lambda r: str(r.domains)),
        ("start-up: first resync of every domain", lambda r: f"{r.startup_seconds:.1f} s"),
        ("RSS after start-up", lambda r: f"{r.startup_rss_mib:.1f} MiB"),
        ("idle window: length", lambda r: f"{r.idle_seconds:.0f} s"),
        ("idle window: RSS max", lambda r: f"{r.idle_rss_mib:.1f} MiB"),
        ("idle window: CPU (periodic resync included)", lambda r: f"{r.idle_cpu_percent:.2f} %"),
        (
            "idle between resyncs: CPU",
            lambda r: (
                opt(r.idle_between_resyncs_cpu_percent, " %")
                + f" ({r.idle_between_resyncs_seconds:.0f} s)"
            ),
        ),
        ("periodic resyncs in the window", lambda r: str(r.resyncs)),
        (
            "periodic resyncs: reconciles, last one's duration",
            lambda r: f"{r.resync_reconciles}, {opt(r.resync_seconds, ' s', 2)}",
        ),
        ("one periodic resync: CPU time", lambda r: opt(r.resync_cpu_seconds, " s")),
        ("burst: suspend+resume calls took", lambda r: f"{r.burst_api_seconds:.1f} s"),
        (
            "burst: events seen (suspended / resumed)",
            lambda r: f"{r.burst_suspended_events} / {r.burst_resumed_events}",
        ),
        ("burst: domains reconciled after resume", lambda r: str(r.burst_reconciled_domains)),
        (
            "burst: drain, first suspend to last reconcile",
            lambda r: f"{r.burst_drain_seconds:.1f} s",
        ),
        (
            "burst: drain after the last resume event",
            lambda r: f"{r.burst_drain_after_last_event_seconds:.1f} s",
        ),
        ("burst: CPU time", lambda r: f"{r.burst_cpu_seconds:.1f} s"),
        ("peak RSS (VmHWM)", lambda r: f"{r.peak_rss_mib:.1f} MiB"),
        ("metrics: samples in one scrape", lambda r: opt(r.metrics_series, "", 0)),
        ("metrics: scrape time", lambda r: opt(r.metrics_scrape_seconds, " s", 3)),
        ("metrics: lifecycle events counted", lambda r: opt(r.metrics_lifecycle_events, "", 0)),
    ]
    header = ["", *(footprint_label(r) for r in results)]
    body = [[label, *(cell(r) for r in results)] for label, cell in rows]
    notes = [f"  {footprint_label(r)}: {r.resync_summary}" for r in results]
    return (
        f"Daemon footprint: watch over {SHARED_URI}\n"
        + table(header, body)
        + "\nlast periodic resync, as watch reported it:\n"
        + "\n".join(notes)
    )


# --- hot-add to online on lab VMs -----------------------------------------------------------

HOTADD_LABELS = {
    "auto-online": "(a) guest auto-online rule",
    "watch": "(b) watch, policy online",
    "poll-1s": "(c) 1-s guestVcpus polling loop",
}


def hotadd_guests(choice: Optional[str]) -> list[str]:
    """The guests of the hot-add part: as asked, else Debian 12 too when its images exist."""
    if choice == "both":
        return ["busybox", "debian12"]
    if choice is not None:
        return [choice]
    if debian12_cached():
        return ["busybox", "debian12"]
    log("hot-add: the Debian 12 images are not built (make lab-images): busybox guest only")
    return ["busybox"]


def hotadd_tables(result: HotaddResult) -> str:
    text = busybox_tables(result) if "busybox" in result.guests else ""
    if result.debian is not None:
        text += ("\n\n" if text else "") + debian_table(result.debian)
    elif result.debian_error:
        text += ("\n\n" if text else "") + f"Debian 12: not measured: {result.debian_error}"
    return text


DEBIAN_LABELS = {
    "udev-rule": "(a) udev rule (debian12-rule)",
    "watch": "(b) watch, policy online (debian12)",
    "watch-resync": "(c) watch, during a test-node resync",
}


def debian_table(result: DebianResult) -> str:
    rows = []
    for method in result.methods:
        host = result.host[method].summary()
        clock = result.guest_clock[method].summary()
        up = result.guest_clock_up[method].summary()
        rows.append(
            [
                DEBIAN_LABELS[method],
                str(host["n"]),
                fmt_seconds(host["p50"]),
                fmt_seconds(host["p95"]),
                str(host["failures"]),
                str(clock["n"]),
                fmt_seconds(clock["p50"]),
                fmt_seconds(clock["p95"]),
                fmt_seconds(clock["max"]),
                fmt_seconds(up["p50"]),
                fmt_seconds(result.ost[method].summary()["p50"]),
            ]
        )
    header = ["method", "n", "host p50", "p95", "failed", "n", "guest p50", "p95", "max"]
    header += ["-> up p50", "->OST p50"]
    poll = result.agent_poll.summary()
    resync = ""
    if result.resync_domains:
        resync = (
            f"\n(c): a second watch, also on a {result.resync_domains}-domain test node "
            f"(test+unix, another connection), --resync-interval {result.resync_interval:g}; "
            f"each hot-add made as a resync began, {result.resync_overlaps} of "
            f"{result.host['watch-resync'].summary()['n']} returned while the node's listing "
            f"still ran; its last resync: {result.resync_summary or '-'}"
        )
    return (
        f"Hot-add to online on Debian 12 guests (kernel {result.kernel or '?'}, "
        f"{result.max_vcpus} vCPUs max, {result.restarts} restarts, boots "
        f"{min(result.boot_seconds, default=0):.0f}-{max(result.boot_seconds, default=0):.0f} s)"
        "; rounds interleaved\n"
        "host: hot-add call returned -> the agent lists the CPU online (polled every "
        f"{AGENT_POLL * 1000:.0f} ms from the kernel's 'Booting' line on, the CPU cannot be "
        f"online before it; {poll['n']} polls repeated, p50 interval {fmt_seconds(poll['p50'])})"
        "; guest: the kernel's 'CPUn has been hot-added' -> "
        "'smpboot: Booting Node 0 Processor n' (dmesg clock); -> up: to 'Will online and "
        "init hotplugged CPU: n'\n"
        + table(header, rows)
        + resync
        + "\nwatch's logs: bench/results/hotadd-debian12-<method>.log"
    )


def busybox_tables(result: HotaddResult) -> str:
    rows = []
    for method in HOTADD_METHODS if result.latency else ():
        lat = result.latency[method].summary()
        ost = result.ost[method].summary()
        rows.append(
            [
                HOTADD_LABELS[method],
                str(lat["n"]),
                fmt_seconds(lat["p50"]),
                fmt_seconds(lat["p95"]),
                fmt_seconds(lat["max"]),
                str(lat["failures"]),
                fmt_seconds(ost["p50"]),
            ]
        )
    header = ["method", "n", "p50", "p95", "max", "failed", "hot-add->OST p50"]
    text = (
        f"Hot-add to online on lab VMs ({result.accelerator}): from setVcpusFlags returning to "
        f"the CPU online in the guest's sysfs; rounds interleaved, {result.restarts} restarts\n"
        + table(header, rows)
    )
    if result.burst_vms:
        burst = [
            ("watch: OST event -> online", result.burst_ost_to_online.summary()),
            ("watch: hot-add returned -> online", result.burst_hotadd_to_online.summary()),
            (
                "no watch, agent onlines at OST: OST -> online",
                result.burst_direct_ost_to_online.summary(),
            ),
        ]
        rows = [
            [
                what,
                str(s["n"]),
                fmt_seconds(s["p50"]),
                fmt_seconds(s["p95"]),
                fmt_seconds(s["max"]),
                str(s["failures"]),
            ]
            for what, s in burst
        ]
        text += (
            f"\n\n{result.burst_vms} VMs hot-added at once, under watch (policy online), then "
            "onlined by the benchmark itself at each OST event (the floor)\n"
            + table(["", "n", "p50", "p95", "max", "failed"], rows)
        )
    return text


def hotadd_targets(result: HotaddResult) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    label = " ".join(["watch", *result.watch_args])
    if result.latency:
        a = result.latency["auto-online"].summary()
        b = result.latency["watch"].summary()
        c = result.latency["poll-1s"].summary()
        checks += [
            {
                "target": f"hot-add to online: {label} p50 within "
                f"{TARGET_HOTADD_OVER_RULE * 1000:.0f} ms of the guest's own rule "
                f"(lab guest, {result.accelerator}; seen from the host's sysfs polling)",
                "value": f"{b['p50'] - a['p50']:+.3f} s (rule {fmt_seconds(a['p50'])})",
                "met": b["p50"] - a["p50"] <= TARGET_HOTADD_OVER_RULE and not b["failures"],
            },
            {
                "target": f"hot-add to online: {label} p50 at least 2x better than 1-s polling",
                "value": f"{c['p50'] / b['p50']:.2f}x" if b["p50"] > 0 else "-",
                "met": b["p50"] > 0 and c["p50"] / b["p50"] >= 2.0,
            },
        ]
    if result.burst_vms:
        burst = result.burst_ost_to_online.summary()
        floor = result.burst_direct_ost_to_online.summary()
        ratio = burst["p50"] / floor["p50"] if floor["p50"] > 0 else float("nan")
        checks.append(
            {
                "target": f"{result.burst_vms} VMs at once under {label}: OST to online p50 "
                f"within {(TARGET_BURST_OVER_FLOOR - 1) * 100:.0f} % of the floor (onlined "
                "through the agent at its OST, no watch, same run)",
                "value": f"{ratio:.2f}x (floor p50 {fmt_seconds(floor['p50'])}, "
                f"max {fmt_seconds(burst['max'])} vs {fmt_seconds(floor['max'])})",
                "met": ratio <= TARGET_BURST_OVER_FLOOR and not burst["failures"],
            }
        )
    if result.debian is not None:
        checks += debian_targets(result.debian, label)
    elif result.debian_error:
        target = "Debian 12 hot-add to online: watch within 30 ms of the guest's udev rule"
        checks.append({"target": target, "value": "not measured", "met": False})
    return checks


def debian_targets(result: DebianResult, label: str) -> list[dict[str, Any]]:
    """watch within 30 ms of the udev rule (guest's clock, and from the host), and no more
    than 30 ms slower while a resync runs on another connection (from the host, and on the
    guest's clock)."""
    checks: list[dict[str, Any]] = []
    for what, seen in (("guest_clock", "on the guest's clock"), ("host", "seen from the host")):
        values = getattr(result, what)
        rule, watch = values["udev-rule"].summary(), values["watch"].summary()
        over = watch["p50"] - rule["p50"]
        checks.append(
            {
                "target": f"Debian 12 hot-add to online: {label} p50 within "
                f"{TARGET_HOTADD_OVER_RULE * 1000:.0f} ms of the guest's udev rule ({seen})",
                "value": f"{over * 1000:+.0f} ms (rule p50 {fmt_seconds(rule['p50'])})",
                "met": over <= TARGET_HOTADD_OVER_RULE and not watch["failures"],
            }
        )
    if "watch-resync" in result.host:
        for what, seen in (("host", "seen from the host"), ("guest_clock", "guest's clock")):
            checks.append(resync_target(result, getattr(result, what), seen, label))
    return checks


def resync_target(
    result: DebianResult, values: dict[str, Latencies], seen: str, label: str
) -> dict[str, Any]:
    """Hot-add to online p50 while the same watch resyncs a test node on a second connection,
    against the same without: the difference and the ratio beside the target."""
    alone, busy = values["watch"].summary(), values["watch-resync"].summary()
    over = busy["p50"] - alone["p50"]
    return {
        "target": f"Debian 12: {label} hot-add to online p50 at most "
        f"{TARGET_HOTADD_UNDER_RESYNC * 1000:.0f} ms slower while it resyncs "
        f"{result.resync_domains} test domains every {result.resync_interval:g} s on a "
        f"second connection ({seen})",
        "value": f"{over * 1000:+.0f} ms, {busy['p50'] / alone['p50']:.2f}x "
        f"({fmt_seconds(alone['p50'])} alone, {fmt_seconds(busy['p50'])} during)",
        "met": over <= TARGET_HOTADD_UNDER_RESYNC and not busy["failures"],
    }


# --- targets --------------------------------------------------------------------------------


def targets(sweep: list[SizeResult], footprints: list[FootprintResult]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for r in sweep:
        if r.domains != 1000:
            continue
        ratio = paired_ratio(r, "virthotplug", "floor")
        checks.append(
            {
                "target": f"status --all within {TARGET_FLOOR_RATIO:g}x of the floor at "
                f"1,000 domains, mix {r.mix}",
                "value": f"{ratio:.2f}x (floor {fmt_seconds(r.median('floor'))})",
                "met": ratio <= TARGET_FLOOR_RATIO,
            }
        )
    by_size = {r.domains: r for r in sweep if r.mix == MIX}
    if 1000 in by_size:
        r = by_size[1000]
        virsh = paired_ratio(r, "virsh", "virthotplug")
        checks.append(
            {
                "target": "at least 50x faster than the virsh loop at 1,000 domains",
                "value": f"{virsh:.0f}x",
                "met": virsh >= TARGET_VIRSH_RATIO,
            }
        )
        if 10 in by_size:
            # virsh connects once per command, and libvirtd's test driver re-reads the whole
            # node file at every connect: per-command cost grows with N here, unlike on a
            # real host. The per-domain cost measured at N=10 takes that out.
            small = by_size[10]
            conservative = small.per_domain("virsh") * 1000 / r.median("virthotplug")
            checks.append(
                {
                    "target": "... with virsh's per-domain cost measured at N=10 "
                    "(without the test driver's node re-parse per connect)",
                    "value": f"{conservative:.0f}x",
                    "met": conservative >= TARGET_VIRSH_RATIO,
                }
            )
    if 100 in by_size and 1000 in by_size and 5000 in by_size:
        a, b, c = by_size[100], by_size[1000], by_size[5000]
        early = (b.median("virthotplug") - a.median("virthotplug")) / (b.domains - a.domains)
        late = (c.median("virthotplug") - b.median("virthotplug")) / (c.domains - b.domains)
        growth = late / early if early > 0 else float("nan")
        floor_early = (b.median("floor") - a.median("floor")) / (b.domains - a.domains)
        floor_late = (c.median("floor") - b.median("floor")) / (c.domains - b.domains)
        floor_growth = floor_late / floor_early if floor_early > 0 else float("nan")
        checks.append(
            {
                "target": "linear growth: marginal cost per domain, 1000-5000 vs 100-1000 "
                f"(floor: {floor_growth:.2f})",
                "value": f"{growth:.2f}",
                "met": growth <= max(1.5, floor_growth * 1.25),
            }
        )
    for footprint in footprints:
        label = footprint_label(footprint)
        checks += [
            {
                "target": f"{label}: RSS under {TARGET_RSS_MIB:g} MiB with "
                f"{footprint.domains} domains (peak)",
                "value": f"{footprint.peak_rss_mib:.1f} MiB",
                "met": footprint.peak_rss_mib < TARGET_RSS_MIB,
            },
            {
                "target": f"{label}: idle CPU under {TARGET_IDLE_CPU:g} % of a core with "
                f"{footprint.domains} domains ({footprint.idle_seconds:.0f} s, "
                f"{footprint.resyncs} resyncs included)",
                "value": f"{footprint.idle_cpu_percent:.2f} %",
                "met": footprint.idle_cpu_percent < TARGET_IDLE_CPU,
            },
            {
                "target": f"{label}: idle between periodic resyncs under "
                f"{TARGET_IDLE_CPU:g} % of a core",
                "value": f"{footprint.idle_between_resyncs_cpu_percent or float('nan'):.2f} %",
                "met": (footprint.idle_between_resyncs_cpu_percent or 100.0) < TARGET_IDLE_CPU,
            },
            {
                "target": f"{label}: burst, no event lost, every domain reconciled",
                "value": f"{footprint.burst_reconciled_domains}/{footprint.domains}",
                "met": footprint.no_event_lost,
            },
        ]
    return checks


def targets_table(checks: list[dict[str, Any]]) -> str:
    rows = [[c["target"], c["value"], "met" if c["met"] else "MISSED"] for c in checks]
    return "Targets\n" + table(["target", "value", ""], rows, right=1)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    check_daemon()
    byte_compile_virthotplug()
    started = datetime.datetime.now(datetime.timezone.utc)
    document: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": _cpu_count(),
            "load_average_start": load_average(),
            "libvirt": _libvirt_version(),
        },
    }
    sweep: list[SizeResult] = []
    footprints: list[FootprintResult] = []
    output = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    if not args.no_sweep:
        sweep = run_sweep(args)
        document["sweep"] = [r.to_dict() for r in sweep]
        output += [sweep_tables(sweep), sweep_breakdown(sweep)]
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")  # so far
        print("\n\n".join(output), flush=True)
        output = []
    if not args.no_footprint:
        variants = [([], mix) for mix in args.footprint_mixes.split(",") if mix]
        if not args.no_metrics_footprint:
            variants.append((["--metrics-listen", "127.0.0.1:0"], MIX))
        for extra, mix in variants:
            log(f"footprint: watch {' '.join(extra)} over {args.footprint_domains} domains ({mix})")
            footprint = Footprint(args.footprint_domains, args.idle_seconds, extra, mix)
            footprints.append(footprint.run(log))
        document["footprint"] = [f.to_dict() for f in footprints]
        output.append(footprint_table(footprints))
    hotadd: Optional[HotaddResult] = None
    if not args.no_hotadd:
        guests = hotadd_guests(args.hotadd_guest)
        parts = []
        if "busybox" in guests:
            parts.append(f"busybox {args.hotadd_rounds} rounds, then {args.burst_vms} at once")
        if "debian12" in guests:
            parts.append(f"Debian 12 {args.hotadd_debian_rounds} rounds")
        log(f"hot-add to online: {'; '.join(parts)}")
        try:
            extra = ["--workers", str(args.watch_workers)] if args.watch_workers else []
            hotadd = Hotadd(
                args.hotadd_rounds,
                args.burst_vms,
                args.burst_rounds,
                extra,
                guests=guests,
                debian_rounds=args.hotadd_debian_rounds,
                resync_domains=args.hotadd_resync_domains,
            ).run(log)
        except Exception as exc:  # the lab could not start: report it, keep the rest
            log(f"hot-add benchmark failed: {exc}")
            document["hotadd"] = {"error": str(exc)}
            output.append(f"Hot-add to online: not measured: {exc}")
        else:
            document["hotadd"] = hotadd.to_dict()
            output.append(hotadd_tables(hotadd))
    flood_checks = [] if args.no_flood else run_flood(args, document, output)
    shrink_checks = [] if args.no_shrink else run_shrink(args, document, output)
    checks = targets(sweep, footprints)
    if hotadd is not None:
        checks += hotadd_targets(hotadd)
    checks += flood_checks + shrink_checks
    document["targets"] = checks
    document["machine"]["load_average_end"] = load_average()
    output.append(targets_table(checks))
    output.append(
        f"load average: start {document['machine']['load_average_start']}, "
        f"end {document['machine']['load_average_end']}"
    )
    print("\n\n" + "\n\n".join(output) if sweep else "\n\n".join(output))
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    shutil.copyfile(path, RESULTS / "latest.json")
    print(f"\nresults: {path.relative_to(RESULTS.parent.parent)}")
    return 0


def run_flood(
    args: argparse.Namespace, document: dict[str, Any], output: list[str]
) -> list[dict[str, Any]]:
    """The flood cases; their table goes to ``output``, ``flood.json`` beside the results."""
    why_not = flood_available()
    if why_not:
        output.append(f"OST flood: not measured: {why_not}")
        return []
    log(f"OST flood: {args.flood_seconds:.0f} s per case, on a private libvirtd")
    results = Flood(args.flood_seconds).run(log)
    document["flood"] = [r.to_dict() for r in results]
    (RESULTS / "flood.json").write_text(
        json.dumps(document["flood"], indent=1) + "\n", encoding="utf-8"
    )
    output.append(flood_table(results))
    return flood_targets(results)


def run_shrink(
    args: argparse.Namespace, document: dict[str, Any], output: list[str]
) -> list[dict[str, Any]]:
    """The stack-3 shrink; its table goes to ``output``."""
    log(f"shrink: stack 3, {args.shrink_rounds} rounds of each method")
    try:
        result = Shrink(args.shrink_rounds).run(log)
    except Exception as exc:  # the stack or the lab could not start: report it, keep the rest
        log(f"shrink benchmark failed: {exc}")
        document["shrink"] = {"error": str(exc)}
        output.append(f"Shrink on stack 3: not measured: {exc}")
        return []
    document["shrink"] = result.to_dict()
    output.append(shrink_table(result))
    return shrink_targets(result)


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def _libvirt_version() -> str:
    done = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


if __name__ == "__main__":
    started_at = time.monotonic()
    status = main()
    log(f"bench: done in {time.monotonic() - started_at:.0f} s")
    sys.exit(status)
