"""Per-domain QEMU monitor registrations against the real libvirt library (test driver): a
driver without monitor events registers none and says so, and the daemon's registration
thread takes that without an error; the domain events still work."""

from __future__ import annotations

import time

from tdriver import MIXED

from virthotplug.daemon.flood import FloodGuard
from virthotplug.daemon.listener import Listener
from virthotplug.daemon.subscriptions import HANDOFF_WAIT, MonitorSubscriptions
from virthotplug.host.connection import Connection
from virthotplug.host.libvirt_module import ensure_event_loop


def test_a_driver_without_monitor_events_registers_none() -> None:
    ensure_event_loop()
    with Connection(MIXED) as conn:
        running = conn.list_running()
        assert running
        conn.subscribe(Listener(conn.uri, lambda _ev: None, lambda: None), monitor=running)
        assert conn.monitored() == frozenset()
        assert conn.monitor_domain(running[0]) is False
        assert conn.unmonitor_domain(running[0].uuid) is False
        subs = MonitorSubscriptions(conn.uri, lambda: conn, FloodGuard())
        subs.start()
        subs.sync(d.uuid for d in running)
        subs.add(running[0].uuid)
        subs.drop(running[0].uuid)
        subs.stop()
        subs._thread.join(5)
        assert not subs._thread.is_alive()
        assert conn.monitored() == frozenset()


def test_the_registration_thread_survives_a_missing_connection() -> None:
    subs = MonitorSubscriptions("test:///default", lambda: None, FloodGuard())
    subs.start()
    subs.add("00000000-0000-0000-0000-000000000000")
    subs.stop()
    deadline = time.monotonic() + 5
    while subs._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not subs._thread.is_alive()


def test_drop_now_returns_once_the_removal_is_under_way() -> None:
    with Connection(MIXED) as conn:
        subs = MonitorSubscriptions(conn.uri, lambda: conn, FloodGuard())
        started = time.monotonic()
        subs.drop_now("00000000-0000-0000-0000-000000000000")  # no thread yet: it waits
        waited = time.monotonic() - started
        subs.start()
        started = time.monotonic()
        subs.drop_now("00000000-0000-0000-0000-000000000000")
        handed_over = time.monotonic() - started
        subs.stop()
        subs._thread.join(5)
    assert waited >= HANDOFF_WAIT * 0.9  # bounded: the event thread is never held long
    assert handed_over < HANDOFF_WAIT / 2
