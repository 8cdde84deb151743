"""The layering contract (pyproject.toml's [tool.importlinter]) holds, and it can fail.

``make lint`` runs ``lint-imports`` on the tree; these tests run it on a copy with a
deliberate violation, so a contract that stopped checking anything would show.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "virthotplug", tmp_path / "virthotplug", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("core/cpulist.py", "import libvirt  # noqa", "core is pure"),
        ("core/view.py", "from lxml import etree  # noqa", "core is pure"),
        ("core/drift.py", "import virthotplug.host.collect  # noqa", "layers"),
        ("host/collect.py", "import virthotplug.daemon.watch  # noqa", "layers"),
        ("host/collect.py", "import virthotplug.ops.reconcile  # noqa", "layers"),
        ("ops/reconcile.py", "import virthotplug.daemon.jobs  # noqa", "layers"),
        ("daemon/jobs.py", "import virthotplug.cli.main  # noqa", "layers"),
    ],
)
def test_a_violation_breaks_the_contract(tree: Path, module: str, line: str, broken: str) -> None:
    add_line(tree / "virthotplug" / module, line)
    result = lint_imports(tree)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout


def test_each_daemon_module_logs_under_its_own_name() -> None:
    # One logger name per module: a log configuration can single one out (its level, its
    # handler), and a line says where it came from with %(name)s.
    import importlib
    import pkgutil

    import virthotplug.daemon

    names = [m.name for m in pkgutil.iter_modules(virthotplug.daemon.__path__)]
    shared = []
    for name in names:
        module = importlib.import_module(f"virthotplug.daemon.{name}")
        log = getattr(module, "log", None)
        if log is not None and log.name != module.__name__:
            shared.append((module.__name__, log.name))
    assert shared == []
