"""One daemon job: reconcile one domain under its policy and describe the outcome.

Grace: after a hot-add, a policy may give the guest ``grace`` seconds to online the new CPU
itself (its own udev rule). The job does not sleep for it; it asks the scheduler to come
back when the grace period ends, and the reconcile then reports "onlined-by-guest" when the
guest won.

What happened to each vCPU is the judge's (``core.judge``), run by the one reconcile
(``ops.reconcile``) on the domain's ``Observations``, kept between jobs in the domain's
record (``domains.DomainJobs``): QEMU's monitor events as the main loop sees them, the
hot-add hints of each job and this daemon's own writes. Until
the guest lists a hot-added CPU the job looks again with backoff; if it lists none
``judge.HOTADD_WAIT`` seconds after the OST event although it answered, it rejected the
hot-add: recorded in the domain's history, reported once at warning level. A critical
finding that depends on the guest is held at warning for ``judge.SETTLE_WINDOW`` seconds
and judged again then; the policy's action is never held back by it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional

from virthotplug.core import errors
from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.drift import INVALID_POLICY, invalid_policy_finding
from virthotplug.core.events import (
    DeviceDeletedMonitorEvent,
    DeviceRemovalEvent,
    Event,
    HostEvent,
    LifecycleEvent,
    OstMonitorEvent,
    VcpuRemovedEvent,
)
from virthotplug.core.judge import Verdict
from virthotplug.core.policy import Policy
from virthotplug.core.records import Record, iso_time
from virthotplug.core.schedule import Job, Key
from virthotplug.core.view import VcpuView, to_dict
from virthotplug.daemon.domains import DomainJobs, DomainRegistry
from virthotplug.daemon.flood import FloodEvent
from virthotplug.daemon.results import JobResult
from virthotplug.host import collect, history
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.policysource import effective_policy
from virthotplug.ops.reconcile import ReconcileResult, reconcile

ACTING_MODES = ("online", "match")
RETRY_HOTADD = "hot-add"
RETRY_SETTLE = "settle"
SOURCE = "watch"  # who wrote a history entry
# Lifecycle "started" details that mean a new QEMU process: it has made only the vCPUs it
# starts with (not "from snapshot" or "wakeup": the same process goes on).
FRESH_STARTS = ("booted", "migrated", "restored")


# The events that say something about one vCPU (``core.observed``).
_VCPU_EVENTS = (OstMonitorEvent, DeviceDeletedMonitorEvent, DeviceRemovalEvent, VcpuRemovedEvent)


class JobRunner:
    """Holds the current configuration (replaced on SIGHUP) and runs jobs with it."""

    def __init__(
        self,
        config: HostConfig,
        settings: WatchSettings,
        domains: Optional[DomainRegistry] = None,
        *,
        voucher: str = "",
    ) -> None:
        self.config = config
        self.settings = settings
        # The token of this run's host locks: the histories this daemon begins at QEMU's
        # start carry it, so that they count as complete only while it runs ("": none do).
        self.voucher = voucher
        self._stopping = False  # set by ``withdraw``: no record is marked any more
        # What is kept per domain between its jobs (``DomainJobs``: the observations the
        # judge reads, with this daemon's own writes, and the findings last reported) lives
        # in its record (``domains``), forgotten with it.
        self.domains = domains if domains is not None else DomainRegistry()

    def update(self, config: HostConfig, settings: WatchSettings) -> None:
        self.config, self.settings = config, settings

    def observe(self, ev: Event) -> None:
        """Every event, on the daemon's main loop (quick, no libvirt call): what QEMU's
        monitor events and libvirt's device and vCPU removals say about vCPUs is kept for
        the domain's next job."""
        if isinstance(ev, HostEvent) and ev.what == "connected":
            self._missed_events(ev.host)
            return
        if ev.domain is None:
            return
        if isinstance(ev, FloodEvent):
            self._distrust_monitor(ev.domain.key)
            return
        if isinstance(ev, LifecycleEvent) and ev.event_name == "started":
            if ev.detail_name in FRESH_STARTS:
                with self.domains.lock:
                    self.domains.record(ev.domain.key).started_at = time.monotonic()
            return
        if not isinstance(ev, _VCPU_EVENTS):
            return
        domain = self._domain(ev.domain.key)
        found = domain.reader.read(ev)
        if found is not None:
            domain.observations.add([found])

    def _distrust_monitor(self, key: Key) -> None:
        """The domain flooded its monitor events, so the few that became records were the
        guest's to forge: none is judged (no "rejected" for a hot-add that never was) or
        recorded. Policy still acts on what the guest lists."""
        with self.domains.lock:
            # Only a mark here: the domain's next job applies it before it reads its
            # observations, so a job running meanwhile never has them voided under it
            # (its judgement would write its pending hot-add back).
            self.domains.record(key).distrusted_at = time.monotonic()

    def _missed_events(self, host: str) -> None:
        """A new connection to ``host``: events in the gap are lost, so no record of its
        domains is complete since QEMU's start any more (their next job says so)."""
        with self.domains.lock:
            for rec in self.domains.records(host):
                rec.jobs.since_start = False

    def _apply_distrust(self, key: Key, domain: DomainJobs) -> None:
        with self.domains.lock:
            rec = self.domains.record(key)
            at, rec.distrusted_at = rec.distrusted_at, None
        if at is not None:
            domain.observations.distrust(at)
            domain.since_start = False  # the plugs it sent were not kept

    def _keep_since_start(
        self, conn: Connection, dom: Domain, domain: DomainJobs, result: ReconcileResult
    ) -> None:
        """Begin the domain's record at QEMU's start this daemon saw, once its monitor
        events come in (the live count then holds any plug made before); take the mark
        off a record this daemon cannot vouch for (another run's, or a gap since)."""
        with self.domains.lock:
            rec = self.domains.record((conn.uri, dom.uuid))
            started, rec.started_at = rec.started_at, None
            if started is not None and dom.uuid not in conn.monitored():
                rec.started_at = started  # not listening yet: the next job begins it
                started = None
        live = result.view.live
        if started is not None and live is not None:
            since = time.time() - (time.monotonic() - started)  # the start, in Unix seconds
            voucher = "" if self._stopping else self.voucher
            begun = history.started(dom, live.current, since, voucher)
            domain.since_start = begun is not None and begun.since_start
        elif result.view.history.since_start and not domain.since_start:
            history.not_since_start(dom)

    def withdraw(self, conns: Mapping[str, Connection]) -> None:
        """An orderly stop: take the mark off every record this daemon vouches for, on the
        hosts whose connection is still there. Best effort (the caller bounds the time): a
        mark left behind counts for nothing once this process has let go of its locks."""
        with self.domains.lock:
            self._stopping = True
            vouched = [
                rec for host in conns for rec in self.domains.records(host) if rec.jobs.since_start
            ]
        for rec in vouched:
            try:
                dom = conns[rec.host].domain_by_uuid(rec.uuid)
            except errors.VirtHotplugError:
                continue  # gone, or the host is: its history went with it
            if history.not_since_start(dom) is not None:
                with self.domains.lock:
                    rec.jobs.since_start = False

    def run(self, conn: Connection, dom: Domain, job: Job) -> JobResult:
        domain = self._domain(job.ref.key)
        self._apply_distrust(job.ref.key, domain)
        domain.observations.hinted(job.hotadded, job.first_request)
        try:
            return self._reconcile(conn, dom, job, domain)
        except errors.InvalidPolicyError as exc:
            # Raised before any write: nothing was done to the guest. A record, a finding
            # (and its metric) say so, not only a log line.
            return self._invalid_policy(conn, dom, job, domain, str(exc))

    def _reconcile(self, conn: Connection, dom: Domain, job: Job, domain: DomainJobs) -> JobResult:
        config = self.config
        effective = None
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
            observations=domain.observations,
            source=SOURCE,
            first_look=self.settings.hotadd_settle,
        )
        self._keep_since_start(conn, dom, domain, result)
        return _reconciled(job, result, self._routine(job, domain, result))

    def _invalid_policy(
        self, conn: Connection, dom: Domain, job: Job, domain: DomainJobs, error: str
    ) -> JobResult:
        """The domain as it is, with the ``invalid-policy`` finding; routine (debug level)
        when the last job found the same."""
        contexts = history.contexts(self.config)
        view = collect.read_view(
            conn, dom, agent_timeout=self.settings.agent_timeout, context=contexts
        )
        finding = invalid_policy_finding(dom.name, error)
        view = dataclasses.replace(view, findings=(finding, *view.findings))
        codes = _codes(view)
        with self.domains.lock:
            previous, domain.findings = domain.findings, codes
        routine = set(job.reasons) <= {"host"} and previous == codes
        details = {"trigger": list(job.reasons), "policy_error": finding.message}
        record = _reconcile_record(
            (job.ref.host, dom.name, dom.uuid), view, details, "none", INVALID_POLICY
        )
        line = f"domain '{dom.name}': {finding.message}"
        return JobResult(record=record, line=line, view=view, routine=routine, warning=not routine)

    def _domain(self, key: Key) -> DomainJobs:
        with self.domains.lock:
            return self.domains.record(key).jobs

    def _routine(self, job: Job, domain: DomainJobs, result: ReconcileResult) -> bool:
        """A resync that wrote nothing and found what the last reconcile found."""
        codes = _codes(result.view)
        with self.domains.lock:
            previous, domain.findings = domain.findings, codes
        quiet_outcomes = {"skipped", "unchanged", "excluded"}
        return (
            set(job.reasons) <= {"host"}
            and previous == codes
            and all(o.code in quiet_outcomes for o in result.outcomes)
        )


