"""One daemon job: reconcile one domain under its policy and describe the outcome.

Grace: after a hot-add, a policy may give the guest ``grace`` seconds to online the new CPU
itself (its own udev rule). The job does not sleep for it; it asks the scheduler to come
back when the grace period ends, and the reconcile then reports "onlined-by-guest" when the
guest won.

Which guest CPUs a hot-add brought is decided from what the guest reports: its present set
now minus the one this daemon saw before the OST event. The ``vcpuN`` of an OST event is
libvirt's vCPU id, only a trigger: after ``virsh setvcpu DOM 3 --enable --live`` the guest
calls the new CPU cpu1. Until the guest lists a new CPU the job looks again with backoff
(``HOTADD_LOOKS``); if it still lists none ``HOTADD_WAIT`` seconds after the OST event, the
guest rejected the hot-add although its ACPI accepted the device: that is recorded in the
domain's history (``guest-rejected-vcpu``), reported once at warning level, and not looked
at again. A critical finding that depends on the guest (e.g. right after a resume, a hot-add
made while paused) is held at warning for ``SETTLE_WINDOW`` seconds and judged again then.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.drift import GUEST_DEPENDENT, find_drift
from virthotplug.core.events import DeviceDeletedMonitorEvent, Event, OstMonitorEvent
from virthotplug.core.policy import Policy
from virthotplug.core.records import Record, iso_time
from virthotplug.core.schedule import Job, Key
from virthotplug.core.view import CRITICAL, HISTORY_REJECTED, HistoryEntry, VcpuView, to_dict
from virthotplug.daemon.domains import DomainRegistry
from virthotplug.daemon.flood import FloodEvent
from virthotplug.daemon.results import JobResult
from virthotplug.host import actions, history
from virthotplug.host.actions import ONLINED
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.policysource import effective_policy
from virthotplug.host.reconcile import ReconcileResult, reconcile

ACTING_MODES = ("online", "match")
# After a hot-add the guest lists the new CPU a moment after OST (lab: well under 0.1 s).
# The first look is at once; until the guest lists the CPU, look again ``hotadd_settle``
# seconds after the OST event, then three and nine times as long after it, and a last time
# HOTADD_WAIT seconds after it (0, 0.1, 0.3, 0.9, 3 s with the default 0.1 s): five looks
# in all, so a guest that never lists the CPU is not polled in a loop. A CPU still not
# listed by then was rejected by the guest.
HOTADD_FIRST_LOOK = 0.01
HOTADD_LOOK_FACTOR = 3.0
HOTADD_RETRIES = 4  # looks after the first one
HOTADD_WAIT = 3.0
# A critical guest-dependent finding is a warning for this long after it first appears
# (the same bound: a guest that has not listed a hot-added CPU by then will not).
SETTLE_WINDOW = HOTADD_WAIT
RETRY_HOTADD = "hot-add"
RETRY_SETTLE = "settle"
MAX_UNRECORDED = 64  # monitor-event entries kept per domain until its next job writes them


@dataclass(slots=True)
class PendingHotadd:
    """A hot-add QEMU reported (OST device check) that the guest has not listed yet."""

    vcpus: set[int]
    baseline: Optional[frozenset[int]]  # the guest's present CPUs before; None: not known
    since: float  # monotonic time of the OST event
    looks: int = 0


@dataclass(slots=True)
class DomainMemory:
    """What the daemon remembers of one domain between its jobs."""

    present: Optional[frozenset[int]] = None  # the guest's present CPUs, last seen
    pending: Optional[PendingHotadd] = None
    critical_since: dict[str, float] = field(default_factory=dict)  # code -> first seen
    decided_upto: float = float("-inf")  # the OST time of the last hot-add decided
    # What QEMU's events said (plugs, ejects), for the history; written by the next job.
    events: history.EventHistory = field(default_factory=history.EventHistory)
    unrecorded: list[HistoryEntry] = field(default_factory=list)


@dataclass(frozen=True)
class HotaddSeen:
    """The outcome of looking for a pending hot-add in one reconcile."""

    cpus: frozenset[int] = frozenset()  # guest CPUs it brought (present now minus before)
    vcpus: frozenset[int] = frozenset()  # the vCPU ids of the OST events behind it
    retry_after: Optional[float] = None  # not listed yet: look again then
    rejected: frozenset[int] = frozenset()  # vCPUs the guest did not take
    waited: float = 0.0  # seconds since the OST event, when rejected


class JobRunner:
    """Holds the current configuration (replaced on SIGHUP) and runs jobs with it."""

    def __init__(
        self,
        config: HostConfig,
        settings: WatchSettings,
        domains: Optional[DomainRegistry] = None,
    ) -> None:
        self.config = config
        self.settings = settings
        # What is kept per domain lives in its record (``domains``), forgotten with it:
        # the guest CPUs this daemon onlined, until seen offline again (a later job carrying
        # the same hot-add hint must not credit our own write to the guest), the findings
        # last reported (to tell a routine resync from news) and the ``DomainMemory``.
        self.domains = domains if domains is not None else DomainRegistry()
        self._ours_lock = self.domains.lock

    def update(self, config: HostConfig, settings: WatchSettings) -> None:
        self.config, self.settings = config, settings

    def observe(self, ev: Event) -> None:
        """Every event, on the daemon's main loop (quick, no libvirt call): what QEMU's
        monitor events say about vCPUs is kept for the domain's history, which its next
        job writes."""
        if isinstance(ev, FloodEvent) and ev.domain is not None:
            self._distrust_monitor(ev.domain.key)
            return
        if not isinstance(ev, (OstMonitorEvent, DeviceDeletedMonitorEvent)) or ev.domain is None:
            return
        memory = self._memory_for(ev.domain.key)
        found = memory.events.entries(ev)
        if found:
            with self._ours_lock:
                memory.unrecorded = (memory.unrecorded + found)[-MAX_UNRECORDED:]

    def _distrust_monitor(self, key: Key) -> None:
        """The domain flooded its monitor events, so the few that became records were the
        guest's to forge: no hot-add is judged on them (no "rejected" for a hot-add that
        never was) and none goes into its history. Policy still acts on what the guest
        lists."""
        memory = self._memory_for(key)
        with self._ours_lock:
            # Only a mark here: the domain's next job (the one thread that writes its
            # memory) voids its pending hot-add.
            self.domains.record(key).distrusted_at = time.monotonic()
            memory.unrecorded = []

    def _apply_distrust(self, key: Key, memory: DomainMemory) -> None:
        with self._ours_lock:
            rec = self.domains.record(key)
            at, rec.distrusted_at = rec.distrusted_at, None
        if at is not None:
            memory.pending, memory.decided_upto = None, max(memory.decided_upto, at)

    def run(self, conn: Connection, dom: Domain, job: Job) -> JobResult:
        config = self.config
        effective = None
        self._apply_distrust(job.ref.key, self._memory_for(job.ref.key))
        memory = self._remember_hotadd(job)
        if job.hotadded:
            effective = effective_policy(conn, dom, config)
            wait = _grace_left(effective.policy, job)
            if wait > 0:
                return _deferred(job, dom, wait)
        result = reconcile(
            conn,
            dom,
            config,
            trigger="+".join(job.reasons),
            agent_timeout=self.settings.agent_timeout,
            effective=effective,
        )
        seen = self._look(memory, result)
        if seen.cpus:
            result = self._credit(job.ref.key, result, seen.cpus)
        entries = self._unrecorded(memory)
        if seen.rejected:
            at = history.now()
            entries += [
                HistoryEntry(HISTORY_REJECTED, v, at, "watch") for v in sorted(seen.rejected)
            ]
        if entries:
            result = _record(dom, result, entries)
        self._remember_ours(job.ref.key, result)
        view = result.after or result.before
        settle = self._settle(memory, view, result.policy.policy)
        if settle is not None:
            result = _judged(result, settle[0])
        done = _reconciled(job, result, seen)
        done = dataclasses.replace(done, routine=self._routine(job, result))
        retry = _retry(seen, settle)
        if retry is not None:
            done = dataclasses.replace(done, retry_after=retry[0], retry_reason=retry[1])
        return done

    def _unrecorded(self, memory: DomainMemory) -> list[HistoryEntry]:
        with self._ours_lock:
            entries, memory.unrecorded = memory.unrecorded, []
        return entries

    def _memory_for(self, key: Key) -> DomainMemory:
        with self._ours_lock:
            rec = self.domains.record(key)
            if not isinstance(rec.memory, DomainMemory):
                rec.memory = DomainMemory()
            return rec.memory

    def _remember_hotadd(self, job: Job) -> DomainMemory:
        """A hot-add hint starts (or joins) the domain's pending hot-add."""
        memory = self._memory_for(job.ref.key)
        # A retried job carries its hints again: a hot-add already decided is not new.
        if job.hotadded and job.first_request > memory.decided_upto:
            if memory.pending is None:
                memory.pending = PendingHotadd(set(), memory.present, job.first_request)
            memory.pending.vcpus |= job.hotadded
        return memory

    def _look(self, memory: DomainMemory, result: ReconcileResult) -> HotaddSeen:
        guest = result.before.guest
        pending = memory.pending
        if guest is not None:
            memory.present = guest.present
        if pending is None or guest is None:
            return HotaddSeen()
        return _judge_hotadd(
            pending, guest.present, result.before, memory, self.settings.hotadd_settle
        )

    def _credit(self, key: Key, result: ReconcileResult, cpus: frozenset[int]) -> ReconcileResult:
        """Outcomes again, with the guest CPUs the hot-add brought (never our own writes)."""
        with self._ours_lock:
            hotadded = frozenset(cpus - self.domains.record(key).ours)
        found = actions.outcomes(
            result.policy.policy, result.plan, result.before, result.after, result.writes, hotadded
        )
        return dataclasses.replace(result, outcomes=found)

    def _settle(
        self, memory: DomainMemory, view: VcpuView, policy: Policy
    ) -> Optional[tuple[VcpuView, float]]:
        """A guest-dependent critical finding seen for the first time is held at warning;
        the view judged so, and when to judge again. None: nothing to hold."""
        now = time.monotonic()
        critical = {f.code for f in view.findings if f.severity == CRITICAL}
        critical &= GUEST_DEPENDENT
        for code in list(memory.critical_since):
            if code not in critical:
                del memory.critical_since[code]
        for code in critical:
            memory.critical_since.setdefault(code, now)
        young = [now - t for t in memory.critical_since.values() if now - t < SETTLE_WINDOW]
        if not young:
            return None
        judged = find_drift(view, policy, settling=True)
        return dataclasses.replace(view, findings=judged), SETTLE_WINDOW - max(young)

    def _routine(self, job: Job, result: ReconcileResult) -> bool:
        """A resync that wrote nothing and found what the last reconcile found."""
        view = result.after or result.before
        codes = tuple(sorted(f.code for f in view.findings))
        with self._ours_lock:
            rec = self.domains.record(job.ref.key)
            previous, rec.findings = rec.findings, codes
        quiet_outcomes = {"skipped", "unchanged", "excluded"}
        return (
            set(job.reasons) <= {"host"}
            and previous == codes
            and all(o.code in quiet_outcomes for o in result.outcomes)
        )

    def _remember_ours(self, key: Key, result: ReconcileResult) -> None:
        view = result.after or result.before
        onlined = {cpu for o in result.outcomes if o.code == ONLINED for cpu in o.cpus}
        with self._ours_lock:
            ours = self.domains.record(key).ours
            ours |= onlined
            if view.guest is not None:
                ours -= view.guest.offline | (ours - view.guest.present)


