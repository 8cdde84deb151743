"""hook_socket must live in a directory that only root (or the daemon's user) can write:
in a world-writable one such as /tmp, any local user could create the path first and read
every hook message. watch refuses to bind there, and the hook refuses to send there (or to
a socket that neither root nor its own user owns)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest

from virthotplug.daemon.hookserver import HookServer

ROOT = Path(__file__).resolve().parents[2]
XML = "<domain><name>web1</name><uuid>3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01</uuid></domain>"
NOBODY = 65534


def _shared_dir(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    return shared


def _others_dir(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    os.chown(other, NOBODY, NOBODY)
    return other


@pytest.mark.parametrize("where", [_shared_dir, _others_dir])
def test_watch_does_not_bind_in_a_directory_others_control(
    tmp_path: Path, where: object, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a directory to another user")
    directory = where(tmp_path)  # type: ignore[operator]
    server = HookServer(str(directory / "hook.sock"), "qemu:///system")
    with caplog.at_level(logging.ERROR):
        server.start(lambda _ev: None)
    try:
        assert not server.listening
        assert any("hook socket" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


def _hook(path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "VIRTHOTPLUG_HOOK_SOCKET": str(path)}
    env["VIRTHOTPLUG_CONFIG"] = str(path.parent / "absent.conf")
    return subprocess.run(
        [str(ROOT / "hooks" / "qemu"), "web1", "started", "begin", "-"],
        input=XML,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def _rogue(path: Path, owner: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    os.chown(path, owner, owner)
    sock.setblocking(False)
    return sock


@pytest.mark.parametrize("case", ["world-writable directory", "socket of another user"])
def test_the_hook_does_not_send_where_others_could_listen(tmp_path: Path, case: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand a socket to another user")
    if case == "world-writable directory":
        path, owner = _shared_dir(tmp_path) / "hook.sock", 0
    else:
        private = tmp_path / "private"
        private.mkdir(mode=0o755)
        path, owner = private / "hook.sock", NOBODY
    rogue = _rogue(path, owner)
    try:
        done = _hook(path)
        assert done.returncode == 0
        with pytest.raises(BlockingIOError):
            rogue.recv(8192)  # nothing reached it
        assert "message dropped" in done.stderr
    finally:
        rogue.close()


def test_the_hook_still_sends_to_a_private_directory(tmp_path: Path) -> None:
    private = tmp_path / "run"
    private.mkdir(mode=0o755)
    path = private / "hook.sock"
    listener = _rogue(path, os.geteuid())
    try:
        assert _hook(path).returncode == 0
        assert b'"op":"started"' in listener.recv(8192)
    finally:
        listener.close()
