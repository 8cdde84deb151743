"""libvirt errors → the project's exceptions (design: what to retry, what means the
connection is gone, what is permanent).

Classified on libvirt's error code and error domain (``VIR_FROM_*``) only. The message is
never read to decide: libvirt embeds text from elsewhere in it (the guest agent's own error
replies, an ssh client's stderr), and libvirtd may speak another language. Errors of
guest-agent calls (``agent=True``) stay that domain's agent trouble unless the code says the
connection or our access to it is the problem: libvirt reports a guest's error replies as
``VIR_ERR_INTERNAL_ERROR`` from ``VIR_FROM_QEMU`` (``VIR_ERR_AGENT_COMMAND_FAILED`` from
11.2), and a guest chooses their wording. Messages are made one line, control characters
escaped (``report.printable``), before anyone shows them.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from virthotplug.core import errors
from virthotplug.core.report import printable
from virthotplug.host.libvirt_module import libvirt_module

# libvirt error code names → project exception. Looked up with getattr because older
# bindings lack the newer codes.
_BY_CODE: tuple[tuple[str, type[errors.VirtHotplugError]], ...] = (
    ("VIR_ERR_NO_DOMAIN", errors.NoDomainError),
    ("VIR_ERR_NO_CONNECT", errors.InvalidURIError),
    ("VIR_ERR_RPC", errors.ConnectError),
    ("VIR_ERR_INVALID_CONN", errors.ConnectError),
    ("VIR_ERR_OPERATION_TIMEOUT", errors.TransientError),
    ("VIR_ERR_AGENT_UNRESPONSIVE", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_UNSYNCED", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_COMMAND_TIMEOUT", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_COMMAND_FAILED", errors.AgentError),
    ("VIR_ERR_OPERATION_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_NO_SUPPORT", errors.UnsupportedError),
    ("VIR_ERR_ARGUMENT_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_CONFIG_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_OPERATION_INVALID", errors.InvalidRequestError),
    ("VIR_ERR_INVALID_ARG", errors.InvalidRequestError),
    ("VIR_ERR_OPERATION_FAILED", errors.InvalidRequestError),
    ("VIR_ERR_OPERATION_DENIED", errors.PermissionDeniedError),
    ("VIR_ERR_AUTH_FAILED", errors.PermissionDeniedError),
    ("VIR_ERR_AUTH_CANCELLED", errors.PermissionDeniedError),
    ("VIR_ERR_AUTH_UNAVAILABLE", errors.PermissionDeniedError),
    ("VIR_ERR_ACCESS_DENIED", errors.PermissionDeniedError),
    ("VIR_ERR_XML_ERROR", errors.MalformedXMLError),
    ("VIR_ERR_XML_DETAIL", errors.MalformedXMLError),
)

# In a guest-agent call these codes mean one thing each (qemuDomainAgentAvailable and the
# domain checks before it); every other non-host code is the agent's own failure.
_AGENT_BY_CODE: tuple[tuple[str, type[errors.VirtHotplugError]], ...] = (
    ("VIR_ERR_ARGUMENT_UNSUPPORTED", errors.AgentNotConfiguredError),
    ("VIR_ERR_OPERATION_INVALID", errors.NotRunningError),  # not running, or paused
    ("VIR_ERR_AGENT_UNRESPONSIVE", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_UNSYNCED", errors.AgentUnavailableError),
    ("VIR_ERR_AGENT_COMMAND_TIMEOUT", errors.AgentUnavailableError),
    ("VIR_ERR_OPERATION_TIMEOUT", errors.TransientError),
    ("VIR_ERR_NO_DOMAIN", errors.NoDomainError),
    ("VIR_ERR_NO_SUPPORT", errors.UnsupportedError),
    ("VIR_ERR_OPERATION_UNSUPPORTED", errors.UnsupportedError),
    ("VIR_ERR_INVALID_ARG", errors.InvalidRequestError),
)

# Error domains of the client's and the daemon's transport: their system and internal
# errors mean the connection is gone.
_TRANSPORT_DOMAINS = ("VIR_FROM_RPC", "VIR_FROM_REMOTE")
_HOST_CLASSES = (errors.ConnectError, errors.PermissionDeniedError)


def classify(exc: Exception, *, context: str = "", agent: bool = False) -> errors.VirtHotplugError:
    """Translate a ``libvirtError`` into the project's exception, message prefixed by context.

    ``agent``: the error came from a guest-agent call.
    """
    libvirt = libvirt_module()
    if not isinstance(exc, libvirt.libvirtError):
        text = one_line(str(exc))
        return errors.VirtHotplugError(f"{context}: {text}" if context else text)
    code, domain = exc.get_error_code(), exc.get_error_domain()
    message = one_line(exc.get_error_message() or str(exc))
    text = f"{context}: {message}" if context else message
    return exception_class(libvirt, code, domain, agent=agent)(text, code=code)


def exception_class(
    libvirt: Any, code: Optional[int], domain: Optional[int], *, agent: bool = False
) -> type[errors.VirtHotplugError]:
    """The class for libvirt's ``(code, VIR_FROM_*)``; the message plays no part."""
    transport = domain in [getattr(libvirt, name, -1) for name in _TRANSPORT_DOMAINS]
    transport_codes = (getattr(libvirt, "VIR_ERR_INTERNAL_ERROR", -1), _code(libvirt, "SYSTEM"))
    if transport and code in transport_codes:
        return errors.ConnectError
    cls = _lookup(libvirt, code, _BY_CODE) or errors.VirtHotplugError
    if not agent or issubclass(cls, _HOST_CLASSES):
        return cls
    return _lookup(libvirt, code, _AGENT_BY_CODE) or errors.AgentError


