"""What happened to each vCPU of one domain, judged only from what was observed.

Pure: no libvirt, no clock, no I/O. The daemon keeps one ``Observations`` per domain and
fills it from QEMU's monitor events (read by ``core.observed``) and the hot-add hints of its
jobs; ``setvcpus`` fills
one from the events it saw during the command and the requests it made. Both ask ``judge``
with the guest agent's latest answer and libvirt's per-vCPU state, and get a ``Verdict``:
each vCPU's fate, which guest CPUs a hot-add brought and which of them the guest onlined
itself, the hot-adds the guest rejected, when to look again, and the history entries for
what was observed (never for what was not).

Fates (libvirt vCPU ids; the guest numbers its CPUs its own way):

    plugged            QEMU's OST device check said success; the guest has not been asked
    listed             the guest lists the CPU a hot-add brought
    credited           ... and onlined it itself (never our own write)
    rejected           the guest answered and lists no new CPU ``HOTADD_WAIT`` after the OST
    unplug-requested   this tool asked libvirt to unplug it
    ejected            the guest ejected it (OST eject success)
    removed            QEMU or libvirt removed it (DEVICE_DELETED / device removed)
    stale              the guest ejected it, libvirt still counts it

Rules that hold whatever the order of events:

- a CPU the guest listed, or that was onlined after the plug, is never rejected;
- an eject, an unplug request or a removal after a plug is not a hot-add rejection;
- a DEVICE_DELETED or removal of a vCPU after its latest plug, with no unplug of it in
  between, is the late event of the vCPU that had the slot before (QEMU 11.1 sends it only
  when the slot is plugged again): it changes nothing;
- nothing is judged without the observation it needs: no agent answer, no rejection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from virthotplug.core.cpulist import MAX_CPU_ID
from virthotplug.core.view import (
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_TIMEOUT,
    HistoryEntry,
)

# --- the one set of waits ----------------------------------------------------------------

# A guest lists a hot-added CPU well under 0.1 s after its OST device check (lab); one that
# has not HOTADD_WAIT seconds after it never will: it rejected the hot-add.
HOTADD_WAIT = 3.0
# Looks for a hot-added CPU: at once, then ``first`` (hotadd_settle) seconds after the OST,
# three and nine times as long after it, and a last time at HOTADD_WAIT: five in all.
HOTADD_FIRST_LOOK = 0.01
HOTADD_LOOK_FACTOR = 3.0
HOTADD_RETRIES = 4  # looks after the first one
# A critical finding that depends on the guest is a warning for this long after it first
# appears (the same bound: a guest that has not caught up by then will not). It holds back
# findings only, never the policy's action.
SETTLE_WINDOW = HOTADD_WAIT
MAX_OBSERVED = 64  # events kept per domain (the latest)

# libvirt's virErrorNumber for "Timed out during operation" (stable ABI): an unplug libvirt
# gave up waiting for. The message text is never read (it changed in 12.8, and a localized
# libvirtd translates it).
VIR_ERR_OPERATION_TIMEOUT = 68

# What was observed.
PLUG = "plug"  # QEMU's OST device check success for vcpuN
EJECT = "eject"  # the guest's OST eject success for vcpuN
DELETED = "deleted"  # QEMU's DEVICE_DELETED for vcpuN itself (never a sub-path)
REMOVED = "removed"  # libvirt's device-removed / vcpu-removed for vcpuN
UNPLUG_REQUEST = "unplug-request"  # this tool asked libvirt to unplug vcpuN
PLUG_REQUEST = "plug-request"  # this tool asked libvirt to plug vcpuN
KINDS = (PLUG, EJECT, DELETED, REMOVED, UNPLUG_REQUEST, PLUG_REQUEST)

# Fates.
FATE_PLUGGED = "plugged"
FATE_LISTED = "listed"
FATE_CREDITED = "credited"
FATE_REJECTED = "rejected"
FATE_UNPLUG_REQUESTED = "unplug-requested"
FATE_EJECTED = "ejected"
FATE_REMOVED = "removed"
FATE_STALE = "stale"
FATES = (
    FATE_PLUGGED,
    FATE_LISTED,
    FATE_CREDITED,
    FATE_REJECTED,
    FATE_UNPLUG_REQUESTED,
    FATE_EJECTED,
    FATE_REMOVED,
    FATE_STALE,
)
_GONE = (EJECT, UNPLUG_REQUEST, DELETED, REMOVED)


@dataclass(frozen=True, slots=True)
class Observed:
    """One thing seen about one vCPU (libvirt's id). ``at``: monotonic seconds (orders and
    times waits); ``wall``: Unix seconds (for the history). ``error``: for a request, the
    virErrorNumber libvirt answered (None: accepted)."""

    kind: str
    vcpu: int
    at: float
    wall: float
    error: Optional[int] = None

    @property
    def timed_out(self) -> bool:
        return self.kind == UNPLUG_REQUEST and self.error == VIR_ERR_OPERATION_TIMEOUT


@dataclass(frozen=True, slots=True)
class GuestSeen:
    """The guest agent's answer: its present and online CPUs (guest ids), and when."""

    present: frozenset[int]
    online: frozenset[int]
    at: float


