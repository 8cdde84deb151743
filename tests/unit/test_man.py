"""The manual pages: they render, lint clean, and say what the code does.

Rendering is the Makefile's (rst2man, then man/fixup.py), into a temporary directory;
``mandoc -T lint`` must print nothing at all (style level included), ``groff -ww`` no
warning, and ``man -l`` must render each page. The sync tests compare the documented
commands, options, exit statuses, JSON vocabularies and settings with the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from virthotplug.cli import main as cli
from virthotplug.core import drift, errors, events, policy, view
from virthotplug.core.config import WatchSettings
from virthotplug.daemon.hookserver import OPERATIONS
from virthotplug.host import actions

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
PAGES = ["virthotplug.1", "virthotplug.conf.5", "virthotplug-hook.8"]


def source(page: str) -> str:
    return (MAN / f"{page}.rst").read_text()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    pages = {}
    for page in PAGES:
        roff = subprocess.run(
            ["rst2man", "--halt=warning", "--no-generator", "--no-datestamp", MAN / f"{page}.rst"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        fixed = subprocess.run(
            [sys.executable, MAN / "fixup.py"],
            input=roff,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        pages[page] = out / page
        pages[page].write_text(fixed)
    return pages


# --- rendering and lint --------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_silent(rendered: dict[str, Path], page: str) -> None:
    lint = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "style", rendered[page]], capture_output=True, text=True
    )
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_groff_has_no_warnings(rendered: dict[str, Path], page: str) -> None:
    groff = subprocess.run(
        ["groff", "-man", "-ww", "-z", rendered[page]], capture_output=True, text=True
    )
    assert (groff.returncode, groff.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_renders_the_page(rendered: dict[str, Path], page: str) -> None:
    shown = subprocess.run(
        ["man", "-l", rendered[page]],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", "PATH": "/usr/bin:/bin"},
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "EXAMPLES", "SEE ALSO"):
        assert f"\n{heading}\n" in shown.stdout, heading


def test_fixup_keeps_the_rendering(rendered: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.1"
    plain.write_text(
        subprocess.run(
            ["rst2man", "--no-generator", "--no-datestamp", MAN / "virthotplug.1.rst"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    env = {"MANWIDTH": "100", "PATH": "/usr/bin:/bin"}
    text = [
        subprocess.run(["man", "-l", p], capture_output=True, text=True, env=env).stdout
        for p in (plain, rendered["virthotplug.1"])
    ]
    assert text[0] == text[1]


# --- virthotplug(1) against the parser ----------------------------------------------------


def sections(text: str, underline: str) -> dict[str, str]:
    """Section title -> body, for sections underlined with ``underline`` characters."""
    pattern = re.compile(rf"^(\S[^\n]*)\n{re.escape(underline)}+\n", re.M)
    found = list(pattern.finditer(text))
    return {
        m.group(1): text[m.end() : found[i + 1].start() if i + 1 < len(found) else len(text)]
        for i, m in enumerate(found)
    }


def documented_options(body: str) -> set[str]:
    """Options of an RST option list: lines starting at column 0 with '-'."""
    options: set[str] = set()
    for line in body.splitlines():
        if line.startswith("-"):
            head = re.split(r"\s{2,}", line, maxsplit=1)[0]
            options.update(part.split()[0] for part in head.split(", "))
    return options


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [
        str(a.metavar or a.dest)
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


PARSER = cli.build_parser()
COMMANDS = subparsers(PARSER)
PAGE_1 = source("virthotplug.1")
TOP = sections(PAGE_1, "=")
COMMAND_SECTIONS = sections(TOP["COMMANDS"], "-")


def test_every_command_is_documented() -> None:
    assert set(COMMAND_SECTIONS) == set(COMMANDS)
    synopsis = TOP["SYNOPSIS"]
    for name in COMMANDS:
        assert f"**virthotplug {name}**" in synopsis, name


def test_global_options_match_the_parser() -> None:
    assert documented_options(TOP["GLOBAL OPTIONS"]) == option_strings(PARSER)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_options_match_the_parser(name: str) -> None:
    parser = COMMANDS[name]
    body = COMMAND_SECTIONS[name]
    assert documented_options(body) == option_strings(parser) - {"-h", "--help"}
    # The command's own synopsis line names every option and positional argument.
    synopsis = body.strip().split("\n\n")[0]
    top_synopsis = next(
        block for block in TOP["SYNOPSIS"].split("\n\n") if f"**virthotplug {name}**" in block
    )
    for text in (synopsis, top_synopsis):
        for option in option_strings(parser) - {"-h", "--help"}:
            assert f"**{option}**" in text, f"{name}: {option} missing in its synopsis"
        for metavar in positionals(parser):
            assert f"*{metavar}*" in text, f"{name}: {metavar} missing in its synopsis"


def test_option_values_are_named_like_the_parser() -> None:
    for name, parser in [("", PARSER), *COMMANDS.items()]:
        body = COMMAND_SECTIONS[name] if name else TOP["GLOBAL OPTIONS"]
        for action in parser._actions:
            if action.option_strings and action.metavar:
                longest = max(action.option_strings, key=len)
                documented = re.escape(f"{longest} {action.metavar}")
                assert re.search(rf"(^|, ){documented}(\s|,|$)", body, re.M), (
                    f"{name or 'global'}: {longest} {action.metavar}"
                )


def test_exit_statuses_match_errors_py() -> None:
    body = TOP["EXIT STATUS"]
    documented = {int(n) for n in re.findall(r"^(\d+)\n    \S", body, re.M)}
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert documented == codes


def test_json_vocabularies_are_documented() -> None:
    output = TOP["JSON OUTPUT"]
    for code in drift.ALL_CODES:
        assert f"{code} (" in output, code
    for code in actions.OUTCOME_CODES:
        assert f"``{code}``" in output, code
    agent_states = [v for k, v in vars(view).items() if k.startswith("AGENT_") and k.isupper()]
    for state in agent_states:
        assert f"``{state}``" in output, state
    kinds = {
        cls.kind
        for cls in vars(events).values()
        if isinstance(cls, type) and issubclass(cls, events.Event) and cls is not events.Event
    }
    watch_section = sections(output, "-")["watch --json"]
    for kind in kinds | {"reconcile"}:
        assert f"``{kind}``" in watch_section, kind


def test_policy_modes_are_documented() -> None:
    for mode in policy.MODES:
        assert f"\n{mode}\n    " in TOP["DESCRIPTION"], mode


# --- virthotplug.conf(5) and virthotplug-hook(8) -------------------------------------------


def test_every_setting_is_documented() -> None:
    conf = sections(source("virthotplug.conf.5"), "=")
    for name in (f.name for f in dataclasses.fields(WatchSettings)):
        assert re.search(rf"^{name} = ", conf["WATCH SETTINGS"], re.M), name
    for name in policy.FIELDS:
        assert re.search(rf"^{name} = ", conf["POLICY FIELDS"], re.M), name


def test_documented_defaults_match_the_code() -> None:
    conf = sections(source("virthotplug.conf.5"), "=")
    defaults = WatchSettings()
    for field in dataclasses.fields(WatchSettings):
        body = conf["WATCH SETTINGS"].split(f"\n{field.name} = ", 1)[1].split("\n\n", 1)[0]
        value = getattr(defaults, field.name)
        shown = {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value
        if shown == ():
            shown = "none"
        text = f"{shown:g}" if isinstance(shown, float) else str(shown)
        assert re.search(rf"Default:\s+(\*\*|``)?{re.escape(text)}(\W|$)", body), field.name


def test_hook_operations_are_documented() -> None:
    hook = sections(source("virthotplug-hook.8"), "=")
    for operation in sorted(OPERATIONS):
        assert re.search(rf"^(\w+ \w+, )?{operation} (begin|end)", hook["OPERATIONS"], re.M)