def _grace_left(policy: Policy, job: Job) -> float:
    if policy.mode not in ACTING_MODES:
        return 0.0
    return policy.grace - (time.monotonic() - job.first_request)


def _judge_hotadd(
    pending: PendingHotadd,
    present: frozenset[int],
    view: VcpuView,
    memory: DomainMemory,
    look_cap: float,
) -> HotaddSeen:
    """The guest's present set against the one before the hot-add."""
    vcpus = frozenset(pending.vcpus)
    counted = view.live.current if view.live is not None else len(present)
    if pending.baseline is not None:
        new = present - pending.baseline
    else:  # the daemon never saw this guest before: only the count can tell
        new = frozenset(sorted(present)[-len(vcpus) :]) if len(present) >= counted else frozenset()
    if new:
        memory.pending, memory.decided_upto = None, pending.since
        return HotaddSeen(cpus=frozenset(new), vcpus=vcpus)
    pending.looks += 1
    waited = time.monotonic() - pending.since
    if waited < HOTADD_WAIT and pending.looks <= HOTADD_RETRIES:
        delay = hotadd_look_delay(pending.looks, waited, look_cap)
        return HotaddSeen(vcpus=vcpus, retry_after=delay)
    memory.pending, memory.decided_upto = None, pending.since
    return HotaddSeen(vcpus=vcpus, rejected=vcpus, waited=waited)


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


