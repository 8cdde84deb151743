"""The history's since-start mark counts only while the watch that set it runs.

Under TCG the plug that makes QEMU's vCPU thread number maximum+1 aborts QEMU, so
``setvcpus`` trusts a thread count only from a history complete since QEMU's start: one a
running ``watch`` vouches for. Once that watch stops (cleanly or killed), plugs by others
go unrecorded: ``status --json`` says ``since_start: false`` and the guard refuses the
plug it cannot prove safe. The test driver has no QEMU monitor, so no watch marks a record
here by itself: the node file carries the mark a watch writes, with the token of the watch
that holds the host's lock (each test-driver connection reads the file afresh).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from tdriver import Result, node_uri, run_module

from virthotplug.core.errors import EXIT_UNSUPPORTED
from virthotplug.host.domxml import HISTORY_NAMESPACE
from virthotplug.host.watchlock import RUN_DIR_ENV, holder

# One running TCG domain, 1 of 4 vCPUs. Its record: it started with 1, vcpu1 was plugged
# and ejected since, so QEMU has made 2 vCPU threads, and a plug makes the 3rd (of 4).
# Without the proof, the slot unplugged may have been cycled unrecorded: refused.
NODE = """<node xmlns:test="http://libvirt.org/schemas/domain/test/1.0">
  <domain type="qemu">
    <name>tcg</name>
    <uuid>3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e21</uuid>
    <metadata>
      <h:history xmlns:h="{namespace}" initial="1" plugged="1"{mark}>
        <h:entry kind="plugged" vcpu="1" time="100.000" source="ost"/>
        <h:entry kind="ejected" vcpu="1" time="200.000" source="ost"/>
      </h:history>
    </metadata>
    <memory unit="MiB">256</memory>
    <vcpu placement="static" current="1">4</vcpu>
    <os><type arch="x86_64">hvm</type></os>
  </domain>
</node>
"""


class Host:
    """A test-driver host in a node file of the test's own, and a run directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.node = tmp_path / "node.xml"
        self.uri = node_uri(self.node)
        self.run_dir = tmp_path / "run"
        self.env = {RUN_DIR_ENV: str(self.run_dir)}
        self.mark(None)

    def mark(self, token: Optional[str]) -> None:
        """The record as a watch whose run has ``token`` marks it (None: unmarked)."""
        mark = f' since-start="yes" vouched-by="{token}"' if token is not None else ""
        self.node.write_text(NODE.format(namespace=HISTORY_NAMESPACE, mark=mark))

    def watch(self) -> subprocess.Popen[str]:
        """A watch of the host, once it holds the host's lock."""
        env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
        command = ["-c", self.uri, "watch", "--json", "--no-hook-socket"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "virthotplug", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**env, **self.env},
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # connected: the lock is held by then
            if json.loads(line).get("event") == "host":
                return proc
        raise AssertionError("watch ended before connecting")

    def token(self) -> str:
        owner = holder(self.uri, str(self.run_dir))
        assert owner is not None
        return owner.token

    def history(self) -> Any:
        done = run_module("-c", self.uri, "status", "--json", "tcg", env=self.env)
        assert done.status == 0, done.err
        return done.json()["domains"][0]["history"]

    def grow(self) -> Result:
        argv = ("-c", self.uri, "setvcpus", "tcg", "2", "--live", "--timeout", "0.5")
        return run_module(*argv, env=self.env)


def _stop(proc: subprocess.Popen[str], sig: int) -> None:
    proc.send_signal(sig)
    proc.wait(30)  # generous: the machine may be loaded


def test_a_watchs_mark_counts_until_it_stops(tmp_path: Path) -> None:
    host = Host(tmp_path)
    proc = host.watch()
    try:
        host.mark(host.token())
        assert host.history()["since_start"] is True
        grown = host.grow()  # proven: 2 made, the plug makes the 3rd (no agent: exit 11)
        assert grown.status != EXIT_UNSUPPORTED and "refusing" not in grown.err, grown.err
    finally:
        _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0
    assert host.history()["since_start"] is False
    refused = host.grow()
    assert refused.status == EXIT_UNSUPPORTED, refused.err
    assert "how many it has created is not known" in refused.err
    assert "--force" in refused.err


def test_a_killed_watchs_mark_and_another_runs_count_for_nothing(tmp_path: Path) -> None:
    host = Host(tmp_path)
    first = host.watch()
    killed = host.token()
    host.mark(killed)
    _stop(first, signal.SIGKILL)  # no orderly stop: nothing took the mark off
    assert host.history()["since_start"] is False
    later = host.watch()
    try:
        assert host.token() != killed
        assert host.history()["since_start"] is False  # the record names the killed run
        assert host.grow().status == EXIT_UNSUPPORTED
    finally:
        _stop(later, signal.SIGTERM)


def test_no_watch_in_sight_vouches_for_nothing(tmp_path: Path) -> None:
    host = Host(tmp_path)
    proc = host.watch()
    try:
        host.mark(host.token())
        assert host.history()["since_start"] is True
        host.env[RUN_DIR_ENV] = str(tmp_path / "elsewhere")  # as another host sees it
        assert host.history()["since_start"] is False
        assert host.grow().status == EXIT_UNSUPPORTED
    finally:
        _stop(proc, signal.SIGTERM)


def test_an_orderly_stop_takes_the_mark_off_what_the_watch_vouched_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virthotplug.core.config import HostConfig, WatchSettings
    from virthotplug.daemon.jobs import JobRunner
    from virthotplug.daemon.lock import HostLocks
    from virthotplug.host import history
    from virthotplug.host.connection import Connection

    host = Host(tmp_path)
    monkeypatch.setenv(RUN_DIR_ENV, str(host.run_dir))
    with HostLocks() as locks, Connection(host.uri) as conn:
        locks.acquire([conn.uri])
        runner = JobRunner(HostConfig(), WatchSettings(), voucher=locks.token)
        dom = conn.lookup("tcg")
        begun = history.started(dom, 1, time.time(), locks.token)
        assert begun is not None and begun.since_start  # as a job that saw the start
        runner.domains.record((conn.uri, dom.uuid)).jobs.since_start = True
        runner.withdraw({conn.uri: conn})
        stored = dom.metadata(HISTORY_NAMESPACE, live=True) or ""
        assert "initial=" in stored and "since-start" not in stored and "vouched-by" not in stored
