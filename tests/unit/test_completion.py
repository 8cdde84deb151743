"""bash completion (completion/virthotplug.bash): its lists match the parser, and it
completes commands, options, option values and domain names (through a stand-in virsh).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

import pytest

from virthotplug.cli import main as cli
from virthotplug.core import policy

SCRIPT = Path(__file__).resolve().parents[2] / "completion" / "virthotplug.bash"
PARSER = cli.build_parser()
COMMANDS: dict[str, argparse.ArgumentParser] = next(
    dict(a.choices) for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)
)


def bash(code: str, path: str = "/usr/bin:/bin") -> str:
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f"source {shlex.quote(str(SCRIPT))}\n{code}"],
        capture_output=True,
        text=True,
        env={"PATH": path},
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def variable(name: str) -> set[str]:
    return set(bash(f'echo "${name}"').split())


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_commands_match_the_parser() -> None:
    assert variable("_virthotplug_commands") == set(COMMANDS)


def test_global_options_match_the_parser() -> None:
    assert variable("_virthotplug_global") == options(PARSER)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_options_match_the_parser(name: str) -> None:
    assert variable(f"_virthotplug_{name}") == options(COMMANDS[name])


def test_options_with_values_match_the_parser() -> None:
    expected = {
        s
        for parser in [PARSER, *COMMANDS.values()]
        for a in parser._actions
        if a.option_strings and a.nargs != 0
        for s in a.option_strings
    }
    assert variable("_virthotplug_with_value") == expected


def test_domain_arguments_match_the_parser() -> None:
    expected = set()
    for name, parser in COMMANDS.items():
        for action in parser._actions:
            if not action.option_strings and action.metavar == "DOMAIN":
                expected.add(f"{name}:{0 if action.nargs == '*' else 1}")
    assert variable("_virthotplug_domains") == expected


def complete(tmp_path: Path, *words: str) -> list[str]:
    """COMPREPLY for the command line ``words`` (the last one is being completed)."""
    virsh = tmp_path / "virsh"
    virsh.write_text(
        f'#!/bin/sh\necho "$@" >> {shlex.quote(str(tmp_path / "virsh.args"))}\n'
        "printf 'web1\\nweb2\\ndb-main\\n'\n"
    )
    virsh.chmod(0o755)
    quoted = " ".join(shlex.quote(w) for w in words)
    out = bash(
        f"COMP_WORDS=({quoted}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMPREPLY=()\n"
        '_virthotplug; printf "%s\\n" "${COMPREPLY[@]}"',
        path=f"{tmp_path}:/usr/bin:/bin",
    )
    return [line for line in out.splitlines() if line]


def virsh_calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "virsh.args"
    return path.read_text().splitlines() if path.exists() else []


def test_completes_commands_and_options(tmp_path: Path) -> None:
    assert set(complete(tmp_path, "virthotplug", "")) == set(COMMANDS)
    assert complete(tmp_path, "virthotplug", "st") == ["status"]
    assert set(complete(tmp_path, "virthotplug", "--c")) == {"--connect", "--config-file"}
    assert "--no-hook-socket" in complete(tmp_path, "virthotplug", "watch", "--")
    assert complete(tmp_path, "virthotplug", "-c", "qemu:///system", "wa") == ["watch"]
    assert virsh_calls(tmp_path) == []


def test_completes_policy_modes(tmp_path: Path) -> None:
    assert complete(tmp_path, "virthotplug", "policy", "--set", "") == list(policy.MODES)
    assert complete(tmp_path, "virthotplug", "policy", "--set", "o") == ["online"]


def test_completes_domain_names_from_virsh(tmp_path: Path) -> None:
    assert complete(tmp_path, "virthotplug", "status", "web") == ["web1", "web2"]
    assert virsh_calls(tmp_path) == ["-q -r list --all --name"]


def test_domain_names_use_the_connection_given(tmp_path: Path) -> None:
    words = ("virthotplug", "-c", "qemu+ssh://h2/system", "apply", "web1", "d")
    assert complete(tmp_path, *words) == ["db-main"]
    assert virsh_calls(tmp_path) == ["-q -r -c qemu+ssh://h2/system list --all --name"]


def test_one_domain_for_policy_and_setvcpus(tmp_path: Path) -> None:
    assert complete(tmp_path, "virthotplug", "policy", "web1", "") == []
    assert complete(tmp_path, "virthotplug", "setvcpus", "web1", "") == []
    assert complete(tmp_path, "virthotplug", "setvcpus", "--live", "w") == ["web1", "web2"]


def test_no_completion_after_an_option_value(tmp_path: Path) -> None:
    assert complete(tmp_path, "virthotplug", "status", "--agent-timeout", "") == []
    assert virsh_calls(tmp_path) == []


def test_debug_takes_an_optional_level(tmp_path: Path) -> None:
    assert complete(tmp_path, "virthotplug", "-d", "") == ["0", "1", "2", "3", "4"]
    assert complete(tmp_path, "virthotplug", "-d", "st") == ["status"]  # no level given
    assert complete(tmp_path, "virthotplug", "-d", "2", "st") == ["status"]
    assert complete(tmp_path, "virthotplug", "-d", "status", "web") == ["web1", "web2"]
    assert complete(tmp_path, "virthotplug", "--debug", "3", "status", "web") == ["web1", "web2"]


def test_help_completes_commands(tmp_path: Path) -> None:
    assert complete(tmp_path, "virthotplug", "help", "se") == ["setvcpus"]
    assert complete(tmp_path, "virthotplug", "help", "status", "") == []
    assert virsh_calls(tmp_path) == []
