"""Options shared by several commands."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any, Callable, Collection, Optional, Sequence, TypeVar

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
    names: Sequence[str], found: Collection[str], hosts: Sequence[Optional[str]], hosts_down: int
) -> None:
    """A name found on none of several hosts is the same error, with the same exit status
    (3), as a name one host does not know. Not while a host could not be read: the domain
    may be there (the host's failure is reported instead)."""
    if len(hosts) < 2 or hosts_down:
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
    hosts_down = sum(1 for e in result.errors if not e.name)
    missing_everywhere(names or (), found, hosts, hosts_down)