def _codes(view: VcpuView) -> tuple[str, ...]:
    return tuple(sorted(f.code for f in view.findings))


def _grace_left(policy: Policy, job: Job) -> float:
    if policy.mode not in ACTING_MODES:
        return 0.0
    return policy.grace - (time.monotonic() - job.first_request)


def _retry(result: ReconcileResult) -> tuple[Optional[float], str]:
    """When to run again: to look for a hot-added CPU, or to judge a held finding."""
    retries = []
    if result.look_again is not None:
        retries.append((result.look_again, RETRY_HOTADD))
    if result.settle_after is not None:
        retries.append((result.settle_after, RETRY_SETTLE))
    if not retries:
        return None, RETRY_HOTADD
    after, reason = min(retries)
    return after, reason


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


def _reconciled(job: Job, result: ReconcileResult, routine: bool) -> JobResult:
    view, verdict = result.view, result.verdict
    since = time.monotonic() - job.first_request
    codes = [o.code for o in result.outcomes]
    details = {
        "trigger": list(job.reasons),
        "coalesced": job.coalesced,
        # Guest CPU ids the hot-add brought (present now minus before), and the vCPU ids
        # of the OST events behind it.
        "hotadded": sorted(verdict.listed),
        "hotadd_vcpus": sorted(verdict.hotadd_vcpus),
        "rejected_vcpus": sorted(verdict.rejected),
        "since_first_event": round(since, 3),
        "policy": result.policy.to_dict(),
        "plan": result.plan.to_dict(),
        "outcomes": [o.to_dict() for o in result.outcomes],
    }
    outcome = ",".join(codes) or "unchanged"
    record = _reconcile_record(
        (result.host, result.name, result.uuid), view, details, _action(result), outcome
    )
    online = view.guest.online if view.guest is not None else frozenset()
    retry_after, retry_reason = _retry(result)
    return JobResult(
        record=record,
        line=_line(result, since, verdict),
        failed=result.failed,
        retry_after=retry_after,
        view=view,
        routine=routine,
        retry_reason=retry_reason,
        retry_holds=False,  # looks again only: an event meanwhile runs the job at once
        warning=bool(verdict.rejected),
        hotadds_online=_online_hotadds(verdict, online),
        policy_mode=result.policy.policy.mode,
    )


