"""``make install`` and ``make uninstall``: the tree a distribution package would hold.

The first tests install into a DESTDIR with PREFIX=/usr, as a packager does, and check every
file, its mode and its content; the last one installs under a temporary PREFIX and runs the
installed program.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_FILES = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "virthotplug").rglob("*.py")
    if "__pycache__" not in p.parts
)


def make(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def files(root: Path) -> dict[str, int]:
    """Every file under ``root`` (bytecode caches aside) and its permission bits."""
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def expected_tree() -> dict[str, int]:
    tree = {
        "usr/bin/virthotplug": 0o755,
        "etc/libvirt/hooks/qemu.d/virthotplug": 0o755,
        "usr/share/virthotplug/hooks/qemu": 0o755,
        "etc/virthotplug/virthotplug.conf": 0o600,
        "usr/lib/systemd/system/virthotplug.service": 0o644,
        "usr/share/bash-completion/completions/virthotplug": 0o644,
        "usr/share/man/man1/virthotplug.1": 0o644,
        "usr/share/man/man5/virthotplug.conf.5": 0o644,
        "usr/share/man/man8/virthotplug-hook.8": 0o644,
    }
    tree.update({f"usr/share/virthotplug/{path}": 0o644 for path in PACKAGE_FILES})
    return tree


PACKAGER = ("PREFIX=/usr", "SYSCONFDIR=/etc")


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("pkg")
    make("install", f"DESTDIR={dest}", *PACKAGER)
    return dest


def test_install_tree(destdir: Path) -> None:
    assert files(destdir) == expected_tree()


def test_installed_contents(destdir: Path) -> None:
    read = lambda rel: (destdir / rel).read_text()  # noqa: E731
    # The entry point libvirtd runs; its defaults are this layout's paths, so it is unchanged.
    assert read("etc/libvirt/hooks/qemu.d/virthotplug") == (ROOT / "hooks/virthotplug").read_text()
    assert read("usr/share/virthotplug/hooks/qemu") == (ROOT / "hooks/qemu").read_text()
    assert read("etc/virthotplug/virthotplug.conf") == (ROOT / "conf/virthotplug.conf").read_text()
    assert (
        read("usr/share/bash-completion/completions/virthotplug")
        == (ROOT / "completion/virthotplug.bash").read_text()
    )
    for path in PACKAGE_FILES:
        assert read(f"usr/share/virthotplug/{path}") == (ROOT / path).read_text(), path

    wrapper = read("usr/bin/virthotplug")
    assert wrapper.startswith("#!/usr/bin/python3\n")
    assert 'sys.path.insert(0, "/usr/share/virthotplug")' in wrapper
    assert "@" not in wrapper

    unit = read("usr/lib/systemd/system/virthotplug.service")
    assert "ExecStart=/usr/bin/virthotplug watch\n" in unit
    assert "@BINDIR@" not in unit
    for setting in (
        "After=network.target libvirtd.service virtqemud.service",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=virthotplug",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "WantedBy=multi-user.target",
    ):
        assert f"\n{setting}\n" in unit, setting

    page = read("usr/share/man/man1/virthotplug.1")
    assert page.startswith('.\\" Man page generated from reStructuredText')
    assert ".TH" in page


def test_bytecode_is_compiled_for_the_final_path(destdir: Path) -> None:
    caches = list(
        (destdir / "usr/share/virthotplug/virthotplug/cli/__pycache__").glob("main.*.pyc")
    )
    assert caches
    assert str(destdir).encode() not in caches[0].read_bytes()


def test_existing_config_is_kept_and_uninstall_leaves_it(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    config = dest / "etc/virthotplug/virthotplug.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[defaults]\nmode = online\n")
    config.chmod(0o640)
    result = make("install", f"DESTDIR={dest}", *PACKAGER)
    assert "keeping the existing" in result.stdout
    assert config.read_text() == "[defaults]\nmode = online\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o640

    result = make("uninstall", f"DESTDIR={dest}", *PACKAGER)
    assert "keeping" in result.stdout
    assert files(dest) == {"etc/virthotplug/virthotplug.conf": 0o640}


def test_uninstall_removes_everything(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    make("install", f"DESTDIR={dest}", *PACKAGER)
    make("uninstall", f"DESTDIR={dest}", *PACKAGER)
    assert files(dest) == {}
    assert not (dest / "usr/share/virthotplug").exists()
    assert not (dest / "etc/virthotplug").exists()
    assert not (dest / "etc/libvirt/hooks/qemu.d").exists()


def test_installed_program_runs(tmp_path: Path) -> None:
    prefix, etc = tmp_path / "usr", tmp_path / "etc"
    make("install", f"PREFIX={prefix}", f"SYSCONFDIR={etc}", f"INSTALL_PYTHON={sys.executable}")
    program = prefix / "bin" / "virthotplug"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    version = subprocess.run([program, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("virthotplug ")
    config = etc / "virthotplug/virthotplug.conf"
    status = subprocess.run(
        [program, "-c", "test:///default", "--config-file", config, "status", "--all"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert status.returncode == 0, status.stderr
    assert "test" in status.stdout
    shown = subprocess.run(
        ["man", "virthotplug-hook"],
        capture_output=True,
        text=True,
        env={**env, "MANPATH": str(prefix / "share/man"), "MANPAGER": "cat", "MANWIDTH": "80"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "virthotplug-hook" in shown.stdout
    make("uninstall", f"PREFIX={prefix}", f"SYSCONFDIR={etc}")
    assert files(tmp_path) == {}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    prefix = tmp_path / "usr"
    make("install", f"PREFIX={prefix}", f"SYSCONFDIR={tmp_path / 'etc'}")
    unit = prefix / "lib/systemd/system/virthotplug.service"
    assert f"ExecStart={prefix}/bin/virthotplug watch" in unit.read_text()
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", unit], capture_output=True, text=True
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
