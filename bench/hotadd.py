"""Hot-add to online on real VMs (the lab of tests/lab: tiny guests, real QEMU and qemu-ga).

Time from ``setVcpusFlags(n, AFFECT_LIVE)`` returning to the new CPU online in the guest,
read from the guest's sysfs over the lab's control channel (no agent involved), for

    (a) auto-online  the guest onlines it itself (the distro udev rule): the floor
    (b) watch        ``virthotplug watch`` with policy ``online`` (defaults otherwise)
    (c) poll 1 s     a loop that asks ``guestVcpus`` once a second and onlines what is
                     offline (``setGuestVcpus``): the simple alternative

one VM each, hot-adds interleaved round by round; a VM that reaches its maximum is restarted
(vCPU unplug is broken on libvirt 9.0 + QEMU 7.2). Then ten VMs hot-added at once under
``watch``: from each one's ACPI_DEVICE_OST event to its CPU online.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from common import ROOT, virthotplug_command, watch_env

sys.path.insert(0, str(ROOT / "tests" / "lab"))

METHODS = ("auto-online", "watch", "poll-1s")
MAX_VCPUS = 8
ONLINE_TIMEOUT = 20.0
CONTROL_POLL = 0.05  # between two reads of the guest's sysfs (each costs the guest CPU time)


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    failures: int = 0

    def percentile(self, p: float) -> float:
        if not self.seconds:
            return float("nan")
        ordered = sorted(self.seconds)
        rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank]

    def summary(self) -> dict[str, float]:
        return {
            "n": len(self.seconds),
            "failures": self.failures,
            "p50": statistics.median(self.seconds) if self.seconds else float("nan"),
            "p95": self.percentile(95),
            "max": max(self.seconds) if self.seconds else float("nan"),
        }


@dataclass
class HotaddResult:
    rounds: int
    accelerator: str = ""
    watch_args: list[str] = field(default_factory=list)
    latency: dict[str, Latencies] = field(default_factory=dict)  # hot-add → online
    ost: dict[str, Latencies] = field(default_factory=dict)  # hot-add → OST event
    restarts: int = 0
    burst_vms: int = 0
    burst_ost_to_online: Latencies = field(default_factory=Latencies)
    burst_hotadd_to_online: Latencies = field(default_factory=Latencies)
    # The same burst without virthotplug: each VM's CPU onlined through its agent the moment
    # its OST event arrives (the floor for agent onlining on this host).
    burst_direct_ost_to_online: Latencies = field(default_factory=Latencies)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = {m: lat.summary() for m, lat in self.latency.items()}
        data["ost_summary"] = {m: lat.summary() for m, lat in self.ost.items()}
        data["burst_summary"] = {
            "ost_to_online": self.burst_ost_to_online.summary(),
            "hotadd_to_online": self.burst_hotadd_to_online.summary(),
            "direct_ost_to_online": self.burst_direct_ost_to_online.summary(),
        }
        return data


class _Poller:
    """(c): once a second, online whatever the agent reports offline."""

    def __init__(self, vm: Any) -> None:
        self._vm = vm  # vm.dom follows the lab's connection when libvirtd restarts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="poll-1s", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                dom = self._vm.dom
                info = dom.guestVcpus(0)
                if not info:
                    continue
                offline = _cpulist(info.get("vcpus", "")) - _cpulist(info.get("online", ""))
                if offline:
                    dom.setGuestVcpus(",".join(map(str, sorted(offline))), 1, 0)
            except Exception:  # restarting guest, agent not up yet, libvirtd restarting
                continue


def _cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


class _Watch:
    """``virthotplug watch`` on qemu:///system; policy online only for the given globs.

    It sees only the domains matching ``scope`` (``--domain``: the bench's own VMs), so it
    never reads or acts on the host's other domains, and takes its lock in a run directory
    of its own."""

    def __init__(self, tmp: Path, scope: str, online_globs: list[str], extra: list[str]) -> None:
        self.config = config = tmp / "virthotplug.conf"
        self._write_config(online_globs)
        self.log = tmp / "watch.log"
        self._stderr = self.log.open("w", encoding="utf-8")
        argv = [*virthotplug_command(), "--config-file", str(config), "-c", "qemu:///system"]
        self.proc = subprocess.Popen(
            [*argv, "watch", "--json", "--no-hook-socket", "--domain", scope, *extra],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=watch_env(tmp),
            text=True,
        )
        self.records: list[tuple[float, dict[str, Any]]] = []  # (arrival, JSON record)
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="watch-json", daemon=True).start()
        deadline = time.monotonic() + 60
        while "connected" not in self.log.read_text(encoding="utf-8", errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"watch did not connect: {self.log.read_text()[-800:]}")
            time.sleep(0.1)

    def _write_config(self, online_globs: list[str]) -> None:
        sections = "".join(f"[domain:{glob}]\nmode = online\n\n" for glob in online_globs)
        self.config.write_text(f"[defaults]\nmode = report\n\n{sections}", encoding="utf-8")
        self.config.chmod(0o600)

    def set_online_globs(self, online_globs: list[str]) -> None:
        """New policies, through the daemon's own reload (SIGHUP)."""
        self._write_config(online_globs)
        reloads = self.log.read_text(encoding="utf-8").count("configuration reloaded")
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log.read_text(encoding="utf-8").count("configuration reloaded") <= reloads:
            if time.monotonic() > deadline:
                raise RuntimeError("watch did not reload its configuration")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.records.append((time.monotonic(), record))

    def onlined(self, name: str, since: float) -> Optional[float]:
        """Arrival of the first reconcile record since ``since`` that onlined a CPU."""
        with self._lock:
            for arrived, record in self.records:
                if (
                    arrived >= since
                    and record.get("domain") == name
                    and record.get("event") == "reconcile"
                    and "onlined" in str(record.get("outcome", "")).split(",")
                ):
                    return arrived
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def _wait_online(vm: Any, cpu: int, timeout: float = ONLINE_TIMEOUT) -> Optional[float]:
    """Monotonic time at which ``cpu`` was first seen online in the guest, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cpu in vm.cpu_state().online:
            return time.monotonic()
        time.sleep(CONTROL_POLL)
    return None


class Hotadd:
    def __init__(
        self, rounds: int, burst_vms: int, burst_rounds: int, watch_args: list[str]
    ) -> None:
        self.rounds = rounds
        self.burst_vms = burst_vms
        self.burst_rounds = burst_rounds
        self.watch_args = watch_args  # extra options of the watch under test

    def run(self, log: Callable[[str], None]) -> HotaddResult:
        from domains import AUTO, MANUAL
        from lab import PREFIX, Lab, VMRequest, accelerator_description

        result = HotaddResult(self.rounds, accelerator_description(), list(self.watch_args))
        with Lab() as lab, tempfile.TemporaryDirectory(prefix="vhp-hotadd-") as tmp:
            requests = [
                VMRequest(AUTO, max_vcpus=MAX_VCPUS, label="bench-auto"),
                VMRequest(MANUAL, max_vcpus=MAX_VCPUS, label="bench-watch"),
                VMRequest(MANUAL, max_vcpus=MAX_VCPUS, label="bench-poll"),
            ]
            burst = [VMRequest(MANUAL, label=f"bench-ten{i}") for i in range(self.burst_vms)]
            # Only the VMs of one part run at a time: an idle TCG guest still costs CPU.
            log(f"  booting {len(requests)} lab VMs ({result.accelerator})")
            vms = lab.start_many(requests if self.rounds else [])
            by_method = dict(zip(METHODS, vms))
            scope = f"{PREFIX}-{lab.run_id}-*"  # this run's VMs only (lab.py names them)
            online = ["*-bench-watch", "*-bench-ten*"]
            watch = _Watch(Path(tmp), scope, online, self.watch_args)
            poller = _Poller(by_method.get("poll-1s"))
            if self.rounds:
                poller.start()
            try:
                if self.rounds:
                    self._sequential(lab, by_method, result, log)
                poller.stop()
                for vm in vms:
                    lab.remove(vm)
                if burst:
                    log(f"  booting {len(burst)} lab VMs")
                    self._ten_at_once(lab, watch, lab.start_many(burst), result, log)
            finally:
                poller.stop()
                watch.stop()
        return result

    def _sequential(
        self, lab: Any, vms: dict[str, Any], result: HotaddResult, log: Callable[[str], None]
    ) -> None:
        for method in METHODS:
            result.latency[method] = Latencies()
            result.ost[method] = Latencies()
        for index in range(self.rounds):
            order = METHODS[index % 3 :] + METHODS[: index % 3]
            line = []
            for method in order:
                for attempt in range(3):
                    try:
                        line.append(f"{method} {self._one(lab, vms[method], method, result)}")
                        break
                    except Exception as exc:  # e.g. libvirtd restarted by other work
                        log(f"  {method}: {exc}; measuring again")
                        time.sleep(5.0 * (attempt + 1))
            log(f"  round {index + 1}/{self.rounds}: " + ", ".join(line))

    def _one(self, lab: Any, vm: Any, method: str, result: HotaddResult) -> str:
        """One hot-add on ``vm``; a VM at its maximum is restarted first."""
        if vm.live_vcpus() >= vm.max_vcpus:
            vm.restart()
            result.restarts += 1
            time.sleep(1.0)  # let the watch see the agent connect and settle
        cpu = vm.live_vcpus()  # the new vCPU's id: vCPUs are added in order
        since = time.monotonic()
        vm.hot_add(cpu + 1)
        returned = time.monotonic()
        online = _wait_online(vm, cpu)
        try:
            event = lab.ost.wait_for(vm.name, since=since, timeout=5.0)
            result.ost[method].seconds.append(event.received - returned)
        except Exception:
            result.ost[method].failures += 1
        if online is None:
            result.latency[method].failures += 1
            return "not online"
        result.latency[method].seconds.append(online - returned)
        return f"{online - returned:.2f}s"

    def _ten_at_once(
        self,
        lab: Any,
        watch: _Watch,
        vms: list[Any],
        result: HotaddResult,
        log: Callable[[str], None],
    ) -> None:
        """All VMs hot-added at the same moment. Online is taken from watch's reconcile
        record that onlined the CPU (its re-read of the guest), not by polling ten guests'
        sysfs: that polling would load the guests and the host enough to skew the result.
        Each guest's CPU is checked in sysfs once at the end."""
        result.burst_vms = len(vms)
        for index in range(self.burst_rounds):
            for vm in vms:
                if vm.live_vcpus() >= vm.max_vcpus:
                    vm.restart()
            added = _all_at_once(vms)
            worst = 0.0
            for vm, cpu, since, returned, _ in added:
                online = _wait_for(watch.onlined, vm.name, since, ONLINE_TIMEOUT)
                if online is None or cpu not in vm.cpu_state().online:
                    result.burst_ost_to_online.failures += 1
                    result.burst_hotadd_to_online.failures += 1
                    continue
                result.burst_hotadd_to_online.seconds.append(online - returned)
                try:
                    event = lab.ost.wait_for(vm.name, since=since, timeout=5.0)
                except Exception:
                    result.burst_ost_to_online.failures += 1
                    continue
                result.burst_ost_to_online.seconds.append(online - event.received)
                worst = max(worst, online - event.received)
            log(f"  {len(vms)} VMs at once, round {index + 1}: worst OST to online {worst:.2f} s")
        watch.set_online_globs(["*-bench-watch"])  # the ten: report only from now on
        for index in range(self.burst_rounds):
            for vm in vms:
                if vm.live_vcpus() >= vm.max_vcpus:
                    vm.restart()
            worst = 0.0
            for vm, cpu, _since, _returned, done in _all_at_once(vms, _online_at_ost(lab)):
                if done is None or cpu not in vm.cpu_state().online:
                    result.burst_direct_ost_to_online.failures += 1
                    continue
                result.burst_direct_ost_to_online.seconds.append(done[1] - done[0])
                worst = max(worst, done[1] - done[0])
            log(
                f"  {len(vms)} VMs at once, onlined at their OST without watch, round "
                f"{index + 1}: worst OST to online {worst:.2f} s"
            )


def _wait_for(
    found: Callable[[str, float], Optional[float]], name: str, since: float, timeout: float
) -> Optional[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found(name, since)
        if value is not None:
            return value
        time.sleep(0.05)
    return None


Then = Callable[[Any, int, float], Optional[tuple[float, float]]]


def _online_at_ost(lab: Any) -> Then:
    """Online the new CPU through the agent the moment its OST event arrives; returns
    (OST received, agent call returned)."""

    def then(vm: Any, cpu: int, since: float) -> Optional[tuple[float, float]]:
        try:
            event = lab.ost.wait_for(vm.name, since=since, timeout=10.0)
            vm.dom.setGuestVcpus(str(cpu), 1, 0)
        except Exception:
            return None
        return event.received, time.monotonic()

    return then


def _all_at_once(
    vms: list[Any], then: Optional[Then] = None
) -> list[tuple[Any, int, float, float, Optional[tuple[float, float]]]]:
    """Hot-add one vCPU to every VM at the same moment; per VM (vm, the new vCPU, call
    started, call returned, what ``then`` returned)."""
    barrier = threading.Barrier(len(vms))
    added: list[tuple[Any, int, float, float, Optional[tuple[float, float]]]] = []
    lock = threading.Lock()

    def one(vm: Any) -> None:
        cpu = vm.live_vcpus()
        barrier.wait()
        since = time.monotonic()
        vm.hot_add(cpu + 1)
        returned = time.monotonic()
        done = then(vm, cpu, since) if then is not None else None
        with lock:
            added.append((vm, cpu, since, returned, done))

    threads = [threading.Thread(target=one, args=(vm,)) for vm in vms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return added
