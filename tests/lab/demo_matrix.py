"""The seed case on a real Debian 12 guest (``make demo-matrix``).

Debian 12 as shipped (systemd, udev, its own qemu-guest-agent, no auto-online rule) gets a
vCPU hot-added: QEMU's OST event says "device check: success" and the guest kernel logs
"CPU1 has been hot-added", yet the CPU stays offline. ``virthotplug check`` warns;
with the domain's policy set to ``online``, ``virthotplug apply`` onlines it through the
agent. Pass ``--stack2`` or ``--stack3`` to run it on the second (libvirt 11.3 + QEMU 10.0)
or third host stack (libvirt 12.8 + QEMU 11.1).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt
from debian_image import ImageError
from demo import REPO, cpus, say
from domains import MANUAL
from lab import DEFAULT_URI, Lab, LabError, LabVM, VMRequest, describe_ost
from stacks import STACKS, Stack, StackError, ensure_stack

SETTLE = 3.0


def run_cli(uri: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "virthotplug", "-c", uri, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return (done.stdout + done.stderr).rstrip() + f"\n(exit status {done.returncode})"


def boot(lab: Lab) -> LabVM:
    libvirt_version, hypervisor = lab.versions()
    say(f"host stack: libvirt {libvirt_version}, {hypervisor} ({lab.uri})")
    say("booting a Debian 12 guest (direct kernel boot of its own kernel, qcow2 overlay)...")
    vm = lab.start_many([VMRequest(MANUAL, guest="debian12", label="demo")])[0]
    say(f"{vm.name}: agent answers after {vm.boot_seconds:.1f} s")
    say(f"guest CPUs online: {cpus(vm.cpu_state().online)}")
    return vm


def hot_add(lab: Lab, vm: LabVM) -> None:
    say(f"$ virsh setvcpus {vm.name} 2 --live")
    offset = len(vm.serial_text())
    since = time.monotonic()
    vm.hot_add(2)
    event = lab.ost.wait_for(vm.name, since=since, timeout=60)
    say(f"QEMU ACPI_DEVICE_OST after {event.received - since:.2f} s: {describe_ost(event.details)}")
    line = vm.wait_serial(r"CPU\d+ has been hot-added", after=offset)
    say(f"guest kernel (serial console): {line.group(0)}")
    time.sleep(SETTLE)
    state = vm.cpu_state()
    say(f"guest agent: CPUs present {cpus(state.present)}, online {cpus(state.online)}")


def check_and_apply(uri: str, vm: LabVM, workdir: Path) -> None:
    config = workdir / "virthotplug.conf"
    config.write_text(f"[defaults]\nmode = report\n\n[domain:{vm.name}]\nmode = online\n")
    config.chmod(0o600)
    say(f"$ virthotplug check {vm.name}")
    say(run_cli(uri, "check", vm.name))
    say(f"$ virthotplug --config-file {config.name} apply {vm.name}   (policy: online)")
    say(run_cli(uri, "--config-file", str(config), "apply", vm.name))
    state = vm.wait_cpu_state(lambda s: 1 in s.online, timeout=15, what="cpu1 online")
    say(f"guest agent: CPUs online {cpus(state.online)}")
    say(f"$ virthotplug check {vm.name}")
    say(run_cli(uri, "--config-file", str(config), "check", vm.name))
    say(f"taints: {vm.taints() or 'none'}")


def chosen_stack(argv: list[str]) -> Stack | None:
    """The stack ``--stack2``/``--stack3`` names (built or found), None for the host's."""
    names = [name for name in STACKS if f"--{name}" in argv]
    return ensure_stack(STACKS[names[0]]) if names else None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s  %(name)s: %(message)s")
    try:
        stack = chosen_stack(argv)
        uri = stack.uri if stack else DEFAULT_URI
        started = stack.start() if stack else False
        try:
            with Lab(uri) as lab, tempfile.TemporaryDirectory(prefix="vhp-demo-") as tmp:
                vm = boot(lab)
                hot_add(lab, vm)
                check_and_apply(uri, vm, Path(tmp))
        finally:
            if stack and started:
                stack.stop()
        return 0
    except (LabError, ImageError, StackError, libvirt.libvirtError, re.error) as exc:
        say(f"FAILED: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
