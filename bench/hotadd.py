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

On real Debian 12 guests (tests/lab/debian_image.py: systemd, udev, Debian's qemu-guest-agent)
the same comparison, interleaved in one run:

    (a) udev rule    ``debian12-rule``: RHEL's auto-online rule onlines it (the floor)
    (b) watch        the stock ``debian12`` guest under ``watch`` with policy ``online``
    (c) watch + resync  the same, under a second ``watch`` that also watches a 1,000-domain
                     test node on another connection and resyncs every 5 s: each hot-add is
                     made as a resync starts

seen from the host (hot-add call returning -> the agent lists the CPU online, polled every
20 ms from the moment the kernel starts bringing the CPU up: it cannot be online before, and
so the polls never queue in front of watch's own agent calls) and on the guest's own clock
(the kernel's "CPUn has been hot-added" -> "smpboot: Booting Node 0 Processor n" in the
serial log; dmesg timestamps).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from common import RESULTS, ROOT, virthotplug_command, watch_env

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
    guests: list[str] = field(default_factory=list)  # busybox, debian12
    debian: Optional[DebianResult] = None
    debian_error: str = ""  # why the Debian 12 part has no result

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = {m: lat.summary() for m, lat in self.latency.items()}
        data["ost_summary"] = {m: lat.summary() for m, lat in self.ost.items()}
        data["burst_summary"] = {
            "ost_to_online": self.burst_ost_to_online.summary(),
            "hotadd_to_online": self.burst_hotadd_to_online.summary(),
            "direct_ost_to_online": self.burst_direct_ost_to_online.summary(),
        }
        if self.debian is not None:
            data["debian_summary"] = self.debian.summaries()
        return data


@dataclass
class DebianResult:
    """Hot-add to online on real Debian 12 guests, by method (DEBIAN_METHODS)."""

    rounds: int
    guest: str = "debian12"
    kernel: str = ""  # as the guest's serial log names it
    max_vcpus: int = 0
    # hot-add call returned -> the agent lists the CPU online (host clock)
    host: dict[str, Latencies] = field(default_factory=dict)
    # "CPUn has been hot-added" -> "smpboot: Booting Node 0 Processor n" (guest clock)
    guest_clock: dict[str, Latencies] = field(default_factory=dict)
    # "CPUn has been hot-added" -> "Will online and init hotplugged CPU: n" (guest clock)
    guest_clock_up: dict[str, Latencies] = field(default_factory=dict)
    ost: dict[str, Latencies] = field(default_factory=dict)  # hot-add returned -> OST event
    agent_poll: Latencies = field(default_factory=Latencies)  # intervals between host polls
    restarts: int = 0
    boot_seconds: list[float] = field(default_factory=list)
    # (c): the second watch's other connection and how each hot-add met its resync
    resync_domains: int = 0
    resync_interval: float = 0.0
    resync_overlaps: int = 0  # hot-adds returned while the test node's listing still ran
    resync_summary: str = ""

    @property
    def methods(self) -> list[str]:
        return list(self.host)

    def summaries(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            name: {m: lat.summary() for m, lat in getattr(self, name).items()}
            for name in ("host", "guest_clock", "guest_clock_up", "ost")
        }


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
    """``virthotplug watch`` on qemu:///system (and ``more_uris``); policy online only for
    the given globs.

    It sees only the domains matching ``scope`` (``--domain``: the bench's own VMs), so it
    never reads or acts on the host's other domains, and takes its lock in a run directory
    of its own (``tmp`` is this watch's alone)."""

    def __init__(
        self,
        tmp: Path,
        scope: Sequence[str],
        online_globs: list[str],
        extra: list[str],
        more_uris: Sequence[str] = (),
    ) -> None:
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config = config = tmp / "virthotplug.conf"
        self._write_config(online_globs)
        self.log = tmp / "watch.log"
        self._stderr = self.log.open("w", encoding="utf-8")
        uris = ["qemu:///system", *more_uris]
        argv = [*virthotplug_command(), "--config-file", str(config)]
        argv += [arg for uri in uris for arg in ("-c", uri)]
        domains = [arg for glob in scope for arg in ("--domain", glob)]
        self.proc = subprocess.Popen(
            [*argv, "watch", "--json", "--no-hook-socket", *domains, *extra],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=watch_env(tmp),
            text=True,
        )
        from jsonfollow import JsonLineReader

        assert self.proc.stdout is not None
        self._json = JsonLineReader(self.proc.stdout, name="watch-json")
        deadline = time.monotonic() + 60
        # One "connected" line per host.
        while self.log.read_text(encoding="utf-8", errors="replace").count("connected") < len(uris):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
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

    def onlined(self, name: str, since: float) -> Optional[float]:
        """Arrival of the first reconcile record since ``since`` that onlined a CPU."""
        for arrived, record in self._json.arrivals():
            if (
                arrived >= since
                and record.get("domain") == name
                and record.get("event") == "reconcile"
                and "onlined" in str(record.get("outcome", "")).split(",")
            ):
                return arrived
        return None

    def listed(self, host: str, since: float) -> Optional[float]:
        """Arrival of the first "listed" record (a resync's listing done) of the host whose
        URI starts with ``host``, since ``since``."""
        for arrived, record in self._json.arrivals():
            details = record.get("details") or {}
            if (
                arrived >= since
                and details.get("what") == "listed"
                and str(record.get("host", "")).startswith(host)
            ):
                return arrived
        return None

    def last_listed_reason(self, host: str) -> str:
        """What watch said of the host's last resync ("N running, ... 0.31 s")."""
        for record in reversed(self._json.records()):
            details = record.get("details") or {}
            if details.get("what") == "listed" and str(record.get("host")).startswith(host):
                return str(details.get("reason") or "")
        return ""

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
        self,
        rounds: int,
        burst_vms: int,
        burst_rounds: int,
        watch_args: list[str],
        guests: Sequence[str] = ("busybox",),
        debian_rounds: int = 0,
        resync_domains: int = 0,
    ) -> None:
        self.rounds = rounds
        self.burst_vms = burst_vms
        self.burst_rounds = burst_rounds
        self.watch_args = watch_args  # extra options of the watch under test
        self.guests = list(guests)
        self.debian_rounds = debian_rounds
        self.resync_domains = resync_domains

    def run(self, log: Callable[[str], None]) -> HotaddResult:
        from lab import Lab, accelerator_description

        result = HotaddResult(self.rounds, accelerator_description(), list(self.watch_args))
        result.guests = list(self.guests)
        with Lab() as lab, tempfile.TemporaryDirectory(prefix="vhp-hotadd-") as tmp:
            if "busybox" in self.guests:
                self._busybox(lab, Path(tmp) / "busybox", result, log)
            if "debian12" in self.guests:
                debian = DebianHotadd(self.debian_rounds, self.resync_domains, self.watch_args)
                try:
                    result.debian = debian.run(lab, Path(tmp) / "debian12", log)
                except Exception as exc:  # keep the busybox part's results
                    log(f"  Debian 12 part failed: {exc}")
                    result.debian_error = str(exc)
        return result

    def _busybox(
        self, lab: Any, tmp: Path, result: HotaddResult, log: Callable[[str], None]
    ) -> None:
        from domains import AUTO, MANUAL
        from lab import PREFIX, VMRequest

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
        scope = [f"{PREFIX}-{lab.run_id}-*-bench-*"]  # this run's busybox VMs (lab.py names)
        online = ["*-bench-watch", "*-bench-ten*"]
        watch = _Watch(tmp, scope, online, self.watch_args)
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
                burst_vms = lab.start_many(burst)
                self._ten_at_once(lab, watch, burst_vms, result, log)
                for vm in burst_vms:
                    lab.remove(vm)
        finally:
            poller.stop()
            watch.stop()

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


# --- real Debian 12 guests ------------------------------------------------------------------

DEBIAN_METHODS = ("udev-rule", "watch", "watch-resync")
DEBIAN_GUEST = {"udev-rule": "debian12-rule", "watch": "debian12", "watch-resync": "debian12"}
DEBIAN_LABEL = {"udev-rule": "deb12-rule", "watch": "deb12-watch", "watch-resync": "deb12-resync"}
DEBIAN_MAX_VCPUS = 8  # 7 hot-adds per boot: a boot takes 12-25 s under TCG
AGENT_POLL = 0.02  # the host's look at the agent's view: every 20 ms
SERIAL_TIMEOUT = 5.0  # the kernel's lines reach the serial log well within this
SERIAL_POLL = 0.005
# The agent answers while systemd still starts services; let the boot finish first.
BOOT_SETTLE = 5.0
BETWEEN_HOTADDS = 0.5  # the guest's own work after an online (udev, cpufreq probing)
RESYNC_INTERVAL = 5  # seconds, the second watch's --resync-interval (as issue 20 measured)
NODE_PREFIX = "vhp-hotadd-node-"  # the test node's domains (the second watch's scope)
# dmesg lines as Debian 12's 6.1 kernel prints them on the serial console (a shell prompt
# may precede one on the same line).
_STAMP = r"\[\s*(\d+\.\d+)\] "
HOTADDED = _STAMP + r"CPU{cpu} has been hot-added\b"
BOOTING = _STAMP + r"smpboot: Booting Node \d+ Processor {cpu} "
UP = _STAMP + r"Will online and init hotplugged CPU: {cpu}\b"
KERNEL_LINE = re.compile(r"Linux version (\S+)")


def debian12_cached() -> bool:
    """Whether the Debian 12 images are built (``make lab-images``), without building them."""
    import debian_image
    from guest import cache_root

    inputs = debian_image.build_inputs("debian12")
    return debian_image.is_complete(cache_root() / f"debian-{inputs.suite}-{inputs.key()}")


@dataclass
class GuestClock:
    """The kernel's timestamps (seconds since its boot) of one hot-add's lines."""

    hotadded: Optional[float] = None
    booting: Optional[float] = None
    up: Optional[float] = None


def guest_clock(text: str, cpu: int) -> GuestClock:
    """The first "CPUn has been hot-added" in ``text`` and the lines after it for ``cpu``."""
    found = GuestClock()
    added = re.search(HOTADDED.format(cpu=cpu), text)
    if added is None:
        return found
    found.hotadded = float(added.group(1))
    booting = re.compile(BOOTING.format(cpu=cpu)).search(text, added.end())
    up = re.compile(UP.format(cpu=cpu)).search(text, added.end())
    found.booting = float(booting.group(1)) if booting else None
    found.up = float(up.group(1)) if up else None
    return found


class _SerialFrom:
    """A domain's serial log from its current end on (a file read: nothing in the guest)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def wait(self, pattern: str, timeout: float = SERIAL_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while not compiled.search(self.text()):
            if time.monotonic() > deadline:
                return False
            time.sleep(SERIAL_POLL)
        return True


def _wait_guest_clock(serial: _SerialFrom, cpu: int) -> GuestClock:
    deadline = time.monotonic() + SERIAL_TIMEOUT
    while True:
        found = guest_clock(serial.text(), cpu)
        if found.up is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _agent_online(vm: Any, cpu: int, intervals: Latencies) -> Optional[float]:
    """Poll the agent's view every AGENT_POLL s (or as fast as it answers) until it lists
    ``cpu`` online; the time its answer came back, or None."""
    deadline = time.monotonic() + ONLINE_TIMEOUT
    last: Optional[float] = None
    while time.monotonic() < deadline:
        started = time.monotonic()
        if last is not None:
            intervals.seconds.append(started - last)
        last = started
        try:
            info = vm.dom.guestVcpus()  # None on failure (the agent busy with watch's call)
        except Exception:
            info = None
        if info and cpu in _cpulist(info.get("online", "")):
            return time.monotonic()
        time.sleep(max(0.0, AGENT_POLL - (time.monotonic() - started)))
    return None


def write_resync_node(directory: Path, count: int) -> Path:
    """A test-driver node of ``count`` running domains (bench/nodes.py's layouts), named so
    that the second watch's scope finds them and nothing else."""
    import nodes

    layouts = [
        dataclasses.replace(layout, name=NODE_PREFIX + layout.name, runstate=nodes.RUNNING)
        for layout in nodes.layouts(count)
    ]
    text = nodes.node_xml(0).replace(
        "</node>", "\n".join(nodes.domain_xml(layout) for layout in layouts) + "\n</node>"
    )
    path = directory / f"node-{count}.xml"
    path.write_text(text, encoding="utf-8")
    return path


class DebianHotadd:
    """(a) the udev-rule guest, (b) the stock guest under watch, (c) the same under a watch
    that also resyncs a 1,000-domain test node on another connection; interleaved."""

    def __init__(self, rounds: int, resync_domains: int, watch_args: list[str]) -> None:
        self.rounds = rounds
        self.resync_domains = resync_domains
        self.watch_args = watch_args
        self.methods = [m for m in DEBIAN_METHODS if m != "watch-resync" or resync_domains]
        self._watches: dict[str, _Watch] = {}

    def run(self, lab: Any, tmp: Path, log: Callable[[str], None]) -> DebianResult:
        from lab import VMRequest

        result = DebianResult(self.rounds, max_vcpus=DEBIAN_MAX_VCPUS)
        for method in self.methods:
            for what in (result.host, result.guest_clock, result.guest_clock_up, result.ost):
                what[method] = Latencies()
        requests = [
            VMRequest(max_vcpus=DEBIAN_MAX_VCPUS, label=DEBIAN_LABEL[m], guest=DEBIAN_GUEST[m])
            for m in self.methods
        ]
        log(f"  booting {len(requests)} Debian 12 VMs ({', '.join(self.methods)})")
        vms = dict(zip(self.methods, lab.start_many(requests)))
        result.boot_seconds = [round(vm.boot_seconds, 1) for vm in vms.values()]
        found = KERNEL_LINE.search(vms[self.methods[0]].serial_text())
        result.kernel = found.group(1) if found else ""
        try:
            self._start_watches(lab, tmp, result, log)
            time.sleep(BOOT_SETTLE)
            self._rounds(lab, vms, result, log)
            if "watch-resync" in self._watches:
                result.resync_summary = self._watches["watch-resync"].last_listed_reason("test")
        finally:
            for method, watch in self._watches.items():
                watch.stop()
                # Kept beside the results: what watch did at each hot-add, with its times.
                RESULTS.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(watch.log, RESULTS / f"hotadd-debian12-{method}.log")
            for vm in vms.values():
                lab.remove(vm)
        return result

    def _start_watches(
        self, lab: Any, tmp: Path, result: DebianResult, log: Callable[[str], None]
    ) -> None:
        """One watch per watch method, each seeing only its own VM (the rule guest: none)."""
        from lab import PREFIX

        run = f"{PREFIX}-{lab.run_id}-*-"
        label = DEBIAN_LABEL["watch"]
        self._watches["watch"] = _Watch(tmp / "watch", [run + label], [f"*-{label}"], [])
        if "watch-resync" not in self.methods:
            return
        tmp.mkdir(mode=0o700, exist_ok=True)
        node = write_resync_node(tmp, self.resync_domains)
        label = DEBIAN_LABEL["watch-resync"]
        scope = [run + label, NODE_PREFIX + "*"]
        extra = ["--resync-interval", str(RESYNC_INTERVAL), *self.watch_args]
        log(f"  watch on qemu:///system + a {self.resync_domains}-domain test node")
        watch = _Watch(tmp / "resync", scope, [f"*-{label}"], extra, [f"test+unix://{node}"])
        self._watches["watch-resync"] = watch
        result.resync_domains, result.resync_interval = self.resync_domains, RESYNC_INTERVAL
        # Its first resync of the node (every definition read) before the measurement.
        if _wait_for(watch.listed, "test", 0.0, 120.0) is None:
            log("  the test node's first resync was not seen within 120 s")

    def _rounds(
        self, lab: Any, vms: dict[str, Any], result: DebianResult, log: Callable[[str], None]
    ) -> None:
        for index in range(self.rounds):
            self._restart_full(list(vms.values()), result)
            shift = index % len(self.methods)
            order = self.methods[shift:] + self.methods[:shift]
            line = []
            for method in order:
                for attempt in range(3):
                    try:
                        line.append(f"{method} {self._one(lab, vms[method], method, result)}")
                        break
                    except Exception as exc:  # e.g. libvirtd restarted by other work
                        log(f"  {method}: {exc}; measuring again")
                        time.sleep(5.0 * (attempt + 1))
                time.sleep(BETWEEN_HOTADDS)
            log(f"  Debian 12 round {index + 1}/{self.rounds}: " + ", ".join(line))

    @staticmethod
    def _restart_full(vms: list[Any], result: DebianResult) -> None:
        """Restart, all at once, the VMs at their maximum (unplug is never used)."""
        full = [vm for vm in vms if not vm.dom.isActive() or vm.live_vcpus() >= vm.max_vcpus]
        if not full:
            return
        with ThreadPoolExecutor(len(full), thread_name_prefix="bench-restart") as pool:
            list(pool.map(lambda vm: vm.restart(), full))  # raises the first failure
        result.restarts += len(full)
        result.boot_seconds += [round(vm.boot_seconds, 1) for vm in full]
        time.sleep(BOOT_SETTLE)  # and let the watches see the agents connect

    def _one(self, lab: Any, vm: Any, method: str, result: DebianResult) -> str:
        """One hot-add; (c) waits for the start of a resync first."""
        cpu = vm.live_vcpus()  # the new vCPU's id (and the guest's CPU number): added in order
        if not vm.dom.isActive():
            raise RuntimeError(f"{vm.name} is not running")
        resync = self._watches.get("watch-resync") if method == "watch-resync" else None
        if resync is not None:
            # Both hosts' resyncs start together; the qemu one is listed first (few domains),
            # while the 1,000-domain listing still runs.
            _wait_for(resync.listed, "qemu", time.monotonic(), 3.0 * RESYNC_INTERVAL)
        serial = _SerialFrom(vm.spec.serial_log)
        since = time.monotonic()
        vm.hot_add(cpu + 1)
        returned = time.monotonic()
        # The CPU cannot be online before the kernel starts bringing it up, so the agent is
        # polled from that line on: the host's polls never queue in front of watch's own
        # agent calls, nor load the rule guest while udev onlines.
        serial.wait(BOOTING.format(cpu=cpu))
        online = _agent_online(vm, cpu, result.agent_poll)
        clock = _wait_guest_clock(serial, cpu)
        if resync is not None:
            listed = _wait_for(resync.listed, "test", since, 5.0)
            result.resync_overlaps += int(listed is not None and listed >= returned)
        try:
            event = lab.ost.wait_for(vm.name, since=since, timeout=5.0)
            result.ost[method].seconds.append(event.received - returned)
        except Exception:
            result.ost[method].failures += 1
        return self._record(method, result, returned, online, clock)

    @staticmethod
    def _record(
        method: str,
        result: DebianResult,
        returned: float,
        online: Optional[float],
        clock: GuestClock,
    ) -> str:
        if online is None:
            result.host[method].failures += 1
        else:
            result.host[method].seconds.append(online - returned)
        for what, end in ((result.guest_clock, clock.booting), (result.guest_clock_up, clock.up)):
            if clock.hotadded is None or end is None:
                what[method].failures += 1
            else:
                what[method].seconds.append(end - clock.hotadded)
        host = "not online" if online is None else f"{online - returned:.2f}s"
        guest = (
            "-"
            if clock.hotadded is None or clock.booting is None
            else (f"{(clock.booting - clock.hotadded) * 1000:.0f}ms")
        )
        return f"{host} (guest {guest})"
