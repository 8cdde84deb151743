"""``virthotplug check``: the monitoring-plugin form, against libvirt's test driver."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tdriver import MIXED, node_uri, run_cli, run_module

from virthotplug.core.report import CHECK_OK, CHECK_UNKNOWN, CHECK_WARNING

PLUGIN_LINE = re.compile(
    r"^VIRTHOTPLUG (?P<status>OK|WARNING|CRITICAL|UNKNOWN) - (?P<summary>[^|\n]+) \| "
    r"domains=(?P<domains>\d+) warning=(?P<warning>\d+) critical=(?P<critical>\d+) "
    r"unknown=(?P<unknown>\d+)\n$"
)


def plugin_line(out: str) -> dict[str, str]:
    match = PLUGIN_LINE.match(out)
    assert match, out
    return match.groupdict()


def test_check_all_warns_about_growable_domains_without_agent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_cli(capsys, "-c", MIXED, "check", "--all")
    assert result.status == CHECK_WARNING
    assert result.err == ""
    line = plugin_line(result.out)
    assert line["status"] == "WARNING"
    assert (line["domains"], line["warning"], line["critical"], line["unknown"]) == (
        "6",
        "2",
        "0",
        "0",
    )
    assert line["summary"].startswith("growable-noagent: agent-not-configured (no guest agent")
    # Its invalid policy first, then the missing agent.
    assert "; bad-metadata: invalid-policy (invalid policy in metadata (live): " in line["summary"]
    assert "), agent-not-configured (" in line["summary"]
    # Info-only domains are not named.
    for quiet in ("hotplug-agent", "fixed-noagent", "stopped-big", "paused-agent"):
        assert quiet not in line["summary"]


def test_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["fixed-noagent", "hotplug-agent", "stopped-big", "paused-agent"]
    result = run_cli(capsys, "-c", MIXED, "check", *names)
    assert result.status == CHECK_OK
    assert result.out == (
        "VIRTHOTPLUG OK - 4 domains, vCPUs consistent | domains=4 warning=0 critical=0 unknown=0\n"
    )


def test_check_one_warning_domain_by_id(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "check", "3")
    assert result.status == CHECK_WARNING
    assert plugin_line(result.out)["summary"].startswith("growable-noagent: ")


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["-c", MIXED, "check", "nosuch"], "failed to get domain 'nosuch': no such domain"),
        (["-c", "bogus:///x", "check", "--all"], "cannot connect to 'bogus:///x': "),
        (["-c", MIXED, "check"], "no domain given"),
    ],
)
def test_check_errors_are_unknown_on_stdout(
    argv: list[str], start: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, *argv)
    assert result.status == CHECK_UNKNOWN
    assert result.err == ""
    assert result.out.startswith(f"VIRTHOTPLUG UNKNOWN - {start}")
    assert result.out.count("\n") == 1


def test_check_unreachable_host_among_several(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    down = f"qemu+unix:///system?socket={tmp_path / 'nonexistent' / 'sock'}"
    result = run_cli(capsys, "-c", MIXED, "-c", down, "check", "--all")
    assert result.status == CHECK_UNKNOWN
    line = plugin_line(result.out)
    assert line["status"] == "UNKNOWN"
    assert (line["domains"], line["warning"], line["unknown"]) == ("6", "2", "1")
    # The failure names the host, then the error; no stray space for the missing domain.
    assert f"; {down}: cannot connect to '{down}': " in line["summary"]
    assert " : " not in line["summary"]


def test_check_domain_the_model_refuses_is_unknown(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "huge.xml"
    padding = "x" * (9 * 1024 * 1024)
    path.write_text(
        '<node><domain type="test"><name>huge</name>'
        f'<metadata><note xmlns="http://example.org/note">{padding}</note></metadata>'
        '<memory unit="MiB">256</memory><vcpu>2</vcpu>'
        '<os><type arch="x86_64">hvm</type></os></domain></node>',
        encoding="utf-8",
    )
    uri = node_uri(path)
    result = run_cli(capsys, "-c", uri, "check", "--all")
    assert result.status == CHECK_UNKNOWN
    line = plugin_line(result.out)
    assert line["summary"].startswith(f"{uri} huge: domain 'huge': malformed domain XML: ")
    assert (line["domains"], line["unknown"]) == ("0", "1")


def test_check_output_never_has_a_second_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    # Whatever lands in the text (here a domain name the user typed), '|' starts perfdata.
    result = run_cli(capsys, "-c", MIXED, "check", "web|1")
    assert result.status == CHECK_UNKNOWN
    assert result.out.count("|") == 0


def test_python_m_check() -> None:
    result = run_module("-c", MIXED, "check", "--all")
    assert result.status == CHECK_WARNING
    assert result.err == ""
    assert plugin_line(result.out)["status"] == "WARNING"


# --- a monitoring user: read-only, no access to the configuration file ---------------------


def test_check_read_only_gives_a_verdict_and_says_what_it_did_not_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_cli(capsys, "-c", MIXED, "-r", "check", "--all")
    assert result.status == CHECK_WARNING  # the two growable domains without an agent
    line = plugin_line(result.out)
    assert (line["domains"], line["warning"], line["unknown"]) == ("6", "2", "0")
    assert line["summary"].endswith(
        "; not read: the guest layer of 1 running domain with a guest agent "
        "(a read-only connection cannot ask the agent)"
    )


def test_check_read_only_of_one_domain_with_an_agent(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "-r", "check", "hotplug-agent")
    assert result.status == CHECK_OK
    assert result.out.startswith("VIRTHOTPLUG OK - 1 domain, vCPUs consistent; not read: the ")


@pytest.fixture
def unreadable_default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default configuration file exists but this user may not read it (root reads
    every file, so the refusal is simulated where the file is opened)."""
    from virthotplug.core import config

    path = tmp_path / "virthotplug.conf"
    path.write_text("[defaults]\nmode = online\n")
    real = config._read_private_file

    def refuse(name: str) -> str:
        if name == str(path):
            raise PermissionError(13, "Permission denied", name)
        return real(name)

    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(path))
    monkeypatch.setattr(config, "_read_private_file", refuse)
    return path


