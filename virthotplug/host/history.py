"""The domain's vCPU history: what the host does not keep, kept in the live definition.

libvirt forgets that an unplug timed out, QEMU's eject reports go nowhere, and nobody notes a
hot-add the guest did not take; yet telling these apart is the difference between "restart
the domain" and "nothing is wrong here". ``setvcpus`` and ``watch`` record what they see in a
metadata element of the running definition (``domxml.HISTORY_NAMESPACE``; never the
persistent one, so the record ends with the domain run), and every command reads it back.

Writing it never taints the domain (``virDomainSetMetadata`` is a first-class API) and never
touches the policy element, so a METADATA_CHANGE subscription filtered on the policy
namespace ignores it. A failed write is logged and otherwise ignored: the record is a help,
never a reason for a command to fail.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core.config import HostConfig
from virthotplug.core.cpulist import MAX_CPU_ID
from virthotplug.core.policy import MODE_IGNORE, Policy, merge_policy
from virthotplug.core.view import (
    HISTORY_EJECTED,
    HISTORY_KINDS,
    HISTORY_PLUGGED,
    History,
    HistoryEntry,
    QemuCpus,
)
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import (
    HISTORY_KEY,
    HISTORY_NAMESPACE,
    DomainXML,
    RawHistory,
    history_element,
    parse_domain_xml,
    parse_history_element,
)

if TYPE_CHECKING:  # the events are the daemon's: status and check need not import them
    from virthotplug.core.events import Event

log = logging.getLogger(__name__)

SOURCE_OST = "ost"
SOURCE_DEVICE_DELETED = "device-deleted"
_PERIPHERAL = "/machine/peripheral/vcpu"
_MAX_COUNT = 1_000_000


# --- what findings depend on besides the layers ------------------------------------------


@dataclass(frozen=True)
class DomainContext:
    """One domain's effective policy (None: unknown or invalid), its history, and whether
    the guest may still be catching up (findings that depend on it are then at most
    warnings)."""

    policy: Optional[Policy] = None
    history: History = field(default_factory=History)
    settling: bool = False
    qemu: Optional[QemuCpus] = None  # asked of QEMU (status --qemu-monitor: taints)

    @property
    def queries_agent(self) -> bool:
        """'ignore' leaves the domain alone: its guest agent is never asked."""
        return self.policy is None or self.policy.mode != MODE_IGNORE


# (domain, the definition read, active?, the live definition when already read)
ContextFn = Callable[[Domain, DomainXML, bool, Optional[DomainXML]], DomainContext]


def contexts(
    config: Optional[HostConfig],
    *,
    policy: Optional[Policy] = None,
    settling: bool = False,
    qemu_monitor: bool = False,
) -> ContextFn:
    """A ``collect`` hook: each domain's context from the definition it has read.

    ``definition`` is what collect read (the persistent definition of a persistent domain,
    the live one of a transient domain), and ``live`` the live definition when collect read
    it; else, for a running domain, this reads it (its metadata holds the live policy and
    the history).
    ``policy``: the caller already resolved it (a reconcile); else it is resolved from the
    metadata and ``config`` like ``policysource`` does. ``qemu_monitor``: also ask QEMU
    itself for its vCPUs, which taints every running domain asked (``status`` only).
    """

    def context(
        dom: Domain, definition: DomainXML, active: bool, live: Optional[DomainXML] = None
    ) -> DomainContext:
        if live is None and active and definition.domain_id is not None:
            live = definition
        if active and live is None:
            try:
                live = parse_domain_xml(dom.xml(inactive=False), domain=dom.name)
            except (errors.NoDomainError, errors.ConfigError):
                live = None
        history = from_raw(live.history) if live is not None else History()
        resolved = policy if policy is not None else _policy(config, dom, definition, live)
        qemu = _ask_qemu(dom) if qemu_monitor and active else None
        return DomainContext(resolved, history, settling, qemu)

    return context


def _ask_qemu(dom: Domain) -> Optional[QemuCpus]:
    from virthotplug.host.qemu_monitor import hotpluggable_cpus

    try:
        return hotpluggable_cpus(dom)
    except errors.VirtHotplugError as exc:
        log.warning("%s: QEMU monitor not asked: %s", dom.context, exc)
        return None


def _policy(
    config: Optional[HostConfig], dom: Domain, definition: DomainXML, live: Optional[DomainXML]
) -> Optional[Policy]:
    from virthotplug.host.policysource import SOURCE_LIVE, SOURCE_PERSISTENT

    layers = list(config.policy_layers(dom.name, dom.uuid)) if config is not None else []
    if live is not None and live.policy is not None:
        layers.insert(0, (SOURCE_LIVE, live.policy))
    elif definition.domain_id is None and definition.policy is not None:
        layers.insert(0, (SOURCE_PERSISTENT, definition.policy))
    try:
        return merge_policy(layers, domain=dom.name).policy
    except errors.ConfigError:
        return None  # an invalid policy changes nothing; 'policy DOMAIN' reports it


# --- raw element <-> History --------------------------------------------------------------


def from_raw(raw: Optional[RawHistory]) -> History:
    """Validate the raw element; entries that do not parse are dropped (anyone with write
    access to the domain can write metadata: it is input, not truth)."""
    if raw is None:
        return History()
    entries = [e for e in (_entry(attrs) for attrs in raw.entries) if e is not None]
    history = History(
        plugged=_count(raw.attributes.get("plugged")) or 0,
        initial=_count(raw.attributes.get("initial")),
    )
    for entry in entries:
        history = _keep(history, entry)
    return history


def _keep(history: History, entry: HistoryEntry) -> History:
    """Add without counting a plug again (``plugged`` is read back as written)."""
    added = history.add(entry)
    return History(added.entries, history.plugged, history.initial)


def to_raw(history: History) -> RawHistory:
    attributes = {"plugged": str(history.plugged)}
    if history.initial is not None:
        attributes["initial"] = str(history.initial)
    entries = tuple(
        {"kind": e.kind, "vcpu": str(e.vcpu), "time": f"{e.time:.3f}", "source": e.source}
        for e in history.entries
    )
    return RawHistory(attributes=attributes, entries=entries)


def _count(text: Optional[str]) -> Optional[int]:
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 7:
        return None
    value = int(text)
    return value if value <= _MAX_COUNT else None


def _entry(attrs: Mapping[str, str]) -> Optional[HistoryEntry]:
    kind, vcpu, at = attrs.get("kind"), _count(attrs.get("vcpu")), attrs.get("time", "")
    if kind not in HISTORY_KINDS or vcpu is None or vcpu > MAX_CPU_ID:
        return None
    try:
        seconds = float(at)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    source = attrs.get("source", "")[:32]
    return HistoryEntry(str(kind), vcpu, seconds, source)


# --- reading and writing ------------------------------------------------------------------


def read(dom: Domain) -> History:
    """The running domain's history; empty when there is none or it cannot be read."""
    try:
        text = dom.metadata(HISTORY_NAMESPACE, live=True)
    except errors.VirtHotplugError as exc:
        log.debug("%s: history not read: %s", dom.context, exc)
        return History()
    if text is None:
        return History()
    try:
        return from_raw(parse_history_element(text, domain=dom.name))
    except errors.VirtHotplugError as exc:
        log.warning("%s: ignoring unreadable vCPU history: %s", dom.context, exc)
        return History()