def _record(dom: Domain, result: ReconcileResult, entries: list[HistoryEntry]) -> ReconcileResult:
    """Write ``entries`` into the domain's history and judge the view with it."""
    view = result.after or result.before
    live = view.live.current if view.live is not None else None
    recorded = history.record(dom, entries, live_count=live)
    judged = dataclasses.replace(view, history=recorded)
    judged = dataclasses.replace(judged, findings=find_drift(judged, result.policy.policy))
    return _judged(result, judged)


def _judged(result: ReconcileResult, view: VcpuView) -> ReconcileResult:
    if result.after is not None:
        return dataclasses.replace(result, after=view)
    return dataclasses.replace(result, before=view)


def _retry(
    seen: HotaddSeen, settle: Optional[tuple[VcpuView, float]]
) -> Optional[tuple[float, str]]:
    retries = []
    if seen.retry_after is not None:
        retries.append((seen.retry_after, RETRY_HOTADD))
    if settle is not None:
        retries.append((settle[1], RETRY_SETTLE))
    return min(retries) if retries else None


def _deferred(job: Job, dom: Domain, wait: float) -> JobResult:
    cpus = format_cpulist(job.hotadded)
    line = f"domain '{dom.name}': grace period: CPU {cpus} left to the guest for {wait:.1f} s"
    record = Record(
        time=iso_time(time.time()),
        host=job.ref.host,
        domain=job.ref.name,
        uuid=job.ref.uuid,
        event="reconcile",
        details={"trigger": list(job.reasons), "hotadded": sorted(job.hotadded)},
        findings=[],
        action="wait",
        outcome="deferred",
    )
    return JobResult(record=record, line=line, retry_after=wait)