@dataclass(frozen=True, slots=True)
class LibvirtSeen:
    """libvirt's live count and the vCPU ids it has enabled (empty: no per-vCPU detail)."""

    count: int
    enabled: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Pending:
    """Hot-adds QEMU reported that the guest has not listed yet."""

    vcpus: Mapping[int, float]  # vCPU id -> monotonic time of its OST (or hint)
    baseline: Optional[frozenset[int]]  # the guest's present CPUs before; None: not known
    looks: int = 0

    @property
    def since(self) -> float:
        return min(self.vcpus.values())


@dataclass
class Observations:
    """Everything observed of one domain that its next judgement needs.

    Safe to fill from one thread (the daemon's event loop) while a reconcile of the domain
    judges on another: every change is under the object's own lock, and ``snapshot``
    hands out immutable copies.
    """

    events: list[Observed] = field(default_factory=list)
    pending: Optional[Pending] = None
    present: Optional[frozenset[int]] = None  # the guest's present CPUs, last seen
    decided_upto: float = float("-inf")  # hot-add hints up to this time are decided
    recorded_upto: int = 0  # events[:recorded_upto] are in the domain's history
    onlined: list[tuple[frozenset[int], float]] = field(default_factory=list)  # our writes
    ours: set[int] = field(default_factory=set)  # guest CPUs we onlined, until seen offline
    critical_since: dict[str, float] = field(default_factory=dict)  # finding -> first seen
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # --- filling ---------------------------------------------------------------------------

    def add(self, observed: Iterable[Observed]) -> None:
        with self.lock:
            self.events.extend(observed)
            dropped = max(0, len(self.events) - MAX_OBSERVED)
            if dropped:
                del self.events[:dropped]
                self.recorded_upto = max(0, self.recorded_upto - dropped)

    def hinted(self, vcpus: Iterable[int], at: float) -> None:
        """A hot-add hint (an OST device check) for ``vcpus`` at ``at``; a hint at or before
        the last decided one is a retry's, not news."""
        todo = [v for v in vcpus if 0 <= v <= MAX_CPU_ID]
        with self.lock:
            if not todo or at <= self.decided_upto:
                return
            if self.pending is None:
                self.pending = Pending({}, self.present)
            merged = dict(self.pending.vcpus)
            for vcpu in todo:
                merged.setdefault(vcpu, at)
            self.pending = Pending(merged, self.pending.baseline, self.pending.looks)

    def distrust(self, now: float) -> None:
        """The domain flooded its monitor events: nothing it sent so far is judged or
        recorded (the guest could forge them)."""
        with self.lock:
            self.pending, self.decided_upto = None, now
            self.events.clear()
            self.recorded_upto = 0

    def wrote_online(self, cpus: frozenset[int], at: float) -> None:
        """This tool onlined ``cpus`` (guest ids) at ``at``: never the guest's credit."""
        if not cpus:
            return
        with self.lock:
            self.onlined = [*self.onlined, (cpus, at)][-MAX_OBSERVED:]
            self.ours |= cpus

    def snapshot(self) -> Observations:
        with self.lock:
            return Observations(
                events=list(self.events),
                pending=self.pending,
                present=self.present,
                decided_upto=self.decided_upto,
                recorded_upto=self.recorded_upto,
                onlined=list(self.onlined),
                ours=set(self.ours),
                critical_since=dict(self.critical_since),
            )

    # --- after a judgement -----------------------------------------------------------------

    def settle(self, verdict: Verdict, guest: Optional[GuestSeen], recorded: bool) -> None:
        """Keep what the judgement decided: a decided hot-add is not pending any more, a
        look is counted, entries written are not written again."""
        with self.lock:
            if guest is not None:
                self.present = guest.present
                self.ours -= (self.ours - guest.online) | (self.ours - guest.present)
            if self.pending is not None:
                if verdict.decided:
                    self.decided_upto = max(self.decided_upto, self.pending.since)
                    self.pending = None
                elif verdict.look_again is not None:
                    p = self.pending
                    self.pending = Pending(p.vcpus, p.baseline, p.looks + 1)
            if recorded:
                self.recorded_upto = min(len(self.events), verdict.events_judged)


