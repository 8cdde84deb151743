"""The one view builder: a domain's bulk stats and parsed definitions as a ``VcpuView``
without its guest layer (the agent is asked later, see ``agentread``).

    config layer      the persistent definition's counts (none for a transient domain)
    live layer        the stats' ``vcpu.current``/``vcpu.maximum``; on a driver without
                      vCPU stats (the test driver) the live definition's counts
    hypervisor layer  the stats' per-vCPU states; without them, the vCPUs the live
                      definition has enabled

Equal layers of different domains are one object (``core.shared``): every view of every
domain holds its layers until the next read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from virthotplug.core.shared import SharedValues
from virthotplug.core.view import (
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_QUERIED,
    VCPU_STATES,
    AgentStatus,
    CountLayer,
    History,
    HypervisorLayer,
    VcpuView,
)
from virthotplug.host.connection import DOMAIN_STATES
from virthotplug.host.domxml import DomainXML
from virthotplug.host.history import DomainContext
from virthotplug.host.libvirt_types import Stats


@dataclass(frozen=True, slots=True)
class Definitions:
    """One domain's parsed definitions, as a read fetched them.

    ``inactive`` is None for a transient domain, ``live`` None when it was not read (a
    domain that is not running, or the stats carry the live layer and nobody asked for the
    live metadata). ``signature`` and ``expires`` matter only to ``bulk.DefinitionCache``.
    """

    inactive: Optional[DomainXML]
    live: Optional[DomainXML]
    signature: tuple[Any, ...] = ()  # what the stats said when they were read (signature())
    expires: float = 0.0  # monotonic time after which they are read again anyway

    @property
    def main(self) -> DomainXML:
        """The definition that names the agent channel and the policy: the persistent one,
        else (a transient domain) the live one."""
        xml = self.inactive if self.inactive is not None else self.live
        assert xml is not None  # a transient domain has its live definition read
        return xml


def build_view(
    uri: str,
    name: str,
    uuid: str,
    domain_id: Optional[int],
    stats: Stats,
    defs: Definitions,
    context: Optional[DomainContext] = None,
) -> VcpuView:
    """The view of one domain: ``domain_id`` None when it is not running. With its
    ``context`` (``history.contexts``), the view has its history, its domain type and
    QEMU's answer, and says when the policy ('ignore') keeps its agent from being asked."""
    persistent = defs.inactive is not None
    live: Optional[CountLayer] = None
    hypervisor: Optional[HypervisorLayer] = None
    if domain_id is not None:
        live = live_from_stats(stats)
        if live is not None:
            hypervisor = _hypervisor_from_stats(stats)
        else:  # this driver has no vCPU stats (the test driver)
            assert defs.live is not None
            hypervisor = _hypervisor_from_xml(defs.live)
            live = CountLayer(current=defs.live.vcpu_current, maximum=defs.live.vcpu_max)
        if not persistent and defs.live is not None:
            live = dataclasses.replace(live, vcpus=defs.live.vcpus)
    channel = defs.main.agent_channel
    agent = _agent_status(channel)
    state = DOMAIN_STATES.get(int(stats.get("state.state", 0)), "unknown")
    config = _count_layer(defs.inactive) if defs.inactive is not None else None
    history, domain_type, qemu = _NO_HISTORY, "", None
    if context is not None:
        history, domain_type, qemu = context.history, defs.main.domain_type, context.qemu
        if channel and not context.queries_agent:
            note = "policy 'ignore': the guest agent is not asked"
            agent = dataclasses.replace(agent, error=note)
    return VcpuView(
        host=uri,
        name=name,
        uuid=uuid,
        state=state,
        persistent=persistent,
        agent=agent,
        domain_id=domain_id,
        config=config,
        live=live,
        hypervisor=hypervisor,
        history=history,
        domain_type=domain_type,
        qemu=qemu,
    )


def signature(stats: Stats) -> tuple[Any, ...]:
    """What the stats tell about a domain that a definition change would also change."""
    vcpus = tuple(
        sorted((k, v) for k, v in stats.items() if k.startswith("vcpu.") and k.endswith("state"))
    )
    return (stats.get("state.state"), stats.get("vcpu.current"), stats.get("vcpu.maximum"), vcpus)


def live_from_stats(stats: Stats) -> Optional[CountLayer]:
    """The live layer from the stats; None when this driver's stats have no vCPU counts."""
    current, maximum = stats.get("vcpu.current"), stats.get("vcpu.maximum")
    if not isinstance(current, int) or not isinstance(maximum, int):
        return None
    return _layers.get(
        ("live", current, maximum), lambda: CountLayer(current=current, maximum=maximum)
    )


_layers = SharedValues()
_NO_HISTORY = History()  # immutable: one for every view without a record


def _agent_status(channel: bool) -> AgentStatus:
    return _layers.get(
        ("agent", channel),
        lambda: AgentStatus(
            configured=channel, state=AGENT_NOT_QUERIED if channel else AGENT_NOT_CONFIGURED
        ),
    )


def _count_layer(xml: DomainXML) -> CountLayer:
    return _layers.get(
        ("count", xml.vcpu_current, xml.vcpu_max, xml.vcpus),
        lambda: CountLayer(current=xml.vcpu_current, maximum=xml.vcpu_max, vcpus=xml.vcpus),
    )


def _hypervisor_from_stats(stats: Stats) -> HypervisorLayer:
    """``vcpu.N.state`` entries; sparse after hotplug, so N comes from the key."""
    vcpus = {}
    for key, value in stats.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "vcpu" and parts[2] == "state" and parts[1].isdigit():
            vcpus[int(parts[1])] = VCPU_STATES.get(int(value), "unknown")
    return _layers.get(("stats", *vcpus.items()), lambda: HypervisorLayer(vcpus=vcpus))


def _hypervisor_from_xml(live: DomainXML) -> HypervisorLayer:
    """Without vCPU stats, the vCPUs the running definition has enabled (libvirt's own view
    of what is plugged), reported running like the test driver's ``virDomainGetVcpus``
    does. With no ``<vcpus>`` element, vCPUs 0..current-1 are on."""
    enabled = [v.id for v in live.vcpus if v.enabled] if live.vcpus else []
    ids = enabled or list(range(live.vcpu_current))
    return _layers.get(
        ("xml", *ids), lambda: HypervisorLayer(vcpus=dict.fromkeys(ids, VCPU_STATES[1]))
    )
