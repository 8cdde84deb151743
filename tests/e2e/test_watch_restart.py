"""``watch`` survives a libvirtd restart: reconnects, re-registers, resyncs, keeps acting."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import Lab
from watchproc import WatchProcess, for_domain, host_event, scoped_config


@pytest.fixture
def watch_proc(tmp_path: Path) -> Iterator[list[WatchProcess]]:
    procs: list[WatchProcess] = []
    yield procs
    for proc in procs:
        assert proc.stop() < 2.0
        assert proc.proc.returncode == 0, proc.stderr_tail()


def test_hotadds_during_and_after_a_libvirtd_restart_are_handled(
    lab: Lab, make_vm, watch_proc: list[WatchProcess], tmp_path: Path
) -> None:
    vm = make_vm()
    vm.wait_agent()
    watch = WatchProcess(scoped_config(tmp_path, {vm.name: "mode = online"}))
    watch_proc.append(watch)
    watch.wait_for(host_event("connected"))

    restarted = time.monotonic()
    lab.restart_libvirtd()  # the daemon's connection dies with it; the lab reconnects
    # A hot-add right away lands in the gap: before the daemon has reconnected, or while
    # it re-registers. Either way it must be found (resync) and handled.
    vm.hot_add(2)
    watch.wait_for(host_event("lost"), since=restarted)
    watch.wait_for(host_event("connected"), since=restarted, timeout=60)
    vm.wait_cpu_state(lambda s: 1 in s.online, timeout=30)

    # After the reconnect the monitor events are registered again: a hot-add is seen live.
    since = time.monotonic()
    vm.hot_add(3)
    arrived, _ = watch.wait_for(for_domain(vm.name, "ost", source=1, status=0), since=since)
    assert arrived - since < 1.0
    vm.wait_cpu_state(lambda s: 2 in s.online, timeout=15)
    assert vm.taints() == []
