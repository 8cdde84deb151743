"""A policy set on a running domain is an event: METADATA_CHANGE, filtered on virthotplug's
namespace, schedules a reconcile at once (the next resync used to pick it up, up to a
minute later). Metadata of other namespaces (other tools', or virthotplug's own vCPU
history, which has a namespace of its own) is not a reason to reconcile."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from virthotplug.core.events import RECONCILE, Event, MetadataEvent
from virthotplug.daemon.listener import Listener
from virthotplug.host.connection import Connection
from virthotplug.host.domxml import METADATA_KEY, NAMESPACE
from virthotplug.host.libvirt_module import ensure_event_loop

URI = "test:///default"


@pytest.fixture
def subscribed() -> Iterator[tuple[Connection, queue.Queue[Event]]]:
    ensure_event_loop()
    events: queue.Queue[Event] = queue.Queue()
    conn = Connection(URI).open()
    conn.subscribe(Listener(URI, events.put, lambda: None))
    yield conn, events
    conn.close()


def _wait(events: queue.Queue[Event], kind: type, timeout: float = 5.0) -> list[Any]:
    deadline, found = time.monotonic() + timeout, []
    while time.monotonic() < deadline and not found:
        try:
            ev = events.get(timeout=0.05)
        except queue.Empty:
            continue
        if isinstance(ev, kind):
            found.append(ev)
    return found


def _set(conn: Connection, namespace: str, key: str, xml: str) -> None:
    dom = conn.raw.lookupByName("test")
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
    threading.Thread(
        target=dom.setMetadata,
        args=(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, namespace, flags),
    ).start()


def test_our_policy_written_on_a_running_domain_asks_for_a_reconcile(
    subscribed: tuple[Connection, queue.Queue[Event]],
) -> None:
    conn, events = subscribed
    _set(conn, NAMESPACE, METADATA_KEY, "<policy mode='online'/>")
    (ev,) = _wait(events, MetadataEvent)
    assert ev.domain.name == "test" and ev.intent == RECONCILE
    assert ev.details() == {"type": "element", "namespace": NAMESPACE}


def test_metadata_of_another_namespace_is_not_even_recorded(
    subscribed: tuple[Connection, queue.Queue[Event]],
) -> None:
    # Other tools may rewrite their metadata often: not worth a record, a log line, a job.
    conn, events = subscribed
    _set(conn, "http://example.org/other/1.0", "other", "<thing/>")
    _set(conn, NAMESPACE, METADATA_KEY, "<policy mode='report'/>")
    found = _wait(events, MetadataEvent)
    assert [ev.details()["namespace"] for ev in found] == [NAMESPACE]
