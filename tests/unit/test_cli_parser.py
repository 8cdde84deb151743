"""Tests for the command-line parser and the usage errors ``cli.main`` reports.

Nothing here opens a libvirt connection: usage errors are found before any is needed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virthotplug import __version__
from virthotplug.cli import main as cli
from virthotplug.core.errors import EXIT_USAGE
from virthotplug.core.report import CHECK_UNKNOWN

# A URI that would fail loudly if anything tried to connect.
NOWHERE = "bogus:///never-opened"


def parse(*argv: str) -> object:
    return cli.build_parser().parse_args(list(argv))


def test_connect_is_repeatable_and_keeps_order() -> None:
    args = parse("-c", "qemu:///system", "--connect", "qemu+ssh://h2/system", "status", "--all")
    assert args.uris == ["qemu:///system", "qemu+ssh://h2/system"]  # type: ignore[attr-defined]


def test_defaults() -> None:
    args = parse("status", "web1")
    assert args.uris is None  # type: ignore[attr-defined]
    assert args.readonly is False  # type: ignore[attr-defined]
    assert args.debug is False  # type: ignore[attr-defined]
    assert args.quiet is False  # type: ignore[attr-defined]
    assert args.all is False  # type: ignore[attr-defined]
    assert args.json is False  # type: ignore[attr-defined]
    assert args.domains == ["web1"]  # type: ignore[attr-defined]
    assert args.agent_timeout is None  # type: ignore[attr-defined]  # the file's, else 5 s


def test_short_global_options() -> None:
    args = parse("-r", "-d", "-q", "check", "--all", "--agent-timeout", "0.5")
    assert args.readonly and args.debug and args.quiet  # type: ignore[attr-defined]
    assert args.agent_timeout == 0.5  # type: ignore[attr-defined]


def test_several_domains() -> None:
    args = parse("status", "web1", "3", "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01")
    assert args.domains == ["web1", "3", "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no command
        ["frobnicate"],
        ["status", "--bogus"],
        ["--bogus", "status", "--all"],
        ["-c"],  # -c needs a URI
        ["status", "--all", "--agent-timeout", "0"],
        ["status", "--all", "--agent-timeout", "-1"],
        ["status", "--all", "--agent-timeout", "3601"],
        ["status", "--all", "--agent-timeout", "nan"],
        ["status", "--all", "--agent-timeout", "soon"],
        ["apply", "--all", "--qemu-monitor"],  # --qemu-monitor belongs to status only
    ],
)
def test_argparse_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv if argv[:1] == ["-c"] else ["-c", NOWHERE, *argv])
    assert info.value.code == EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "usage: virthotplug" in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "status" in out and "check" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"virthotplug {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--all", "web1"], "give domain names or --all, not both"),
        (["status"], "no domain given (name one or more, or use --all)"),
        (["status", "--json"], "no domain given (name one or more, or use --all)"),
    ],
)
def test_selection_errors_exit_2_before_connecting(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-c", NOWHERE, *argv]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"virthotplug: error: {message}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--all", "web1"], "give domain names or --all, not both"),
        (["check"], "no domain given (name one or more, or use --all)"),
    ],
)
def test_check_reports_selection_errors_as_unknown(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-c", NOWHERE, *argv]) == CHECK_UNKNOWN
    captured = capsys.readouterr()
    assert captured.out == f"VIRTHOTPLUG UNKNOWN - {message}\n"
    assert captured.err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--bogus"], "unrecognized arguments: --bogus"),
        (["check", "--all", "--json"], "unrecognized arguments: --json"),  # status's only
        (["--bogus", "check", "--all"], "unrecognized arguments: --bogus"),
        (
            ["check", "--all", "--agent-timeout", "0"],
            "argument --agent-timeout: must be between 0.1 and 600 seconds: '0'",
        ),
        (["check", "--agent-timeout"], "argument --agent-timeout: expected one argument"),
        (["--config-file", "check", "check", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_check_reports_usage_errors_as_one_unknown_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Monitoring Plugins guidelines: a plugin's every failure is UNKNOWN (3) on stdout.
    assert cli.main(["-c", NOWHERE, *argv]) == CHECK_UNKNOWN
    captured = capsys.readouterr()
    assert captured.out == f"VIRTHOTPLUG UNKNOWN - {message}\n"
    assert captured.err == ""


def test_check_usage_error_in_a_child_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "virthotplug", "-c", NOWHERE, "check", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        CHECK_UNKNOWN,
        "VIRTHOTPLUG UNKNOWN - unrecognized arguments: --bogus\n",
        "",
    )


def test_pure_modules_do_not_import_libvirt() -> None:
    # Start-up stays light, and the pure tier never needs libvirt.
    code = (
        "import sys\n"
        "import virthotplug.cli.main, virthotplug.host.domxml, virthotplug.core.view\n"
        "import virthotplug.core.drift\n"
        "import virthotplug.core.report, virthotplug.core.workpool, virthotplug.host.collect\n"
        "virthotplug.cli.main.build_parser()\n"
        "print('libvirt' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_agent_timeout_is_the_option_else_the_configuration_files(tmp_path: Path) -> None:
    from virthotplug.cli.commands.common import agent_timeout
    from virthotplug.core.config import parse_config

    config = parse_config("[watch]\nagent_timeout = 12\n", path=str(tmp_path / "conf"))
    assert agent_timeout(parse("status", "web1"), config) == 12.0
    assert agent_timeout(parse("check", "--agent-timeout", "0.5", "web1"), config) == 0.5
    assert agent_timeout(parse("apply", "--all"), parse_config("", path="x")) == 5.0
