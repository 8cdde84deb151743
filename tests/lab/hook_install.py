"""The libvirt hook installed for the host's libvirtd as users get it, and put back after.

The /bin/sh entry point ``hooks/virthotplug`` goes to ``/etc/libvirt/hooks/qemu.d/virthotplug``
and runs the Python hook program ``hooks/qemu``. The program and the package go to a scratch
directory laid out like ``$(PREFIX)/share/virthotplug``, and the entry point is pointed at it
the way ``make install`` does (its ``PROGRAM=`` line rewritten): libvirtd passes no environment
to hooks, so ``VIRTHOTPLUG_HOOK_PROGRAM`` cannot, and a package's ``/usr/share/virthotplug`` is
never touched.

Whatever was there before (hook, configuration file, directories) is put back afterwards, also
on failure, and libvirtd is told to re-read its hooks (SIGHUP) both times. The hook learns its
socket from ``hook_socket`` in ``/etc/virthotplug/virthotplug.conf``, which is swapped in and
restored the same way; nothing in it but ``hook_socket``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "hooks" / "virthotplug"  # what libvirtd runs: the stub that cannot fail
PROGRAM = ROOT / "hooks" / "qemu"  # the Python hook program it runs
HOOKS_DIR = Path("/etc/libvirt/hooks")
INSTALLED = HOOKS_DIR / "qemu.d" / "virthotplug"
SYSTEM_CONFIG = Path("/etc/virthotplug/virthotplug.conf")
PID_FILES = (Path("/run/libvirtd.pid"), Path("/run/virtqemud.pid"))
RELOAD_PAUSE = 1.0  # libvirtd re-reads its hooks in a thread right after SIGHUP


class HookLeftBehind(RuntimeError):
    """The hook or its configuration could not be put back as it was."""


def reload_libvirt_hooks() -> None:
    """SIGHUP to the running libvirtd (or virtqemud): it re-reads its hook directory."""
    for pid_file in PID_FILES:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
            time.sleep(RELOAD_PAUSE)
            return
    raise AssertionError(f"no running libvirt daemon found through {PID_FILES}")


def install_entry_point(program: Path) -> None:
    """The entry point as ``INSTALLED``, naming ``program`` as make install names the hook
    program it installs (``sed -e 's|^PROGRAM=.*|PROGRAM=...|'``)."""
    lines = ENTRY.read_text().splitlines(keepends=True)
    program_lines = [i for i, line in enumerate(lines) if line.startswith("PROGRAM=")]
    assert len(program_lines) == 1, f"{ENTRY}: expected one PROGRAM= line"
    lines[program_lines[0]] = f"PROGRAM={program}\n"
    INSTALLED.write_text("".join(lines))
    INSTALLED.chmod(0o755)


class Saved:
    """A file's bytes and mode (or its absence), and directories created for the test."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, bytes | None, int]] = []
        self._dirs: list[Path] = []

    def file(self, path: Path) -> None:
        if path.exists():
            self._files.append((path, path.read_bytes(), path.stat().st_mode & 0o7777))
        else:
            self._files.append((path, None, 0))

    def directory(self, path: Path) -> None:
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for created in reversed(missing):
            created.mkdir(mode=0o755)
            self._dirs.append(created)

    def restore(self) -> None:
        for path, data, mode in reversed(self._files):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
                path.chmod(mode)
        for created in reversed(self._dirs):
            with contextlib.suppress(OSError):
                created.rmdir()

    def restored(self) -> bool:
        files = all(
            (path.read_bytes() == data) if data is not None else not path.exists()
            for path, data, _ in self._files
        )
        return files and not any(path.exists() for path in self._dirs)


@contextlib.contextmanager
def installed_hook(socket_path: Path, scratch: Path) -> Iterator[Path]:
    """Install the hook for libvirtd, its messages going to ``socket_path``; the package
    copy lives under ``scratch``. Yields ``socket_path``; everything is put back at the end
    (HookLeftBehind if it could not be)."""
    saved = Saved()
    try:
        saved.file(INSTALLED)
        saved.file(SYSTEM_CONFIG)
        saved.directory(INSTALLED.parent)
        saved.directory(SYSTEM_CONFIG.parent)
        SYSTEM_CONFIG.write_text(f"[watch]\nhook_socket = {socket_path}\n")
        SYSTEM_CONFIG.chmod(0o600)  # virthotplug refuses a file others may write
        share = scratch / "share" / "virthotplug"  # make install's layout: the package
        shutil.copytree(  # beside the hooks (the program imports its protocol from it)
            ROOT / "virthotplug",
            share / "virthotplug",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        program = share / "hooks" / "qemu"
        program.parent.mkdir(parents=True)
        shutil.copyfile(PROGRAM, program)
        program.chmod(0o755)
        install_entry_point(program)
        reload_libvirt_hooks()
        yield socket_path
    finally:
        saved.restore()
        reload_libvirt_hooks()
    if not saved.restored():
        raise HookLeftBehind("the hook or its configuration was left behind")
