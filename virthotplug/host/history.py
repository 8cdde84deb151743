"""The domain's vCPU history: what the host does not keep, kept in the live definition.

libvirt forgets that an unplug timed out, QEMU's eject reports go nowhere, and nobody notes a
hot-add the guest did not take; yet telling these apart is the difference between "restart
the domain" and "nothing is wrong here". ``setvcpus`` and ``watch`` record what they see in a
metadata element of the running definition (``domxml.HISTORY_NAMESPACE``; never the
persistent one, so the record ends with the domain run), and every command reads it back.

The mark that the record is complete since QEMU's start (``History.since_start``: the TCG
thread count is proven) names the ``watch`` run that keeps it, by the token in that watch's
lock file (``host.watchlock``). It counts only while that watch holds the host's lock: once
it stops (cleanly, killed, crashed), plugs made by others go unrecorded, so every read takes
a mark whose watch is gone, or that cannot be seen from here (another host's run directory),
as no mark at all. A reader never writes for that; the next write drops it.

Writing it never taints the domain (``virDomainSetMetadata`` is a first-class API) and never
touches the policy element, so a METADATA_CHANGE subscription filtered on the policy
namespace ignores it. A failed write is logged and otherwise ignored: the record is a help,
never a reason for a command to fail.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core.config import HostConfig
from virthotplug.core.cpulist import MAX_CPU_ID
from virthotplug.core.policy import MODE_IGNORE, Policy, merge_policy
from virthotplug.core.report import printable
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
from virthotplug.host.watchlock import vouches

log = logging.getLogger(__name__)

_MAX_COUNT = 1_000_000
MAX_SOURCE_CHARS = 32
MAX_TIME_CHARS = 32  # Unix seconds as written ("1764581234.512"), with room
WRITE_ATTEMPTS = 3  # read-merge-write rounds when another writer got in between
# The record began when QEMU started and nothing was missed since (``History.since_start``),
# as the watch run whose token is in ``VOUCHED_BY`` says while it runs.
SINCE_START = "since-start"
VOUCHED_BY = "vouched-by"
# When this host refused a repeated unplug request of the domain (Unix seconds, observed).
REPEAT_REFUSED = "repeat-refused"


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
        history = from_raw(live.history, uri=dom.uri) if live is not None else History()
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


def from_raw(raw: Optional[RawHistory], *, uri: Optional[str]) -> History:
    """Validate the raw element of a domain of the host ``uri``; entries that do not parse
    are dropped (anyone with write access to the domain can write metadata: it is input,
    not truth), and so is a since-start mark no running watch of that host vouches for
    (``uri`` None: nobody can)."""
    if raw is None:
        return History()
    entries = [e for e in (_entry(attrs) for attrs in raw.entries) if e is not None]
    voucher = _voucher(raw.attributes, uri)
    history = History(
        plugged=_count(raw.attributes.get("plugged")) or 0,
        initial=_count(raw.attributes.get("initial")),
        since_start=bool(voucher),
        voucher=voucher,
        repeat_refused=_time(raw.attributes.get(REPEAT_REFUSED)),
    )
    for entry in entries:
        history = _keep(history, entry)
    return history


def _voucher(attributes: Mapping[str, str], uri: Optional[str]) -> str:
    """The token of the watch that vouches for the mark, if it still runs; else ""."""
    if attributes.get(SINCE_START) != "yes":
        return ""
    token = attributes.get(VOUCHED_BY, "")
    return token if vouches(uri, token) else ""


def _keep(history: History, entry: HistoryEntry) -> History:
    """Add without counting a plug again (``plugged`` is read back as written)."""
    return dataclasses.replace(history.add(entry), plugged=history.plugged)


def to_raw(history: History) -> RawHistory:
    attributes = {"plugged": str(history.plugged)}
    if history.initial is not None:
        attributes["initial"] = str(history.initial)
    if history.since_start and history.voucher:  # a mark nobody vouches for is none
        attributes[SINCE_START] = "yes"
        attributes[VOUCHED_BY] = history.voucher
    if history.repeat_refused is not None:
        attributes[REPEAT_REFUSED] = f"{history.repeat_refused:.3f}"
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


def _time(text: Optional[str]) -> Optional[float]:
    """Unix seconds as written; None for anything else (metadata is input, not truth)."""
    if text is None or len(text) > MAX_TIME_CHARS:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _entry(attrs: Mapping[str, str]) -> Optional[HistoryEntry]:
    kind, vcpu = attrs.get("kind"), _count(attrs.get("vcpu"))
    if kind not in HISTORY_KINDS or vcpu is None or vcpu > MAX_CPU_ID:
        return None
    seconds = _time(attrs.get("time", ""))
    if seconds is None:
        return None
    # Anyone who can write the domain's metadata wrote this: bounded, and escaped like agent
    # text, before it reaches a terminal or a log line.
    source = printable(attrs.get("source", "")[:MAX_SOURCE_CHARS])
    return HistoryEntry(str(kind), vcpu, seconds, source)


# --- reading and writing ------------------------------------------------------------------


def read(dom: Domain) -> Optional[History]:
    """The running domain's history (empty when it has none); None when it could not be
    read, so that nobody writes over a history they have not seen."""
    try:
        text = dom.metadata(HISTORY_NAMESPACE, live=True)
    except errors.VirtHotplugError as exc:
        log.warning("%s: vCPU history not read: %s", dom.context, exc)
        return None
    if text is None:
        return History()
    try:
        return from_raw(parse_history_element(text, domain=dom.name), uri=dom.uri)
    except errors.VirtHotplugError as exc:
        # Written by someone else and not ours to read: a record of our own replaces it.
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


def update(dom: Domain, change: Callable[[History], History]) -> Optional[History]:
    """Read, change, write back, and read again: another writer (``setvcpus`` beside
    ``watch``) may have written in between, so the change is merged into what is stored
    until the stored history holds it (``WRITE_ATTEMPTS`` rounds). Never writes after a
    failed read; None then, or when libvirt refused the write."""
    stored = read(dom)
    for _ in range(WRITE_ATTEMPTS):
        if stored is None:
            return None
        wanted = change(stored)
        if wanted == stored:
            return stored
        if not write(dom, wanted):
            return None
        stored = read(dom)
        if stored == wanted:
            return stored
        if stored is not None and change(stored) == stored:  # the other writer kept ours
            return stored
    log.warning("%s: vCPU history kept changing under this write: not recorded", dom.context)
    return None


def record(
    dom: Domain,
    entries: Iterable[HistoryEntry],
    *,
    live_count: Optional[int],
    repeat_refused: Optional[float] = None,
) -> Optional[History]:
    """Add ``entries`` (repeats are dropped) to what is stored; ``live_count``, the live vCPU
    count now, starts a new record's count; ``repeat_refused``: when this host was seen to
    refuse a repeated unplug request (kept if later than the one stored). The history as
    stored; None when it could not be read or written."""
    todo = list(entries)

    def change(history: History) -> History:
        initial = initial_count(history, live_count, todo)
        if initial is not None:
            history = history.with_initial(initial)
        for entry in todo:
            history = history.add(entry)
        if repeat_refused is not None and (history.repeat_refused or 0.0) < repeat_refused:
            history = dataclasses.replace(history, repeat_refused=repeat_refused)
        return history

    return update(dom, change)


def started(dom: Domain, live_count: int, since: float, voucher: str) -> Optional[History]:
    """QEMU started afresh at ``since`` (Unix seconds: booted, restored, migrated in) and the
    caller saw it: the record counts from then, marked as complete since the start by the
    watch whose token is ``voucher`` (its lock's; "": not marked). Entries
    from before are about another QEMU process (a restored or migrated record carries them)
    and go; those seen since stay (the job that begins the record may have recorded a
    hot-add already), and the count they began from is ``live_count`` less what they
    plugged, plus what they ejected (a vCPU libvirt still counts after its eject makes
    that one too many: the safe side of a thread budget)."""

    def begin(old: History) -> History:
        kept = tuple(e for e in old.entries if e.time >= since)
        plugged = sum(1 for e in kept if e.kind == HISTORY_PLUGGED)
        ejected = sum(1 for e in kept if e.kind == HISTORY_EJECTED)
        initial = max(1, live_count - plugged + ejected)
        refused = old.repeat_refused
        if refused is not None and refused < since:
            refused = None
        return History(
            kept,
            plugged,
            initial,
            since_start=bool(voucher),
            voucher=voucher,
            repeat_refused=refused,
        )

    return update(dom, begin)


def not_since_start(dom: Domain) -> Optional[History]:
    """The record's mark that nothing was missed since QEMU's start goes: its keeper stopped
    watching (a gap in which plugs may have gone unrecorded)."""
    return update(dom, lambda old: dataclasses.replace(old, since_start=False, voucher=""))


# --- counting ----------------------------------------------------------------------------


def initial_count(
    history: History, live_now: Optional[int], new: Sequence[HistoryEntry]
) -> Optional[int]:
    """The live count a record that starts now began with: today's minus the plugs in it."""
    if history.initial is not None or live_now is None:
        return live_now
    # libvirt may still count an ejected vCPU (a stale one): ejects are not added back.
    plugged = sum(1 for e in new if e.kind == HISTORY_PLUGGED)
    return max(1, live_now - plugged)


def now() -> float:
    return time.time()
