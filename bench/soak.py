"""Soak: one ``virthotplug watch`` for a long time under churn and faults, with figures.

    make soak                       # 60 minutes (SOAK_MINUTES=N for another length)
    python bench/soak.py --minutes 5 --seed 7 [--no-debian] [--restart-host-libvirtd]

Root, on a host set up by ``make host`` with ``make lab-images`` built. One ``watch`` (JSON
records, ``--metrics-listen`` on loopback, resync every 60 s) follows four hosts:

* the host's libvirtd and stacks 2 and 3 (tests/lab/stacks.py), each with busybox lab VMs
  (tests/lab) under the policies ``online``, ``match`` and ``report``, and a real Debian 12
  guest on stack 1 (``--no-debian`` leaves it out);
* a private libvirtd of the lab (tests/lab/private_libvirtd.py) serving 1,000 test-driver
  domains over real RPC (``test+unix:///default``, shared by every client of the daemon),
  whose lifecycle a thread of the harness churns all the time.

The libvirt hook is installed for the host's libvirtd (tests/lab/hook_install.py) and put
back at the end. A seeded schedule (soak_schedule.py) then hot-adds vCPUs at random moments
and brings every fault kind (soak_faults.py); after each step the invariants are checked
(soak_checks.py) and every 10 s the series sampled (soak_series.py). At the end the series,
the schedule's log, the violations and the pass criteria go to
``bench/results/soak-<time>.json``, the plot to ``soak-<time>.png``; exit status 0 only when
there was no violation and every criterion passed.

Every VM the soak creates is destroyed and undefined, every test domain removed, the private
libvirtd stopped, stacks 2 and 3 stopped unless another run uses them, and only processes the
soak started are ended (by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for extra in (ROOT / "tests" / "lab", ROOT / "tests" / "e2e", ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import hook_install  # noqa: E402
import libvirt  # noqa: E402
import nodes  # noqa: E402
import soak_checks  # noqa: E402
import soak_schedule  # noqa: E402
import soak_series  # noqa: E402
from common import RESULTS  # noqa: E402
from domains import MANUAL  # noqa: E402
from lab import Lab, VMRequest  # noqa: E402
from private_libvirtd import PrivateLibvirtd  # noqa: E402
from soak_faults import Faults, SoakVM  # noqa: E402
from stacks import LIBVIRTD_PID, STACK2, STACK3, Stack, Users, ensure_stack  # noqa: E402
from watchproc import WatchProcess, scoped_config  # noqa: E402

TEST_PREFIX = "vhpsoak-"
TEST_DOMAINS = 1000
CHURN_INTERVAL = 2.0
CHURN_OPS = 4
CHURN_EVENT_BOUND = 30.0  # watch has a lifecycle record for a churned test domain
BUSYBOX_MAX_VCPUS = 8  # room for seven hot-adds per boot (TCG's thread budget)
RESYNC = 60
HISTORY_BOUND = 30.0  # a plug is in the domain's history this long after the guest onlined it
# The lab VMs: (stack, guest, policy of the configuration file).
# Five guests: TCG guests idle at a tenth of a host core each, and a starved guest stalls
# (soft lockups while a CPU comes online) whatever onlines it.
ROSTER = (
    ("stack1", "busybox", "online"),
    ("stack1", "debian12", "match"),
    ("stack2", "busybox", "match"),
    ("stack3", "busybox", "online"),
    ("stack3", "busybox", "report"),
)


@dataclass
class Options:
    minutes: float = 60.0
    seed: int = 7
    debian: bool = True
    restart_host_libvirtd: bool = False
    test_domains: int = TEST_DOMAINS
    out: Path = RESULTS


@dataclass
class SoakResult:
    path: Path
    plot: Optional[Path]
    violations: list[soak_checks.Violation]
    criteria: list[soak_series.Criterion]
    kinds_done: set[str] = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return not self.violations and all(c.passed for c in self.criteria)


def _leave_stack(built: Stack, users: Users) -> None:
    """Stop the stack unless another run uses it."""
    if users.leave():
        built.stop()


# ---- the test driver's 1,000 domains and their churn --------------------------------------


class TestDomains:
    """1,000 test-driver domains on the private libvirtd, and the thread that churns them."""

    def __init__(self, daemon: PrivateLibvirtd, count: int, seed: int, ledger: soak_checks.Ledger):
        self.daemon = daemon
        self.count = count
        self.uri = f"test+unix:///default?socket={daemon.socket}"
        self._rng = random.Random(seed)
        self._ledger = ledger
        self._conn: Any = None
        self._names: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self.ops: list[tuple[float, str, str]] = []  # (monotonic, domain, operation)
        self.restarts: list[float] = []  # monotonic: when the daemon was killed
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="soak-churn", daemon=True)

    def populate(self) -> None:
        with self._lock:
            self._conn = libvirt.open(self.uri)
            self._names = []
            for layout in nodes.layouts(self.count, seed=11):
                named = dataclasses.replace(layout, name=TEST_PREFIX + layout.name)
                dom = self._conn.defineXML(nodes.domain_xml(named))
                if layout.runstate != nodes.SHUTOFF:
                    dom.create()
                    if layout.runstate == nodes.PAUSED:
                        dom.suspend()
                self._names.append(named.name)

    def start(self) -> None:
        self._thread.start()

    def restart_daemon(self) -> None:
        """Kill the private libvirtd and start it again (the default node starts over), define
        the domains anew; the churn stays paused until ``resume`` (watch reconnected)."""
        self._paused.set()
        with self._lock:
            self.restarts.append(time.monotonic())
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self.daemon.restart()
        self.populate()

    def resume(self) -> None:
        self._paused.clear()

    def _loop(self) -> None:
        while not self._stop.wait(CHURN_INTERVAL):
            if self._paused.is_set():
                continue
            with self._lock:
                for _ in range(CHURN_OPS):
                    self._one()

    def _one(self) -> None:
        name = self._rng.choice(self._names)
        before = time.monotonic()  # its event may reach watch's reader before the call returns
        try:
            dom = self._conn.lookupByName(name)
            state = dom.info()[0]
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                op = "start"
                dom.create()
            elif state == libvirt.VIR_DOMAIN_PAUSED:
                op = "resume"
                dom.resume()
            else:
                op = self._rng.choice(("destroy", "suspend", "undefine-define"))
                self._running_op(dom, op)
            self.ops.append((before, name, op))
        except libvirt.libvirtError as exc:
            self.errors.append(f"{self._ledger.now():.0f} s {name}: {exc}")

    def _running_op(self, dom: Any, op: str) -> None:
        if op == "destroy":
            dom.destroy()
        elif op == "suspend":
            dom.suspend()
        else:  # running and transient for a moment, then persistent again
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            dom.undefine()
            self._conn.defineXML(xml)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        with self._lock, contextlib.suppress(libvirt.libvirtError):
            for name in self._names:
                with contextlib.suppress(libvirt.libvirtError):
                    dom = self._conn.lookupByName(name)
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
            self._conn.close()


# ---- the run ------------------------------------------------------------------------------


class Soak:
    def __init__(self, options: Options, scratch: Path) -> None:
        self.options = options
        self.scratch = scratch
        self.ledger = soak_checks.Ledger()
        self.labs: dict[str, Lab] = {}
        self.stacks: dict[str, Stack] = {}
        self.vms: list[SoakVM] = []
        self.steps: list[soak_schedule.Step] = []
        self.kinds_done: set[str] = set()

    # -- set-up --

    def open_stacks(self, stack: contextlib.ExitStack) -> None:
        for definition in (STACK2, STACK3):
            built = ensure_stack(definition)
            users = Users(definition)
            stack.callback(_leave_stack, built, users)
            built.start()
            self.stacks[definition.name] = built
        uris = {"stack1": "qemu:///system", **{n: s.uri for n, s in self.stacks.items()}}
        for name, uri in uris.items():
            self.labs[name] = stack.enter_context(Lab(uri, ost=False))

    def boot_vms(self) -> None:
        wanted = [r for r in ROSTER if self.options.debian or r[1] == "busybox"]
        by_lab: dict[str, list[SoakVM]] = {}
        for index, (stack_name, guest, mode) in enumerate(wanted):
            lab = self.labs[stack_name]
            request = VMRequest(
                MANUAL, max_vcpus=BUSYBOX_MAX_VCPUS, label=f"soak{index}{mode[:3]}", guest=guest
            )
            sv = SoakVM(lab.define(request), lab, stack_name, mode)
            self.vms.append(sv)
            by_lab.setdefault(stack_name, []).append(sv)
        started = time.monotonic()
        errors: list[str] = []
        threads = [
            threading.Thread(target=lambda s=s: self._boot(s, errors)) for s in by_lab.values()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError("lab VMs failed to boot: " + "; ".join(errors))
        for sv in self.vms:
            sv.started_afresh()
        print(f"{len(self.vms)} lab VMs booted in {time.monotonic() - started:.0f} s", flush=True)

    def _boot(self, vms: list[SoakVM], errors: list[str]) -> None:
        try:
            vms[0].lab.boot([sv.vm for sv in vms])
        except Exception as exc:
            errors.append(str(exc))

    def config_text(self) -> Path:
        sections = {sv.name: f"mode = {sv.file_mode}\n" for sv in self.vms}
        return scoped_config(self.scratch, sections)

    def targets(self) -> list[soak_schedule.Target]:
        return [
            soak_schedule.Target(
                name=sv.name,
                stack=sv.stack,
                guest=sv.vm.guest,
                control=sv.control,
                unplug=sv.stack == "stack3",
                saves=sv.stack == "stack1",
            )
            for sv in self.vms
        ]

    def libvirtd_pids(self, test: TestDomains) -> dict[str, Optional[int]]:
        pids: dict[str, Optional[int]] = {"private (test driver)": test.daemon.pid}
        with contextlib.suppress(OSError, ValueError):
            pids["stack1"] = int(Path("/run/libvirtd.pid").read_text().strip())
        for name, built in self.stacks.items():
            with contextlib.suppress(OSError, ValueError):
                pids[name] = int(built.host_path(LIBVIRTD_PID).read_text().strip())
        return pids

    # -- the run --

    def run(self) -> SoakResult:
        duration = self.options.minutes * 60
        with contextlib.ExitStack() as stack:
            self.open_stacks(stack)
            self.boot_vms()
            daemon = stack.enter_context(PrivateLibvirtd.first_free("soak"))
            test = TestDomains(daemon, self.options.test_domains, self.options.seed, self.ledger)
            test.populate()
            stack.callback(test.stop)
            print(f"{self.options.test_domains} test domains on {test.uri}", flush=True)
            socket_path = self.scratch / "hook.sock"
            stack.enter_context(hook_install.installed_hook(socket_path, self.scratch))
            watch = self.start_watch(test)
            stack.callback(self._stop_watch, watch)
            faults = Faults(
                self.ledger,
                watch,
                self.scratch,
                test,
                self.config_text,
                self.options.restart_host_libvirtd,
            )
            faults.vms = self.vms
            sampler = soak_series.Sampler(
                watch.proc.pid, watch.metrics_port(), lambda: self.libvirtd_pids(test)
            ).start()
            stack.callback(sampler.stop)
            self.steps = soak_schedule.build(self.options.seed, duration, self.targets())
            self.ledger.started = time.monotonic()
            test.start()
            self.execute(faults, watch, duration)
            self.final_checks(watch, test, faults)
            sampler.stop()
            return self.write(sampler, faults, watch, test, duration)

    def start_watch(self, test: TestDomains) -> WatchProcess:
        hosts = ("qemu:///system", *(s.uri for s in self.stacks.values()), test.uri)
        watch = WatchProcess(self.config_text(), "--metrics-listen", "127.0.0.1:0", connect=hosts)
        watch.wait_for(
            lambda r: r["event"] == "host" and r["details"]["what"] == "connected", timeout=120
        )
        return watch

    def _stop_watch(self, watch: WatchProcess) -> None:
        try:
            stopped_in = watch.stop()
        except AssertionError as exc:  # records that do not fit the published schema
            self.ledger.violate("schema", "watch", str(exc)[:500])
            return
        if watch.proc.returncode != 0 or stopped_in > 2.0:
            self.ledger.violate(
                "clean-stop",
                "watch",
                f"exit {watch.proc.returncode} {stopped_in:.2f} s after SIGTERM",
                watch.stderr_tail(),
            )

    def execute(self, faults: Faults, watch: WatchProcess, duration: float) -> None:
        by_name = {sv.name: sv for sv in self.vms}
        for index, step in enumerate(self.steps):
            wait = step.at - self.ledger.now()
            if wait > 0:
                time.sleep(wait)
            late = max(0.0, -wait)
            print(
                f"{self.ledger.now():7.1f} s  step {index + 1}/{len(self.steps)} {step.kind} "
                f"{step.target} (late {late:.0f} s)",
                flush=True,
            )
            target: Any = by_name.get(step.target, step.target)
            entry: dict[str, Any] = {"step": index, **step.to_dict(), "late": round(late, 1)}
            started = time.monotonic()
            try:
                getattr(faults, "do_" + step.kind.replace("-", "_"))(target)
                entry["result"] = "done"
            except Exception as exc:  # a failed step is a violation; the run goes on
                entry["result"] = f"error: {exc}"
                stalled = isinstance(target, SoakVM) and faults.stalled(target, str(exc))
                if not stalled:
                    self.ledger.violate("step-failed", step.target, f"{step.kind}: {exc}")
            entry["seconds"] = round(time.monotonic() - started, 2)
            self.ledger.record(entry)
            self.kinds_done.add(step.kind)
            self.after_step(watch, [target] if isinstance(target, SoakVM) else self.vms)
        left = duration - self.ledger.now()
        if left > 0:
            time.sleep(left)

    # -- invariants after each step --

    def after_step(self, watch: WatchProcess, touched: list[SoakVM]) -> None:
        port = watch.metrics_port()
        for sv in touched:
            self.check_history(sv, self.check_findings(sv, port))
        for sv in self.vms:
            taints = sv.vm.taints()
            if taints:
                self.ledger.violate("taint", sv.name, "tainted", taints)
        if watch.proc.poll() is not None:
            raise RuntimeError(f"watch exited {watch.proc.returncode}: {watch.stderr_tail()}")

    def check_findings(self, sv: SoakVM, port: int) -> Optional[dict[str, Any]]:
        """watch's view of the domain agrees with a fresh read within one resync; returns
        the last fresh read."""
        seen: dict[str, Any] = {}

        def agree() -> bool:
            doc = soak_checks.status(sv.lab.uri, sv.name)
            seen["status"] = doc
            seen["watch"] = soak_checks.domain_metrics(port, sv.name)
            return doc is not None and soak_checks.findings_agree(seen["watch"], doc)

        if soak_checks.poll(RESYNC + 15, agree, 2.0) is None:
            doc = seen.get("status") or {}
            evidence = {
                "watch": {**seen.get("watch", {}), "findings": sorted(seen["watch"]["findings"])},
                "status": {
                    "live": (doc.get("live") or {}).get("current"),
                    "guest": doc.get("guest"),
                    "findings": [f["code"] for f in doc.get("findings", [])],
                },
            }
            self.ledger.violate("findings", sv.name, "watch disagrees with a fresh read", evidence)
        return seen.get("status")

    def check_history(self, sv: SoakVM, doc: Optional[dict[str, Any]]) -> None:
        """The domain's history has exactly the hot-adds the schedule made since it started,
        within ``HISTORY_BOUND`` seconds: the reconcile that onlines a CPU records its plug
        after its agent calls end (the guest may list the CPU online before they return, and
        a guest slow to online keeps them going for up to three agent timeouts), so a read
        meanwhile comes before the record."""

        def plugged(document: Optional[dict[str, Any]]) -> Optional[int]:
            return None if document is None else (document.get("history") or {}).get("plugged", 0)

        seen = {"doc": doc}

        def recorded() -> bool:
            if plugged(seen["doc"]) == sv.plugs_since_start:
                return True
            seen["doc"] = soak_checks.status(sv.lab.uri, sv.name)
            return plugged(seen["doc"]) == sv.plugs_since_start

        if soak_checks.poll(HISTORY_BOUND, recorded, 1.0) is not None:
            return
        doc = seen["doc"]
        count = plugged(doc)
        if doc is None or count is None:  # the one implies the other: for the type checker
            self.ledger.violate("history", sv.name, "status could not be read")
            return
        what = "lost" if count < sv.plugs_since_start else "invented"
        self.ledger.violate(
            "history",
            sv.name,
            f"{what}: {count} plugged recorded, {sv.plugs_since_start} hot-added",
            doc.get("history"),
        )

    def final_checks(self, watch: WatchProcess, test: TestDomains, faults: Faults) -> None:
        for trace in soak_checks.tracebacks(watch.stderr_path):
            self.ledger.violate("traceback", "watch", trace)
        self.check_churn(watch, test)
        missing = set(soak_schedule.KIND_NAMES) - self.kinds_done
        if missing:
            self.ledger.violate("coverage", "-", f"fault kinds never run: {sorted(missing)}")

    def check_churn(self, watch: WatchProcess, test: TestDomains) -> None:
        """Every lifecycle change the churn made shows up as a lifecycle record of watch."""
        records: dict[str, list[float]] = {}
        for t, r in list(watch.records):
            if r["event"] == "lifecycle" and (r["domain"] or "").startswith(TEST_PREFIX):
                records.setdefault(r["domain"], []).append(t)
        end = time.monotonic() - CHURN_EVENT_BOUND
        lost = [
            (round(t - self.ledger.started, 1), name, op)
            for t, name, op in test.ops
            if t < end
            and not any(t <= seen <= t + CHURN_EVENT_BOUND for seen in records.get(name, []))
            and not any(0 <= killed - t < 5 for killed in test.restarts)  # died with libvirtd
        ]
        if lost:
            self.ledger.violate(
                "churn-events", "test driver", f"{len(lost)} of {len(test.ops)} lost", lost[:20]
            )

    # -- results --

    def write(
        self,
        sampler: soak_series.Sampler,
        faults: Faults,
        watch: WatchProcess,
        test: TestDomains,
        duration: float,
    ) -> SoakResult:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.options.out.mkdir(parents=True, exist_ok=True)
        path = self.options.out / f"soak-{stamp}.json"
        latencies = [v for _, v in faults.hotadd_latencies]
        found = soak_series.criteria(sampler.samples, duration, latencies)
        doc = {
            "minutes": self.options.minutes,
            "seed": self.options.seed,
            "vms": [
                {"name": sv.name, "stack": sv.stack, "guest": sv.vm.guest, "mode": sv.file_mode}
                for sv in self.vms
            ],
            "test_domains": self.options.test_domains,
            "test_churn": {"ops": len(test.ops), "errors": test.errors[:50]},
            "schedule": [s.to_dict() for s in self.steps],
            "log": self.ledger.log,
            "violations": self.ledger.violations_dicts(),
            "incidents": faults.incidents,
            "criteria": [dataclasses.asdict(c) for c in found],
            "hotadd_latencies": faults.hotadd_latencies,
            "samples": soak_series.samples_dicts(sampler.samples),
            "sample_errors": sampler.errors,
            "watch_records": len(watch.records),
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")
        png = path.with_suffix(".png")
        title = f"virthotplug watch soak, {self.options.minutes:g} min, seed {self.options.seed}"
        drawn = soak_series.plot(sampler.samples, faults.hotadd_latencies, png, title)
        print(soak_series.criteria_table(found))
        print(f"{len(self.ledger.violations)} violations; results in {path}")
        return SoakResult(
            path, png if drawn else None, list(self.ledger.violations), found, self.kinds_done
        )


def run(options: Options) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="vhp-soak-") as scratch:
        return Soak(options, Path(scratch)).run()


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = float(os.environ.get("SOAK_MINUTES") or 60)
    parser.add_argument("--minutes", type=float, default=default)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-debian", dest="debian", action="store_false")
    parser.add_argument("--restart-host-libvirtd", action="store_true")
    parser.add_argument("--test-domains", type=int, default=TEST_DOMAINS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    return Options(
        args.minutes,
        args.seed,
        args.debian,
        args.restart_host_libvirtd,
        args.test_domains,
        args.out,
    )


def main(argv: list[str]) -> int:
    result = run(parse(argv))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
