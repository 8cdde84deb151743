"""The ``[watch]`` settings: one table of name, default, range and help for each.

The configuration file (``core.config``: ``WatchSettings`` and its ``[watch]`` parser) and
the command-line options of the same name (``--agent-timeout``, ``--workers``, ...) both
read this table, so a setting has one default and one range wherever it is given, and a
value refused in one place is refused in the other. virthotplug.conf(5) documents the same
ranges and defaults (tests/unit/test_man.py holds them to this table).

A parser takes the text as written and returns the value, or raises ``ValueError`` with
what is wrong ("must be ..."); the caller names the setting and where the value came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from virthotplug.core.hookproto import DEFAULT_SOCKET

T = TypeVar("T")

SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting: its ``[watch]`` key, default, parser and one-line help.

    ``option`` is its command-line option, or None when it is set in the file only.
    ``low``/``high`` are the parser's bounds, for the help texts.
    """

    name: str
    default: T
    parse: Callable[[str], T]
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    unit: str = ""
    option: Optional[str] = None

    def describe_range(self) -> str:
        """e.g. ``0.1 to 600 seconds``; empty when the setting has no numeric range."""
        if self.low is None or self.high is None:
            return ""
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.low:g} to {self.high:g}{unit}"


# The one rule for every number a person writes: command-line options, the configuration
# file, policy values. ASCII digits only, no sign, no leading zero, no digit separator, no
# exponent; seconds may have a decimal fraction. int() and float() alone accept far more
# ("\u0663", "\uff15", "1_0", "1e2", "nan", "-0"), and what one source accepted another refused.
_INTEGER = re.compile(r"0|[1-9][0-9]{0,9}")
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,9})(?:\.[0-9]{1,6})?")


def parse_integer(text: str, low: int, high: int) -> int:
    """``text`` as an integer from ``low`` to ``high``; ``ValueError`` says the rule."""
    if not _INTEGER.fullmatch(text) or not low <= int(text) <= high:
        raise ValueError(f"must be an integer from {low} to {high}")
    return int(text)


def parse_seconds(text: str, low: float, high: float) -> float:
    """``text`` as seconds (e.g. ``1.5``) from ``low`` to ``high``."""
    if not _DECIMAL.fullmatch(text) or not low <= float(text) <= high:
        raise ValueError(f"must be between {low:g} and {high:g} seconds")
    return float(text)


def seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        return parse_seconds(text, low, high)

    return parse


def integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return parse_integer(text, low, high)

    return parse


def socket_path(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    if not text.startswith("/") or len(text) > SOCKET_PATH_MAX:
        raise ValueError(f"must be an absolute path of at most {SOCKET_PATH_MAX} characters")
    return text


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError("must be yes or no")


def _seconds_setting(
    name: str, default: float, low: float, high: float, help: str, option: str
) -> Setting[float]:
    return Setting(name, default, seconds(low, high), help, low, high, "seconds", option)


RESYNC_INTERVAL = _seconds_setting(
    "resync_interval",
    60.0,
    1.0,
    86400.0,
    "full resync period, the safety net for lost events",
    "--resync-interval",
)
AGENT_TIMEOUT = _seconds_setting(
    "agent_timeout", 5.0, 0.1, 600.0, "longest wait for one guest agent call", "--agent-timeout"
)
WORKERS = Setting(
    "workers",
    8,
    integer(1, 256),
    "reconciles running at once across domains",
    1,
    256,
    option="--workers",
)
# The guest is read at once after a hot-add's OST event; 0.1 s: a guest that had not listed
# the CPU then has by now (daemon/jobs.py: the looks that follow).
HOTADD_SETTLE = _seconds_setting(
    "hotadd_settle",
    0.1,
    0.0,
    60.0,
    "when to look again for a hot-added CPU the guest did not list at once (the guest is "
    "read at once, then this long, 3 and 9 times this long, and 3 s after the event)",
    "--hotadd-settle",
)
HOOK_SOCKET = Setting(
    "hook_socket",
    DEFAULT_SOCKET,
    socket_path,
    "the unix datagram socket on which watch receives the hook's messages",
)
# The libvirt hook's setting: hooks/qemu reads the file itself; the daemon never uses it.
STRICT_AGENT = Setting(
    "strict_agent",
    False,
    boolean,
    "the hook refuses to start a domain without a guest agent channel",
)


def globs(text: str) -> tuple[str, ...]:
    """Domain name globs or UUIDs, separated by blanks or commas; none: every domain."""
    return tuple(g for g in text.replace(",", " ").split() if g)


# The daemon's scope; the command line's --domain GLOB (repeatable) replaces it.
DOMAINS: Setting[tuple[str, ...]] = Setting(
    "domains",
    (),
    globs,
    "the domains watch acts on: name globs or UUIDs (none: every domain)",
)

WATCH_SETTINGS: tuple[Setting[Any], ...] = (
    RESYNC_INTERVAL,
    AGENT_TIMEOUT,
    WORKERS,
    HOTADD_SETTLE,
    HOOK_SOCKET,
    STRICT_AGENT,
    DOMAINS,
)
BY_NAME = {setting.name: setting for setting in WATCH_SETTINGS}
