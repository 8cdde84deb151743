"""The daemon's periodic resync (and the one after a reconnect), in bulk.

One pass over a host, every running domain at once:

    1 call        getAllDomainStats of the active domains (state, vCPU counts and states)
    1 call        the transient ones
    definitions   only where the cache cannot answer (``collect.DefinitionCache``): first
                  sight, an event for the domain, a change in its stats, or its age; on a
                  driver whose stats have no vCPU counts (the test driver), one
                  virDomainGetInfo per domain stands in for them as the change signal
    agent         never for ``ignore`` domains; otherwise only for running domains whose
                  policy may act (``online``, ``match``),
                  whose last guest reading had findings (so that a fix made from outside,
                  e.g. ``virthotplug apply``, shows), or whose guest layer is older than the
                  definitions' age limit; the policy comes from the host file and the
                  metadata element already in the definitions read, so it costs no call

Every view is judged as a reconcile would judge it: under the domain's policy and with its
vCPU history; a domain whose inputs are all as last time (the same bulk view object from
the cache, guest layer, history and policy) keeps its last judgement, unless a finding tells
an age (``unplug-pending``). Then a reconcile job only for the domains that need one: first
seen, findings different from the last ones known (this resync's or the last reconcile's),
or a plan that is not a no-op. Everything else is left alone: a host of a thousand quiet
domains costs a few calls and no reconcile per resync.

Otherwise the guest layer is not re-read here: the view keeps the guest layer last read
(events — OST, agent lifecycle, hook — re-read it), and a hot-add still shows, in the live
layer from the stats, as changed findings. A change made inside a clean guest whose policy
does not act (an administrator offlining a CPU) shows within the age limit.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

from virthotplug.core import errors
from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.drift import UNPLUG_PENDING, find_drift, invalid_policy_finding
from virthotplug.core.events import DomainRef
from virthotplug.core.policy import MODE_IGNORE, EffectivePolicy, decide
from virthotplug.core.view import VcpuView
from virthotplug.host import collect, history
from virthotplug.host.connection import Connection
from virthotplug.host.policysource import policy_from_definitions

log = logging.getLogger(__name__)

# Definitions are read again at least this many resync intervals after they were read.
MAX_AGE_INTERVALS = 10

# Told of every view a resync read: (host, views, uuid → effective policy mode). A domain
# whose policy is invalid has no mode (its reconcile reports the error).
OnViews = Callable[[str, Sequence[VcpuView], Mapping[str, str]], None]


class ConfigHolder(Protocol):
    """Where the current configuration lives (``jobs.JobRunner``; replaced on SIGHUP)."""

    config: HostConfig
    settings: WatchSettings


@dataclass(frozen=True)
class ResyncResult:
    host: str
    running: int  # domains read
    reconcile: tuple[DomainRef, ...]  # the ones that need a reconcile job
    listed: tuple[DomainRef, ...]  # every running domain
    definition_reads: int
    agents_asked: int
    seconds: float
    complete: bool = True  # every running domain was read (``listed`` has them all)
    judged: int = 0  # domains judged again (the others' judgement was unchanged)

    def describe(self) -> str:
        return (
            f"{self.running} running, {len(self.reconcile)} to reconcile; "
            f"{self.definition_reads} definitions read, {self.agents_asked} agents asked, "
            f"{self.judged} judged, "
            f"{self.seconds:.2f} s"
        )


@dataclass(slots=True)
class _Known:
    codes: tuple[str, ...]
    view: VcpuView
    guest_read: float  # monotonic time the guest layer in ``view`` was read
    # What a resync judged ``view`` from (None after a reconcile): the bulk read's view (the
    # same object while the domain's stats and definitions are unchanged), the policy, and
    # whether that policy's plan for ``view`` does something (a reconcile is then due).
    base: Optional[VcpuView] = None
    policy: Optional[EffectivePolicy] = None
    acts: bool = False

    def same_judgement(self, raw: collect.BulkRaw, policy: Optional[EffectivePolicy]) -> bool:
        """Whether judging ``raw`` again (its agent not asked) would give ``view`` again:
        the same inputs (the bulk view by identity, the guest layer and history kept here,
        the policy) and no finding whose text tells an age."""
        return (
            raw.view is self.base
            and policy is not None
            and policy == self.policy
            and UNPLUG_PENDING not in self.codes
        )

    def worth_asking(self, now: float, max_age: float) -> bool:
        """Whether the agent should be asked although the policy does not act."""
        return (self.view.guest is not None and bool(self.codes)) or (
            now - self.guest_read >= max_age
        )


class _HostState:
    def __init__(self, conn: Connection, max_age: float) -> None:
        self.conn = conn
        self.cache = collect.DefinitionCache(max_age)
        self.known: dict[str, _Known] = {}  # uuid → last findings and full view
        # Guards ``known``. One per host: a resync judging a thousand domains of one host
        # holds it a while, and a reconcile ending on another host (a hot-add) must not
        # wait for that.
        self.lock = threading.Lock()
        # uuid → (metadata fields, configuration, their policy): merged again only when
        # either changed (the fields are the cached definitions' own object until then).
        self._policies: dict[str, tuple[Any, HostConfig, EffectivePolicy]] = {}

    def policy(self, raw: collect.BulkRaw, config: HostConfig) -> EffectivePolicy:
        """The domain's effective policy; ``ConfigError`` when invalid (never kept)."""
        uuid, fields = raw.view.uuid, raw.policy_fields
        kept = self._policies.get(uuid)
        if kept is not None and kept[0] == fields and kept[1] is config:
            return kept[2]
        policy = policy_from_definitions(raw.view.name, uuid, fields, config)
        self._policies[uuid] = (fields, config, policy)
        return policy

    def retain_policies(self, uuids: set[str]) -> None:
        for uuid in [u for u in self._policies if u not in uuids]:
            del self._policies[uuid]