def _code(libvirt: Any, name: str) -> int:
    return int(getattr(libvirt, f"VIR_ERR_{name}_ERROR", -1))


def _lookup(
    libvirt: Any, code: Optional[int], table: tuple[tuple[str, type[errors.VirtHotplugError]], ...]
) -> Optional[type[errors.VirtHotplugError]]:
    for name, cls in table:
        if code == getattr(libvirt, name, None):
            return cls
    return None


def open_error(exc: Exception, uri: Optional[str]) -> errors.VirtHotplugError:
    """Errors from ``open()`` are about the URI or the daemon, whatever their code.
    ``uri`` None: libvirt's default was asked for."""
    libvirt = libvirt_module()
    where = errors.quote(uri) if uri is not None else "libvirt's default URI"
    err = classify(exc, context=f"cannot connect to {where}")
    lv_error: Any = exc if isinstance(exc, libvirt.libvirtError) else None
    domain = lv_error.get_error_domain() if lv_error is not None else None
    bad_uri = domain == getattr(libvirt, "VIR_FROM_URI", -1)
    if isinstance(err, (errors.PermissionDeniedError, errors.InvalidURIError)):
        return err
    if lv_error is not None and _refused_socket(libvirt, lv_error):
        return errors.PermissionDeniedError(err.message, code=err.code)
    # At open() the URI (and the node file it may name) is the only argument: a refused
    # argument or definition means the URI is unusable, not that the daemon is down.
    unusable = (errors.MalformedXMLError, errors.InvalidRequestError, errors.UnsupportedError)
    if bad_uri or isinstance(err, unusable):
        return errors.InvalidURIError(err.message, code=err.code)
    if isinstance(err, errors.ConnectError):
        return errors.ConnectError(f"{err.message} (is libvirtd running?)", code=err.code)
    return errors.ConnectError(err.message, code=err.code)


def _refused_socket(libvirt: Any, exc: Any) -> bool:
    """The daemon's socket refused us (EACCES/EPERM in the system error's errno), as for
    an unprivileged user on ``qemu:///system``. An ssh client's "Permission denied
    (publickey)" is no such thing: its errno is the broken connection's."""
    return bool(
        exc.get_error_code() == _code(libvirt, "SYSTEM")
        and exc.get_int1() in (errno.EACCES, errno.EPERM)
    )


def one_line(text: str) -> str:
    """One line, control characters escaped: libvirt's messages carry guests' text."""
    return printable(" ".join(text.split()))


def last_error(libvirt: Any, context: str, *, agent: bool = True) -> errors.VirtHotplugError:
    """Build the exception from the thread's last libvirt error (read in the same thread);
    the binding returns None instead of raising only for guest-agent calls."""
    last = libvirt.virGetLastError()
    if not last:
        return errors.AgentError(f"{context}: guest agent call failed")
    code, domain, message = last[0], last[1], one_line(str(last[2] or "unknown error"))
    cls = exception_class(libvirt, code, domain, agent=agent)
    return cls(f"{context}: {message}", code=code)
