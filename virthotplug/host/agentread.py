"""Agent reads: the guest layer of many domains, then their drift findings; and the guest
layer of one domain, for a command that waits on it (``read_guest``).

One ``guestVcpus`` per running domain with an agent channel (and a policy that asks its
agent), in parallel with a bounded pool and a bounded wait each (``core.workpool``), each
on an agent lease of the connection (``Connection.agent_call``); none once the driver said
it has no such API at all. An agent that hangs or replies garbage becomes the domain's
agent state and a finding, never a failure of the read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Sequence

from virthotplug.core import errors
from virthotplug.core.drift import find_drift
from virthotplug.core.view import (
    AGENT_BAD_REPLY,
    AGENT_CONNECTED,
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_CONNECTED,
    AGENT_NOT_QUERIED,
    AGENT_UNRESPONSIVE,
    AGENT_UNSUPPORTED,
    AgentStatus,
    Finding,
    GuestLayer,
    VcpuView,
    parse_guest_reply,
)
from virthotplug.core.workpool import CallResult, CallTimeout, bounded_map, call_with_timeout
from virthotplug.host.bulk import DomainRead
from virthotplug.host.connection import Connection, NoLeaseError
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import parse_domain_xml
from virthotplug.host.history import DomainContext

log = logging.getLogger(__name__)


def guest_layers(
    conn: Connection, raws: Sequence[DomainRead], *, agent_timeout: float, workers: int
) -> list[VcpuView]:
    """The agent of each of ``raws`` asked (in parallel, bounded), findings added: the
    views in the order of ``raws``."""
    queried = [
        r
        for r in raws
        if r.view.agent.configured
        and r.view.state == "running"
        and (r.context is None or r.context.queries_agent)
    ]
    outcomes = _query_agents(conn, queried, workers, agent_timeout)
    agent_views = {}
    for raw, outcome in zip(queried, outcomes):
        error: Optional[BaseException] = outcome.error
        if outcome.timed_out:
            error = CallTimeout(f"no answer within {agent_timeout:g} s")
        asked = not isinstance(error, NoLeaseError)  # the host's cap, not the guest's fault
        if isinstance(error, errors.AgentUnavailableError) and _channel_disconnected(raw.dom):
            error = errors.AgentNotConnectedError(str(error), code=error.code)
        agent_views[raw.view.uuid] = _guest_view(raw, outcome.value, error, asked=asked)
    views = [agent_views.get(r.view.uuid, r.view) for r in raws]
    return [dataclasses.replace(v, findings=_findings(v, r.context)) for v, r in zip(views, raws)]


def read_guest(conn: Connection, dom: Domain, *, maximum: int, timeout: float) -> GuestLayer:
    """The guest layer of ``dom`` now, for a command that waits on it: its agent's list
    (``Domain.guest_vcpus``, on an agent lease) parsed as ``guest_layers`` parses it.
    Raises what the call raises, ``CallTimeout`` when no answer came within ``timeout``
    seconds, and ``GuestDataError`` for a reply that is not a list of CPUs."""
    reply = call_with_timeout(lambda: conn.guest_vcpus(dom), timeout)
    return parse_guest_reply(reply, maximum=maximum, domain=dom.name)


def _findings(view: VcpuView, context: Optional[DomainContext]) -> tuple[Finding, ...]:
    if context is None:
        return find_drift(view, now=time.time())
    return find_drift(view, context.policy, settling=context.settling, now=time.time())


def _query_agents(
    conn: Connection, queried: Sequence[DomainRead], workers: int, timeout: float
) -> list[CallResult[Any]]:
    """``guest_vcpus`` of every domain in ``queried``, ``workers`` at a time.

    A driver without the guest-agent API (the capability record says so: the test driver)
    is asked once, on the shared connection, not once per domain: every call would fail
    the same way without reaching a guest, so the driver's own answer for one (e.g. "read
    only access prevents ..." or "not supported") is every domain's. No guest is behind
    that call, so nothing can hang it, and no agent lease is opened for it (a lease is a
    connection of its own; the test driver re-reads its whole node file for each one).
    """
    if not queried:
        return []
    domains = [r.dom for r in queried]
    if conn.support.guest_agent_api:
        return bounded_map(Domain.guest_vcpus, domains, workers=workers, timeout=timeout)
    first = bounded_map(Domain.guest_vcpus_unleased, domains[:1], workers=1, timeout=timeout)[0]
    if first.error is None or first.timed_out:  # it answered after all: ask every domain
        rest = bounded_map(Domain.guest_vcpus, domains[1:], workers=workers, timeout=timeout)
        return [first, *rest]
    asked = queried[0].view.name
    return [first] + [
        CallResult(error=_same_error(first.error, asked, raw.view.name)) for raw in queried[1:]
    ]


def _same_error(error: BaseException, asked: str, other: str) -> BaseException:
    """The error one domain got, as another domain's (same class and code, its name)."""
    if not isinstance(error, errors.VirtHotplugError):
        return error
    message = error.message.replace(f"domain '{asked}': ", f"domain '{other}': ", 1)
    return type(error)(message, code=error.code)


def _guest_view(
    raw: DomainRead, reply: Any, error: Optional[BaseException], *, asked: bool = True
) -> VcpuView:
    view = raw.view
    guest: Optional[GuestLayer] = None
    if error is None:
        maximum = view.live.maximum if view.live else raw.definitions.main.vcpu_max
        try:
            guest = parse_guest_reply(reply, maximum=maximum, domain=view.name)
        except errors.GuestDataError as exc:
            log.warning("%s", exc)
            error = exc
    state = AGENT_CONNECTED if error is None else _agent_state_for(error)
    agent = AgentStatus(
        configured=True, state=state, error=str(error) if error else None, asked=asked
    )
    return dataclasses.replace(view, guest=guest, agent=agent)


def _channel_disconnected(dom: Domain) -> bool:
    """Whether the live definition says no agent is connected to the domain's channel.

    libvirt reports "not connected" and "no answer" with one code; the channel state tells
    them apart without reading its (translated) message. One call, only after a failure.
    """
    try:
        live = parse_domain_xml(dom.xml(inactive=False), domain=dom.name)
    except errors.VirtHotplugError:
        return False
    return live.agent_channel_state == "disconnected"


def _agent_state_for(error: BaseException) -> str:
    """Map an agent failure to an agent state; host-level failures are re-raised."""
    if isinstance(error, (errors.PermissionDeniedError, errors.ConnectError)):
        raise error
    if isinstance(error, errors.GuestDataError):
        return AGENT_BAD_REPLY
    if isinstance(error, errors.AgentNotConfiguredError):
        return AGENT_NOT_CONFIGURED
    if isinstance(error, errors.UnsupportedError):
        return AGENT_UNSUPPORTED
    if isinstance(error, errors.NotRunningError):
        return AGENT_NOT_QUERIED
    if isinstance(error, errors.AgentNotConnectedError):
        return AGENT_NOT_CONNECTED
    if isinstance(error, (errors.AgentUnavailableError, CallTimeout)):
        return AGENT_UNRESPONSIVE
    # The agent answered, with an error instead of the data asked for (its own words,
    # whatever they say), or the call failed in a way only this domain sees.
    return AGENT_BAD_REPLY
