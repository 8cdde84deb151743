"""Record the QEMU-monitor hints (ACPI_DEVICE_OST, DEVICE_DELETED) and libvirt's
vcpu-removed events of one domain while a command runs, for printing them decoded and for
the command's judge. Nothing is decided from them here.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from virthotplug.core.events import (
    DeviceDeletedMonitorEvent,
    Event,
    OstMonitorEvent,
    VcpuRemovedEvent,
)

_KEPT = (OstMonitorEvent, DeviceDeletedMonitorEvent, VcpuRemovedEvent)
_NAMES = {OstMonitorEvent: "ACPI_DEVICE_OST", DeviceDeletedMonitorEvent: "DEVICE_DELETED"}


class MonitorLog:
    """An ``enqueue`` target for ``listener.Listener`` that keeps one domain's monitor events.

    Called on libvirt's event thread: it only filters and appends.
    """

    MAX_EVENTS = 256  # a guest can emit OST reports at will: bound what we keep

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def put(self, event: Event) -> None:
        if not isinstance(event, _KEPT):
            return
        if event.domain is None or event.domain.uuid != self.uuid:
            return
        with self._lock:
            if len(self._events) < self.MAX_EVENTS:
                self._events.append(event)

    def events(self, since: Optional[float] = None) -> list[Event]:
        """Events recorded at or after the monotonic time ``since``."""
        with self._lock:
            return [e for e in self._events if since is None or e.mono >= since]

    def wait_for(self, found: Callable[[Event], bool], since: float, limit: float) -> bool:
        """Wait (at most ``limit`` seconds) for an event at or after ``since`` that
        ``found`` accepts; whether one came."""
        deadline = time.monotonic() + limit
        while True:
            if any(found(e) for e in self.events(since)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def wait_quiet(self, quiet: float, limit: float) -> None:
        """Wait until no event arrived for ``quiet`` seconds (at most ``limit`` seconds), so
        late reports (the eject's final OST) are not cut off."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                last = self._events[-1].mono if self._events else 0.0
            if time.monotonic() - last >= quiet:
                return
            time.sleep(0.05)


def event_name(event: Event) -> str:
    """The name of a logged event (``ACPI_DEVICE_OST``, ``DEVICE_DELETED``, ``vcpu-removed``)."""
    return _NAMES.get(type(event), "vcpu-removed")