def test_check_without_access_to_the_configuration_file(
    unreadable_default_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "-c", MIXED, "check", "fixed-noagent")
    assert result.status == CHECK_OK
    assert result.out.startswith(
        "VIRTHOTPLUG OK - 1 domain, vCPUs consistent; not read: config file "
        f"{unreadable_default_config}: Permission denied (policies from metadata and defaults "
        "only) |"
    )


def test_status_without_access_to_the_configuration_file(
    unreadable_default_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "fixed-noagent", "--json")
    assert result.status == CHECK_OK
    assert result.json()["not_read"] == [
        f"config file {unreadable_default_config}: Permission denied (policies from metadata "
        "and defaults only)"
    ]


def test_a_named_configuration_file_must_be_readable(
    unreadable_default_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(unreadable_default_config)
    result = run_cli(capsys, "-c", MIXED, "--config-file", path, "check", "fixed-noagent")
    assert result.status == CHECK_UNKNOWN
    assert result.out.startswith(f"VIRTHOTPLUG UNKNOWN - config file {path}: Permission denied")


# --- an invalid policy is a finding, not OK -------------------------------------------------


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "virthotplug.conf"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("[defaults]\nmode = sometimes\n", "[defaults]"),
        ("[domain:fixed-*]\ngrace = soon\n", "[domain:fixed-*]"),
    ],
)
def test_check_reports_an_invalid_policy_in_the_configuration_file(
    text: str, source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, text)
    result = run_cli(capsys, "-c", MIXED, "--config-file", path, "check", "fixed-noagent")
    assert result.status == CHECK_WARNING
    summary = plugin_line(result.out)["summary"]
    assert summary.startswith(f"fixed-noagent: invalid-policy (invalid policy in config {path}: ")
    assert source in summary and "nothing is done to the guest" in summary


def test_status_reports_an_invalid_metadata_policy(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "bad-metadata", "--json")
    findings = result.json()["domains"][0]["findings"]
    assert findings[0]["code"] == "invalid-policy"
    assert findings[0]["severity"] == "warning"
    assert findings[0]["message"].startswith("invalid policy in metadata (live): mode='sometimes'")


def test_a_valid_policy_is_no_finding(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "--all", "--json")
    codes = {d["name"]: [f["code"] for f in d["findings"]] for d in result.json()["domains"]}
    assert [name for name, found in codes.items() if "invalid-policy" in found] == ["bad-metadata"]