@dataclass(frozen=True)
class Verdict:
    """What ``judge`` decided."""

    fates: Mapping[int, str] = field(default_factory=dict)  # vCPU id -> fate
    hotadd_vcpus: frozenset[int] = frozenset()  # vCPU ids of the hot-adds judged
    listed: frozenset[int] = frozenset()  # guest CPUs those brought (present now minus before)
    credited: frozenset[int] = frozenset()  # of those, online without a write from us
    ours: frozenset[int] = frozenset()  # guest CPUs this tool onlined: never the guest's credit
    rejected: frozenset[int] = frozenset()  # vCPU ids the guest did not take
    undecided: frozenset[int] = frozenset()  # hot-adds not known yet
    look_again: Optional[float] = None  # seconds: look for the hot-added CPU again then
    waited: float = 0.0  # seconds since the OST, when rejected
    late: frozenset[int] = frozenset()  # removals that were the slot's previous vCPU's
    entries: tuple[HistoryEntry, ...] = ()  # what was observed, for the domain's history
    events_judged: int = 0  # how many of the observations' events the entries cover
    # Unix time this host refused a repeated unplug request (None: not seen): kept with the
    # domain's record, so that a later finding names the remedy that works on this host.
    repeat_refused: Optional[float] = None

    @property
    def decided(self) -> bool:
        return bool(self.hotadd_vcpus) and not self.undecided and self.look_again is None


# --- judging -------------------------------------------------------------------------------


def judge(
    observations: Observations,
    guest: Optional[GuestSeen],
    libvirt: Optional[LibvirtSeen],
    *,
    now: float,
    wall: float,
    source: str,
    first_look: float = HOTADD_FIRST_LOOK,
) -> Verdict:
    """Judge one domain from a snapshot of its observations, the guest agent's answer (None:
    it did not answer) and libvirt's state; ``now``/``wall``: the monotonic and Unix time
    of the judgement; ``source``: who records the entries ("watch", "setvcpus")."""
    events = observations.events
    late = _late_removals(events)
    hotadd = _judge_hotadd(observations, guest, libvirt, now, first_look)
    fates = _fates(events, late, libvirt, hotadd)
    entries = _entries(events, observations.recorded_upto, late, source)
    entries += tuple(
        HistoryEntry(HISTORY_REJECTED, v, wall, source) for v in sorted(hotadd.rejected)
    )
    return Verdict(
        fates=fates,
        hotadd_vcpus=hotadd.hotadd_vcpus,
        listed=hotadd.listed,
        credited=hotadd.credited,
        ours=hotadd.ours,
        rejected=hotadd.rejected,
        undecided=hotadd.undecided,
        look_again=hotadd.look_again,
        waited=hotadd.waited,
        late=frozenset(v for v, _ in late),
        entries=entries,
        events_judged=len(events),
        repeat_refused=repeat_refused(events, observations.recorded_upto),
    )


