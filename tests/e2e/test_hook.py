"""The libvirt hook on the lab: libvirtd runs the installed hook for a real VM and
``virthotplug watch`` turns its messages into reconciles.

The hook is installed as users get it: the /bin/sh entry point ``hooks/virthotplug`` as
``/etc/libvirt/hooks/qemu.d/virthotplug``, running the Python hook program ``hooks/qemu``.
The program and the package go to a directory of the test laid out like
``$(PREFIX)/share/virthotplug``, and the entry point is pointed at it the way ``make install``
does (its ``PROGRAM=`` line rewritten): libvirtd passes no environment to hooks, so
``VIRTHOTPLUG_HOOK_PROGRAM`` cannot, and a package's ``/usr/share/virthotplug`` is never touched.

The entry point goes to ``/etc/libvirt/hooks/qemu.d/virthotplug`` only for the test: whatever
was there before (hook, configuration file, directories) is put back afterwards, also when
the test fails, and libvirtd is told to re-read its hooks (SIGHUP) both times. The hook
learns the test's socket from ``hook_socket`` in ``/etc/virthotplug/virthotplug.conf``, which
is swapped in and restored the same way. Nothing in it but ``hook_socket``: another VM
starting meanwhile only sends a message nobody else reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from lab import LabVM
from watchproc import Record, WatchProcess, scoped_config, write_config

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "hooks" / "virthotplug"  # what libvirtd runs: the stub that cannot fail
PROGRAM = ROOT / "hooks" / "qemu"  # the Python hook program it runs
HOOKS_DIR = Path("/etc/libvirt/hooks")
INSTALLED = HOOKS_DIR / "qemu.d" / "virthotplug"
SYSTEM_CONFIG = Path("/etc/virthotplug/virthotplug.conf")
PID_FILES = (Path("/run/libvirtd.pid"), Path("/run/virtqemud.pid"))
RELOAD_PAUSE = 1.0  # libvirtd re-reads its hooks in a thread right after SIGHUP


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


@pytest.fixture
def installed_hook(tmp_path: Path) -> Iterator[Path]:
    """Install the hook for libvirtd; yields the socket path its messages go to."""
    socket_path = tmp_path / "hook.sock"  # where scoped_config puts watch's socket
    saved = Saved()
    try:
        saved.file(INSTALLED)
        saved.file(SYSTEM_CONFIG)
        saved.directory(INSTALLED.parent)
        saved.directory(SYSTEM_CONFIG.parent)
        write_config(SYSTEM_CONFIG, f"[watch]\nhook_socket = {socket_path}\n")
        share = tmp_path / "share" / "virthotplug"  # make install's layout: the package
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
    assert saved.restored(), "the hook or its configuration was left behind"


def hook_record(name: str, operation: str) -> Callable[[Record], bool]:
    return lambda r: (
        r["domain"] == name and r["event"] == "hook" and r["details"]["operation"] == operation
    )


def test_libvirtd_runs_the_hook_and_watch_reconciles(
    installed_hook: Path, tmp_path: Path, make_vm: Callable[..., LabVM]
) -> None:
    config = scoped_config(tmp_path, {})  # hook_socket = tmp_path/hook.sock, as installed
    watch = WatchProcess(config)
    try:
        watch.wait_for(lambda r: r["event"] == "host" and r["details"]["what"] == "connected")
        assert installed_hook.exists(), watch.stderr_tail()
        assert INSTALLED.read_text().startswith("#!/bin/sh\n")  # libvirtd runs the stub
        since = time.monotonic()
        vm = make_vm()
        name = vm.name

        # libvirtd ran the hook for prepare, start and started; watch logged each message.
        for operation in ("prepare", "start", "started"):
            _, record = watch.wait_for(hook_record(name, operation), since=since)
            assert record["uuid"] == vm.dom.UUIDString()
            assert record["host"] == "qemu:///system"
        started_at, _ = watch.wait_for(hook_record(name, "started"), since=since)

        # 'started' asks for a reconcile: one follows with "hook" among its triggers.
        _, reconcile = watch.wait_for(
            lambda r: (
                r["domain"] == name
                and r["event"] == "reconcile"
                and "hook" in r["details"]["trigger"]
            ),
            since=since,
        )
        assert reconcile["uuid"] == vm.dom.UUIDString()
        print(f"hook 'started' message reached watch {started_at - since:.2f} s after start")

        # Destroying the VM runs the stopped and release hooks.
        since = time.monotonic()
        vm.destroy()
        for operation in ("stopped", "release"):
            watch.wait_for(hook_record(name, operation), since=since)
    finally:
        stopped_in = watch.stop()
    assert watch.proc.returncode == 0, watch.stderr_tail()
    assert stopped_in < 2.0
    assert not installed_hook.exists()  # watch removed its socket
