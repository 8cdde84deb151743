"""The daemon's end of the hook socket: strict message validation, a real ``HookServer``
receiving what the real hook sends, socket file handling, and a fast close.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virthotplug.core.events import RECONCILE, DomainRef, Event, HookEvent
from virthotplug.daemon.hookserver import (
    MAX_MESSAGE_BYTES,
    HookMessage,
    HookServer,
    MessageError,
    local_qemu_uri,
    parse_message,
)

HOOK = Path(__file__).resolve().parents[2] / "hooks" / "qemu"
HOST = "qemu:///system"
UUID = "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01"
VALID: dict[str, Any] = {
    "v": 1,
    "op": "started",
    "subop": "begin",
    "name": "web1",
    "uuid": UUID,
    "vcpus": {"current": 1, "maximum": 4, "hotpluggable": 3},
    "agent_channel": True,
}
XML = f"""<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid>
<vcpu current='1'>4</vcpu><devices><channel type='unix'>
<target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>"""


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def with_(**changes: Any) -> dict[str, Any]:
    return {**VALID, **changes}


# --- parse_message -------------------------------------------------------------------------


def test_valid_message() -> None:
    assert parse_message(encode(VALID)) == HookMessage(
        operation="started",
        sub_operation="begin",
        name="web1",
        uuid=UUID,
        vcpus=(1, 4, 3),
        agent_channel=True,
    )


def test_uuid_is_normalised_and_vcpus_may_be_null() -> None:
    message = parse_message(encode(with_(uuid=UUID.upper(), vcpus=None)))
    assert (message.uuid, message.vcpus) == (UUID, None)


def without(key: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != key}


INVALID: dict[str, bytes] = {
    "empty": b"",
    "not utf-8": b'{"v": 1, "name": "\xff"}',
    "not json": b"started web1",
    "list": encode([VALID]),
    "string": encode("started"),
    "missing key": encode(without("uuid")),
    "unknown key": encode(with_(extra=1)),
    "duplicate key": b'{"v":1,"v":1,' + encode(without("v"))[1:],
    "version 2": encode(with_(v=2)),
    "version as string": encode(with_(v="1")),
    "version as bool": encode(with_(v=True)),
    "version as float": encode(with_(v=1.0)),
    "unknown operation": encode(with_(op="frobnicate")),
    "operation not a string": encode(with_(op=["started"])),
    "unknown sub-operation": encode(with_(subop="middle")),
    "empty name": encode(with_(name="")),
    "name with newline": encode(with_(name="web1\nFAKE LOG LINE")),
    "name with NUL": encode(with_(name="web\x00")),
    "name too long": encode(with_(name="x" * 1025)),
    "name not a string": encode(with_(name=7)),
    "uuid short": encode(with_(uuid=UUID[:-1])),
    "uuid not hex": encode(with_(uuid=UUID.replace("3", "g"))),
    "uuid without dashes": encode(with_(uuid=UUID.replace("-", ""))),
    "uuid not a string": encode(with_(uuid=None)),
    "vcpus list": encode(with_(vcpus=[1, 4, 3])),
    "vcpus missing key": encode(with_(vcpus={"current": 1, "maximum": 4})),
    "vcpus float": encode(with_(vcpus={"current": 1.0, "maximum": 4, "hotpluggable": 3})),
    "vcpus bool": encode(with_(vcpus={"current": True, "maximum": 4, "hotpluggable": 3})),
    "vcpus negative": encode(with_(vcpus={"current": -1, "maximum": 4, "hotpluggable": 3})),
    "vcpus huge": encode(with_(vcpus={"current": 1, "maximum": 10**9, "hotpluggable": 3})),
    "vcpus current above max": encode(with_(vcpus={"current": 5, "maximum": 4, "hotpluggable": 0})),
    "agent_channel int": encode(with_(agent_channel=1)),
    "NaN": encode(with_(vcpus=None))[:-1] + b', "x": NaN}',
    "deep nesting": b"[" * 4000 + b"]" * 4000,
    "too large": encode(with_(name="x" * 5000)),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_messages_are_refused(case: str) -> None:
    with pytest.raises(MessageError):
        parse_message(INVALID[case])


# --- local_qemu_uri ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        (["qemu:///system"], "qemu:///system"),
        (["qemu+ssh://h1/system", "qemu:///system"], "qemu:///system"),
        (["test:///default", "qemu+unix:///system"], "qemu+unix:///system"),
        (["qemu+tls://h2/system", "qemu+ssh://h1/system"], "qemu+tls://h2/system"),
        (["test:///default"], "test:///default"),
    ],
)
def test_local_qemu_uri(uris: list[str], expected: str) -> None:
    assert local_qemu_uri(uris) == expected


# --- a real server -------------------------------------------------------------------------


class Collected:
    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def next(self, timeout: float = 3.0) -> Event:
        return self.events.get(timeout=timeout)

    def empty_after(self, seconds: float) -> bool:
        time.sleep(seconds)
        return self.events.empty()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "hook.sock"


@pytest.fixture
def server(socket_path: Path) -> Iterator[tuple[HookServer, Collected]]:
    srv = HookServer(str(socket_path), HOST)
    collected = Collected()
    srv.start(collected)
    assert srv.listening
    yield srv, collected
    srv.close()


def send(path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(data, str(path))


def run_hook(path: Path, operation: str, sub: str = "begin") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(HOOK), "web1", operation, sub, "-"],
        input=XML.encode(),
        capture_output=True,
        env={"VIRTHOTPLUG_HOOK_SOCKET": str(path), "PATH": "/usr/bin:/bin"},
        timeout=10,
        check=False,
    )


def test_the_real_hook_reaches_the_server(
    server: tuple[HookServer, Collected], socket_path: Path
) -> None:
    srv, collected = server
    for operation, sub in (("prepare", "begin"), ("started", "begin"), ("stopped", "end")):
        proc = run_hook(socket_path, operation, sub)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
        event = collected.next()
        assert event == HookEvent(
            DomainRef(HOST, UUID, "web1"), operation=operation, sub_operation=sub
        )
    assert srv.received == 3


@pytest.mark.parametrize(
    ("operation", "intent"),
    [("started", RECONCILE), ("reconnect", RECONCILE), ("restore", RECONCILE)],
)
def test_reconciling_operations(
    server: tuple[HookServer, Collected], socket_path: Path, operation: str, intent: str
) -> None:
    run_hook(socket_path, operation)
    assert server[1].next().intent == intent


def test_garbage_is_dropped_and_the_server_keeps_going(
    server: tuple[HookServer, Collected], socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv, collected = server
    with caplog.at_level(logging.WARNING, logger="virthotplug.daemon.hookserver"):
        for data in INVALID.values():
            send(socket_path, data[: MAX_MESSAGE_BYTES + 100])
        send(socket_path, b"x" * 60000)  # truncated on receipt
        send(socket_path, encode(VALID))
        event = collected.next()
    assert isinstance(event, HookEvent) and event.operation == "started"
    assert collected.empty_after(0.1)
    assert srv.dropped == len(INVALID) + 1
    warnings = [r for r in caplog.records if "dropped an invalid message" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited
    assert "\n" not in warnings[0].getMessage()


def test_socket_and_directory_permissions(
    server: tuple[HookServer, Collected], socket_path: Path
) -> None:
    info = socket_path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o755
    assert sorted(p.name for p in socket_path.parent.iterdir()) == ["hook.sock"]


def test_close_removes_the_socket_quickly(socket_path: Path) -> None:
    srv = HookServer(str(socket_path), HOST)
    srv.start(Collected())
    started = time.monotonic()
    srv.close()
    assert time.monotonic() - started < 0.5
    assert not socket_path.exists()
    srv.close()  # twice is harmless


def test_close_leaves_a_replaced_socket_alone(socket_path: Path) -> None:
    srv = HookServer(str(socket_path), HOST)
    srv.start(Collected())
    socket_path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(str(socket_path))
    try:
        srv.close()
        assert socket_path.exists()
    finally:
        other.close()


def test_stale_socket_is_replaced(socket_path: Path) -> None:
    socket_path.parent.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(socket_path))
    stale.close()
    srv = HookServer(str(socket_path), HOST)
    collected = Collected()
    srv.start(collected)
    try:
        assert srv.listening
        assert run_hook(socket_path, "started").returncode == 0
        assert isinstance(collected.next(), HookEvent)
    finally:
        srv.close()


def test_live_socket_of_another_daemon_is_left_alone(
    server: tuple[HookServer, Collected], socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, collected = server
    second = HookServer(str(socket_path), HOST)
    with caplog.at_level(logging.ERROR, logger="virthotplug.daemon.hookserver"):
        second.start(Collected())
    assert not second.listening
    assert "in use by another process" in caplog.text
    second.close()
    # The first one still owns the path and still receives.
    assert run_hook(socket_path, "started").returncode == 0
    assert isinstance(collected.next(), HookEvent)


def test_regular_file_in_the_way_is_not_touched(
    socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    socket_path.parent.mkdir(mode=0o755)
    socket_path.write_text("precious\n")
    srv = HookServer(str(socket_path), HOST)
    with caplog.at_level(logging.ERROR, logger="virthotplug.daemon.hookserver"):
        srv.start(Collected())
    srv.close()
    assert not srv.listening
    assert "not a socket" in caplog.text
    assert socket_path.read_text() == "precious\n"


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    srv = HookServer(str(directory / "hook.sock"), HOST)
    srv.start(Collected())
    srv.close()
    assert not srv.listening
    assert not (directory / "hook.sock").exists()


def test_foreign_sender_is_refused(
    server: tuple[HookServer, Collected], caplog: pytest.LogCaptureFixture
) -> None:
    srv, collected = server
    someone = os.geteuid() + 4242
    ucred = socket.SCM_CREDENTIALS
    ancillary = [
        (
            socket.SOL_SOCKET,
            ucred,
            (1234).to_bytes(4, "little") + someone.to_bytes(4, "little") + bytes(4),
        )
    ]
    with caplog.at_level(logging.WARNING, logger="virthotplug.daemon.hookserver"):
        srv._handle(encode(VALID), ancillary, 0, collected)
        srv._handle(encode(VALID), [], 0, collected)  # no credentials at all
    assert collected.empty_after(0)
    assert srv.dropped == 2
