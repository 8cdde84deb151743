"""One reconcile of one domain, shared by ``virthotplug apply`` and the daemon.

    effective policy (metadata > config file > default)
      → read the four layers (collect.read_view)
      → policy.decide(view, policy) → Plan
      → execute through the agent (unless dry run) → re-read → outcomes

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
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from virthotplug.core.config import HostConfig
from virthotplug.core.policy import MODES, EffectivePolicy, Plan, decide
from virthotplug.core.view import VcpuView, to_dict
from virthotplug.host import actions, collect, history
from virthotplug.host.actions import FAILED, CpuOutcome, WriteResult
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
    hotadded: frozenset[int] = frozenset(),
    agent_timeout: Optional[float] = None,
    mode: Optional[str] = None,
    effective: Optional[EffectivePolicy] = None,
    settling: bool = False,
) -> ReconcileResult:
    """Reconcile one domain once. ``hotadded``: guest CPU ids a hot-add hint says just
    appeared (online ones we never wrote are reported ``onlined-by-guest``). ``mode``
    overrides the effective mode (``setvcpus --online/--no-online``). ``effective``: the
    domain's policy when the caller has just resolved it (saves its metadata reads).
    ``settling``: the guest may still be catching up (findings that depend on it are at most
    warnings). Under 'ignore' the guest agent is never asked."""
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
    found = actions.outcomes(effective.policy, plan, before, after, writes, hotadded)
    return ReconcileResult(
        name=before.name,
        uuid=before.uuid,
        host=conn.uri,
        trigger=trigger,
        dry_run=dry_run,
        policy=effective,
        before=before,
        plan=plan,
        outcomes=found,
        after=after,
        writes=writes,
    )


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
