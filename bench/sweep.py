"""Sweep: ``virthotplug status --all --json`` against the floor and an admin's virsh loop.

All three run as separate processes against the same ``test+unix://`` node (libvirtd's test
driver, real RPC), start-up included, repetitions interleaved (the order rotates every
round) so that load from anything else on the machine hits all of them alike; medians.

    virthotplug   the real CLI: ``virthotplug -c URI status --all --json``
    floor         one Python process: open, one getAllDomainStats, one inactive XMLDesc per
                  domain, one live XMLDesc per active domain (the test driver's stats carry
                  no vCPU counts, so only the live definition tells the live layer), close:
                  the least any tool reading the config and live layers must do here
    virsh loop    ``virsh vcpucount D`` + ``virsh dumpxml --inactive D`` per domain; over an
                  evenly spread sample of domains at large N, extrapolated linearly
    connect       one Python process that only opens and closes the connection (shows how
                  much of every number is start-up plus libvirtd parsing the node file)

Each size runs on one of ``nodes.MIXES`` (the mix by default; the virsh loop only there).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import nodes
from common import (
    NODES_DIR,
    child_env,
    count_calls,
    daemon_restarted,
    median,
    virthotplug_command,
    wait_for_daemon,
)

FLOOR_CODE = """
import sys
import libvirt
libvirt.registerErrorHandler(lambda _c, _e: None, None)
conn = libvirt.open(sys.argv[1])
groups = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_VCPU
stats = conn.getAllDomainStats(groups, 0)
for dom, _ in stats:
    dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    if dom.ID() != -1:
        dom.XMLDesc(0)
