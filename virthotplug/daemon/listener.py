"""Turns libvirt callbacks into event records and hands them on. Nothing else.

Callbacks run on libvirt's event-loop thread: they must not block or call libvirt (beyond
the local ``name()``/``UUIDString()`` getters), so each one builds a small immutable record
and enqueues it. A failure inside a callback is logged, never raised into libvirt.

Events a guest can trigger at will (QEMU monitor events, guest agent lifecycle) first pass
a ``FloodGuard`` when one is given: before anything is parsed, each is counted per domain,
and only a few per domain and second become records; the rest are counted into one summary
record. A domain that floods its monitor events is handed to ``on_flood``, which must only
schedule the removal of its registrations (never deregister on this thread); it may wait a
moment for that removal to be sent, the one wait allowed here (see
``MonitorSubscriptions.drop_now``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from virthotplug.core.events import (
    CLOSE_REASONS,
    AgentEvent,
    DeviceDeletedMonitorEvent,
    DeviceRemovalEvent,
    DomainRef,
    Event,
    HostEvent,
    LifecycleEvent,
    MetadataEvent,
    OstMonitorEvent,
    VcpuRemovedEvent,
)
from virthotplug.core.ost import EventDataError, parse_device_deleted, parse_ost_details
from virthotplug.daemon.flood import FloodEvent, FloodGuard, Verdict
from virthotplug.host.domxml import NAMESPACE
from virthotplug.host.libvirt_types import VirDomain

METADATA_ELEMENT = 2  # VIR_DOMAIN_METADATA_ELEMENT

log = logging.getLogger(__name__)


class Listener:
    """An ``EventSink`` for one connection to ``host``."""

    def __init__(
        self,
        host: str,
        enqueue: Callable[[Event], None],
        on_lost: Callable[[], None],
        *,
        guard: Optional[FloodGuard] = None,
        on_flood: Callable[[DomainRef], None] = lambda _ref: None,
    ) -> None:
        self.host = host
        self._enqueue = enqueue
        self._on_lost = on_lost
        self._guard = guard
        self._on_flood = on_flood

    def on_lifecycle(self, dom: VirDomain, event: int, detail: int) -> None:
        self._put(lambda: LifecycleEvent(self._ref(dom), event=event, detail=detail))

    def on_agent(self, dom: VirDomain, state: int, reason: int) -> None:
        if self._admit(dom, AgentEvent.kind, monitor=False):
            self._put(lambda: AgentEvent(self._ref(dom), state=state, reason=reason))

    def on_metadata(self, dom: VirDomain, mtype: int, namespace: Any) -> None:
        # Only our policy element: other tools' metadata, and our own vCPU history (a
        # namespace of its own), are neither news nor a reason to reconcile.
        if mtype == METADATA_ELEMENT and namespace == NAMESPACE:
            self._put(
                lambda: MetadataEvent(self._ref(dom), mtype=mtype, namespace=NAMESPACE, ours=True)
            )

    def on_device_removed(self, dom: VirDomain, alias: str, failed: bool) -> None:
        self._put(lambda: DeviceRemovalEvent(self._ref(dom), alias=str(alias), failed=failed))

    def on_vcpu_removed(self, dom: VirDomain, vcpu: int) -> None:
        self._put(lambda: VcpuRemovedEvent(self._ref(dom), vcpu=_vcpu_id(vcpu)))

    def on_monitor(
        self, dom: VirDomain, event: str, details: Any, emitted: Optional[float] = None
    ) -> None:
        known = _MONITOR_RECORDS.get(event)
        if known is not None and self._admit(dom, known[0], monitor=True, emitted=emitted):
            self._put(lambda: known[1](self._ref(dom), details))

    def on_close(self, reason: int) -> None:
        why = CLOSE_REASONS.get(reason, str(reason))
        self._put(lambda: HostEvent(None, host=self.host, what="lost", reason=why))
        self._on_lost()

    def _admit(
        self, dom: VirDomain, kind: str, *, monitor: bool, emitted: Optional[float] = None
    ) -> bool:
        """Whether this event becomes a record (see the module doc); cheap, never raises."""
        guard = self._guard
        if guard is None:
            return True
        try:
            key = (self.host, dom.UUIDString())
            verdict = guard.admit(key, dom.name, kind, monitor=monitor, emitted=emitted)
            if verdict is Verdict.FLOOD:
                ref = self._ref(dom)
                self._on_flood(ref)
                self._put(lambda: FloodEvent(ref, info=guard.suppressed(ref.key)))
        except Exception:
            log.exception("%s: flood accounting failed", self.host)
            return True
        return verdict is Verdict.PASS

    def _ref(self, dom: VirDomain) -> DomainRef:
        return DomainRef(self.host, dom.UUIDString(), dom.name())

    def _put(self, build: Callable[[], Event]) -> None:
        try:
            self._enqueue(build())
        except Exception:
            log.exception("%s: dropping an event that could not be recorded", self.host)


def _vcpu_id(value: Any) -> int:
    """The event's vCPU id as an int; -1 for anything else (never raised into libvirt)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


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


# QEMU event name -> (record kind, record builder)
_MONITOR_RECORDS: dict[str, tuple[str, Callable[[DomainRef, Any], Event]]] = {
    "ACPI_DEVICE_OST": (OstMonitorEvent.kind, _ost_record),
    "DEVICE_DELETED": (DeviceDeletedMonitorEvent.kind, _deleted_record),
}
