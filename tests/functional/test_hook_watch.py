"""``virthotplug watch`` with its hook socket, on the test driver: the real hook script's
message becomes a "hook" JSON line and a reconcile of that domain; garbage changes nothing;
``--no-hook-socket`` binds nothing; SIGTERM removes the socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "hooks" / "qemu"
NODE = Path(__file__).resolve().parent / "nodes" / "mixed.xml"
URI = f"test://{NODE}"
NAME, UUID = "hotplug-agent", "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01"
XML = f"""<domain><name>{NAME}</name><uuid>{UUID}</uuid><vcpu current='2'>4</vcpu>
<devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""
Record = dict[str, Any]


class Watch:
    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.socket = tmp_path / "run" / "hook.sock"
        config = tmp_path / "virthotplug.conf"
        config.write_text(f"[defaults]\nmode = report\n[watch]\nhook_socket = {self.socket}\n")
        config.chmod(0o600)
        self.stderr_path = tmp_path / "watch.stderr"
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [*self.command(config), "watch", "--json", *extra],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"},
            )
        self.records: list[Record] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def command(config: Path) -> list[str]:
        return [sys.executable, "-m", "virthotplug", "-c", URI, "--config-file", str(config)]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.records.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, match: Callable[[Record], bool], timeout: float = 10.0) -> Record:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((r for r in self.records if match(r)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no such record; stderr:\n{self.stderr_path.read_text()}")
                self._cond.wait(min(left, 0.2))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Watch]:
    proc = Watch(tmp_path)
    proc.wait_for(lambda r: r["event"] == "host" and r["details"]["what"] == "connected")
    yield proc
    proc.stop()


def run_hook(socket_path: Path, operation: str, sub: str = "begin") -> None:
    result = subprocess.run(
        [str(HOOK), NAME, operation, sub, "-"],
        input=XML.encode(),
        capture_output=True,
        env={"VIRTHOTPLUG_HOOK_SOCKET": str(socket_path), "VIRTHOTPLUG_CONFIG": "/nonexistent"},
        timeout=10,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_hook_message_triggers_a_reconcile(watch: Watch) -> None:
    # The first resync reconciles every running domain: wait for it, then use the hook.
    watch.wait_for(lambda r: r["event"] == "reconcile" and r["domain"] == NAME)
    run_hook(watch.socket, "started")
    hook = watch.wait_for(lambda r: r["event"] == "hook")
    assert (hook["domain"], hook["uuid"], hook["host"]) == (NAME, UUID, URI)
    assert hook["details"] == {"operation": "started", "sub_operation": "begin"}
    reconcile = watch.wait_for(
        lambda r: r["event"] == "reconcile" and "hook" in r["details"]["trigger"]
    )
    assert reconcile["domain"] == NAME


def test_report_only_operations_do_not_reconcile(watch: Watch) -> None:
    watch.wait_for(lambda r: r["event"] == "reconcile" and r["domain"] == NAME)
    run_hook(watch.socket, "prepare")
    run_hook(watch.socket, "release", "end")
    watch.wait_for(lambda r: r["event"] == "hook" and r["details"]["operation"] == "release")
    time.sleep(0.3)
    assert not [
        r for r in watch.records if r["event"] == "reconcile" and "hook" in r["details"]["trigger"]
    ]


def test_garbage_on_the_socket_is_dropped(watch: Watch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for junk in (b"", b"{}", b"\xff" * 100, b'{"v": 1}'):
            sock.sendto(junk, str(watch.socket))
    run_hook(watch.socket, "reconnect")
    hook = watch.wait_for(lambda r: r["event"] == "hook")
    assert hook["details"]["operation"] == "reconnect"
    assert len([r for r in watch.records if r["event"] == "hook"]) == 1
    assert watch.stop() == 0
    assert "dropped an invalid message" in watch.stderr_path.read_text()
    assert not watch.socket.exists()  # removed on exit


def test_no_hook_socket_option(tmp_path: Path) -> None:
    proc = Watch(tmp_path, "--no-hook-socket")
    try:
        proc.wait_for(lambda r: r["event"] == "host" and r["details"]["what"] == "connected")
        assert not proc.socket.exists()
    finally:
        assert proc.stop() == 0
