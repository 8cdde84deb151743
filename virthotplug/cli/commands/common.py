"""Options shared by several commands."""

from __future__ import annotations

import argparse
from typing import Any

from virthotplug.core.errors import UsageError

DEFAULT_AGENT_TIMEOUT = 5.0


def add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domain name, UUID or id")
    parser.add_argument("--all", action="store_true", help="every domain of the host")
    parser.add_argument(
        "--agent-timeout",
        type=positive_float,
        default=DEFAULT_AGENT_TIMEOUT,
        metavar="SECONDS",
        help="longest wait for one guest agent (default: %(default)s)",
    )


def selected_names(args: Any) -> list[str] | None:
    """The named domains, or None for ``--all``; naming none is a usage error."""
    if args.all and args.domains:
        raise UsageError("give domain names or --all, not both")
    if not args.all and not args.domains:
        raise UsageError("no domain given (name one or more, or use --all)")
    return None if args.all else list(args.domains)


def uris(args: Any) -> list[str | None]:
    return list(args.uris) if args.uris else [None]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value > 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds: {text!r}")
    return value
