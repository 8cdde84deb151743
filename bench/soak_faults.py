"""The soak's lab VMs and the faults done to them, each followed by the checks of its bound.

A fault method does one thing to one VM (or to the hosts), keeps the harness's own account
of what the domain should show (its policy, the vCPUs plugged since it started) and checks
what must follow within the fault's bound: a hot-added vCPU online (or left alone), the guest
answering again, watch reconnected. The checks common to every step (findings right within
one resync, history, taint) are ``Soak.after_step``'s, in soak.py.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import libvirt
from lab import Lab, LabError, LabVM
from soak_checks import ONLINE_BOUND, REPORT_WATCH, SUPPRESSED_BOUND, Ledger, poll

if TYPE_CHECKING:
    from soak import TestDomains
    from watchproc import WatchProcess

ACTING = ("online", "match")
MODES = ("online", "match", "report")
RECOVERY_BOUND = 60.0  # a guest answers again after suspend, restore, reset, an agent fault
RECONNECT_BOUND = 90.0  # watch connected again after a libvirtd restart
HOOK_BOUND = 15.0  # watch has the hook's "started" message after a start
FLOOD_SECONDS = 10
SUPPRESSED_FOR = 150.0  # a flooded domain's monitor events stay cut off (30 s back-off, probes)
AGENT_FAULT_SECONDS = 8.0


@dataclass(eq=False)
class SoakVM:
    """A lab VM and the harness's account of it."""

    vm: LabVM
    lab: Lab
    stack: str
    file_mode: str  # the mode its [domain:NAME] section of the configuration file gives
    metadata_mode: Optional[str] = None  # set with ``virthotplug policy --set``, if any
    threads_made: int = 1  # vCPU threads QEMU made in this domain's life (TCG's budget)
    plugs_since_start: int = 0  # hot-adds since the domain last started (its history)
    suppressed_until: float = 0.0  # monotonic: a flood cut its monitor events off
    hook_starts: int = 0  # starts done on a host whose libvirtd runs the installed hook
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def mode(self) -> str:
        return self.metadata_mode or self.file_mode

    @property
    def control(self) -> bool:
        return self.vm.spec.control_channel

    def online_set(self) -> frozenset[int]:
        return self.vm.cpu_state().online

    def started_afresh(self) -> None:
        self.threads_made = self.vm.live_vcpus()
        self.plugs_since_start = 0

    def enabled_vcpus(self) -> set[int]:
        """libvirt's enabled vCPU ids of the live definition."""
        root = ET.fromstring(self.vm.dom.XMLDesc(0))
        return {int(v.get("id", "0")) for v in root.iter("vcpu") if v.get("enabled") == "yes"}

    def ready(self, bound: float = RECOVERY_BOUND) -> Optional[float]:
        """Seconds until the guest answers (control channel or agent), None past ``bound``."""
        started = time.monotonic()
        try:
            if self.control:
                self.vm.wait_control(bound)
            if self.vm.behaviour.agent_expected or not self.control:
                self.vm.wait_agent(max(1.0, bound - (time.monotonic() - started)))
        except LabError:
            return None
        return time.monotonic() - started


