"""One daemon job: reconcile one domain under its policy and describe the outcome.

Grace: after a hot-add, a policy may give the guest ``grace`` seconds to online the new CPU
itself (its own udev rule). The job does not sleep for it; it asks the scheduler to come
back when the grace period ends, and the reconcile then reports "onlined-by-guest" when the
guest won. Hot-added vCPU ids from OST events are taken as guest CPU ids: they agree while
vCPUs are added in order, which is how libvirt hot-adds them.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.policy import Policy
from virthotplug.core.records import Record, iso_time
from virthotplug.core.schedule import Job, Key
from virthotplug.core.view import to_dict
from virthotplug.daemon.watch import JobResult
from virthotplug.host.actions import ONLINED
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.policysource import effective_policy
from virthotplug.host.reconcile import ReconcileResult, reconcile

ACTING_MODES = ("online", "match")
# After a hot-add the guest lists the new CPU a moment after OST. The first look is at once;
# until the guest lists it, look again after as long as has passed since the OST event (10,
# 20, 40 ms ...: doubling), never waiting longer than the ``hotadd_settle`` setting between
# two looks, for at most NOT_YET_SEEN_LIMIT seconds, then leave it to the periodic resync.
HOTADD_FIRST_LOOK = 0.01
NOT_YET_SEEN_LIMIT = 5.0


class JobRunner:
    """Holds the current configuration (replaced on SIGHUP) and runs jobs with it."""

    def __init__(self, config: HostConfig, settings: WatchSettings) -> None:
        self.config = config
        self.settings = settings
        # Guest CPUs this daemon onlined, per domain, until seen offline again: a later job
        # carrying the same hot-add hint must not credit our own write to the guest.
        self._ours: dict[Key, set[int]] = {}
        self._ours_lock = threading.Lock()
        # The findings last reported per domain, to tell a routine resync from news.
        self._last_findings: dict[Key, tuple[str, ...]] = {}

    def update(self, config: HostConfig, settings: WatchSettings) -> None:
        self.config, self.settings = config, settings

    def forget(self, key: Key) -> None:
        """The domain stopped or went away: drop what was kept for it."""
        with self._ours_lock:
            self._ours.pop(key, None)
            self._last_findings.pop(key, None)

    def run(self, conn: Connection, dom: Domain, job: Job) -> JobResult:
        config = self.config
        effective = None
        if job.hotadded:
            effective = effective_policy(conn, dom, config)
            wait = _grace_left(effective.policy, job)
            if wait > 0:
                return _deferred(job, dom, wait)
        with self._ours_lock:
            hotadded = frozenset(job.hotadded - self._ours.get(job.ref.key, set()))
        result = reconcile(
            conn,
            dom,
            config,
            trigger="+".join(job.reasons),
            hotadded=hotadded,
            agent_timeout=self.settings.agent_timeout,
            effective=effective,
        )
        self._remember_ours(job.ref.key, result)
        done = dataclasses.replace(_reconciled(job, result), routine=self._routine(job, result))
        if _hotadd_not_seen_yet(job, result):
            waited = time.monotonic() - job.first_request
            delay = hotadd_look_delay(waited, self.settings.hotadd_settle)
            return dataclasses.replace(done, retry_after=delay)
        return done

    def _routine(self, job: Job, result: ReconcileResult) -> bool:
        """A resync that wrote nothing and found what the last reconcile found."""
        view = result.after or result.before
        codes = tuple(sorted(f.code for f in view.findings))
        with self._ours_lock:
            previous = self._last_findings.get(job.ref.key)
            self._last_findings[job.ref.key] = codes
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
            ours = self._ours.setdefault(key, set())
            ours |= onlined
            if view.guest is not None:
                ours -= view.guest.offline | (ours - view.guest.present)
            if not ours:
                del self._ours[key]


def _grace_left(policy: Policy, job: Job) -> float:
    if policy.mode not in ACTING_MODES:
        return 0.0
    return policy.grace - (time.monotonic() - job.first_request)


def hotadd_look_delay(waited: float, cap: float) -> float:
    """How long to wait before looking again for a hot-added CPU the guest has not listed,
    ``waited`` seconds after its OST event: as long again (10, 20, 40 ms ...), at most
    ``cap`` (``hotadd_settle``)."""
    return max(0.0, min(max(cap, HOTADD_FIRST_LOOK), max(HOTADD_FIRST_LOOK, waited)))


def _hotadd_not_seen_yet(job: Job, result: ReconcileResult) -> bool:
    guest = (result.after or result.before).guest
    if guest is None or not result.policy.policy.acts:
        return False
    waited = time.monotonic() - job.first_request
    return bool(job.hotadded - guest.present) and waited < NOT_YET_SEEN_LIMIT


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


def _reconciled(job: Job, result: ReconcileResult) -> JobResult:
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
            "hotadded": sorted(job.hotadded),
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
    return JobResult(record=record, line=_line(result, since), failed=result.failed, view=view)


def _action(result: ReconcileResult) -> str:
    plan = result.plan
    parts = []
    if plan.online:
        parts.append(f"online {format_cpulist(plan.online)}")
    if plan.offline:
        parts.append(f"offline {format_cpulist(plan.offline)}")
    return ", ".join(parts) or "none"


def _line(result: ReconcileResult, since: float) -> str:
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
        f"domain '{result.name}': policy {mode}: {done or 'nothing to do'}; {state}; "
        f"{findings} [{result.trigger}, {since:.2f} s after the first event]"
    )
