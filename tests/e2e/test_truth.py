"""What virthotplug says is what each stack and guest did (decided from observation).

- Stack 1, out-of-order ``virsh setvcpu DOM 3 --enable --live``: the guest calls the new CPU
  cpu1, and every record of watch names cpu1 (vcpu3 only as the OST event's device).
- Stack 1, Debian 13 (its 6.12 kernel rejects the hot-add under TCG while QEMU's OST says
  success): watch reports ``guest-rejected-vcpu`` once, at warning level, with at most five
  reconciles of the domain in the 10 s after the hot-add; ``setvcpus`` exits 12.
- Stack 2 (libvirt 11.3 + QEMU 10.0): shrinking 3 -> 2 ends with every layer at 2 and exit 0
  (the repeated unplug request is accepted there); the next grow, which would make QEMU's
  last vCPU thread under TCG while no record since QEMU's start proves the count, is refused
  saying what is not known, and works with --force. No output names a QEMU version other
  than the host's.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import libvirt
import pytest
from lab import DEVICE_CHECK, SUCCESS, Lab, LabVM, MonitorEvent
from matrix_fixtures import REJECTED, Case, vhp
from watchproc import Record, WatchProcess, scoped_config

StartWatch = Callable[..., WatchProcess]
VERSION = re.compile(r"QEMU \d+\.\d+(?:\.\d+)?")


@pytest.fixture
def start_watch(tmp_path: Path) -> Iterator[StartWatch]:
    started: list[WatchProcess] = []

    def start(policies: dict[str, str], uri: str, watch: str = "") -> WatchProcess:
        config = scoped_config(tmp_path, policies, watch)
        proc = WatchProcess(config, "--json", connect=(uri,))
        started.append(proc)
        proc.wait_for(lambda r: r["event"] == "host" and _what(r) == "connected", timeout=60)
        for name in policies:  # act only once watch has judged (and subscribed to) the domain
            proc.wait_for(lambda r, n=name: _reconcile_of(r, n), timeout=60)
        return proc

    yield start
    for proc in started:
        proc.stop()
        assert proc.proc.returncode == 0, proc.stderr_tail()


def _what(record: Record) -> str:
    return str((record.get("details") or {}).get("what"))


def _reconcile_of(record: Record, name: str) -> bool:
    return record["event"] == "reconcile" and record["domain"] == name


def _is_hot_add(event: MonitorEvent) -> bool:
    return event.source == DEVICE_CHECK and event.info.get("slot-type") == "CPU"


def _reconciles(watch: WatchProcess, name: str, since: float, until: float) -> list[Record]:
    return [r for t, r in watch.records if since <= t <= until and _reconcile_of(r, name)]


def _other_versions(text: str, lab: Lab) -> set[str]:
    """QEMU versions named in ``text`` other than the one the host reports."""
    host = lab.versions()[1]  # "QEMU 10.0.13", as the daemon reports it
    return {v for v in VERSION.findall(text) if not host.startswith(v)}


# ---- stack 1: out-of-order setvcpu --------------------------------------------------------


@pytest.mark.parametrize("case", [Case("stack1", "busybox")], ids=str)
def test_out_of_order_setvcpu_names_the_guest_cpu_everywhere(
    case: Case, matrix_lab: Lab, matrix_vm: LabVM, start_watch: StartWatch
) -> None:
    vm = matrix_vm
    # The report policy, which never writes: onlining this CPU takes the busybox guest on
    # QEMU 7.2 under TCG 10-20 s, and once it wedged the guest kernel for minutes, holding
    # libvirtd's job lock on the domain through the agent call. The name the plan gives the
    # CPU is what is checked here; onlining itself has its own tests.
    watch = start_watch({vm.name: "mode = report"}, matrix_lab.uri)
    since = time.monotonic()
    vm.dom.setVcpu("3", 1, libvirt.VIR_DOMAIN_AFFECT_LIVE)  # virsh setvcpu DOM 3 --enable --live
    ost = matrix_lab.ost.wait_for(vm.name, since=since, where=_is_hot_add, timeout=60)
    assert ost.device == "vcpu3"

    def reported(record: Record) -> bool:
        return _reconcile_of(record, vm.name) and record["details"].get("hotadded") == [1]

    record = watch.wait_for(reported, since=since, timeout=60)[1]
    guest = vm.guest_vcpus()
    assert guest.vcpus == {0, 1} and guest.online == {0}, "the guest calls it cpu1"
    details = record["details"]
    assert details["hotadd_vcpus"] == [3], details
    cpus = [o["cpus"] for o in details["outcomes"] if o["code"] == "skipped"]
    assert cpus == [[1]], details["outcomes"]
    # Looked at until listed, not polled for seconds: a handful of reconciles at most.
    assert len(_reconciles(watch, vm.name, since, time.monotonic())) <= 5
    assert vm.taints() == []


# ---- stack 1: Debian 13 rejects the hot-add -----------------------------------------------


@pytest.mark.parametrize("case", [Case("stack1", "debian13")], ids=str)
def test_debian13_rejected_hot_add_is_one_warning_without_a_spin(
    case: Case, matrix_lab: Lab, matrix_vm: LabVM, start_watch: StartWatch
) -> None:
    vm = matrix_vm
    watch = start_watch({vm.name: "mode = online"}, matrix_lab.uri)
    offset = len(vm.serial_text())
    since = time.monotonic()
    vm.hot_add(2)
    ost = matrix_lab.ost.wait_for(vm.name, since=since, where=_is_hot_add, timeout=60)
    assert (ost.device, ost.status) == ("vcpu1", SUCCESS)
    vm.wait_serial(REJECTED, after=offset)

    def rejected(record: Record) -> bool:
        return _reconcile_of(record, vm.name) and record["details"].get("rejected_vcpus") == [1]

    record = watch.wait_for(rejected, since=since, timeout=30)[1]
    judged = {f["code"]: f["severity"] for f in record["findings"]}
    assert judged["guest-rejected-vcpu"] == "warning" and "guest-missing-vcpus" not in judged
    time.sleep(max(0.0, since + 10.0 - time.monotonic()))
    seen = _reconciles(watch, vm.name, since, since + 10.0)
    print(f"{case}: {len(seen)} reconciles in the 10 s after the hot-add")
    assert len(seen) <= 5, [r["details"]["trigger"] for r in seen]
    assert sum(1 for r in seen if r["details"].get("rejected_vcpus")) == 1
    assert not [r for r in seen if "grace" in r["details"]["trigger"]]
    # Every later command reads the domain's history.
    status = vhp(matrix_lab.uri, "status", vm.name, "--json")
    domain = json.loads(status.out)["domains"][0]
    codes = [(f["code"], f["severity"]) for f in domain["findings"]]
    assert ("guest-rejected-vcpu", "warning") in codes and "guest-missing-vcpus" not in str(codes)
    assert [e["kind"] for e in domain["history"]["entries"]].count("rejected") == 1
    assert vm.taints() == []


@pytest.mark.parametrize("case", [Case("stack1", "debian13")], ids=str)
def test_debian13_setvcpus_reports_the_rejection(
    case: Case, matrix_lab: Lab, matrix_vm: LabVM
) -> None:
    vm = matrix_vm
    run = vhp(matrix_lab.uri, "setvcpus", vm.name, "2", "--live")
    print(run.text)
    assert run.status == 12, run.text
    assert "the guest's ACPI accepted vcpu1" in run.out
    assert "guest-detected" not in run.out
    assert "guest-rejected-vcpu: vcpu1 was hot-added and QEMU's OST said" in run.out
    assert "crash" not in run.out and not _other_versions(run.text, matrix_lab)


# ---- stack 2: shrink ends where the stack can, then grow ----------------------------------


@pytest.mark.parametrize("case", [Case("stack2", "busybox")], ids=str)
def test_stack2_shrink_ends_at_2_and_the_regrow_is_refused_only_for_what_is_unknown(
    case: Case, matrix_lab: Lab, matrix_vm: LabVM
) -> None:
    vm = matrix_vm
    grown = vhp(matrix_lab.uri, "setvcpus", vm.name, "3", "--live", "--online")
    assert grown.status == 0, grown.text
    shrunk = vhp(matrix_lab.uri, "setvcpus", vm.name, "2", "--live")
    print(shrunk.text)
    assert shrunk.status == 0, shrunk.text
    assert vm.live_vcpus() == 2
    assert vm.cpu_state().present == {0, 1}
    assert "repeated unplug request was accepted by this host" in shrunk.out
    assert not _other_versions(shrunk.text, matrix_lab), shrunk.text
    # Under TCG the re-plug makes QEMU's 4th vCPU of 4 by the domain's record, but no watch
    # saw QEMU start, so plugs before the record began are not known, and the record shows
    # vcpu2 unplugged (its slot could have been cycled unrecorded): refused, saying so.
    again = vhp(matrix_lab.uri, "setvcpus", vm.name, "3", "--live", "--online", "--json")
    print(again.text)
    assert again.status == 9, again.text
    assert "how many it has created is not known: at least 3" in again.err, again.text
    assert vm.live_vcpus() == 2
    forced = vhp(matrix_lab.uri, "setvcpus", vm.name, "3", "--live", "--online", "--force")
    assert forced.status == 0, forced.text
    assert vm.cpu_state().online == {0, 1, 2}
    assert vm.taints() == []
