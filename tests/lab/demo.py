"""Show virthotplug's problem and its fix on a real tiny VM (``make demo``).

A guest without an auto-online rule gets a vCPU hot-added: QEMU's OST event says "device
check: success", yet the CPU stays offline in the guest. ``virthotplug watch`` decodes the
event and reports the offline CPU; with the domain's policy set to ``online``, ``apply`` fixes
it once, and the next hot-add is onlined by the daemon by itself. Each step is one function.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import libvirt
from domains import MANUAL
from guest import BuildError, ensure_image
from lab import DEFAULT_URI, Lab, LabError, LabVM

REPO = Path(__file__).resolve().parents[2]
T0 = time.monotonic()


_PRINT_LOCK = threading.Lock()  # the daemon's lines are relayed from another thread


def say(message: str = "") -> None:
    """Print with wall-clock time and seconds since the demo started; "" is a blank line."""
    stamp = f"{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.1f}s"
    lines = message.splitlines()
    text = "\n".join(f"{stamp}  {line}" for line in lines) if lines else ""
    with _PRINT_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def cpus(cpu_set: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpu_set))) or "none"


@dataclass
class Demo:
    """What the steps share."""

    uri: str = DEFAULT_URI
    lab: Lab | None = None
    vm: LabVM | None = None
    hot_add_started: float = 0.0
    watch: subprocess.Popen[str] | None = None
    watch_lines: list[str] = field(default_factory=list)
    watch_seen: int = 0
    watch_lines_cond: threading.Condition = field(default_factory=threading.Condition)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vhp-demo-")))

    @property
    def cli_base(self) -> list[str]:
        return [sys.executable, "-m", "virthotplug", "-c", self.uri]

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


def start_watch(demo: Demo) -> None:
    config = demo.workdir / "virthotplug.conf"
    # Only the default policy (report) and a private hook socket: the demo's daemon must not
    # act on other guests of this host, nor take the host's hook socket.
    config.write_text(
        f"[defaults]\nmode = report\n\n[watch]\nhook_socket = {demo.workdir}/hook.sock\n"
    )
    config.chmod(0o600)
    # Only the demo's VM (--domain), and the one-per-host lock in a run directory of its
    # own: a real watch on this host and the demo never block each other.
    name = demo.the_vm.name
    command = [*demo.cli_base, "--config-file", str(config), "watch", "--domain", name]
    run_dir = demo.workdir / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "VIRTHOTPLUG_RUN_DIR": str(run_dir)}
    say(f"$ virthotplug --config-file {config.name} watch --domain {name}   (policy: report)")
    demo.watch = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    threading.Thread(target=_relay_watch, args=(demo,), daemon=True).start()
    _wait_for_watch_line(demo, "connected")


def hot_add(demo: Demo, total: int) -> None:
    name = demo.the_vm.name
    say(f"$ virsh setvcpus {name} {total} --live")
    demo.hot_add_started = time.monotonic()
    demo.the_vm.hot_add(total)
    say(f"returned after {(time.monotonic() - demo.hot_add_started) * 1000:.0f} ms")


def first_hot_add(demo: Demo) -> None:
    hot_add(demo, 2)
    _wait_for_watch_line(demo, "offline 1")


def show_status(demo: Demo) -> None:
    say(f"$ virthotplug status {demo.the_vm.name}")
    say(_run_cli(demo, "status", demo.the_vm.name))
    state = demo.the_vm.cpu_state()
    say(f"guest sysfs: present {cpus(state.present)}, online {cpus(state.online)}")


def set_policy(demo: Demo) -> None:
    name = demo.the_vm.name
    say(f"$ virthotplug policy {name} --set online --live")
    say(_run_cli(demo, "policy", name, "--set", "online", "--live"))


def apply_policy(demo: Demo) -> None:
    name = demo.the_vm.name
    say(f"$ virthotplug apply {name}")
    started = time.monotonic()
    say(_run_cli(demo, "apply", name))
    say(f"({time.monotonic() - started:.2f} s)")


def second_hot_add(demo: Demo) -> None:
    hot_add(demo, 3)
    vm = demo.the_vm
    state = vm.wait_cpu_state(lambda s: 2 in s.online, timeout=30, what="CPU 2 online")
    latency = time.monotonic() - demo.hot_add_started
    _wait_for_watch_line(demo, "guest online 0-2")
    say(f"guest sysfs: online {cpus(state.online)} -- {latency:.2f} s after the hot-add,")
    say("with no step by anyone: watch saw the OST event and applied the policy")


def stop_watch(demo: Demo) -> None:
    if demo.watch is None or demo.watch.poll() is not None:
        return
    started = time.monotonic()
    demo.watch.send_signal(signal.SIGTERM)
    demo.watch.wait(10)
    say(f"watch stopped {time.monotonic() - started:.2f} s after SIGTERM")
    say(f"domain tainted: {', '.join(demo.the_vm.taints()) or 'no'}")


def clean_up(demo: Demo) -> None:
    if demo.watch is not None and demo.watch.poll() is None:
        demo.watch.kill()
        demo.watch.wait()
    if demo.lab is not None:
        names = [vm.name for vm in demo.lab.vms]
        demo.lab.close()
        say(f"destroyed and undefined: {', '.join(names) or 'nothing'}")


STEPS: Sequence[tuple[str, Callable[[Demo], None]]] = (
    ("Set up the host", set_up_host),
    ("Build the guest image (cached)", build_guest),
    ("Boot a guest whose hot-added CPUs stay offline (Debian/Ubuntu default)", boot_vm),
    ("Start the daemon", start_watch),
    ("Hot-add a vCPU: watch decodes the OST event and finds the CPU offline", first_hot_add),
    ("Every layer, side by side", show_status),
    ("Ask for hot-added CPUs to be onlined", set_policy),
    ("Apply the policy once", apply_policy),
    ("Every layer again", show_status),
    ("Hot-add another vCPU: watch onlines it by itself", second_hot_add),
    ("Every layer again", show_status),
    ("Stop the daemon", stop_watch),
)


def _relay_watch(demo: Demo) -> None:
    """Print the daemon's log lines as they come, and remember them for the steps."""
    assert demo.watch is not None and demo.watch.stderr is not None
    for line in demo.watch.stderr:
        text = line.rstrip()
        message = text.split(" INFO ", 1)[-1].split(" WARNING ", 1)[-1]
        if "vhplab" in message and demo.vm is not None and demo.vm.name not in message:
            continue  # other guests of this host: not the demo's business
        with demo.watch_lines_cond:
            demo.watch_lines.append(message)
            demo.watch_lines_cond.notify_all()
        say(f"    watch | {message}")


def _wait_for_watch_line(demo: Demo, fragment: str, timeout: float = 30.0) -> None:
    with demo.watch_lines_cond:
        seen = demo.watch_lines_cond.wait_for(
            lambda: any(fragment in line for line in demo.watch_lines[demo.watch_seen :]),
            timeout,
        )
        if not seen:
            raise LabError(f"watch did not report '{fragment}' within {timeout:.0f} s")
        demo.watch_seen = len(demo.watch_lines)


# ---- running ------------------------------------------------------------------------------


def _run_cli(demo: Demo, *args: str) -> str:
    done = subprocess.run([*demo.cli_base, *args], capture_output=True, text=True, cwd=REPO)
    return (done.stdout + done.stderr).rstrip() or f"(exit status {done.returncode})"


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s  %(name)s: %(message)s")
    demo = Demo()
    try:
        for number, (title, step) in enumerate(STEPS, 1):
            say()
            say(f"== {number}. {title}")
            step(demo)
        return 0
    except (LabError, BuildError, libvirt.libvirtError, subprocess.SubprocessError) as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        say()
        say("== Clean up")
        clean_up(demo)
        shutil.rmtree(demo.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
