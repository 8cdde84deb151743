"""Helpers for the functional tier: test-driver node files, and running the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from jsonschemas import validate_output  # tests/jsonschemas.py

from virthotplug.cli import main as cli

NODES = Path(__file__).resolve().parent / "nodes"


def node_uri(node: str | Path) -> str:
    """``test:///abs/path.xml`` for a node file given by name (in nodes/) or path."""
    path = node if isinstance(node, Path) else NODES / f"{node}.xml"
    return f"test://{path.resolve()}"


MIXED = node_uri("mixed")


@dataclass(frozen=True)
class Result:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``virthotplug ARGV`` in this process."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    validate_output(argv, captured.out)  # every --json document against its schema
    return Result(status, captured.out, captured.err)


def run_module(*argv: str, env: Optional[dict[str, str]] = None) -> Result:
    """``python -m virthotplug ARGV`` in a child process."""
    inherited = ("LIBVIRT_DEFAULT_URI", "VIRTHOTPLUG_CONFIG")
    child_env = {k: v for k, v in os.environ.items() if k not in inherited}
    child_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "virthotplug", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env,
        check=False,
    )
    validate_output(argv, done.stdout)
    return Result(done.returncode, done.stdout, done.stderr)
