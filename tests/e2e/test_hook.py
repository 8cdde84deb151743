"""The libvirt hook on the lab: libvirtd runs the installed hook for a real VM and
``virthotplug watch`` turns its messages into reconciles.

The hook is installed as users get it (tests/lab/hook_install.py: the /bin/sh entry point
``hooks/virthotplug`` as ``/etc/libvirt/hooks/qemu.d/virthotplug``, running the Python hook
program ``hooks/qemu`` from a ``make install`` layout) only for the test: whatever was there
before is put back afterwards, also when the test fails. The hook learns the test's socket
from ``hook_socket`` in ``/etc/virthotplug/virthotplug.conf``, swapped in and restored the same
way. Nothing in it but ``hook_socket``: another VM starting meanwhile only sends a message
nobody else reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import hook_install
import pytest
from hook_install import INSTALLED
from lab import LabVM
from watchproc import Record, WatchProcess, scoped_config


@pytest.fixture
def installed_hook(tmp_path: Path) -> Iterator[Path]:
    """Install the hook for libvirtd; yields the socket path its messages go to."""
    # scoped_config puts watch's socket at tmp_path/hook.sock.
    with hook_install.installed_hook(tmp_path / "hook.sock", tmp_path) as socket_path:
        yield socket_path


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