class Faults:
    """Every fault kind of soak_schedule as a method ``do_<kind>`` (dashes as underscores)."""

    def __init__(
        self,
        ledger: Ledger,
        watch: WatchProcess,
        scratch: Path,
        test_domains: TestDomains,
        rewrite_config: Callable[[], Path],
        restart_host_libvirtd: bool = False,
    ) -> None:
        self.ledger = ledger
        self.watch = watch
        self.scratch = scratch
        self.test_domains = test_domains
        self._rewrite_config = rewrite_config
        self._restart_host = restart_host_libvirtd
        self.hotadd_latencies: list[tuple[float, float]] = []  # (run time, seconds)
        self.incidents: list[dict[str, Any]] = []  # guests that stalled (see ``stalled``)
        self.vms: list[SoakVM] = []

    # -- vCPUs --

    def do_hot_add(self, sv: SoakVM) -> None:
        self._ensure_budget(sv)
        before = sv.online_set()
        live = sv.vm.live_vcpus()
        started = time.monotonic()
        sv.vm.hot_add(live + 1)
        self._plugged(sv, started, before, live + 1)

    def do_setvcpu_out_of_order(self, sv: SoakVM) -> None:
        """Enable the highest disabled vCPU id first (``virsh setvcpu DOM N --enable``)."""
        self._ensure_budget(sv)
        disabled = set(range(sv.vm.max_vcpus)) - sv.enabled_vcpus()
        before = sv.online_set()
        live = sv.vm.live_vcpus()
        started = time.monotonic()
        sv.vm.dom.setVcpu(str(max(disabled)), 1, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        self._plugged(sv, started, before, live + 1)

    def do_unplug(self, sv: SoakVM) -> None:
        """Unplug one vCPU where the stack completes it: the request times out though the
        guest ejected the CPU, and the repeated request corrects libvirt's count."""
        if sv.vm.live_vcpus() == 1:
            self.do_hot_add(sv)
        target = sv.vm.live_vcpus() - 1
        error = sv.vm.unplug(target)
        if error is not None:
            error = sv.vm.unplug(target)
        if error is not None or sv.vm.live_vcpus() != target:
            self.ledger.violate("fault-recovered", sv.name, f"unplug to {target} failed: {error}")
            return
        sv.vm.hotplug_broken = False  # the stack re-plugs a removed slot
        if poll(30, lambda: len(sv.vm.cpu_state().present) == target, 0.2) is None:
            self.ledger.violate("fault-recovered", sv.name, "the guest did not eject the vCPU")

    def _ensure_budget(self, sv: SoakVM) -> None:
        """A VM at its maximum (or its TCG thread budget) is restarted, never unplugged
        where unplug is broken."""
        if sv.threads_made >= sv.vm.max_vcpus or sv.vm.live_vcpus() >= sv.vm.max_vcpus:
            self.ledger.record({"kind": "restart-at-maximum", "target": sv.name})
            self._cold_start(sv)

    def _plugged(self, sv: SoakVM, started: float, before: frozenset[int], live: int) -> None:
        returned = time.monotonic()
        sv.threads_made += 1
        sv.plugs_since_start += 1
        if sv.mode in ACTING:
            self._expect_online(sv, returned, live)
        else:
            self._expect_untouched(sv, started, before)

    def _expect_online(self, sv: SoakVM, returned: float, live: int) -> None:
        suppressed = time.monotonic() < sv.suppressed_until
        bound = SUPPRESSED_BOUND if suppressed else ONLINE_BOUND
        interval = 0.05 if sv.control else 0.2  # a Debian guest is read through its agent
        took = poll(bound, lambda: len(sv.online_set()) >= live, interval)
        if took is None:
            evidence = {"cpu_state": str(sv.vm.cpu_state()), "records": self._records(sv, returned)}
            self.ledger.violate(
                "hotadd-online", sv.name, f"not online within {bound} s ({sv.mode})", evidence
            )
            return
        if not suppressed:
            self.hotadd_latencies.append((self.ledger.now(), round(took, 3)))

    def _expect_untouched(self, sv: SoakVM, started: float, before: frozenset[int]) -> None:
        time.sleep(REPORT_WATCH)
        after = sv.online_set()
        acted = [
            r
            for t, r in self.watch.records
            if t >= started
            and r["domain"] == sv.name
            and r["event"] == "reconcile"
            and r.get("action") not in (None, "", "none")
        ]
        if after != before or acted:
            evidence = {"before": sorted(before), "after": sorted(after), "records": acted[-3:]}
            self.ledger.violate("report-untouched", sv.name, "changed under report", evidence)

    def _records(self, sv: SoakVM, since: float) -> list[dict[str, Any]]:
        return [r for t, r in self.watch.records if t >= since and r["domain"] == sv.name][-5:]

    # -- lifecycle --

    def do_suspend_resume(self, sv: SoakVM) -> None:
        sv.vm.dom.suspend()
        time.sleep(3)
        sv.vm.dom.resume()
        self._expect_ready(sv, "resume")

    def do_save_restore(self, sv: SoakVM) -> None:
        path = self.scratch / f"{sv.name}.save"
        sv.vm.dom.save(str(path))
        try:
            sv.lab.conn.restore(str(path))
        finally:
            path.unlink(missing_ok=True)
        # A new QEMU, started with the live vCPUs: the domain's record begins again there.
        sv.started_afresh()
        self._expect_ready(sv, "restore")

    def do_managedsave(self, sv: SoakVM) -> None:
        sv.vm.dom.managedSave(0)
        self._start(sv)
        sv.started_afresh()  # restored by a new QEMU, as above
        self._expect_ready(sv, "managedsave restore")

    def do_reboot(self, sv: SoakVM) -> None:
        """An ACPI (or agent) reboot: the guest's agent goes away, then answers again."""
        sv.vm.dom.reboot(0)
        if poll(120, lambda: sv.vm.agent_channel_state() != "connected", 0.2) is None:
            self.ledger.violate("fault-recovered", sv.name, "the guest did not reboot")
        self._expect_ready(sv, "reboot", bound=480.0)

    def do_reset(self, sv: SoakVM) -> None:
        sv.vm.dom.reset(0)
        time.sleep(2)  # the old guest's control loop may still answer for a moment
        self._expect_ready(sv, "reset")

    def do_destroy_start(self, sv: SoakVM) -> None:
        self._cold_start(sv)

    def _cold_start(self, sv: SoakVM) -> None:
        sv.vm.dom.destroy()
        self._start(sv)
        sv.started_afresh()
        self._expect_ready(sv, "start")

    def _start(self, sv: SoakVM) -> None:
        since = time.monotonic()
        sv.vm.dom.create()
        sv.vm.hotplug_broken = False
        if sv.stack == "stack1":
            self._expect_hook(sv, since)

    def _expect_hook(self, sv: SoakVM, since: float) -> None:
        def seen() -> bool:
            return any(
                t >= since
                and r["domain"] == sv.name
                and r["event"] == "hook"
                and r["details"].get("operation") == "started"
                for t, r in list(self.watch.records)
            )

        sv.hook_starts += 1
        if poll(HOOK_BOUND, seen, 0.2) is None:
            self.ledger.violate("hook", sv.name, f"no hook 'started' within {HOOK_BOUND} s")

    def do_transient_undefine_define(self, sv: SoakVM) -> None:
        """Undefine the running domain (it goes on, transient), then define it again."""
        xml = sv.vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        sv.vm.dom.undefine()
        time.sleep(3)
        if sv.vm.dom.isPersistent():
            self.ledger.violate("fault-recovered", sv.name, "still persistent after undefine")
        sv.lab.conn.defineXML(xml)

    def _expect_ready(self, sv: SoakVM, what: str, bound: float = RECOVERY_BOUND) -> None:
        if sv.ready(bound) is None and not self.stalled(sv, f"not ready after {what}"):
            tail = sv.vm.serial_tail(5)
            self.ledger.violate(
                "fault-recovered", sv.name, f"not ready {bound} s after {what}", tail
            )

    def stalled(self, sv: SoakVM, error: str) -> bool:
        """A guest that stopped answering with its kernel stalled (soft lockup, RCU stall:
        its vCPU threads starved on a loaded host under TCG) is a lab incident, not the
        tool's: recorded with the serial console, and the VM cold-started."""
        if sv.ready(10.0) is not None:
            return False
        serial = sv.vm.serial_tail(30)
        if "soft lockup" not in serial and "rcu" not in serial.lower():
            return False
        self.incidents.append(
            {"t": self.ledger.now(), "target": sv.name, "error": error, "serial": serial}
        )
        print(f"  incident: {sv.name} stalled (guest kernel); restarting it", flush=True)
        try:
            self._cold_start(sv)
        except Exception as exc:  # the restart itself failed: that is a violation
            self.ledger.violate("fault-recovered", sv.name, f"restart after a stall: {exc}")
        return True

    # -- the guest agent --

    def do_agent_kill(self, sv: SoakVM) -> None:
        sv.vm.control_ok("agent-stop")
        time.sleep(AGENT_FAULT_SECONDS)
        sv.vm.control_ok("agent-start")
        self._expect_ready(sv, "agent restart")

    def do_agent_hang(self, sv: SoakVM) -> None:
        sv.vm.control_ok("agent-hang")
        time.sleep(AGENT_FAULT_SECONDS)
        sv.vm.control_ok("agent-cont")
        self._expect_ready(sv, "agent SIGCONT")

    def do_agent_restart(self, sv: SoakVM) -> None:
        sv.vm.control_ok("agent-restart")
        self._expect_ready(sv, "agent restart")

    # -- policies --

    def do_policy_change(self, sv: SoakVM) -> None:
        """Alternately ``policy --set`` another mode and ``--clear`` (back to the file's),
        live and persistent, so the policy outlives a restart."""
        if sv.metadata_mode is None:
            mode = next(m for m in MODES if m != sv.mode)
            argv = ["--set", mode]
        else:
            mode, argv = None, ["--clear"]
        since = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "virthotplug",
                "-c",
                sv.lab.uri,
                "policy",
                sv.name,
                *argv,
                "--live",
                "--config",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            self.ledger.violate("fault-recovered", sv.name, "policy change refused", done.stderr)
            return
        sv.metadata_mode = mode
        self._expect_policy_applied(sv, since)

    def do_sighup_config_change(self, _target: str) -> None:
        """Change a file-policy VM's mode in the configuration file, SIGHUP watch."""
        candidates = [sv for sv in self.vms if sv.metadata_mode is None] or self.vms
        sv = min(candidates, key=lambda s: (s.extra.get("sighups", 0), s.name))
        sv.extra["sighups"] = sv.extra.get("sighups", 0) + 1
        sv.file_mode = next(m for m in MODES if m != sv.file_mode)
        self._rewrite_config()
        since = time.monotonic()
        self.watch.proc.send_signal(signal.SIGHUP)
        self.ledger.record({"kind": "config", "target": sv.name, "file_mode": sv.file_mode})
        if sv.metadata_mode is None:
            self._expect_policy_applied(sv, since)

    def _expect_policy_applied(self, sv: SoakVM, since: float) -> None:
        """An acting policy onlines what is offline (within a resync: SIGHUP reloads, the
        next reconcile applies); report changes nothing."""
        if sv.mode not in ACTING or sv.vm.live_vcpus() == 1:
            return
        live = sv.vm.live_vcpus()
        bound = 75.0  # one resync (60 s) and its reconcile
        if poll(bound, lambda: len(sv.online_set()) >= live, 0.5) is None:
            self.ledger.violate(
                "policy-applied",
                sv.name,
                f"{sv.mode}: not applied within {bound} s",
                {"cpu_state": str(sv.vm.cpu_state()), "records": self._records(sv, since)},
            )

    # -- the hosts --

    def do_libvirtd_restart(self, _target: str) -> None:
        """Kill and restart every private libvirtd of the lab (stacks 2 and 3, the test
        driver's), and the host's only when asked; watch must reconnect to each."""
        since = time.monotonic()
        labs = {sv.lab.uri: sv.lab for sv in self.vms if sv.stack != "stack1" or self._restart_host}
        for lab in labs.values():
            lab.restart_libvirtd(timeout=60)
        self.test_domains.restart_daemon()
        expected = len(labs) + 1

        def reconnected() -> bool:
            return (
                sum(
                    1
                    for t, r in list(self.watch.records)
                    if t >= since
                    and r["event"] == "host"
                    and r["details"].get("what") == "connected"
                )
                >= expected
            )

        try:
            if poll(RECONNECT_BOUND, reconnected, 0.5) is None:
                hosts = [
                    (r["host"], r["details"].get("what"))
                    for t, r in self.watch.records
                    if t >= since and r["event"] == "host"
                ]
                self.ledger.violate(
                    "reconnect", "-", f"watch not reconnected to {expected} hosts", hosts
                )
        finally:
            self.test_domains.resume()

    def do_ost_flood(self, sv: SoakVM) -> None:
        """10 s of ACPI_DEVICE_OST at full speed from the guest, faking a slot that is not
        plugged (so the events name no vCPU: nothing for the history)."""
        free = sorted(set(range(1, sv.vm.max_vcpus)) - sv.enabled_vcpus())
        since = time.monotonic()
        sv.vm.flood_start(rate=0, seconds=FLOOD_SECONDS, selector=free[-1] if free else 1)
        time.sleep(FLOOD_SECONDS + 0.5)
        with contextlib.suppress(LabError):
            sv.vm.flood_stop()
        sv.suppressed_until = time.monotonic() + SUPPRESSED_FOR

        def cut_off() -> bool:
            return any(
                t >= since and r["domain"] == sv.name and r["event"] == "flood"
                for t, r in list(self.watch.records)
            )

        if poll(15, cut_off, 0.2) is None:
            self.ledger.violate("flood-cut-off", sv.name, "no flood record from watch")
        self._expect_ready(sv, "flood")
