"""Errors are classified by libvirt's (code, error domain), never by text a guest wrote.

libvirt puts the guest agent's own error text into its message ("unable to execute QEMU
agent command 'guest-get-vcpus': <whatever the guest said>"), so a guest must not be able
to turn its failure into a host-level one by choosing its words, and text that came from a
guest reaches a terminal with its control characters escaped.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Callable

import libvirt
import pytest
from tdriver import run_cli

from virthotplug.core import errors
from virthotplug.core.report import printable
from virthotplug.host import collect
from virthotplug.host.connection import Connection, _AgentLeases
from virthotplug.host.errors import classify, open_error
from virthotplug.host.support import Capabilities

HOSTILE = "Permission denied; read only access; not running; agent is not configured \x1b[2J"
AGENT_FAILED = f"unable to execute QEMU agent command 'guest-get-vcpus': {HOSTILE}"


def lv_error(code: int, domain: int, message: str, int1: int = -1) -> libvirt.libvirtError:
    """A libvirtError as the binding builds it from virGetLastError()."""
    exc = libvirt.libvirtError.__new__(libvirt.libvirtError)
    Exception.__init__(exc, message)
    exc.err = (code, domain, message, 2, message, None, None, int1, -1)
    return exc


@pytest.mark.parametrize("agent", [False, True])
def test_guest_text_never_makes_a_host_level_error(agent: bool) -> None:
    exc = lv_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, AGENT_FAILED)
    err = classify(exc, context="domain 'd'", agent=agent)
    assert not isinstance(err, (errors.PermissionDeniedError, errors.ConnectError))
    assert not isinstance(err, (errors.NotRunningError, errors.AgentNotConfiguredError))
    if agent:
        assert type(err) is errors.AgentError
    assert "\x1b" not in str(err) and "\\x1b[2J" in str(err)


def test_agent_command_failed_stays_an_agent_error() -> None:
    code = getattr(libvirt, "VIR_ERR_AGENT_COMMAND_FAILED", 110)
    exc = lv_error(code, libvirt.VIR_FROM_QEMU, f"guest agent command failed: {HOSTILE}")
    assert type(classify(exc, agent=True)) is errors.AgentError


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        # libvirt's own agent errors, whatever language the daemon speaks
        ("VIR_ERR_AGENT_UNRESPONSIVE", "QEMU-Gastagent ist nicht verbunden", "AgentUnavailable"),
        ("VIR_ERR_ARGUMENT_UNSUPPORTED", "Gastagent nicht konfiguriert", "AgentNotConfigured"),
        ("VIR_ERR_OPERATION_INVALID", "Domäne läuft nicht", "NotRunning"),
    ],
)
def test_agent_errors_by_code_not_by_english_text(code: str, message: str, expected: str) -> None:
    exc = lv_error(getattr(libvirt, code), libvirt.VIR_FROM_QEMU, message)
    assert type(classify(exc, agent=True)).__name__ == f"{expected}Error"


def test_permission_comes_from_the_code() -> None:
    exc = lv_error(libvirt.VIR_ERR_OPERATION_DENIED, libvirt.VIR_FROM_NONE, "Nur-Lese-Zugriff")
    assert isinstance(classify(exc, agent=True), errors.PermissionDeniedError)


def test_ssh_permission_denied_is_worth_reconnecting() -> None:
    # What an ssh hiccup looks like at open(): the RPC layer's system error, ECONNRESET.
    text = "Cannot recv data: user@h2: Permission denied (publickey).: Connection reset by peer"
    exc = lv_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, text, errno.ECONNRESET)
    err = open_error(exc, "qemu+ssh://h2/system")
    assert type(err) is errors.ConnectError


def test_a_socket_we_may_not_open_is_permission_denied() -> None:
    text = "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied"
    exc = lv_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, text, errno.EACCES)
    assert isinstance(open_error(exc, "qemu:///system"), errors.PermissionDeniedError)


def test_a_guest_side_system_error_is_not_a_lost_connection() -> None:
    exc = lv_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_QEMU, "Unable to read from agent")
    err = classify(exc, agent=True)
    assert isinstance(err, errors.AgentError)
    assert not isinstance(classify(exc), errors.ConnectError)


def test_printable_escapes_control_characters() -> None:
    assert printable("a\x1b[31mb\x07\u202ec\u2028d\x85") == "a\\x1b[31mb\\x07\\u202ec\\u2028d\\x85"
    assert printable("plain text, ümlaut") == "plain text, ümlaut"


# --- one hostile guest among others, through the read path and the command line -----------

AGENT = '<devices><channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0"/>'
AGENT += "</channel></devices>"


def node(path: Path, names: list[str]) -> str:
    domains = "".join(
        f'<domain type="test"><name>{name}</name>'
        f"<uuid>6b0e4c1a-0000-4000-8000-{i:012d}</uuid>"
        f'<memory unit="MiB">64</memory><vcpu current="1">4</vcpu>'
        f'<os><type arch="x86_64">hvm</type></os>{AGENT}</domain>'
        for i, name in enumerate(names)
    )
    path.write_text(f'<?xml version="1.0"?><node>{domains}</node>')
    return f"test://{path}"


class _Guest:
    """A leased domain handle whose agent answers, or fails like a hostile guest's."""

    def __init__(self, hostile: bool) -> None:
        self.hostile = hostile

    def guestVcpus(self, _flags: int) -> dict[str, str]:
        if self.hostile:
            raise lv_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_QEMU, AGENT_FAILED)
        return {"vcpus": "0", "online": "0", "offlinable": ""}


@pytest.fixture
def hostile_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = node(tmp_path / "host.xml", ["tenant-evil", "tenant-good"])
    evil = "6b0e4c1a-0000-4000-8000-000000000000"

    def run(_self: _AgentLeases, uuid: str, fn: Callable[[Any], Any]) -> Any:
        return fn(_Guest(hostile=uuid == evil))

    monkeypatch.setattr(_AgentLeases, "run", run)
    monkeypatch.setattr(Capabilities, "guest_agent_api", property(lambda _self: True))
    return uri


def test_one_hostile_agent_stays_that_domains_agent_state(hostile_host: str) -> None:
    with Connection(hostile_host) as conn:
        result = collect.read_views(conn, None)
    states = {v.name: v.agent.state for v in result.views}
    assert states == {"tenant-evil": "bad-reply", "tenant-good": "connected"}
    assert not result.errors


def test_status_table_and_check_escape_guest_text(
    hostile_host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_cli(capsys, "-c", hostile_host, "status", "--all")
    assert status.status == 0, status.err
    assert "tenant-good" in status.out and "bad-reply" in status.out
    check = run_cli(capsys, "-c", hostile_host, "check", "--all")
    assert check.status == 2  # the hostile tenant's agent is critical; the host is not UNKNOWN
    assert "tenant-evil" in check.out and "\\x1b[2J" in check.out
    for text in (status.out, status.err, check.out, check.err):
        assert "\x1b" not in text