class BulkResync:
    """Bulk resyncs of every host; also told of events and of finished reconciles."""

    def __init__(
        self,
        holder: ConfigHolder,
        on_views: Optional[OnViews] = None,
    ) -> None:
        self._holder = holder
        self._on_views = on_views
        self._hosts: dict[str, _HostState] = {}
        self._lock = threading.Lock()  # guards ``_hosts``; each host's state has its own

    # --- what the daemon tells it --------------------------------------------------------

    def invalidate(self, host: str, uuid: str) -> None:
        """An event named the domain: its cached definitions may be out of date."""
        state = self._hosts.get(host)
        if state is not None:
            state.cache.invalidate(uuid)

    def forget(self, host: str, uuid: str) -> None:
        """The domain stopped or went away."""
        state = self._hosts.get(host)
        if state is not None:
            state.cache.invalidate(uuid)
            with state.lock:
                state.known.pop(uuid, None)

    def reconciled(self, host: str, view: Optional[VcpuView]) -> None:
        """A reconcile job ended with ``view``: the latest full view of the domain."""
        state = self._hosts.get(host)
        if state is None or view is None:
            return
        with state.lock:
            state.known[view.uuid] = _Known(_codes(view), view, time.monotonic())

    # --- the resync -----------------------------------------------------------------------

    def run(self, conn: Connection) -> ResyncResult:
        """One bulk pass over ``conn``'s host (on a thread of its own, never the main one)."""
        started = time.monotonic()
        state = self._state(conn)
        holder = self._holder
        config, settings = holder.config, holder.settings
        read = collect.read_running(
            conn, state.cache, workers=settings.workers, include=settings.watches
        )
        for error in read.errors:
            log.warning("domain '%s': resync: %s", error.name, error.error)
        state.retain_policies({raw.view.uuid for raw in read.raws})
        acting: list[collect.BulkRaw] = []
        idle: list[collect.BulkRaw] = []
        policies: dict[str, Optional[EffectivePolicy]] = {}
        invalid: dict[str, str] = {}  # uuid -> why its policy is invalid
        for raw in read.raws:
            try:
                policy = state.policy(raw, config)
            except errors.ConfigError as exc:
                policies[raw.view.uuid] = None  # the reconcile job records it
                invalid[raw.view.uuid] = str(exc)
                idle.append(raw)
                continue
            policies[raw.view.uuid] = policy
            (acting if self._asks(state, raw, policy, started) else idle).append(raw)
        views = collect.guest_layers(
            conn, acting, agent_timeout=settings.agent_timeout, workers=settings.workers
        )
        asked = {view.uuid for view in views}
        raws = {raw.view.uuid: raw for raw in read.raws}
        with state.lock:
            unchanged = self._unchanged(state, idle, policies)
            views += [
                self._carried_over(state, raw.view)
                for raw in idle
                if raw.view.uuid not in unchanged
            ]
            views = [
                self._judged(state, v, policies.get(v.uuid), raws[v.uuid], invalid.get(v.uuid))
                for v in views
            ]
            chosen = self._choose(state, views, policies, asked, started, raws, unchanged)
            kept = [state.known[uuid] for uuid in unchanged]
            chosen += tuple(_ref(known.view) for known in kept if known.acts)
            views += [known.view for known in kept]
        if self._on_views is not None:
            modes = {uuid: p.policy.mode for uuid, p in policies.items() if p is not None}
            self._on_views(conn.uri, views, modes)
        listed = tuple(DomainRef(conn.uri, r.view.uuid, r.view.name) for r in read.raws)
        return ResyncResult(
            host=conn.uri,
            running=len(read.raws),
            reconcile=chosen,
            listed=listed,
            definition_reads=read.definition_reads,
            agents_asked=len(acting),
            seconds=time.monotonic() - started,
            complete=not read.errors,
            judged=len(read.raws) - len(unchanged),
        )

    def _state(self, conn: Connection) -> _HostState:
        """The host's state, started afresh on a new connection: events in a gap are lost,
        so nothing cached from before it can be trusted."""
        with self._lock:
            state = self._hosts.get(conn.uri)
            if state is None or state.conn is not conn:
                max_age = MAX_AGE_INTERVALS * self._holder.settings.resync_interval
                state = self._hosts[conn.uri] = _HostState(conn, max_age)
            return state

    def _asks(
        self, state: _HostState, raw: collect.BulkRaw, policy: EffectivePolicy, now: float
    ) -> bool:
        view = raw.view
        if not view.agent.configured or view.state != "running":
            return False
        if policy.policy.mode == MODE_IGNORE:  # 'ignore' leaves the guest alone
            return False
        if policy.policy.acts:
            return True
        with state.lock:
            known = state.known.get(view.uuid)
        return known is None or known.worth_asking(now, state.cache.max_age)

    @staticmethod
    def _unchanged(
        state: _HostState,
        idle: Sequence[collect.BulkRaw],
        policies: dict[str, Optional[EffectivePolicy]],
    ) -> set[str]:
        """The idle domains whose judgement would come out as last time (their UUIDs).
        Judging a thousand quiet domains again each resync is most of a resync's cost."""
        unchanged = set()
        for raw in idle:
            uuid = raw.view.uuid
            known = state.known.get(uuid)
            if known is not None and known.same_judgement(raw, policies.get(uuid)):
                unchanged.add(uuid)
        return unchanged

    @staticmethod
    def _carried_over(state: _HostState, view: VcpuView) -> VcpuView:
        """A view whose agent was not asked, with the guest layer last read for it."""
        known = state.known.get(view.uuid)
        if known is not None and known.view.agent.configured and view.agent.configured:
            view = dataclasses.replace(view, guest=known.view.guest, agent=known.view.agent)
        return view

    @staticmethod
    def _judged(
        state: _HostState,
        view: VcpuView,
        policy: Optional[EffectivePolicy],
        raw: collect.BulkRaw,
        invalid: Optional[str] = None,
    ) -> VcpuView:
        """Findings as a reconcile would judge them: under the domain's policy, with its
        vCPU history (the daemon's latest, else what the live definition read holds), so a
        resync never calls CPUs a policy keeps offline a warning, nor a hot-add the guest
        rejected an unplug gone wrong. ``invalid``: why the policy is invalid (its finding
        then leads, as the reconcile job's does)."""
        known = state.known.get(view.uuid)
        live = raw.definitions.live
        latest = None
        if known is not None:
            latest = known.view.history
        elif live is not None:
            latest = history.from_raw(live.history, uri=state.conn.uri)
        if latest is not None and latest != view.history:  # most domains have none: no copy
            view = dataclasses.replace(view, history=latest)
        rules = policy.policy if policy is not None else None
        findings = find_drift(view, rules, now=time.time())
        if invalid is not None:
            findings = (invalid_policy_finding(view.name, invalid), *findings)
        return dataclasses.replace(view, findings=findings)

    @staticmethod
    def _choose(
        state: _HostState,
        views: Sequence[VcpuView],
        policies: dict[str, Optional[EffectivePolicy]],
        asked: set[str],
        now: float,
        raws: Mapping[str, collect.BulkRaw],
        unchanged: set[str],
    ) -> tuple[DomainRef, ...]:
        """The judged ``views`` that need a reconcile; remembers each judgement. Domains in
        ``unchanged`` were not judged again (``_unchanged``): their records stay."""
        chosen = []
        seen = set(unchanged)
        for view in views:
            seen.add(view.uuid)
            codes = _codes(view)
            known = state.known.get(view.uuid)
            policy = policies.get(view.uuid)
            acts = policy is not None and not decide(view, policy.policy).is_noop
            needed = known is None or known.codes != codes or policy is None or acts
            read = now if view.uuid in asked or known is None else known.guest_read
            base = raws[view.uuid].view if view.uuid not in asked else None
            if known is not None and known.codes == codes and known.view == view:
                # Unchanged: keep the old objects and drop this pass's copies, so that a
                # quiet host's resync leaves no new long-lived objects behind (memory).
                known.guest_read = read
                known.base, known.policy, known.acts = base, policy, acts
            else:
                state.known[view.uuid] = _Known(codes, view, read, base, policy, acts)
            if needed:
                chosen.append(_ref(view))
        for uuid in [u for u in state.known if u not in seen]:
            del state.known[uuid]
        return tuple(chosen)


def _ref(view: VcpuView) -> DomainRef:
    return DomainRef(view.host, view.uuid, view.name)


def _codes(view: VcpuView) -> tuple[str, ...]:
    return tuple(sorted(f.code for f in view.findings))
