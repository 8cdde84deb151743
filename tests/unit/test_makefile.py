"""The Makefile's set-up: lint and type checks run in a plain virtualenv, without setting up
the machine (apt packages, libvirtd); the test tiers, the demo and the benchmarks set it up.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST_SETUP = "tests/lab/host-setup.sh"


def planned(*targets: str) -> str:
    """What ``make`` would run for ``targets`` (dry run, every target out of date)."""
    done = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", "-C", str(ROOT), *targets],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_lint_and_typecheck_set_up_no_machine() -> None:
    commands = planned("lint", "typecheck")
    assert "ruff check" in commands and "mypy" in commands and "lint-imports" in commands
    assert HOST_SETUP not in commands
    assert "-m venv" in commands  # the virtualenv is made when missing


@pytest.mark.parametrize("target", ["test", "unit", "functional", "e2e", "demo", "bench"])
def test_the_tiers_the_demo_and_the_benchmarks_set_up_the_machine(target: str) -> None:
    assert HOST_SETUP in planned(target)
