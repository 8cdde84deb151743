"""Options shared by several commands."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Optional, Sequence, Sized, TypeVar

from virthotplug.core.errors import NoDomainError, UsageError, quote
from virthotplug.core.settings import AGENT_TIMEOUT, Setting, parse_seconds

if TYPE_CHECKING:
    from virthotplug.core.config import HostConfig

T = TypeVar("T")


# virsh's -d levels (0 debug ... 4 error) and the logging level of each.
DEBUG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.WARNING}
DEBUG_LEVELS[4] = logging.ERROR


def log_level(args: Any, *, default: int) -> int:
    """The logging level -d LEVEL or -q asks for; ``default`` without either."""
    level: Optional[int] = getattr(args, "debug_level", None)
    if level is not None:
        return DEBUG_LEVELS[level]
    return logging.ERROR if args.quiet else default


def add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain name, UUID or id")
    parser.add_argument("--all", action="store_true", help="every domain of the host")
    add_setting(parser, AGENT_TIMEOUT)


def agent_timeout(args: Any, config: HostConfig) -> float:
    """``--agent-timeout``, else the configuration file's ``[watch] agent_timeout`` (whose
    own default is the setting's)."""
    given: Optional[float] = args.agent_timeout
    return given if given is not None else config.watch.agent_timeout


def add_setting(
    parser: argparse.ArgumentParser, setting: Setting[Any], *, default: Optional[Any] = None
) -> None:
    """The option of a ``[watch]`` setting (``core.settings``): its range and help.

    ``default`` None leaves the value to the configuration file; the help shows the
    setting's own default either way.
    """
    assert setting.option is not None, setting.name
    shown = setting.default
    help_text = setting.help
    if setting.describe_range():
        help_text += f", {setting.describe_range()}"
    parser.add_argument(
        setting.option,
        type=setting_type(setting),
        default=default,
        metavar="SECONDS" if setting.unit == "seconds" else "N",
        help=f"{help_text} (default: {shown:g})",
    )


def setting_type(setting: Setting[T]) -> Callable[[str], T]:
    """An argparse type: the setting's own parser, its message in argparse's usage error."""

    def parse(text: str) -> T:
        try:
            return setting.parse(text.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}: {quote(text)}") from None

    parse.__name__ = setting.name  # argparse names it in "invalid <name> value"
    return parse


def selected_names(args: Any) -> list[str] | None:
    """The named domains, or None for ``--all``; naming none is a usage error."""
    if args.all and args.domains:
        raise UsageError("give domain names or --all, not both")
    if not args.all and not args.domains:
        raise UsageError("no domain given (name one or more, or use --all)")
    return None if args.all else list(args.domains)


def uris(args: Any) -> list[str | None]:
    return list(args.uris) if args.uris else [None]


def timeout_seconds(text: str) -> float:
    """An argparse type: seconds from 0.001 to 3600, by the one number rule (core.settings)."""
    try:
        return parse_seconds(text.strip(), 0.001, 3600)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: {quote(text)}") from None


def missing_everywhere(
    names: Sequence[str], found: Collection[str], hosts: Sequence[Optional[str]], down: Sized
) -> None:
    """A name found on none of several hosts is the same error, with the same exit status
    (3), as a name one host does not know. Not while a host could not be read: the domain
    may be there (the host's failure is reported instead)."""
    if len(hosts) < 2 or len(down):
        return
    for name in dict.fromkeys(names):
        if name not in found:
            raise NoDomainError(
                f"failed to get domain {quote(name)}: no such domain on any of the "
                f"{len(hosts)} hosts"
            )


def check_read_result(result: Any, names: Optional[Sequence[str]], hosts: Sequence[Any]) -> None:
    """``missing_everywhere`` for a read of several hosts (``collect.read_hosts``): there a
    name found nowhere comes back as an error without a host."""
    nowhere = {e.name for e in result.errors if not e.host and e.name}
    found = [name for name in names or () if name not in nowhere]
    missing_everywhere(names or (), found, hosts, [e for e in result.errors if not e.name])


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
    from virthotplug.core.config import load_config
    from virthotplug.host import collect, history

    hosts, names = uris(args), selected_names(args)
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
    import dataclasses

    from virthotplug.core.drift import INVALID_POLICY
    from virthotplug.core.view import WARNING, Finding

    why = invalid.get((view.name, view.uuid))
    if why is None:
        return view
    prefix = f"domain {quote(view.name)}: "
    message = why[len(prefix) :] if why.startswith(prefix) else why
    finding = Finding(INVALID_POLICY, WARNING, f"{message}; nothing is done to the guest")
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