def repeat_refused(events: Sequence[Observed], start: int = 0) -> Optional[float]:
    """When an unplug request of a vCPU already asked for failed again, among
    ``events[start:]`` (the latest such request; None: none did). This tool repeats a
    request only once the guest has ejected the vCPU, and records a failed repeat on a vCPU
    only where libvirt's count did not drop (``ops.shrink``): libvirt's answer, by its error,
    is this host's refusal of a repeat. A first request that failed is not one."""
    asked: set[int] = set()
    refused: Optional[float] = None
    for index, event in enumerate(events):
        if event.kind != UNPLUG_REQUEST:
            continue
        if index >= start and event.error is not None and event.vcpu in asked:
            refused = event.wall
        asked.add(event.vcpu)
    return refused


def _judge_hotadd(
    observations: Observations,
    guest: Optional[GuestSeen],
    libvirt: Optional[LibvirtSeen],
    now: float,
    first_look: float,
) -> Verdict:
    pending = observations.pending
    if pending is None or not pending.vcpus:
        return Verdict()
    vcpus = frozenset(pending.vcpus)
    if guest is None:  # no answer, no judgement
        return Verdict(hotadd_vcpus=vcpus, undecided=vcpus)
    gone = _gone_after_plug(observations.events, pending)
    new = _new_cpus(pending, guest, libvirt, observations.onlined)
    waiting = vcpus - gone
    waited = now - pending.since
    if new:
        ours = _ours_since(observations, pending.since)
        credited = (new & guest.online) - ours
        # Fewer new CPUs than hot-adds, the wait over: the highest ones were not taken.
        missing = len(waiting) - len(new) if waited >= HOTADD_WAIT else 0
        rejected = frozenset(sorted(waiting)[-missing:]) if missing > 0 else frozenset()
        return Verdict(
            hotadd_vcpus=vcpus, listed=new, credited=credited, ours=ours, rejected=rejected
        )
    if not waiting:  # ejected or unplugged before the guest was judged: not a rejection
        return Verdict(hotadd_vcpus=vcpus)
    looks = pending.looks + 1
    if waited < HOTADD_WAIT and looks <= HOTADD_RETRIES:
        delay = hotadd_look_delay(looks, waited, first_look)
        return Verdict(hotadd_vcpus=vcpus, look_again=delay)
    return Verdict(hotadd_vcpus=vcpus, rejected=waiting, waited=waited)


def _new_cpus(
    pending: Pending,
    guest: GuestSeen,
    libvirt: Optional[LibvirtSeen],
    onlined: list[tuple[frozenset[int], float]],
) -> frozenset[int]:
    """The guest CPUs the hot-add brought: its present set now minus the one before. Where
    that is not known, or out of date (a slot plugged again, whose CPU the guest listed
    before its unplug): the CPUs this tool onlined since the plug (the guest listed them),
    else the highest ones when the guest lists every CPU libvirt counts, the plugged vCPUs
    included."""
    if pending.baseline is not None:
        new = guest.present - pending.baseline
        if new:
            return frozenset(new)
    ours = frozenset(cpu for cpus, at in onlined if at >= pending.since for cpu in cpus)
    if ours:  # listed when this tool onlined them (the guest may have ejected them since)
        return ours
    counted = libvirt.count if libvirt is not None else len(guest.present)
    if pending.baseline is not None:  # out of date only if libvirt has the plugged vCPUs
        enabled = libvirt.enabled if libvirt is not None else frozenset()
        if not set(pending.vcpus) <= enabled:
            return frozenset()
    if len(guest.present) >= counted:
        return frozenset(sorted(guest.present)[-len(pending.vcpus) :])
    return frozenset()