def _reconciled(job: Job, result: ReconcileResult, seen: HotaddSeen) -> JobResult:
    view = result.after or result.before
    since = time.monotonic() - job.first_request
    codes = [o.code for o in result.outcomes]
    data = to_dict(view)
    record = Record(
        time=iso_time(time.time()),
        host=result.host,
        domain=result.name,
        uuid=result.uuid,
        event="reconcile",
        details={
            "trigger": list(job.reasons),
            "coalesced": job.coalesced,
            # Guest CPU ids the hot-add brought (present now minus before), and the vCPU ids
            # of the OST events behind it.
            "hotadded": sorted(seen.cpus),
            "hotadd_vcpus": sorted(seen.vcpus),
            "rejected_vcpus": sorted(seen.rejected),
            "since_first_event": round(since, 3),
            "policy": result.policy.to_dict(),
            "plan": result.plan.to_dict(),
            "outcomes": [o.to_dict() for o in result.outcomes],
            "live": data["live"],
            "guest": data["guest"],
            "agent": data["agent"],
        },
        findings=data["findings"],
        action=_action(result),
        outcome=",".join(codes) or "unchanged",
    )
    online = view.guest.online if view.guest is not None else frozenset()
    return JobResult(
        record=record,
        line=_line(result, since, seen),
        failed=result.failed,
        view=view,
        warning=bool(seen.rejected),
        hotadds_online=seen.vcpus if seen.cpus and seen.cpus <= online else frozenset(),
        policy_mode=result.policy.policy.mode,
    )


def _action(result: ReconcileResult) -> str:
    plan = result.plan
    parts = []
    if plan.online:
        parts.append(f"online {format_cpulist(plan.online)}")
    if plan.offline:
        parts.append(f"offline {format_cpulist(plan.offline)}")
    return ", ".join(parts) or "none"


def _line(result: ReconcileResult, since: float, seen: HotaddSeen) -> str:
    view = result.after or result.before
    guest = view.guest
    state = "guest layer unknown"
    if guest is not None:
        state = f"guest online {format_cpulist(guest.online) or '-'}"
        if guest.offline:
            state += f", offline {format_cpulist(guest.offline)}"
    done = "; ".join(
        f"{o.code} {format_cpulist(o.cpus)}".rstrip() + (f" ({o.reason})" if o.reason else "")
        for o in result.outcomes
    )
    mode = result.policy.policy.mode
    findings = ",".join(f.code for f in view.findings) or "no findings"
    return (
        f"domain '{result.name}': {_hotadd_text(seen)}policy {mode}: "
        f"{done or 'nothing to do'}; {state}; "
        f"{findings} [{result.trigger}, {since:.2f} s after the first event]"
    )


def _hotadd_text(seen: HotaddSeen) -> str:
    vcpus = ", ".join(f"vcpu{v}" for v in sorted(seen.vcpus))
    if seen.cpus:
        return f"guest detected CPU {format_cpulist(seen.cpus)} (hot-add of {vcpus}); "
    if seen.rejected:
        return (
            f"guest rejected the hot-add of {vcpus}: QEMU's OST said its ACPI accepted the "
            f"device, but the guest lists no new CPU {seen.waited:.1f} s later; "
        )
    return ""
