"""One reconcile of one domain, used unchanged by ``apply``, ``setvcpus`` and ``watch``.

    effective policy (metadata > config file > default)
      → read the four layers (collect.read_view)
      → decide (policy.decide → Plan)
      → act through the guest agent (unless dry run) → re-read
      → credit: the judge (core.judge) names what happened to each vCPU from the caller's
        observations — hot-adds the guest listed, onlined itself, or rejected
      → record what was observed into the domain's history (read, merge, write)
      → judge the findings once more with that history; a critical finding that depends on
        the guest is held at warning while it settles (only the finding: the action above
        was taken at once)

``observations``: the daemon passes the domain's ``core.judge.Observations`` (kept across
jobs), ``setvcpus`` one built from the events it saw during the command, ``apply`` none
(nothing is judged or recorded then).

It never sleeps for ``grace``: the daemon schedules reconciles, and ``apply`` ignores grace.
It is safe to call from many threads: it keeps no shared state except a lock per domain, so
two reconciles of one domain never interleave their writes. Every agent call is bounded by
``agent_timeout``.

Errors before any write (the domain vanished, an invalid policy, a lost connection) are
raised: nothing in the guest has changed then. Failures of writes become ``failed`` outcomes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from virthotplug.core import judge
from virthotplug.core.config import HostConfig
from virthotplug.core.drift import GUEST_DEPENDENT, find_drift
from virthotplug.core.judge import GuestSeen, LibvirtSeen, Observations, Verdict
from virthotplug.core.policy import MODES, EffectivePolicy, Plan, Policy, decide
from virthotplug.core.view import CRITICAL, History, VcpuView, to_dict
from virthotplug.host import actions, collect, history
from virthotplug.host.actions import FAILED, ONLINED, CpuOutcome, WriteResult
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.policysource import effective_policy

SOURCE_COMMAND_LINE = "command line"

_locks_guard = threading.Lock()


class _DomainLock:
    """A domain's lock and how many reconciles hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


# Only domains with a reconcile in flight have an entry: a daemon that sees thousands of
# short-lived domains must not keep a lock for each one it ever reconciled.
_domain_locks: dict[tuple[str, str], _DomainLock] = {}


@dataclass(frozen=True)
class ReconcileResult:
    name: str
    uuid: str
    host: str
    trigger: Optional[str]
    dry_run: bool
    policy: EffectivePolicy
    before: VcpuView
    plan: Plan
    outcomes: tuple[CpuOutcome, ...]
    after: Optional[VcpuView]  # None for a dry run
    writes: tuple[WriteResult, ...] = ()
    verdict: Verdict = field(default_factory=Verdict)  # the judge's (empty without observations)
    settle_after: Optional[float] = None  # a finding is held at warning: judge again then

    @property
    def view(self) -> VcpuView:
        """The domain as the reconcile left it."""
        return self.after if self.after is not None else self.before

    @property
    def look_again(self) -> Optional[float]:
        """When to look again for a hot-added CPU the guest has not listed yet."""
        return self.verdict.look_again

    @property
    def failed(self) -> bool:
        return any(o.code == FAILED for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "name": self.name,
            "uuid": self.uuid,
            "trigger": self.trigger,
            "dry_run": self.dry_run,
            "policy": self.policy.to_dict(),
            "plan": self.plan.to_dict(),
            "outcomes": [o.to_dict() for o in self.outcomes],
            "before": to_dict(self.before),
            "after": to_dict(self.after) if self.after is not None else None,
        }


def reconcile(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    *,
    dry_run: bool = False,
    trigger: Optional[str] = None,
    agent_timeout: Optional[float] = None,
    mode: Optional[str] = None,
    effective: Optional[EffectivePolicy] = None,
    settling: bool = False,
    observations: Optional[Observations] = None,
    source: str = "watch",
    first_look: float = judge.HOTADD_FIRST_LOOK,
) -> ReconcileResult:
    """Reconcile one domain once. ``mode`` overrides the effective mode (``setvcpus
    --online/--no-online``). ``effective``: the domain's policy when the caller has just
    resolved it (saves its metadata reads). ``settling``: the guest may still be catching up
    (findings that depend on it are at most warnings). ``observations``: what the caller saw
    of the domain (see the module's docstring); ``source`` names the caller in the history,
    ``first_look`` is the first delay before looking again for a hot-added CPU. Under
    'ignore' the guest agent is never asked."""
    timeout = agent_timeout if agent_timeout is not None else config.watch.agent_timeout
    with _lock_for(conn.uri, dom.uuid):
        resolved = effective if effective is not None else effective_policy(conn, dom, config)
        effective = _with_mode(resolved, mode)
        context = history.contexts(config, policy=effective.policy, settling=settling)
        before = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
        plan = decide(before, effective.policy)
        writes: tuple[WriteResult, ...] = ()
        after: Optional[VcpuView] = None if dry_run else before
        if not dry_run and not plan.is_noop:
            writes = actions.execute(
                dom,
                plan,
                policy=effective.policy,
                agent_timeout=timeout,
                maximum=_maximum(before),
            )
            # Always re-read: a partial success or a timed-out write changes the guest.
            after = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
        acted = _Acted(plan, before, after, writes)
        if observations is None or dry_run:
            judged = _Judged(actions.outcomes(effective.policy, plan, before, after, writes))
        else:
            judged = _judge(dom, acted, effective.policy, observations, source, first_look)
    final = judged.view
    return ReconcileResult(
        name=before.name,
        uuid=before.uuid,
        host=conn.uri,
        trigger=trigger,
        dry_run=dry_run,
        policy=effective,
        before=final if final is not None and after is None else before,
        plan=plan,
        outcomes=judged.outcomes,
        after=final if final is not None and after is not None else after,
        writes=writes,
        verdict=judged.verdict,
        settle_after=judged.settle_after,
    )


