"""``setvcpus --guest``: the number of CPUs online inside the guest, like ``virsh setvcpus
--guest``, validated before any change and verified after it.

virsh asks libvirt (``VIR_DOMAIN_VCPU_GUEST``) and libvirt picks the CPUs itself: the first
offlinable ones in the agent's list, which may be cpu0, and it knows nothing of a policy's
``exclude``. Here the same count is reached through ``virDomainSetGuestVcpus`` with the
choice the 'match' policy makes (``core.policy``): never cpu0, never an excluded CPU, the
highest-numbered CPUs offlined first and the lowest-numbered onlined first. What libvirt
refuses is refused the same way, before anything changes: more CPUs than the domain has
enabled vCPUs, more than the guest lists, fewer than it can offline.

The domain's policy decides whether the guest may be changed at all: an invalid policy is
refused (as every change is), and under 'report' or 'ignore' the guest is left alone unless
the caller overrides the policy for this one request (``setvcpus --guest
--override-policy``).
"""

from __future__ import annotations

from virthotplug.core import errors
from virthotplug.core.config import HostConfig
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.policy import (
    MODE_MATCH,
    EffectivePolicy,
    Policy,
    decide,
    unreachable,
)
from virthotplug.core.resizeplan import LayerCheck, Request
from virthotplug.core.view import AGENT_NOT_CONFIGURED, VcpuView
from virthotplug.host import collect, history
from virthotplug.host.connection import Connection
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import AGENT_CHANNEL
from virthotplug.host.policysource import effective_policy
from virthotplug.ops.reconcile import SOURCE_COMMAND_LINE, reconcile
from virthotplug.ops.resize import SOURCE, ResizeResult

TRIGGER = "setvcpus --guest"


def set_guest_count(
    conn: Connection, dom: Domain, config: HostConfig, request: Request
) -> ResizeResult:
    """Online or offline guest CPUs until ``request.count`` are online, then verify."""
    if conn.readonly:
        raise errors.PermissionDeniedError(
            f"{dom.context}: a read-only connection cannot change the guest's CPUs"
        )
    if not dom.is_active():
        raise errors.NotRunningError(f"{dom.context} is not running: --guest needs it running")
    domain_policy = effective_policy(conn, dom, config)  # an invalid one: refused here
    _check_policy_allows(dom, domain_policy.policy, request)
    guest_policy = _one_shot(domain_policy, request.count)
    timeout = config.watch.agent_timeout
    context = history.contexts(config, policy=guest_policy.policy)
    before = collect.read_view(conn, dom, agent_timeout=timeout, context=context)
    check_guest_request(before, guest_policy.policy)
    result = reconcile(
        conn,
        dom,
        config,
        trigger=TRIGGER,
        agent_timeout=timeout,
        effective=guest_policy,
        source=SOURCE,
    )
    after = result.after if result.after is not None else result.before
    checks = (guest_online_check(after, request.count),)
    notes = tuple(_policy_notes(after, domain_policy.policy))
    return ResizeResult(dom.name, request, before, after, checks, reconcile=result, notes=notes)


def _check_policy_allows(dom: Domain, policy: Policy, request: Request) -> None:
    """Under 'report' or 'ignore' nothing changes the guest but an explicit override."""
    if policy.acts or request.override_policy:
        return
    raise errors.UnsupportedError(
        f"{dom.context}: its policy is '{policy.mode}', which leaves the guest's CPUs as "
        "they are: --guest changes nothing then (--override-policy changes them for this "
        "request, or set an acting policy with 'virthotplug policy --set')"
    )


def _one_shot(domain: EffectivePolicy, count: int) -> EffectivePolicy:
    """'match COUNT' for this request, keeping the domain's ``exclude`` and ``retries``."""
    policy = Policy(
        mode=MODE_MATCH,
        count=count,
        exclude=domain.policy.exclude,
        retries=domain.policy.retries,
    )
    sources = {**domain.sources, "mode": SOURCE_COMMAND_LINE, "count": SOURCE_COMMAND_LINE}
    sources["grace"] = SOURCE_COMMAND_LINE  # no grace: the change is asked for now
    return EffectivePolicy(policy=policy, sources=sources)


def check_guest_request(view: VcpuView, policy: Policy) -> None:
    """What libvirt refuses (and what the policy's ``exclude`` and cpu0 make impossible),
    refused before anything changes."""
    count = policy.count
    assert count is not None
    if view.state != "running" or view.live is None:
        raise errors.NotRunningError(
            f"domain '{view.name}' is {view.state}: --guest needs a running domain"
        )
    if view.guest is None:
        named = f"domain '{view.name}': "
        detail = view.agent.error or ""
        detail = f": {detail.removeprefix(named)}" if detail else ""
        # The running domain's definition decides, not the persistent one: libvirt says so
        # when a channel was added to the persistent definition only.
        if not view.agent.configured or view.agent.state == AGENT_NOT_CONFIGURED:
            raise errors.AgentNotConfiguredError(
                f"{named}--guest needs the guest agent, which is not configured: the running "
                f"domain has no {AGENT_CHANNEL} channel{detail}"
            )
        raise errors.AgentError(
            f"{named}--guest needs the guest agent, which is {view.agent.state}{detail}"
        )
    enabled = view.live.current
    if count > enabled:
        raise errors.UnsupportedError(
            f"domain '{view.name}': {count} guest CPUs requested, the domain has {enabled} "
            "enabled vCPUs (hot-add them first: setvcpus without --guest)"
        )
    present = len(view.guest.present)
    if count > present:
        raise errors.UnsupportedError(
            f"domain '{view.name}': {count} guest CPUs requested, the guest lists {present}"
        )
    why = unreachable(view, policy)
    if why is not None:
        raise errors.UnsupportedError(
            f"domain '{view.name}': cannot set {count} CPUs online: {why}"
        )


def guest_online_check(view: VcpuView, count: int) -> LayerCheck:
    guest = view.guest
    if guest is None:
        return LayerCheck("guest online", f"unknown ({view.agent.state})", str(count), False)
    now = f"{len(guest.online)} ({format_cpulist(guest.online)})"
    return LayerCheck("guest online", now, str(count), len(guest.online) == count)


def _policy_notes(after: VcpuView, policy: Policy) -> list[str]:
    """Where the domain's own acting policy will undo the change at its next reconcile."""
    if not policy.acts:
        return []
    plan = decide(after, policy)
    if plan.is_noop:
        return []
    parts = []
    if plan.online:
        parts.append(f"online CPU {format_cpulist(plan.online)}")
    if plan.offline:
        parts.append(f"offline CPU {format_cpulist(plan.offline)}")
    return [
        f"the domain's policy '{policy.mode}' will {' and '.join(parts)} again at the next "
        "reconcile (watch, apply): set the policy to keep this count"
    ]
