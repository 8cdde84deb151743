"""Habits a virsh user brings: -q hides headers, -d takes an optional level 0-4, help
COMMAND, and an empty host still prints the table's header."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tdriver import MIXED, node_uri, run_cli

from virthotplug.cli import main as cli
from virthotplug.core.errors import EXIT_OK

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def empty_host(tmp_path: Path) -> str:
    path = tmp_path / "empty.xml"
    path.write_text("<node/>")
    return node_uri(path)


def test_an_empty_host_prints_the_header(empty_host: str, capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", empty_host, "status", "--all")
    assert result.status == EXIT_OK
    lines = result.out.splitlines()
    assert lines[0].split() == ["Domain", "State", "Config", "Live", "Guest", "Agent", "Findings"]
    assert set(lines[1]) == {"-"} and len(lines) == 2


def test_quiet_prints_rows_only(empty_host: str, capsys: Capsys) -> None:
    assert run_cli(capsys, "-q", "-c", empty_host, "status", "--all").out == ""
    result = run_cli(capsys, "-q", "-c", MIXED, "status", "fixed-noagent", "hotplug-agent")
    assert [line.split()[0] for line in result.out.splitlines()] == [
        "fixed-noagent",
        "hotplug-agent",
    ]


def test_quiet_policy_prints_its_field_rows(capsys: Capsys) -> None:
    loud = run_cli(capsys, "-c", MIXED, "policy", "fixed-noagent", "--set", "online").out
    quiet = run_cli(capsys, "-q", "-c", MIXED, "policy", "fixed-noagent", "--set", "online").out
    assert loud.splitlines()[:2] == ["Changed: the running definition", "Domain: fixed-noagent"]
    assert quiet.splitlines() == loud.splitlines()[2:]
    assert quiet.split()[:2] == ["mode", "online"]


@pytest.mark.parametrize(
    ("argv", "level", "debug"),
    [
        (["-d", "status", "--all"], 0, True),  # -d alone: level 0, the command stays one
        (["-d", "0", "status", "--all"], 0, True),
        (["--debug", "3", "status", "--all"], 3, False),
        (["-d4", "status", "--all"], 4, False),
        (["--debug=1", "status", "--all"], 1, False),
        (["status", "--all"], None, False),
    ],
)
def test_debug_takes_an_optional_level(
    argv: list[str], level: int | None, debug: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    def run(args: object) -> int:
        seen["args"] = args
        return 0

    from virthotplug.cli.commands import status

    monkeypatch.setattr(status, "run", run)
    assert cli.main(["-c", MIXED, *argv]) == 0
    args = seen["args"]
    assert (args.debug_level, args.debug) == (level, debug)  # type: ignore[attr-defined]
    expected = {None: logging.WARNING, 0: logging.DEBUG, 1: logging.INFO, 3: logging.WARNING}
    expected[4] = logging.ERROR
    assert logging.getLogger().level == expected[level]


@pytest.mark.parametrize("level", ["5", "9", "10"])
def test_debug_levels_beyond_4_are_refused(level: str, capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["-c", MIXED, "-d", level, "status", "--all"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument -d/--debug: must be a level from 0 to 4: '{level}'" in err


@pytest.mark.parametrize("command", ["status", "check", "watch", "policy", "apply", "setvcpus"])
def test_help_command_is_the_commands_help(command: str, capsys: Capsys) -> None:
    assert cli.main(["help", command]) == EXIT_OK
    shown = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert shown == capsys.readouterr().out
    assert shown.startswith(f"usage: virthotplug {command} ")


def test_help_alone_is_the_programs_help(capsys: Capsys) -> None:
    assert cli.main(["help"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("usage: virthotplug ")
