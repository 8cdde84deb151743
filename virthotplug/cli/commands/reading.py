"""What ``status`` and ``check`` read: the views of the selected domains, and what could not
be read though every domain got its verdict (a monitoring user: a read-only connection, no
access to the configuration file), with an invalid policy reported as a finding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from virthotplug.cli.commands.common import (
    agent_timeout,
    check_read_result,
    selected_names,
    uris,
)

READ_ONLY_AGENT = (
    "read-only connection: libvirt refuses guest-agent calls, the guest layer is not read"
)


@dataclass
class Reading:
    """What ``status`` and ``check`` read, and what they could not read though the rest
    was (a monitoring user: no access to the configuration file, a read-only connection)."""

    hosts: list[Optional[str]]
    result: Any  # collect.ReadResult
    not_read: list[str] = field(default_factory=list)


def read_for_report(args: Any, *, qemu_monitor: bool = False) -> Reading:
    """The views of the selected domains for ``status``/``check``. A configuration file
    that cannot be read, or a read-only connection's refused agent calls, leave a verdict
    for every domain from what could be read, and say what was not."""
    hosts, names = uris(args), selected_names(args)
    opening = _opening(hosts, args.readonly)
    try:
        return _read(args, hosts, names, opening, qemu_monitor)
    except BaseException:
        if opening is not None:
            opening.discard()
        raise


def _opening(hosts: list[Optional[str]], readonly: bool) -> Any:
    """One host's connection, opened while the read path is imported and the configuration
    loaded (libvirtd may take a second to answer an open); None for several hosts (each is
    opened on a thread of its own anyway)."""
    if len(hosts) != 1:
        return None
    from virthotplug.host.connection import OpeningConnection

    return OpeningConnection(hosts[0], readonly=readonly)


def _read(
    args: Any,
    hosts: list[Optional[str]],
    names: Optional[list[str]],
    opening: Any,
    qemu_monitor: bool,
) -> Reading:
    from virthotplug.core.config import load_config
    from virthotplug.host import collect, history

    config = load_config(args.config_file, unreadable_ok=True)
    invalid: dict[tuple[str, str], str] = {}  # (name, uuid) -> why its policy is invalid
    context = _noting_invalid_policies(
        history.contexts(config, qemu_monitor=qemu_monitor), config, invalid
    )
    if args.readonly:
        context = _without_agent(context)
    result = collect.read_hosts(
        hosts,
        names,
        readonly=args.readonly,
        agent_timeout=agent_timeout(args, config),
        context=context,
        opening=opening,
    )
    check_read_result(result, names, hosts)
    result.views = [_with_invalid_policy(view, invalid) for view in result.views]
    reading = Reading(hosts, result)
    if config.unread:
        reading.not_read.append(f"{config.unread} (policies from metadata and defaults only)")
    if args.readonly:
        result.views = [_agent_not_read(view) for view in result.views]
        skipped = sum(1 for v in result.views if v.agent.error == READ_ONLY_AGENT)
        if skipped:
            noun = "domain" if skipped == 1 else "domains"
            reading.not_read.append(
                f"the guest layer of {skipped} running {noun} with a guest agent "
                "(a read-only connection cannot ask the agent)"
            )
    return reading


def _noting_invalid_policies(context: Any, config: Any, invalid: dict[tuple[str, str], str]) -> Any:
    """The context hook, noting each domain whose policy is invalid and why (the hook
    itself only says the policy is unknown: nothing is then done to the guest)."""
    from virthotplug.core.errors import ConfigError
    from virthotplug.host.policysource import policy_from_definitions

    def noting(dom: Any, definition: Any, active: bool, live: Any = None) -> Any:
        found = context(dom, definition, active, live)
        if found.policy is None:
            if live is None and active and definition.domain_id is not None:
                live = definition  # as the hook reads it: the live definition's element
            metadata = None
            if live is not None and live.policy is not None:
                metadata = (True, live.policy)
            elif definition.domain_id is None and definition.policy is not None:
                metadata = (False, definition.policy)
            try:
                policy_from_definitions(dom.name, dom.uuid, metadata, config)
            except ConfigError as exc:
                invalid[(dom.name, dom.uuid)] = str(exc)
        return found

    return noting


def _with_invalid_policy(view: Any, invalid: dict[tuple[str, str], str]) -> Any:
    why = invalid.get((view.name, view.uuid))
    if why is None:  # nearly every domain: the imports below are for the few others
        return view
    import dataclasses

    from virthotplug.core.drift import invalid_policy_finding

    finding = invalid_policy_finding(view.name, why)
    return dataclasses.replace(view, findings=(finding, *view.findings))


def _without_agent(context: Any) -> Any:
    """The context hook with the guest agent never asked (a read-only connection)."""
    import dataclasses

    from virthotplug.host.history import DomainContext

    @dataclasses.dataclass(frozen=True)
    class NoAgent(DomainContext):
        @property
        def queries_agent(self) -> bool:
            return False

    def without(*args: Any) -> DomainContext:
        found = context(*args)
        return NoAgent(**{f.name: getattr(found, f.name) for f in dataclasses.fields(found)})

    return without


def _agent_not_read(view: Any) -> Any:
    import dataclasses

    if not view.agent.configured or view.state != "running":
        return view
    return dataclasses.replace(view, agent=dataclasses.replace(view.agent, error=READ_ONLY_AGENT))
