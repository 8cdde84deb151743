#!/usr/bin/python3
"""The lab control channel of the service guest (service_image.py), run by its systemd.

Serves the virtio-serial port ``org.virthotplug.lab.0`` with the busybox guest's framing
(initramfs/vhp-control): one request per line, ``ID COMMAND [ARGS]``, one reply line
``ID REPLY``, the id repeated so that the host never takes a late reply for the next one.
Commands and output travel in base64, so that any shell command and any output fit on a line:

    ping                          -> pong
    run SECONDS B64CMD [B64STDIN] -> ok STATUS B64OUTPUT | timeout B64OUTPUT
                                     /bin/sh -c CMD as root, stdout and stderr together
    anything else                 -> err ...

Requests are served one at a time; the host sends one at a time too (LabVM.control). It runs
with the guest's own python3 (a dependency of python3-libvirt), standard library only.
"""

from __future__ import annotations

import base64
import binascii
import os
import select
import subprocess
import time

PORT = "/dev/virtio-ports/org.virthotplug.lab.0"
# No host connected: the port reads EOF (and polls POLLHUP) at once instead of blocking.
IDLE_PAUSE = 0.1
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
}


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") or "-"


def decode(text: str) -> bytes:
    return b"" if text == "-" else base64.b64decode(text, validate=True)


def run(seconds: str, command: str, stdin: str = "-") -> str:
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", decode(command).decode()],
            input=decode(stdin),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd="/root",
            timeout=float(seconds),
        )
    except subprocess.TimeoutExpired as exc:
        return f"timeout {encode(exc.output or b'')}"
    return f"ok {done.returncode} {encode(done.stdout)}"


def handle(words: list[str]) -> str:
    if words == ["ping"]:
        return "pong"
    if words and words[0] == "run" and len(words) in (3, 4):
        try:
            return run(*words[1:])
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            return f"err bad request: {exc}"
    return f"err unknown command {' '.join(words)[:60]!r}"


def reply(port: int, line: bytes) -> None:
    request, _, command = line.decode(errors="replace").strip().partition(" ")
    if not request:
        return
    data = f"{request} {handle(command.split())}\n".encode()
    while data:
        data = data[os.write(port, data) :]


def serve(port: int) -> None:
    pending = b""
    while True:
        ready = select.poll()
        ready.register(port, select.POLLIN)
        mask = dict(ready.poll(1000)).get(port, 0)
        chunk = os.read(port, 1 << 16) if mask & select.POLLIN else b""
        if chunk:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                reply(port, line)
        elif mask:  # EOF or POLLHUP: the host went away, mid-line or not
            pending = b""
            time.sleep(IDLE_PAUSE)


def main() -> None:
    while not os.path.exists(PORT):  # udev makes the link a moment after the port appears
        time.sleep(IDLE_PAUSE)
    serve(os.open(PORT, os.O_RDWR | os.O_CLOEXEC))


if __name__ == "__main__":
    main()
