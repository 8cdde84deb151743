"""Shell commands in the service guest over the lab control channel (service_image.py).

The guest's ``service_guest/control.py`` runs ``/bin/sh -c COMMAND`` as root and answers
with the exit status and the output (stdout and stderr together), both base64 on one line,
through ``LabVM.control``: the domain is not tainted and no guest agent is involved.

    shell = GuestShell(vm)
    shell.run("systemctl is-active virthotplug")   # Done(command, status, output)
    shell.check("apt-get install -y ./x.deb", timeout=120)   # output; LabError unless 0
    shell.put("/root/x.deb", data)
    shell.wait_until("test -S /run/virthotplug/hook.sock", timeout=30)
"""

from __future__ import annotations

import base64
import shlex
import time
from dataclasses import dataclass

from lab import LabError, LabVM

# The host waits this much longer than the guest lets a command run: the guest's "timeout"
# reply, with the output so far, is worth more than a bare "no reply".
REPLY_MARGIN = 15.0
OUTPUT_TAIL = 40


@dataclass(frozen=True)
class Done:
    command: str
    status: int
    output: str
    seconds: float

    def tail(self, lines: int = OUTPUT_TAIL) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") or "-"


def _unb64(text: str) -> str:
    return "" if text == "-" else base64.b64decode(text).decode(errors="replace")


class GuestShell:
    def __init__(self, vm: LabVM) -> None:
        self.vm = vm

    def run(self, command: str, timeout: float = 60.0, stdin: bytes = b"") -> Done:
        """Run ``command`` in the guest; a command still running after ``timeout`` seconds
        is killed there and raises LabError with its output so far."""
        started = time.monotonic()
        request = f"run {timeout:g} {_b64(command.encode())} {_b64(stdin)}"
        reply = self.vm.control(request, timeout=timeout + REPLY_MARGIN).split()
        seconds = time.monotonic() - started
        if reply[:1] == ["ok"] and len(reply) == 3:
            return Done(command, int(reply[1]), _unb64(reply[2]), seconds)
        if reply[:1] == ["timeout"] and len(reply) == 2:
            raise LabError(
                f"{self.vm.name}: '{command}' still ran after {timeout:g} s; "
                f"its output:\n{_unb64(reply[1])[-4000:]}"
            )
        raise LabError(f"{self.vm.name}: '{command}': unexpected reply {' '.join(reply)[:200]}")

    def check(self, command: str, timeout: float = 60.0, stdin: bytes = b"") -> str:
        """The output of ``command``; LabError with its status and output unless it exits 0."""
        done = self.run(command, timeout, stdin)
        if done.status != 0:
            raise LabError(
                f"{self.vm.name}: '{command}' exited {done.status}; output:\n{done.tail()}"
            )
        return done.output

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest."""
        quoted = shlex.quote(path)
        self.check(f"cat > {quoted} && chmod {mode:o} {quoted}", stdin=data)

    def wait_until(self, condition: str, timeout: float = 30.0, pause: float = 0.2) -> float:
        """Wait (in the guest, one request) until the shell ``condition`` holds; return the
        seconds it took. LabError if it does not hold within ``timeout``."""
        script = f"until {condition}; do sleep {pause:g}; done"
        try:
            return self.run(script, timeout).seconds
        except LabError as exc:
            raise LabError(f"{self.vm.name}: not within {timeout:g} s: {condition}") from exc
