"""User input echoed in errors is escaped (no ESC sequence reaches a terminal) and bounded
(a 100 KB name is cut with an ellipsis); watch refuses an empty --domain and fails, with one
line, when the reader of its JSON lines goes away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tdriver import MIXED, run_cli

from virthotplug.core.errors import ECHO_LIMIT, MESSAGE_LIMIT, quote, shown

ESCAPE = "web\x1b[2J\x07\u202e1"
HUGE = "x" * 100_000


def test_quote_escapes_and_bounds() -> None:
    assert quote(ESCAPE) == "'web\\x1b[2J\\x07\\u202e1'"
    assert quote(HUGE) == "'" + "x" * ECHO_LIMIT + "...'"
    assert shown("plain") == "plain"


@pytest.mark.parametrize("text", [ESCAPE, HUGE], ids=["escape", "huge"])
@pytest.mark.parametrize(
    "argv",
    [
        ["-c", MIXED, "status", "{}"],
        ["-c", MIXED, "status", "--json", "{}"],
        ["-c", MIXED, "check", "{}"],
        ["-c", MIXED, "policy", "{}"],
        ["-c", MIXED, "apply", "{}"],
        ["-c", MIXED, "setvcpus", "{}", "2"],
        ["-c", MIXED, "-c", "test:///default", "status", "{}"],
        ["-c", "{}", "status", "--all"],
        ["-c", MIXED, "--config-file", "/nonexistent/{}", "status", "--all"],
        ["-c", MIXED, "{}"],  # argparse: invalid choice
        ["-c", MIXED, "check", "--bogus{}"],
        ["-c", MIXED, "status", "--all", "--agent-timeout", "{}"],
        ["-c", MIXED, "policy", "hotplug-agent", "--set", "match", "--count", "{}"],
    ],
)
def test_errors_echo_input_escaped_and_bounded(
    argv: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        result = run_cli(capsys, *[a.replace("{}", text) for a in argv])
        status, out, err = result.status, result.out, result.err
    except SystemExit as exc:  # argparse's usage errors
        captured = capsys.readouterr()
        status, out, err = int(exc.code or 0), captured.out, captured.err
    assert status != 0
    shown_text = out + err
    assert "\x1b" not in shown_text and "\x07" not in shown_text and "\u202e" not in shown_text
    message_lines = [
        line for line in shown_text.splitlines() if "error" in line or "UNKNOWN" in line
    ]
    assert message_lines, shown_text
    for line in message_lines:
        assert len(line) < MESSAGE_LIMIT + 200, line[:300]
    if text is HUGE:
        # Cut with an ellipsis (a prefix given with the name counts towards the limit).
        assert "x" * (ECHO_LIMIT - 20) in shown_text and "x..." in shown_text
        assert "x" * (MESSAGE_LIMIT + 1) not in shown_text


def test_watch_refuses_an_empty_domain_glob(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "-c", MIXED, "watch", "--domain", "")
    assert info.value.code == 2
    assert "argument --domain: an empty GLOB matches no domain" in capsys.readouterr().err


def test_watch_fails_when_the_json_reader_goes_away(tmp_path: Path) -> None:
    config = tmp_path / "empty.conf"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    env["VIRTHOTPLUG_RUN_DIR"] = str(tmp_path)
    argv = ["-c", MIXED, "--config-file", str(config), "watch", "--no-hook-socket", "--json"]
    child = subprocess.Popen(
        [sys.executable, "-m", "virthotplug", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline()  # the first record: watch is running
    child.stdout.close()  # the reader goes away; the next record meets EPIPE
    try:
        status = child.wait(timeout=90)  # the next resync writes at the latest
    finally:
        child.kill()
    err = child.stderr.read().decode()
    assert status == 1, err
    assert err.splitlines()[-1] == (
        "virthotplug: error: stdout was closed (broken pipe): the JSON records have no reader"
    )
    assert "Traceback" not in err