def _ours_since(observations: Observations, since: float) -> frozenset[int]:
    written = {cpu for cpus, at in observations.onlined if at >= since for cpu in cpus}
    return frozenset(written | observations.ours)


def _gone_after_plug(events: list[Observed], pending: Pending) -> frozenset[int]:
    """Pending vCPUs ejected, unplugged or removed after their plug."""
    return frozenset(
        e.vcpu
        for e in events
        if e.kind in _GONE and e.vcpu in pending.vcpus and e.at >= pending.vcpus[e.vcpu]
    )


def _late_removals(events: list[Observed]) -> list[tuple[int, int]]:
    """(vCPU, index) of removals that belong to the slot's previous vCPU: after the vCPU's
    latest plug or request to plug it, or after an earlier removal of it (that vCPU is gone
    already), with no eject or unplug request of it in between."""
    late: list[tuple[int, int]] = []
    state: dict[int, str] = {}  # vCPU -> what was last seen of it: a plug, an unplug, gone
    for index, e in enumerate(events):
        if e.kind in (PLUG, PLUG_REQUEST):
            state[e.vcpu] = PLUG
        elif e.kind in (EJECT, UNPLUG_REQUEST):
            state[e.vcpu] = UNPLUG_REQUEST
        elif e.kind in (DELETED, REMOVED):
            if state.get(e.vcpu) in (PLUG, REMOVED):
                late.append((e.vcpu, index))
            else:
                state[e.vcpu] = REMOVED
    return late


def late_removals(events: list[Observed]) -> tuple[Observed, ...]:
    """The removals in ``events`` that are the late events of a slot's previous vCPU (see
    the module's rules): not something the request being observed did."""
    return tuple(events[index] for _, index in _late_removals(events))


def _fates(
    events: list[Observed],
    late: list[tuple[int, int]],
    libvirt: Optional[LibvirtSeen],
    hotadd: Verdict,
) -> dict[int, str]:
    late_at = {index for _, index in late}
    fates: dict[int, str] = {}
    for index, e in enumerate(events):
        if index in late_at or e.kind == PLUG_REQUEST:  # a request is no fate by itself
            continue
        fates[e.vcpu] = {
            PLUG: FATE_PLUGGED,
            EJECT: FATE_EJECTED,
            DELETED: FATE_REMOVED,
            REMOVED: FATE_REMOVED,
            UNPLUG_REQUEST: FATE_UNPLUG_REQUESTED,
        }[e.kind]
    for vcpu in hotadd.hotadd_vcpus:
        if vcpu in hotadd.rejected:
            fates[vcpu] = FATE_REJECTED
        elif hotadd.listed and fates.get(vcpu, FATE_PLUGGED) == FATE_PLUGGED:
            fates[vcpu] = FATE_CREDITED if hotadd.credited else FATE_LISTED
        else:
            fates.setdefault(vcpu, FATE_PLUGGED)
    if libvirt is None or not libvirt.enabled:
        return fates
    for vcpu, fate in fates.items():
        if fate == FATE_EJECTED and vcpu in libvirt.enabled:
            fates[vcpu] = FATE_STALE  # the guest gave it up, libvirt still counts it
        elif fate in (FATE_EJECTED, FATE_UNPLUG_REQUESTED) and vcpu not in libvirt.enabled:
            fates[vcpu] = FATE_REMOVED  # libvirt's count has it gone too
    return fates


