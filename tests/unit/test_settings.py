"""One table of ``[watch]`` settings: the file and the command line share defaults and ranges."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from virthotplug.cli import main as cli
from virthotplug.core import settings
from virthotplug.core.config import WatchSettings, parse_config
from virthotplug.core.errors import ConfigError, UsageError

CONF_PAGE = Path(__file__).resolve().parents[2] / "man" / "virthotplug.conf.5.rst"
OPTIONS = [s for s in settings.WATCH_SETTINGS if s.option is not None]


def boundaries(setting: settings.Setting[Any]) -> tuple[list[str], list[str]]:
    """Values both sources must accept, and values both must refuse."""
    assert setting.low is not None and setting.high is not None
    low, high = setting.low, setting.high
    step = 1 if isinstance(setting.default, int) else 0.01
    good = [f"{low:g}", f"{high:g}", f"{setting.default:g}"]
    bad = [str(low - step), str(high + step), "nan", "soon", ""]
    return good, bad


def from_file(name: str, text: str) -> Any:
    return getattr(parse_config(f"[watch]\n{name} = {text}\n", path="/x.conf").watch, name)


def from_command_line(option: str, text: str) -> Any:
    args = cli.build_parser().parse_args(["watch", f"{option}={text}"])
    return getattr(args, option[2:].replace("-", "_"))


def test_the_file_defaults_are_the_table() -> None:
    defaults = WatchSettings()
    fields = [f.name for f in dataclasses.fields(WatchSettings)]
    assert fields == [s.name for s in settings.WATCH_SETTINGS]
    for setting in settings.WATCH_SETTINGS:
        assert getattr(defaults, setting.name) == setting.default, setting.name


@pytest.mark.parametrize("setting", OPTIONS, ids=lambda s: s.name)
def test_file_and_command_line_agree_on_the_range(setting: settings.Setting[Any]) -> None:
    assert setting.option is not None
    good, bad = boundaries(setting)
    for text in good:
        assert from_file(setting.name, text) == from_command_line(setting.option, text)
    for text in bad:
        with pytest.raises(ConfigError, match=setting.name):
            from_file(setting.name, text)
        with pytest.raises(SystemExit):
            from_command_line(setting.option, text)


def test_a_refused_option_names_itself_and_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["watch", "--workers", "0"])
    assert info.value.code == 2
    assert "argument --workers: must be an integer from 1 to 256: '0'" in capsys.readouterr().err


def test_a_refused_file_value_names_the_setting_and_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        from_file("hotadd_settle", "61")
    message = str(info.value)
    assert "/x.conf" in message and "hotadd_settle" in message and "0 and 60" in message


def test_the_commands_agent_timeout_default_is_the_files_else_the_table() -> None:
    from virthotplug.cli.commands.common import agent_timeout
    from virthotplug.core.config import HostConfig

    for command in ("status", "check", "apply"):
        args = cli.build_parser().parse_args([command, "--all"])
        assert args.agent_timeout is None  # not given: the configuration file decides
        assert agent_timeout(args, HostConfig()) == settings.AGENT_TIMEOUT.default


@pytest.mark.parametrize("setting", OPTIONS, ids=lambda s: s.name)
def test_the_manual_page_states_the_range(setting: settings.Setting[Any]) -> None:
    body = CONF_PAGE.read_text().split(f"\n{setting.name} = ", 1)[1].split("\n\n", 1)[0]
    assert setting.low is not None and setting.high is not None
    stated = rf"{re.escape(f'{setting.low:g}')} to {re.escape(f'{setting.high:g}')}\W"
    assert re.search(stated, " ".join(body.split())), setting.name
    assert f"**{setting.option}**" in body


# --- one number rule ---------------------------------------------------------------------

# Numbers int() or float() take that the rule refuses: other scripts' digits, digit
# separators, exponents, signs, special values, hexadecimal, bare points.
NOT_NUMBERS = [
    "\uff15",
    "\u0663",
    "1_0",
    "1e2",
    "1E2",
    "+1",
    "-0",
    "nan",
    "inf",
    "0x10",
    "1.",
    ".5",
    "1 0",
]


def refused_by_the_parser(argv: list[str]) -> bool:
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code == 2
    return False


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_one_number_rule_for_every_option_and_value(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from virthotplug.core.policy import parse_field
    from virthotplug.daemon.metricsserver import parse_listen

    for setting in settings.WATCH_SETTINGS:
        if setting.low is None:
            continue
        with pytest.raises(ConfigError):
            from_file(setting.name, text)
        assert setting.option is not None
        assert refused_by_the_parser(["watch", f"{setting.option}={text}"]), setting.option
    for field in ("count", "grace", "retries"):
        with pytest.raises(ValueError):
            parse_field(field, text)
        assert refused_by_the_parser(["policy", "d", "--set", "match", f"--{field}={text}"])
    assert refused_by_the_parser(["setvcpus", "d", text])
    assert refused_by_the_parser(["setvcpus", "d", "2", f"--timeout={text}"])
    with pytest.raises(UsageError):
        parse_listen(f"127.0.0.1:{text}")
    capsys.readouterr()


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("7", 7), ("1.5", 1.5), ("600", 600), ("0.125", 0.125)]
)
def test_plain_numbers_pass_the_rule(text: str, value: float) -> None:
    assert settings.parse_seconds(text, 0, 600) == value
    if "." not in text:
        assert settings.parse_integer(text, 0, 600) == value