def _reconcile_record(
    where: tuple[str, str, str], view: VcpuView, details: dict[str, Any], action: str, outcome: str
) -> Record:
    """A ``reconcile`` record: ``details`` and the view's layers (live, guest, agent) and
    findings, as every reconcile record carries them; ``where``: (host, domain, UUID)."""
    data = to_dict(view)
    layers = {key: data[key] for key in ("live", "guest", "agent")}
    host, name, uuid = where
    return Record(
        time=iso_time(time.time()),
        host=host,
        domain=name,
        uuid=uuid,
        event="reconcile",
        details={**details, **layers},
        findings=data["findings"],
        action=action,
        outcome=outcome,
    )


def _online_hotadds(verdict: Verdict, online: frozenset[int]) -> frozenset[int]:
    """The vCPU ids of the hot-adds whose guest CPUs are all online."""
    if verdict.listed and verdict.listed <= online:
        return verdict.hotadd_vcpus
    return frozenset()


def _action(result: ReconcileResult) -> str:
    plan = result.plan
    parts = []
    if plan.online:
        parts.append(f"online {format_cpulist(plan.online)}")
    if plan.offline:
        parts.append(f"offline {format_cpulist(plan.offline)}")
    return ", ".join(parts) or "none"


def _line(result: ReconcileResult, since: float, verdict: Verdict) -> str:
    view = result.view
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
        f"domain '{result.name}': {_hotadd_text(verdict)}policy {mode}: "
        f"{done or 'nothing to do'}; {state}; "
        f"{findings} [{result.trigger}, {since:.2f} s after the first event]"
    )


def _hotadd_text(verdict: Verdict) -> str:
    vcpus = ", ".join(f"vcpu{v}" for v in sorted(verdict.hotadd_vcpus))
    if verdict.listed:
        return f"guest detected CPU {format_cpulist(verdict.listed)} (hot-add of {vcpus}); "
    if verdict.rejected:
        return (
            f"guest rejected the hot-add of {vcpus}: QEMU's OST said its ACPI accepted the "
            f"device, but the guest lists no new CPU {verdict.waited:.1f} s later; "
        )
    return ""
