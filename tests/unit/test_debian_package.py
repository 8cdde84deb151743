"""debian/: one version (virthotplug/__init__.py, read by setup.py) that debian/changelog
agrees with, and the package files debian/rules and dh_* expect are there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"


def test_changelog_version_is_the_setup_py_version() -> None:
    setup = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    found = re.match(r"virthotplug \(([^)]+)\) ", first)
    assert found, first
    # A native package: the Debian version is the upstream version, no revision.
    assert found.group(1) == setup.stdout.strip().splitlines()[-1]


def test_package_depends_on_the_system_bindings() -> None:
    control = (DEBIAN / "control").read_text()
    binary = control[control.index("\nPackage: virthotplug\n") :]
    depends = binary[binary.index("Depends:") : binary.index("Recommends:")]
    for package in ("python3-libvirt", "python3-lxml", "python3-tenacity"):
        assert f" {package}," in depends, package
    assert "python3-prometheus-client" in binary[binary.index("Recommends:") :]
    assert "Architecture: all" in binary


def test_installed_files_come_from_the_tree() -> None:
    rules = (DEBIAN / "rules").read_text()
    for source in ("hooks/qemu", "conf/virthotplug.conf", "completion/virthotplug.bash"):
        assert source in rules and (ROOT / source).is_file(), source
    assert "systemd/virthotplug.service.in" in rules
    for page in (DEBIAN / "virthotplug.manpages").read_text().split():
        assert (ROOT / f"{page}.rst").is_file(), page
    for example in (DEBIAN / "virthotplug.examples").read_text().split():
        assert (ROOT / example).is_file(), example