def write(dom: Domain, history: History) -> bool:
    """Replace the running domain's history; False (logged) when libvirt refused."""
    try:
        dom.set_metadata(
            history_element(to_raw(history)),
            HISTORY_KEY,
            HISTORY_NAMESPACE,
            live=True,
            config=False,
        )
    except errors.VirtHotplugError as exc:
        log.warning("%s: vCPU history not recorded: %s", dom.context, exc)
        return False
    return True


def update(dom: Domain, change: Callable[[History], History]) -> History:
    """Read, change, and write back only when something changed."""
    before = read(dom)
    after = change(before)
    if after != before:
        write(dom, after)
    return after


def record(dom: Domain, entries: Iterable[HistoryEntry], *, live_count: Optional[int]) -> History:
    """Add ``entries`` (repeats are dropped); ``live_count``, the live vCPU count now, starts
    a new record's count."""
    todo = list(entries)

    def change(history: History) -> History:
        initial = initial_count(history, live_count, todo)
        if initial is not None:
            history = history.with_initial(initial)
        for entry in todo:
            history = history.add(entry)
        return history

    return update(dom, change)


# --- what QEMU's events say ---------------------------------------------------------------


def entries_from_events(events: Sequence[Event]) -> list[HistoryEntry]:
    """History entries for the monitor events of one domain, in order (``EventHistory``)."""
    reader = EventHistory()
    return [entry for ev in events for entry in reader.entries(ev)]


