"""This tree's virthotplug run inside a stack's root, with the root's own python3 and libvirt
binding (stack 3: python3 3.14 and python3-libvirt 12.8, the client library that has libvirt
12.4's async unplug and vcpu-removed event; the host's binding has neither).

The package is copied into the root (under ``SOURCE_DIR``, one directory per user) and run
with ``python3 -m virthotplug -c qemu:///system``; ``close`` removes the copy, so the cached
root is left as it was built. Its dependencies are the root's (stacks.PACKAGE_DEPENDENCIES).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jsonfollow import JsonLineReader
from sandbox import chroot_env, in_root_argv
from stacks import Stack

PACKAGE = Path(__file__).resolve().parents[2] / "virthotplug"
SOURCE_DIR = "/var/cache/virthotplug-lab-src"
URI_INSIDE = "qemu:///system"
TIMEOUT = 180.0


@dataclass(frozen=True)
class InRootRun:
    status: int
    out: str
    err: str
    seconds: float  # the whole process, sandbox set-up included

    @property
    def text(self) -> str:
        return self.out + self.err


class VirthotplugInRoot:
    """``virthotplug ARGV`` as a process in ``stack``'s root, against its own libvirtd."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.inside = f"{SOURCE_DIR}/{os.getpid()}"
        target = stack.host_path(self.inside)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(PACKAGE, target / "virthotplug", ignore=shutil.ignore_patterns("*.pyc"))

    def argv(self, *argv: str) -> list[str]:
        command = ["env", f"PYTHONPATH={self.inside}", "python3", "-m", "virthotplug"]
        return in_root_argv(self.stack.root, [*command, "-c", URI_INSIDE, *argv])

    def run(self, *argv: str) -> InRootRun:
        full = self.argv(*argv)
        started = time.monotonic()
        done = subprocess.run(
            full, capture_output=True, text=True, env=chroot_env(), timeout=TIMEOUT, check=False
        )
        return InRootRun(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    def start(self, *argv: str) -> InRootProcess:
        """A long-running command (``watch --json``): its JSON lines as they come."""
        return InRootProcess(self.argv(*argv))

    def close(self) -> None:
        shutil.rmtree(self.stack.host_path(self.inside), ignore_errors=True)
        parent = self.stack.host_path(SOURCE_DIR)
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


class InRootProcess:
    """A virthotplug process in the root; its stdout read as JSON lines by a thread."""

    def __init__(self, argv: list[str]) -> None:
        # The sandbox execs its way to python3 (unshare, sh, chroot, env): this PID is it.
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=chroot_env()
        )
        assert self.proc.stdout is not None
        self._json = JsonLineReader(self.proc.stdout)
        self.stderr: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def records(self) -> list[dict[str, Any]]:
        """Every record so far, in the order they came."""
        return self._json.records()

    def wait_line(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        """The first record ``match`` accepts; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self._json.records() if match(r)]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "".join(self.stderr[-10:])
        last = self._json.records()[-5:]
        raise AssertionError(f"no matching record; the last ones: {last}\n{tail}")

    def stop(self) -> str:
        """SIGTERM, then wait; its stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in (self._json.thread, self._stderr_reader):
            reader.join(timeout=5)
        return "".join(self.stderr)