def _entries(
    events: list[Observed], start: int, late: list[tuple[int, int]], source: str
) -> tuple[HistoryEntry, ...]:
    """History entries for ``events[start:]``: QEMU's plugs and the guest's ejects, QEMU's
    removals except a late one (the slot's previous vCPU, already ejected), and an unplug
    request libvirt gave up on (its error code says so). An accepted request and libvirt's
    own removals are not written: libvirt's count shows them."""
    skip = {index for _, index in late}
    entries: list[HistoryEntry] = []
    for index in range(start, len(events)):
        e = events[index]
        if e.kind == PLUG:
            entries.append(HistoryEntry(HISTORY_PLUGGED, e.vcpu, e.wall, SOURCE_OST))
        elif e.kind == EJECT:
            entries.append(HistoryEntry(HISTORY_EJECTED, e.vcpu, e.wall, SOURCE_OST))
        elif e.timed_out:
            entries.append(HistoryEntry(HISTORY_UNPLUG_TIMEOUT, e.vcpu, e.wall, source))
        elif e.kind == DELETED and index not in skip:
            entries.append(HistoryEntry(HISTORY_EJECTED, e.vcpu, e.wall, SOURCE_DEVICE_DELETED))
    return tuple(entries)


SOURCE_OST = "ost"
SOURCE_DEVICE_DELETED = "device-deleted"


def hotadd_look_delay(looks: int, waited: float, first: float) -> float:
    """How long to wait before the next look for a hot-added CPU the guest has not listed,
    after ``looks`` looks, ``waited`` seconds after its OST event: the next look is at
    ``first`` (``hotadd_settle``), 3 and 9 times that after the event, the last one at
    HOTADD_WAIT."""
    at = max(first, HOTADD_FIRST_LOOK) * HOTADD_LOOK_FACTOR ** (looks - 1)
    while at <= waited and at < HOTADD_WAIT:  # the first look came late (a settle delay)
        at *= HOTADD_LOOK_FACTOR
    if looks >= HOTADD_RETRIES or at >= HOTADD_WAIT:
        at = HOTADD_WAIT
    return max(0.0, at - waited)


# --- the repeated unplug -------------------------------------------------------------------


def repeat_unplug(
    requests: Iterable[Observed],
    events: Iterable[Observed],
    guest: Optional[GuestSeen],
    target: int,
) -> bool:
    """Whether to repeat an unplug libvirt failed although the guest ejected the vCPUs:
    decided from libvirt's error code and what the guest did, never from a message.

    The request failed with VIR_ERR_OPERATION_TIMEOUT (libvirt gave up waiting for QEMU),
    or with another code while the guest's own OST reports say it ejected every vCPU asked
    for; and the guest has ejected: its agent lists no more CPUs than the target, or, when
    the agent did not answer, its OST reports say so."""
    asked = [r for r in requests if r.kind == UNPLUG_REQUEST]
    failed = [r for r in asked if r.error is not None]
    if not failed:
        return False
    since = min(r.at for r in asked)
    ejected = {e.vcpu for e in events if e.kind == EJECT and e.at >= since - 1.0}
    all_ejected = {r.vcpu for r in asked} <= ejected
    if not all_ejected and not any(r.timed_out for r in failed):
        return False
    if guest is not None:
        return len(guest.present) <= target
    return all_ejected


# --- settling ------------------------------------------------------------------------------


def settling_left(
    critical_since: Mapping[str, float], critical: Iterable[str], now: float
) -> tuple[dict[str, float], Optional[float]]:
    """The guest-dependent critical findings seen now (``critical``), with when each was
    first seen, and how long the youngest is still held at warning (None: none is)."""
    current = set(critical)
    since = {code: at for code, at in critical_since.items() if code in current}
    for code in current:
        since.setdefault(code, now)
    young = [now - at for at in since.values() if now - at < SETTLE_WINDOW]
    return since, (SETTLE_WINDOW - max(young) if young else None)


def recorded_entries(observed: list[Observed], source: str) -> tuple[HistoryEntry, ...]:
    """The history entries for a sequence of observations (what ``judge`` records)."""
    return _entries(observed, 0, _late_removals(observed), source)
