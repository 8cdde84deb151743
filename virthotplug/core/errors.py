"""The project's own exceptions and the exit status each one maps to.

Nothing here imports libvirt: the connection module translates ``libvirtError`` into these
classes (see ``connection.classify``), and ``cli.main`` is the only place that turns them
into exit statuses.
"""

from __future__ import annotations

import unicodedata

# Exit statuses of the command line (documented in virthotplug(1)).
EXIT_OK = 0
EXIT_FAILURE = 1  # generic failure, or a transient libvirt error that outlived its retries
EXIT_USAGE = 2  # bad command-line arguments (argparse uses 2 as well)
EXIT_NO_DOMAIN = 3  # the named domain does not exist
EXIT_CONNECT = 4  # libvirtd unreachable, connection lost
EXIT_INVALID_URI = 5  # the connection URI is malformed or names no driver
EXIT_PERMISSION = 6  # access denied, or a read-only connection where writing is needed
EXIT_AGENT = 7  # guest agent not configured, not connected, hung, or replied garbage
EXIT_CONFIG = 8  # invalid configuration file, domain XML or metadata
EXIT_UNSUPPORTED = 9  # the hypervisor or domain cannot do what was asked
EXIT_NOT_RUNNING = 10  # the domain must be running for this
EXIT_INCOMPLETE = 11  # an operation ran but not every layer reached the target
EXIT_GUEST_REJECTED = 12  # setvcpus: the guest did not take a hot-added vCPU QEMU's OST accepted
EXIT_QEMU_STOPPED = 13  # setvcpus: QEMU stopped (crashed) during the hot-add
EXIT_INTERRUPTED = 130  # SIGINT, like a shell


class VirtHotplugError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_status = EXIT_FAILURE

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        # libvirt's numeric error code, when the error came from libvirt.
        self.code = code

    def __str__(self) -> str:
        return self.message


class UsageError(VirtHotplugError):
    exit_status = EXIT_USAGE


class NoDomainError(VirtHotplugError):
    exit_status = EXIT_NO_DOMAIN


class ConnectError(VirtHotplugError):
    """The daemon cannot be reached, or the connection was lost: reconnect, don't retry."""

    exit_status = EXIT_CONNECT


class InvalidURIError(ConnectError):
    exit_status = EXIT_INVALID_URI


class PermissionDeniedError(VirtHotplugError):
    exit_status = EXIT_PERMISSION


class AgentError(VirtHotplugError):
    """Base for guest-agent failures."""

    exit_status = EXIT_AGENT


class AgentNotConfiguredError(AgentError):
    """The domain has no guest-agent channel: permanent until the XML changes."""


class AgentUnavailableError(AgentError):
    """The agent is not connected or did not answer: transient, maybe long."""


class AgentNotConnectedError(AgentUnavailableError):
    """No agent is connected to the domain's channel (its live definition says so)."""


class AgentTimeoutError(AgentUnavailableError):
    """Our own bounded wait on an agent call expired. After a write: outcome unknown."""


class GuestDataError(AgentError):
    """The guest agent replied something that is not valid (the guest is untrusted)."""


class ConfigError(VirtHotplugError):
    """Invalid configuration: config file, domain XML, or the project's metadata."""

    exit_status = EXIT_CONFIG


class MalformedXMLError(ConfigError):
    pass


class InvalidPolicyError(ConfigError):
    """A domain's policy (its metadata, or its section of the configuration file) is
    invalid: nothing is done to the guest, and the domain's reports say why."""


class UnsupportedError(VirtHotplugError):
    """Permanent: the driver, QEMU or the domain cannot do this. Record, don't retry."""

    exit_status = EXIT_UNSUPPORTED


class QemuStoppedError(VirtHotplugError):
    """The domain was running when a hot-add was asked for and is not any more: QEMU
    stopped (crashed) during the request."""

    exit_status = EXIT_QEMU_STOPPED


class NotRunningError(VirtHotplugError):
    """The domain is not running (permanent for now: the next lifecycle event handles it)."""

    exit_status = EXIT_NOT_RUNNING


class InvalidRequestError(VirtHotplugError):
    """libvirt refused the request itself (invalid argument, cpu0 not offlinable, ...).

    Permanent for that request: report it, never retry it unchanged.
    """

    exit_status = EXIT_FAILURE


class TransientError(VirtHotplugError):
    """Worth a bounded retry with backoff (e.g. a state-change lock timeout)."""

    exit_status = EXIT_FAILURE


# --- text shown to people ---------------------------------------------------------------

# Characters a terminal acts on instead of showing: C0/C1 controls and DEL (Cc), format
# characters such as bidi overrides (Cf), and line/paragraph separators (Zl, Zp).
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp"})


def printable(text: str) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\u202e``), for terminals.

    Messages carry text a guest wrote (its agent's error replies, embedded by libvirt);
    escape sequences in them must not reach an operator's terminal or a monitoring line.
    """
    if text.isprintable():  # fast path; isprintable() is False for every escaped category
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNPRINTABLE else c for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


ECHO_LIMIT = 200  # characters of one piece of user input echoed in a message
MESSAGE_LIMIT = 2000  # characters of a whole message shown (the last safety net)


def shown(text: str, limit: int = ECHO_LIMIT) -> str:
    """Text from outside (user input, a guest) as messages show it: control characters
    escaped, cut to ``limit`` characters with an ellipsis (a 100 KB name must not fill a
    terminal or a monitoring line)."""
    return printable(text[:limit]) + ("..." if len(text) > limit else "")


def quote(text: str, limit: int = ECHO_LIMIT) -> str:
    """``shown`` in single quotes, as messages name domains, URIs and values."""
    return f"'{shown(text, limit)}'"