@dataclass(frozen=True)
class _Acted:
    """The first half of a reconcile: what was read, planned and written."""

    plan: Plan
    before: VcpuView
    after: Optional[VcpuView]
    writes: tuple[WriteResult, ...]

    @property
    def view(self) -> VcpuView:
        return self.after if self.after is not None else self.before


@dataclass(frozen=True)
class _Judged:
    """The second half: outcomes, the judge's verdict, and the view judged with the history
    as recorded (None: the view as read)."""

    outcomes: tuple[CpuOutcome, ...]
    verdict: Verdict = field(default_factory=Verdict)
    view: Optional[VcpuView] = None
    settle_after: Optional[float] = None


def _judge(
    dom: Domain,
    acted: _Acted,
    policy: Policy,
    observations: Observations,
    source: str,
    first_look: float,
) -> _Judged:
    """Credit, record and judge: the second half of a reconcile with observations."""
    before = acted.before
    verdict = judge.judge(
        observations.snapshot(),
        guest_seen(before),
        libvirt_seen(before),
        now=time.monotonic(),
        wall=time.time(),
        source=source,
        first_look=first_look,
    )
    credit = verdict.listed - verdict.ours
    found = actions.outcomes(policy, acted.plan, before, acted.after, acted.writes, credit)
    ours = frozenset(cpu for o in found if o.code == ONLINED for cpu in o.cpus)
    observations.wrote_online(ours, time.monotonic())
    view = acted.view
    recorded = _record(dom, view, verdict)
    observations.settle(verdict, guest_seen(view), recorded is not None)
    if recorded is not None and recorded != view.history:
        view = dataclasses.replace(view, history=recorded)
        view = dataclasses.replace(view, findings=find_drift(view, policy, now=time.time()))
    view, settle_after = _settle(observations, view, policy)
    return _Judged(found, verdict, view, settle_after)


def _record(dom: Domain, view: VcpuView, verdict: Verdict) -> Optional[History]:
    """Write what was observed into the domain's history. None: nothing could be written
    (the stored history was not readable); the view's history when there was nothing."""
    if not verdict.entries:
        return view.history
    live = view.live.current if view.live is not None else None
    return history.record(dom, verdict.entries, live_count=live)


def _settle(
    observations: Observations, view: VcpuView, policy: Policy
) -> tuple[VcpuView, Optional[float]]:
    """A guest-dependent critical finding seen for the first time is held at warning for
    ``judge.SETTLE_WINDOW``: the view judged so, and when to judge again (None: nothing is
    held). It holds back the finding only; the reconcile has acted already."""
    critical = {f.code for f in view.findings if f.severity == CRITICAL} & GUEST_DEPENDENT
    now = time.monotonic()
    with observations.lock:
        since, left = judge.settling_left(observations.critical_since, critical, now)
        observations.critical_since = since
    if left is None:
        return view, None
    settled = find_drift(view, policy, settling=True, now=time.time())
    return dataclasses.replace(view, findings=settled), left


def guest_seen(view: VcpuView) -> Optional[GuestSeen]:
    """The guest agent's answer in ``view``, for the judge (None: it did not answer)."""
    if view.guest is None:
        return None
    return GuestSeen(view.guest.present, view.guest.online, time.monotonic())


def libvirt_seen(view: VcpuView) -> Optional[LibvirtSeen]:
    if view.live is None:
        return None
    enabled = frozenset(v.id for v in view.live.vcpus if v.enabled)
    if view.hypervisor is not None and not enabled:
        enabled = frozenset(view.hypervisor.vcpus)
    return LibvirtSeen(view.live.current, enabled)


def _with_mode(effective: EffectivePolicy, mode: Optional[str]) -> EffectivePolicy:
    if mode is None:
        return effective
    if mode not in MODES:
        raise ValueError(f"unknown policy mode {mode!r}")
    policy = dataclasses.replace(effective.policy, mode=mode)
    return EffectivePolicy(policy, {**effective.sources, "mode": SOURCE_COMMAND_LINE})


def _maximum(view: VcpuView) -> int:
    if view.live is not None:
        return view.live.maximum
    return view.config.maximum if view.config is not None else 1


@contextlib.contextmanager
def _lock_for(host: str, uuid: str) -> Iterator[None]:
    """Hold the domain's lock; its entry goes when its last user leaves."""
    key = (host, uuid)
    with _locks_guard:
        entry = _domain_locks.setdefault(key, _DomainLock())
        entry.users += 1
    try:
        with entry.lock:
            yield
    finally:
        with _locks_guard:
            entry.users -= 1
            if entry.users == 0:
                del _domain_locks[key]
