"""Installed-package tier: the Debian package installed on this host, driven with the system
``python3`` and its python3-libvirt, never the venv or the checkout's modules.

Run by tests/package/run.sh (``make package-test``) after ``apt-get install
./virthotplug_*.deb``, from a directory outside the checkout so that ``python3 -m
virthotplug`` imports the installed package. The lab fixtures (``lab``, ``make_vm``) are the
e2e tier's, loaded from tests/e2e/conftest.py: one place defines them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parents[1] / "e2e"
sys.path.insert(0, str(E2E_DIR))  # watchproc, test_hook (and, through the conftest, tests/lab)

_spec = importlib.util.spec_from_file_location("e2e_fixtures", E2E_DIR / "conftest.py")
assert _spec is not None and _spec.loader is not None
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
lab = _e2e.lab
make_vm = _e2e.make_vm

SYSTEM_PYTHON = "/usr/bin/python3"
INSTALLED_MODULES = "/usr/lib/python3/dist-packages/virthotplug/"


@pytest.fixture(scope="session", autouse=True)
def _installed_package() -> None:
    """Every test here runs against the installed package, or fails saying why."""
    assert sys.executable == SYSTEM_PYTHON, f"run with {SYSTEM_PYTHON}, not {sys.executable}"
    found = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import virthotplug; print(virthotplug.__file__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.stdout.startswith(INSTALLED_MODULES), (
        f"python3 imports virthotplug from {found.stdout.strip() or found.stderr}, "
        "not the package: run from outside the checkout"
    )
