"""Show virthotplug's problem and its fix on a real tiny VM (``make demo``).

Each step is one function, so that a step can be swapped for the ``virthotplug`` command that
does the same job (status, watch, apply) without touching the others.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import libvirt
from domains import MANUAL
from guest import BuildError, ensure_image
from lab import DEFAULT_URI, Lab, LabError, LabVM, MonitorEvent, describe_ost

REPO = Path(__file__).resolve().parents[2]
T0 = time.monotonic()


def say(message: str = "") -> None:
    """Print with wall-clock time and seconds since the demo started; "" is a blank line."""
    stamp = f"{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.1f}s"
    lines = message.splitlines()
    print("\n".join(f"{stamp}  {line}" for line in lines) if lines else "", flush=True)


def cpus(cpu_set: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpu_set))) or "none"


@dataclass
class Demo:
    """What the steps share."""

    uri: str = DEFAULT_URI
    lab: Lab | None = None
    vm: LabVM | None = None
    hot_add_started: float = 0.0
    ost: MonitorEvent | None = None
    cli: list[str] = field(default_factory=list)

    @property
    def the_lab(self) -> Lab:
        if self.lab is None:
            raise LabError("the boot step has not run")
        return self.lab

    @property
    def the_vm(self) -> LabVM:
        if self.vm is None:
            raise LabError("the boot step has not run")
        return self.vm


# ---- steps --------------------------------------------------------------------------------


def set_up_host(_demo: Demo) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "tests/lab/host-setup.sh")], capture_output=True, text=True
    )
    say(done.stderr.strip() or "host ready")
    if done.returncode != 0:
        raise LabError("host setup failed")


def build_guest(_demo: Demo) -> None:
    started = time.monotonic()
    image = ensure_image()
    say(f"kernel {image.kernel_package} {image.kernel_version} + busybox initramfs with qemu-ga")
    say(f"{image.initrd.parent} ({time.monotonic() - started:.1f} s)")


def boot_vm(demo: Demo) -> None:
    demo.lab = Lab(demo.uri).open()
    demo.vm = demo.the_lab.create(MANUAL, label="demo")
    vm = demo.the_vm
    say(f"{vm.name}: up in {vm.boot_seconds:.1f} s, 1 of {vm.max_vcpus} vCPUs, agent answering")
    say("guest behaviour: no auto-online rule (Debian/Ubuntu default)")


def hot_add(demo: Demo) -> None:
    name = demo.the_vm.name
    say(f"dom.setVcpusFlags(2, VIR_DOMAIN_AFFECT_LIVE)   (virsh setvcpus {name} 2 --live)")
    demo.hot_add_started = time.monotonic()
    demo.the_vm.hot_add(2)
    say(f"returned after {(time.monotonic() - demo.hot_add_started) * 1000:.0f} ms")


def show_ost(demo: Demo) -> None:
    demo.ost = demo.the_lab.ost.wait_for(demo.the_vm.name, since=demo.hot_add_started)
    latency = (demo.ost.received - demo.hot_add_started) * 1000
    say(f"QEMU event ACPI_DEVICE_OST {json.dumps(demo.ost.details)}")
    say(f"  {latency:.0f} ms after the hot-add: {describe_ost(demo.ost.details)}")
    say("  i.e. the guest kernel has detected the CPU -- not that it runs anything")


def show_vcpus(demo: Demo) -> None:
    vm = demo.the_vm
    if demo.cli:
        say(f"$ virthotplug -c {demo.uri} status {vm.name}")
        say(_run_cli(demo, "status", vm.name))
    guest = vm.guest_vcpus()
    say(f"guest agent: vCPUs {cpus(guest.vcpus)} present, online {cpus(guest.online)}")
    offline = guest.offline
    say(f"  offline in the guest: {cpus(offline)}" if offline else "  every vCPU is online")


def online_vcpu(demo: Demo) -> None:
    say("dom.setGuestVcpus('1', 1)   (virsh guestvcpus --enable --cpulist 1)")
    started = time.monotonic()
    demo.the_vm.dom.setGuestVcpus("1", 1)
    say(f"returned after {(time.monotonic() - started) * 1000:.0f} ms")


def clean_up(demo: Demo) -> None:
    if demo.lab is not None:
        names = [vm.name for vm in demo.lab.vms]
        demo.lab.close()
        say(f"destroyed and undefined: {', '.join(names) or 'nothing'}")


STEPS: Sequence[tuple[str, Callable[[Demo], None]]] = (
    ("Set up the host", set_up_host),
    ("Build the guest image (cached)", build_guest),
    ("Boot a guest whose hot-added CPUs stay offline", boot_vm),
    ("Hot-add a vCPU", hot_add),
    ("The hot-add event arrives", show_ost),
    ("The new vCPU is offline in the guest", show_vcpus),
    ("Bring it online through the guest agent", online_vcpu),
    ("The new vCPU is online", show_vcpus),
)


# ---- running ------------------------------------------------------------------------------


def _run_cli(demo: Demo, *args: str) -> str:
    done = subprocess.run([*demo.cli, *args], capture_output=True, text=True)
    return (done.stdout + done.stderr).rstrip() or f"(exit status {done.returncode})"


def find_cli() -> list[str]:
    """``python -m virthotplug -c URI`` when its status command exists, else nothing."""
    command = [sys.executable, "-m", "virthotplug", "-c", DEFAULT_URI]
    probe = subprocess.run([*command, "status", "--help"], capture_output=True, cwd=REPO)
    return command if probe.returncode == 0 else []


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s  %(name)s: %(message)s")
    demo = Demo(cli=find_cli())
    try:
        for number, (title, step) in enumerate(STEPS, 1):
            say()
            say(f"== {number}. {title}")
            step(demo)
        return 0
    except (LabError, BuildError, libvirt.libvirtError) as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        say()
        say("== Clean up")
        clean_up(demo)


if __name__ == "__main__":
    sys.exit(main())
