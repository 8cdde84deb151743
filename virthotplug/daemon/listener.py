"""Turns libvirt callbacks into event records and hands them on. Nothing else.

Callbacks run on libvirt's event-loop thread: they must not block or call libvirt (beyond
the local ``name()``/``UUIDString()`` getters), so each one builds a small immutable record
and enqueues it. A failure inside a callback is logged, never raised into libvirt.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from virthotplug.core.events import (
    CLOSE_REASONS,
    AgentEvent,
    DeviceDeletedMonitorEvent,
    DeviceRemovalEvent,
    DomainRef,
    Event,
    HostEvent,
    LifecycleEvent,
    OstMonitorEvent,
)
from virthotplug.core.ost import EventDataError, parse_device_deleted, parse_ost_details
from virthotplug.host.libvirt_types import VirDomain

log = logging.getLogger(__name__)


class Listener:
    """An ``EventSink`` for one connection to ``host``."""

    def __init__(
        self, host: str, enqueue: Callable[[Event], None], on_lost: Callable[[], None]
    ) -> None:
        self.host = host
        self._enqueue = enqueue
        self._on_lost = on_lost

    def on_lifecycle(self, dom: VirDomain, event: int, detail: int) -> None:
        self._put(lambda: LifecycleEvent(self._ref(dom), event=event, detail=detail))

    def on_agent(self, dom: VirDomain, state: int, reason: int) -> None:
        self._put(lambda: AgentEvent(self._ref(dom), state=state, reason=reason))

    def on_device_removed(self, dom: VirDomain, alias: str, failed: bool) -> None:
        self._put(lambda: DeviceRemovalEvent(self._ref(dom), alias=str(alias), failed=failed))

    def on_monitor(self, dom: VirDomain, event: str, details: Any) -> None:
        if event == "ACPI_DEVICE_OST":
            self._put(lambda: _ost_record(self._ref(dom), details))
        elif event == "DEVICE_DELETED":
            self._put(lambda: _deleted_record(self._ref(dom), details))

    def on_close(self, reason: int) -> None:
        why = CLOSE_REASONS.get(reason, str(reason))
        self._put(lambda: HostEvent(None, host=self.host, what="lost", reason=why))
        self._on_lost()

    def _ref(self, dom: VirDomain) -> DomainRef:
        return DomainRef(self.host, dom.UUIDString(), dom.name())

    def _put(self, build: Callable[[], Event]) -> None:
        try:
            self._enqueue(build())
        except Exception:
            log.exception("%s: dropping an event that could not be recorded", self.host)


def _ost_record(ref: DomainRef, details: Any) -> OstMonitorEvent:
    # details arrive as a JSON string from a monitor the guest can influence: untrusted.
    try:
        return OstMonitorEvent(ref, ost=parse_ost_details(details))
    except EventDataError as exc:
        return OstMonitorEvent(ref, error=str(exc))


def _deleted_record(ref: DomainRef, details: Any) -> DeviceDeletedMonitorEvent:
    try:
        return DeviceDeletedMonitorEvent(ref, deleted=parse_device_deleted(details))
    except EventDataError as exc:
        return DeviceDeletedMonitorEvent(ref, error=str(exc))
