"""The host configuration file, ``/etc/virthotplug/virthotplug.conf`` (INI)::

    [defaults]              policy fields for every domain (mode, count, grace, exclude, retries)
    mode = report

    [domain:web-*]          a domain name glob (fnmatch, case-sensitive) ...
    mode = online
    grace = 2

    [domain:3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01]   ... or a domain UUID
    mode = match
    count = 2

    [watch]                 daemon settings (see ``WatchSettings``)
    resync_interval = 60

The first ``[domain:...]`` section that matches, in file order, wins; its fields override
``[defaults]``, and the domain's own metadata element overrides both.

The file drives actions taken as root, so it is refused when anyone but its owner (root or
the user running virthotplug) can write it. Structure and ``[watch]`` are validated when the
file is loaded; policy values are validated per domain when they are used, so a bad value
skips the domains it applies to, with an error naming the section and the domain.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from virthotplug.core import settings
from virthotplug.core.errors import ConfigError, quote, shown
from virthotplug.core.policy import parse_policy_fields
from virthotplug.core.precedence import DEFAULTS_SECTION, DOMAIN_PREFIX, first_match

DEFAULT_CONFIG_PATH = "/etc/virthotplug/virthotplug.conf"
CONFIG_ENV = "VIRTHOTPLUG_CONFIG"  # another file, for every command and the hook
MAX_CONFIG_BYTES = 1024 * 1024
WATCH_SECTION = "watch"


@dataclass(frozen=True)
class WatchSettings:
    """The ``[watch]`` section: the daemon's settings, and the hook's ``strict_agent``.

    Defaults, ranges and help come from the table in ``core.settings``, which the command
    line's options share. ``strict_agent`` is read by the libvirt hook (``hooks/qemu`` parses
    the file itself), never by the daemon; it is validated here so that a bad value fails
    ``watch`` and every command that loads the file, not only the hook at a domain's start.
    """

    resync_interval: float = settings.RESYNC_INTERVAL.default  # the safety net
    agent_timeout: float = settings.AGENT_TIMEOUT.default
    workers: int = settings.WORKERS.default  # reconciles running at once, across domains
    hotadd_settle: float = settings.HOTADD_SETTLE.default
    hook_socket: str = settings.HOOK_SOCKET.default
    strict_agent: bool = settings.STRICT_AGENT.default  # the hook's
    domains: tuple[str, ...] = settings.DOMAINS.default  # the daemon's scope; () every domain

    def watches(self, name: str, uuid: str) -> bool:
        """Whether the daemon acts on this domain (its events, reads and reconciles)."""
        if not self.domains:
            return True
        return any(fnmatch.fnmatchcase(name, g) or g.lower() == uuid.lower() for g in self.domains)


@dataclass(frozen=True)
class DomainSection:
    """One ``[domain:PATTERN]`` section with its raw (not yet validated) policy fields."""

    pattern: str
    raw: Mapping[str, str]


@dataclass(frozen=True)
class HostConfig:
    path: Optional[str] = None  # None: no file was read (built-in defaults)
    defaults: Mapping[str, str] = field(default_factory=dict)
    domains: tuple[DomainSection, ...] = ()
    watch: WatchSettings = field(default_factory=WatchSettings)
    # Why the default file could not be read (``load_config(unreadable_ok=True)``): the
    # built-in defaults stand in for it, and the reports say so.
    unread: Optional[str] = None

    def policy_layers(self, name: str, uuid: str) -> list[tuple[str, Mapping[str, str]]]:
        """The file's raw policy layers for one domain, highest precedence first."""
        layers: list[tuple[str, Mapping[str, str]]] = []
        index = first_match((s.pattern for s in self.domains), name, uuid)  # the hook's rule
        if index is not None:
            section = self.domains[index]
            layers.append((self.source(DOMAIN_PREFIX + section.pattern), section.raw))
        if self.defaults:
            layers.append((self.source(DEFAULTS_SECTION), self.defaults))
        return layers

    def source(self, section: str) -> str:
        return f"config {self.path}: [{section}]"

    def check_policies(self) -> None:
        """Validate every policy section now (e.g. when the daemon starts)."""
        if self.defaults:
            parse_policy_fields(self.defaults, source=self.source(DEFAULTS_SECTION), domain="*")
        for section in self.domains:
            source = self.source(DOMAIN_PREFIX + section.pattern)
            parse_policy_fields(section.raw, source=source, domain=section.pattern)


