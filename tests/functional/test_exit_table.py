"""The cases listed under EXIT STATUS in virthotplug(1), each run for its exit status.

The list is read from the manual page's source, so a case documented there is a case
tested here, and a status changed in the code without the page (or the reverse) fails.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tdriver import MIXED, Result, run_cli, run_module

PAGE = Path(__file__).resolve().parents[2] / "man" / "virthotplug.1.rst"
CASE = re.compile(r"^``(virthotplug [^`]+)``\n    (\d+)\b", re.M)
SECOND_HOST = "test:///default"
PLACEHOLDERS = {
    "RUNNING": "hotplug-agent",
    "STOPPED": "stopped-big",
    "PAUSED": "paused-agent",
    "NOSUCH": "nosuch",
    "HOST1": MIXED,
    "HOST2": SECOND_HOST,
}


def exit_status_section() -> str:
    text = PAGE.read_text()
    return text.split("\nEXIT STATUS\n===========\n", 1)[1].split("\nENVIRONMENT\n====", 1)[0]


CASES = [(m.group(1), int(m.group(2))) for m in CASE.finditer(exit_status_section())]


def test_the_page_lists_cases() -> None:
    assert len(CASES) >= 15
    assert {status for _, status in CASES} >= {0, 1, 2, 3, 5, 6, 8, 9, 10}


@pytest.fixture
def busy_port() -> Iterator[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def argv_of(case: str, busy: str) -> list[str]:
    words = [PLACEHOLDERS.get(word, word) for word in shlex.split(case)[1:]]
    words = [busy if word == "BUSY" else word for word in words]
    return words if "-c" in words else ["-c", MIXED, *words]


@pytest.mark.parametrize(("case", "status"), CASES, ids=[case for case, _ in CASES])
def test_documented_exit_status(
    case: str, status: int, busy_port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = argv_of(case, busy_port)
    # watch is a daemon: its own process.
    result = run_module(*argv) if "watch" in argv else run_in_process(argv, capsys)
    assert result.status == status, result
    assert "Traceback" not in result.err
    if "--json" in argv:
        document = json.loads(result.out)
        assert document["version"] == 1
        if status:
            assert document["exit_status"] == status, document


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Result:
    try:
        return run_cli(capsys, *argv)
    except SystemExit as exc:  # argparse's usage errors exit from inside the parser
        captured = capsys.readouterr()
        return Result(int(exc.code or 0), captured.out, captured.err)


def test_qemu_stopping_during_the_hot_add_has_its_own_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Not a case the test driver gives by itself: QEMU aborting under a plug (under TCG,
    # more vCPUs than the domain's maximum in its life) is played by a hot-add request that
    # stops the domain and fails, as libvirt's does when QEMU's monitor goes away.
    from virthotplug.core import errors
    from virthotplug.host.domain import Domain

    def crash(self: Domain, count: int, *, live: bool, config: bool, **_flags: bool) -> None:
        self.raw.destroy()
        raise errors.VirtHotplugError("Unable to read from monitor: Connection reset by peer")

    monkeypatch.setattr(Domain, "set_vcpus", crash)
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", "3", "--live", "--json")
    assert result.status == errors.EXIT_QEMU_STOPPED == 13, result
    assert "QEMU stopped (crashed) during the hot-add (1 -> 3 vCPUs)" in result.err, result
    assert "Connection reset by peer" in result.err
    assert result.json()["exit_status"] == 13