conn.close()
print(len(stats))
"""

CONNECT_CODE = """
import sys
import libvirt
libvirt.registerErrorHandler(lambda _c, _e: None, None)
libvirt.open(sys.argv[1]).close()
print(0)
"""

METHODS = ("virthotplug", "floor", "virsh", "connect")
ROUND_ATTEMPTS = 4


@dataclass
class SizeResult:
    domains: int
    uri: str
    mix: str
    repetitions: int
    virsh_sample: int
    seconds: dict[str, list[float]] = field(default_factory=dict)  # per method, per round
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)  # client processes
    calls: dict[str, int] = field(default_factory=dict)
    call_breakdown: dict[str, dict[str, int]] = field(default_factory=dict)

    def median(self, method: str) -> float:
        return median(self.seconds.get(method, []))

    def per_domain(self, method: str) -> float:
        return self.median(method) / self.domains

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["median_seconds"] = {m: self.median(m) for m in self.seconds}
        return data


class SweepError(RuntimeError):
    pass


def _timed(argv: list[str], check: Callable[[str], None]) -> tuple[float, float]:
    """Wall time and the child's CPU time of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SweepError(f"{' '.join(argv[:4])}...: exit {done.returncode}: {done.stderr[-500:]}")
    check(done.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def _sample(names: list[str], size: int) -> list[str]:
    if size >= len(names):
        return names
    step = len(names) / size
    return [names[int(i * step)] for i in range(size)]


class Sweep:
    def __init__(
        self, count: int, repetitions: int, virsh_sample: int, mix: str = nodes.MIX
    ) -> None:
        self.count = count
        path = nodes.write_node(NODES_DIR, count, mix=mix)
        self.uri = nodes.unix_uri(path)
        names = [layout.name for layout in nodes.layouts(count, mix=mix)]
        self.sample = _sample(names, virsh_sample) if mix == nodes.MIX else []
        self.methods = METHODS if self.sample else tuple(m for m in METHODS if m != "virsh")
        self.result = SizeResult(count, self.uri, mix, repetitions, len(self.sample))

    # the methods

    def _virthotplug_argv(self) -> list[str]:
        return [*virthotplug_command(), "-c", self.uri, "status", "--all", "--json"]

    def _check_virthotplug(self, out: str) -> None:
        document = json.loads(out)
        if len(document["domains"]) != self.count or document["errors"]:
            raise SweepError(f"virthotplug read {len(document['domains'])} of {self.count}")

    def _check_count(self, expected: int) -> Callable[[str], None]:
        def check(out: str) -> None:
            if int(out.strip() or -1) != expected:
                raise SweepError(f"expected {expected} domains, got {out.strip()!r}")

        return check

    def _virsh_loop(self) -> tuple[float, float]:
        """The sample's wall and CPU time, scaled to every domain."""
        wall = cpu = 0.0
        for name in self.sample:
            for args in (["vcpucount", name], ["dumpxml", "--inactive", name]):
                spent = _timed(["virsh", "-c", self.uri, *args], _nonempty)
                wall, cpu = wall + spent[0], cpu + spent[1]
        scale = self.count / len(self.sample)
        return wall * scale, cpu * scale

    def run_one(self, method: str) -> tuple[float, float]:
        if method == "virthotplug":
            return _timed(self._virthotplug_argv(), self._check_virthotplug)
        if method == "floor":
            return _timed(
                [sys.executable, "-c", FLOOR_CODE, self.uri], self._check_count(self.count)
            )
        if method == "connect":
            return _timed([sys.executable, "-c", CONNECT_CODE, self.uri], self._check_count(0))
        return self._virsh_loop()

    def run(self, log: Callable[[str], None]) -> SizeResult:
        result = self.result
        # One warm-up round (page cache, libvirtd's first parse of the node file), not kept.
        methods = self.methods
        for method in methods:
            if method != "virsh":
                self.run_one(method)
        for round_index in range(result.repetitions):
            shift = round_index % len(methods)
            order = methods[shift:] + methods[:shift]
            measured = self._round(order, log)
            for method, (wall, cpu) in measured.items():
                result.seconds.setdefault(method, []).append(wall)
                result.cpu_seconds.setdefault(method, []).append(cpu)
            log(
                f"  N={self.count} {result.mix} round {round_index + 1}/{result.repetitions}: "
                + ", ".join(f"{m} {result.seconds[m][-1]:.2f}s" for m in methods)
            )
        self._count_calls()
        return result

    def _round(
        self, order: tuple[str, ...], log: Callable[[str], None]
    ) -> dict[str, tuple[float, float]]:
        """One interleaved round; redone whole when libvirtd went away in the middle (other
        work on a shared machine may restart it): a partial round would not compare alike.
        """
        for attempt in range(ROUND_ATTEMPTS):
            try:
                return {method: self.run_one(method) for method in order}
            except SweepError as exc:
                if attempt + 1 == ROUND_ATTEMPTS or not daemon_restarted(str(exc)):
                    raise
                log(f"  libvirtd went away ({str(exc)[-120:]!r}); waiting, then redoing the round")
                wait_for_daemon(self.uri)
        raise AssertionError("not reached")

    def _count_calls(self) -> None:
        result = self.result
        for method, argv in (
            ("virthotplug", self._virthotplug_argv()),
            ("floor", [sys.executable, "-c", FLOOR_CODE, self.uri]),
            ("connect", [sys.executable, "-c", CONNECT_CODE, self.uri]),
        ):
            total, breakdown = count_calls(argv)
            result.calls[method] = total
            result.call_breakdown[method] = dict(breakdown)
        if not self.sample:
            return
        virsh_total = 0
        virsh_breakdown: dict[str, int] = {}
        for name in self.sample:
            for args in (["vcpucount", name], ["dumpxml", "--inactive", name]):
                total, breakdown = count_calls(["virsh", "-c", self.uri, *args])
                virsh_total += total
                for api, n in breakdown.items():
                    virsh_breakdown[api] = virsh_breakdown.get(api, 0) + n
        scale = self.count / len(self.sample)
        result.calls["virsh"] = round(virsh_total * scale)
        result.call_breakdown["virsh"] = {k: round(v * scale) for k, v in virsh_breakdown.items()}


def _nonempty(out: str) -> None:
    if not out.strip():
        raise SweepError("virsh printed nothing")