class EventHistory:
    """Turns one domain's QEMU monitor events, in order, into history entries.

    - OST device check (source 1) success for ``vcpuN``: QEMU plugged vcpuN (the guest's
      ACPI accepted it; whether the guest lists a CPU is another question).
    - OST eject request (source 3) success for ``vcpuN``: the guest ejected it. Linux sends
      the final report without a ``device`` field; it belongs to the vCPU of the eject
      report (status 0x84, in progress) just before it.
    - DEVICE_DELETED for exactly ``/machine/peripheral/vcpuN``: QEMU removed vcpuN. Never a
      sub-path such as ``…/vcpuN/lapic``, which QEMU sends under TCG
      although the vCPU itself is never finalized.
    """

    def __init__(self) -> None:
        self._ejecting: Optional[int] = None

    def entries(self, ev: Event) -> list[HistoryEntry]:
        from virthotplug.core.events import DeviceDeletedMonitorEvent, OstMonitorEvent
        from virthotplug.core.ost import SOURCE_DEVICE_CHECK, SOURCE_EJECT_REQUEST, STATUS_SUCCESS

        if isinstance(ev, OstMonitorEvent) and ev.ost is not None and ev.ost.is_cpu:
            ost = ev.ost
            vcpu = ost.vcpu_id
            if ost.source == SOURCE_EJECT_REQUEST:
                vcpu = vcpu if vcpu is not None else self._ejecting
                self._ejecting = vcpu
                if ost.status == STATUS_SUCCESS and vcpu is not None:
                    self._ejecting = None
                    return [HistoryEntry(HISTORY_EJECTED, vcpu, ev.at, SOURCE_OST)]
            elif (ost.source, ost.status) == (
                SOURCE_DEVICE_CHECK,
                STATUS_SUCCESS,
            ) and vcpu is not None:
                return [HistoryEntry(HISTORY_PLUGGED, vcpu, ev.at, SOURCE_OST)]
        elif isinstance(ev, DeviceDeletedMonitorEvent) and ev.deleted is not None:
            vcpu = deleted_vcpu(ev.deleted.path)
            if vcpu is not None:
                return [HistoryEntry(HISTORY_EJECTED, vcpu, ev.at, SOURCE_DEVICE_DELETED)]
        return []


def initial_count(
    history: History, live_now: Optional[int], new: Sequence[HistoryEntry]
) -> Optional[int]:
    """The live count a record that starts now began with: today's minus the plugs in it."""
    if history.initial is not None or live_now is None:
        return live_now
    # libvirt may still count an ejected vCPU (a stale one): ejects are not added back.
    plugged = sum(1 for e in new if e.kind == HISTORY_PLUGGED)
    return max(1, live_now - plugged)


def deleted_vcpu(path: str) -> Optional[int]:
    """``/machine/peripheral/vcpu3`` -> 3; None for anything else, sub-paths included."""
    if not path.startswith(_PERIPHERAL):
        return None
    digits = path[len(_PERIPHERAL) :]
    if not digits.isascii() or not digits.isdigit() or len(digits) > 5:
        return None
    if digits != "0" and digits.startswith("0"):
        return None
    vcpu = int(digits)
    return vcpu if vcpu <= MAX_CPU_ID else None


def now() -> float:
    return time.time()
