"""Bad input and unreachable hosts: one line on stderr, no traceback, a distinct exit status."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tdriver import MIXED, Result, node_uri, run_cli, run_module

from virthotplug.core.errors import (
    EXIT_CONNECT,
    EXIT_INVALID_URI,
    EXIT_NO_DOMAIN,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_USAGE,
)
from virthotplug.core.report import CHECK_UNKNOWN

ERROR = "virthotplug: error: "


def assert_one_line_error(result: Result, status: int, start: str, *, json: bool = False) -> str:
    """The failure is exactly one stderr line beginning with ``start``; stdout stays empty,
    or holds the JSON failure document when ``json``."""
    assert result.status == status, result
    if json:
        document = result.json()
        assert (document["version"], document["exit_status"]) == (1, status)
        assert document["error"].startswith(start)
    else:
        assert result.out == ""
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith(ERROR + start), line
    return line


@pytest.fixture
def missing_socket_uri(tmp_path: Path) -> str:
    return f"qemu+unix:///system?socket={tmp_path / 'nonexistent' / 'sock'}"


@pytest.fixture
def truncated_node_uri(tmp_path: Path) -> str:
    path = tmp_path / "truncated.xml"
    path.write_text('<node><domain type="test"><name>x</name>', encoding="utf-8")
    return node_uri(path)


@pytest.fixture
def invalid_domain_node_uri(tmp_path: Path) -> str:
    # Well-formed XML, but a domain libvirt refuses: more current vCPUs than the maximum.
    path = tmp_path / "invalid-domain.xml"
    path.write_text(
        '<node><domain type="test"><name>too-many</name><memory unit="MiB">256</memory>'
        '<vcpu current="5">4</vcpu><os><type arch="x86_64">hvm</type></os></domain></node>',
        encoding="utf-8",
    )
    return node_uri(path)


# --- domains ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ident", ["nosuch", "99", "00000000-0000-0000-0000-000000000000", "hotplug-agent2"]
)
def test_unknown_domain(ident: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", ident)
    line = assert_one_line_error(result, EXIT_NO_DOMAIN, f"failed to get domain '{ident}'")
    assert line.endswith(f": no such domain on {MIXED}")


def test_one_unknown_domain_among_known_ones_fails_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "hotplug-agent", "nosuch", "--json")
    assert_one_line_error(result, EXIT_NO_DOMAIN, "failed to get domain 'nosuch'", json=True)


def test_inactive_domain_has_no_id(capsys: pytest.CaptureFixture[str]) -> None:
    # Ids 1-5 are the running and paused domains; the shut-off one has none.
    result = run_cli(capsys, "-c", MIXED, "status", "6")
    assert_one_line_error(result, EXIT_NO_DOMAIN, "failed to get domain '6'")


# --- usage ------------------------------------------------------------------------------


def test_all_together_with_names(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "--all", "hotplug-agent")
    line = assert_one_line_error(result, EXIT_USAGE, "")
    assert line == ERROR + "give domain names or --all, not both"


def test_no_domain_and_no_all(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status")
    line = assert_one_line_error(result, EXIT_USAGE, "")
    assert line == ERROR + "no domain given (name one or more, or use --all)"


# --- connection URIs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "detail"),
    [
        ("bogus:///x", "no connection driver available for bogus:///x"),
        ("::::", "URI"),
        ("qemu+nosuchtransport:///system", "transport"),
        ("test:///default?x=%zz", "URI"),
    ],
)
def test_malformed_uri(uri: str, detail: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", uri, "status", "--all")
    line = assert_one_line_error(result, EXIT_INVALID_URI, f"cannot connect to '{uri}': ")
    assert detail in line


def test_libvirtd_not_reachable(
    missing_socket_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "-c", missing_socket_uri, "status", "--all")
    line = assert_one_line_error(
        result, EXIT_CONNECT, f"cannot connect to '{missing_socket_uri}': "
    )
    assert "No such file or directory" in line
    assert line.endswith("(is libvirtd running?)")


def test_malformed_node_file(truncated_node_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", truncated_node_uri, "status", "--all")
    line = assert_one_line_error(
        result, EXIT_INVALID_URI, f"cannot connect to '{truncated_node_uri}': "
    )
    assert "truncated.xml" in line


def test_node_file_with_an_invalid_domain(
    invalid_domain_node_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # libvirtd is not the problem: the definition the URI names is. Same status as above.
    result = run_cli(capsys, "-c", invalid_domain_node_uri, "status", "--all")
    line = assert_one_line_error(
        result, EXIT_INVALID_URI, f"cannot connect to '{invalid_domain_node_uri}': "
    )
    assert "vCPU" in line
    assert "is libvirtd running" not in line


def test_missing_node_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = node_uri(tmp_path / "missing.xml")
    result = run_cli(capsys, "-c", uri, "status", "--all")
    assert_one_line_error(result, EXIT_INVALID_URI, f"cannot connect to '{uri}': ")


# --- read-only connections --------------------------------------------------------------


def test_read_only_connection_does_not_ask_the_agent(capsys: pytest.CaptureFixture[str]) -> None:
    # libvirt refuses virDomainGetGuestVcpus on a read-only connection (even the test
    # driver): the domain is judged from the layers that can be read, and that is said.
    result = run_cli(capsys, "-c", MIXED, "-r", "status", "hotplug-agent")
    assert result.status == EXIT_OK, result.err
    assert result.out.splitlines()[2].split()[:2] == ["hotplug-agent", "running"]
    assert result.err == (
        "virthotplug: warning: not read: the guest layer of 1 running domain with a guest "
        "agent (a read-only connection cannot ask the agent)\n"
    )


def test_read_only_all_judges_every_domain(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "--readonly", "status", "--all", "--json")
    assert result.status == EXIT_OK, result.err
    document = result.json()
    assert len(document["domains"]) == 6 and document["errors"] == []
    assert document["not_read"] == [
        "the guest layer of 1 running domain with a guest agent (a read-only connection "
        "cannot ask the agent)"
    ]
    agent = next(d for d in document["domains"] if d["name"] == "hotplug-agent")["agent"]
    assert agent["state"] == "not-queried"
    assert agent["error"].startswith("read-only connection: libvirt refuses guest-agent calls")


@pytest.mark.parametrize("name", ["fixed-noagent", "stopped-big", "paused-agent"])
def test_read_only_is_enough_without_an_agent_query(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "-c", MIXED, "-r", "status", "--json", name)
    assert result.status == EXIT_OK, result.err
    assert result.json()["domains"][0]["name"] == name


# --- --debug ----------------------------------------------------------------------------


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "--debug", "-c", MIXED, "status", "nosuch")
    assert result.status == EXIT_NO_DOMAIN
    assert "Traceback (most recent call last):" in result.err
    assert "NoDomainError" in result.err
    assert result.err_lines[-1].startswith(ERROR + "failed to get domain 'nosuch'")


def test_without_debug_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", "bogus:///x", "status", "--all")
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1


# --- the same through python -m ---------------------------------------------------------

Case = Callable[[Path], tuple[list[str], int, str]]


@pytest.mark.parametrize(
    "case",
    [
        lambda _t: (["-c", MIXED, "status", "nosuch"], EXIT_NO_DOMAIN, "failed to get domain"),
        lambda _t: (["-c", "bogus:///x", "status", "--all"], EXIT_INVALID_URI, "cannot connect"),
        lambda t: (
            ["-c", f"qemu+unix:///system?socket={t / 'no' / 'sock'}", "status", "--all"],
            EXIT_CONNECT,
            "cannot connect",
        ),
        lambda _t: (
            ["-c", MIXED, "-r", "policy", "hotplug-agent", "--set", "online"],
            EXIT_PERMISSION,
            "domain",
        ),
        lambda _t: (["-c", MIXED, "status", "--all", "x"], EXIT_USAGE, "give domain names"),
        lambda _t: (["-c", MIXED, "status"], EXIT_USAGE, "no domain given"),
    ],
    ids=["no-domain", "invalid-uri", "connect", "permission", "all-and-names", "no-selection"],
)
def test_python_m_one_line_errors(case: Case, tmp_path: Path) -> None:
    argv, status, start = case(tmp_path)
    assert_one_line_error(run_module(*argv), status, start)


def test_python_m_check_error_is_unknown_on_stdout() -> None:
    result = run_module("-c", MIXED, "check", "nosuch")
    assert result.status == CHECK_UNKNOWN
    assert result.err == ""
    assert result.out.startswith("VIRTHOTPLUG UNKNOWN - failed to get domain 'nosuch'")
    assert result.out.count("\n") == 1


def test_python_m_argparse_usage_error() -> None:
    result = run_module("-c", MIXED, "status", "--no-such-option")
    assert result.status == EXIT_USAGE
    assert "unrecognized arguments: --no-such-option" in result.err
    assert "Traceback" not in result.err


def test_python_m_debug_traceback() -> None:
    result = run_module("--debug", "-c", MIXED, "status", "nosuch")
    assert result.status == EXIT_NO_DOMAIN
    assert "Traceback (most recent call last):" in result.err
