"""One watch per host: a second ``watch`` for the same host refuses to start with one line
and a non-zero exit status, instead of running without the hook socket and acting on the
same domains. The lock lives in the run directory ($VIRTHOTPLUG_RUN_DIR here, never the
host's /run/virthotplug)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tdriver import node_uri

URI = "test:///default"


def _env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    env["VIRTHOTPLUG_RUN_DIR"] = str(run_dir)
    return env


def _command(uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "virthotplug", "-c", uri, "watch", "--no-hook-socket", *extra]


def _start(uri: str, run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        _command(uri, "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(run_dir),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # connected: the lock is held by then
        if json.loads(line).get("event") == "host":
            return proc
        assert time.monotonic() < deadline
    raise AssertionError("watch ended before connecting")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)  # generous: the machine may be loaded


def test_a_second_watch_for_the_same_host_refuses(tmp_path: Path) -> None:
    first = _start(URI, tmp_path)
    try:
        started = time.monotonic()
        second = subprocess.run(
            _command(URI), capture_output=True, text=True, env=_env(tmp_path), timeout=30
        )
        took = time.monotonic() - started
    finally:
        _stop(first)
    print(f"second watch: exit {second.returncode} after {took:.2f} s: {second.stderr.strip()}")
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("virthotplug: error: ")
    assert f"another watch (pid {first.pid}) already watches {URI}" in lines[0]
    assert str(tmp_path) in lines[0]


def test_other_hosts_and_a_later_watch_are_free(tmp_path: Path) -> None:
    first = _start(URI, tmp_path)
    try:
        other = _start(node_uri("mixed"), tmp_path)  # another host: its own lock
        _stop(other)
    finally:
        _stop(first)
    assert first.returncode == 0
    again = _start(URI, tmp_path)  # the lock went with the first process
    _stop(again)
    assert again.returncode == 0, again.returncode


def test_the_bulk_read_skips_domains_out_of_scope() -> None:
    from virthotplug.host import collect
    from virthotplug.host.connection import Connection

    with Connection(node_uri("mixed")) as conn:
        cache = collect.DefinitionCache(max_age=60.0)
        read = collect.read_running(
            conn, cache, workers=1, include=lambda name, _uuid: name == "hotplug-agent"
        )
    assert [raw.view.name for raw in read.raws] == ["hotplug-agent"]
    assert read.definition_reads <= 2  # that domain's definitions only