def load_config(path: Optional[str] = None, *, unreadable_ok: bool = False) -> HostConfig:
    """Load ``path``, else ``$VIRTHOTPLUG_CONFIG`` (which the libvirt hook reads too), else
    the default file. Only the default file may be missing; with ``unreadable_ok`` it may
    also be unreadable to us (a monitoring user's read-only checks): the built-in defaults
    then stand in, and ``HostConfig.unread`` says why."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    explicit = path is not None
    path = path if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = _read_private_file(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {shown(path)}: not found") from None
        return HostConfig()
    except PermissionError as exc:
        if explicit or not unreadable_ok:
            raise ConfigError(f"config file {shown(path)}: {exc.strerror or exc}") from None
        return HostConfig(unread=f"config file {shown(path)}: {exc.strerror or exc}")
    except OSError as exc:
        raise ConfigError(f"config file {shown(path)}: {exc.strerror or exc}") from None
    return parse_config(text, path=path)


def _read_private_file(path: str) -> str:
    """Read a regular file that only its owner (root or us) can write.

    The checks use the opened file's own status, so the file cannot be swapped between the
    check and the read. It is opened non-blocking: open() of a FIFO would otherwise wait for
    a writer for ever (and every command that reads the file with it).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {shown(path)}: not a regular file")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"config file {shown(path)}: refusing a file writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); it drives actions taken as root: "
                f"chmod go-w {shown(path)}"
            )
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"config file {shown(path)}: refusing a file owned by uid {info.st_uid}, "
                "neither root nor the current user"
            )
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {shown(path)}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {shown(path)}: not valid UTF-8") from None


# Characters on which the daemon's parser (configparser: lines end at "\n") and the hook's
# could disagree about where a line ends, or what a section is called: refused by both
# (hooks/qemu keeps the same list), as is a CR that does not end a line.
AMBIGUOUS_CHARACTERS = "\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def check_characters(text: str) -> Optional[str]:
    """What makes the text ambiguous to read, or None."""
    for char in AMBIGUOUS_CHARACTERS:
        if char in text:
            return f"contains the character U+{ord(char):04X}"
    if "\r" in text.replace("\r\n", ""):
        return "contains a carriage return that does not end a line"
    return None


def parse_config(text: str, *, path: str) -> HostConfig:
    """Parse the file's text; ``path`` names it in errors and policy sources."""
    ambiguous = check_characters(text)
    if ambiguous is not None:
        raise ConfigError(
            f"config file {shown(path)}: {ambiguous} (not read, by watch or the hook)"
        )
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False, default_section="\0"
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"config file {shown(path)}: {_one_line(str(exc))}") from None
    defaults: Mapping[str, str] = {}
    domains: list[DomainSection] = []
    watch = WatchSettings()
    for name in parser.sections():
        values = dict(parser.items(name))
        if name == DEFAULTS_SECTION:
            defaults = values
        elif name == WATCH_SECTION:
            watch = _parse_watch(values, path)
        elif name.startswith(DOMAIN_PREFIX) and name[len(DOMAIN_PREFIX) :].strip():
            domains.append(DomainSection(pattern=name[len(DOMAIN_PREFIX) :].strip(), raw=values))
        else:
            raise ConfigError(
                f"config file {shown(path)}: unknown section [{shown(name)}] "
                "(expected [defaults], [watch] or [domain:NAME-GLOB-OR-UUID])"
            )
    return HostConfig(path=path, defaults=defaults, domains=tuple(domains), watch=watch)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- [watch] -------------------------------------------------------------------------------


def _parse_watch(raw: Mapping[str, str], path: str) -> WatchSettings:
    values: dict[str, Any] = {}
    for key, text in raw.items():
        setting = settings.BY_NAME.get(key)
        if setting is None:
            known = ", ".join(settings.BY_NAME)
            raise ConfigError(
                f"config file {shown(path)}: [watch]: unknown setting {quote(key)} ({known})"
            )
        try:
            values[key] = setting.parse(text.strip())
        except ValueError as exc:
            raise ConfigError(
                f"config file {shown(path)}: [watch] {shown(key)}={quote(text)}: {exc}"
            ) from None
    return WatchSettings(**values)
