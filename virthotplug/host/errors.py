"""libvirt errors → the project's exceptions (design: what to retry, what means the
connection is gone, what is permanent).

libvirt embeds text from elsewhere in its messages (the guest agent's own error text among
it), so the message is never trusted to say what kind of error it is beyond the few
documented cases below.
"""

from __future__ import annotations

from typing import Any

from virthotplug.core import errors
from virthotplug.host.libvirt_module import libvirt_module

# libvirt error code names → project exception. Looked up with getattr because older
# bindings lack the newer codes.
_BY_CODE: tuple[tuple[str, type[errors.VirtHotplugError]], ...] = (
    ("VIR_ERR_NO_DOMAIN", errors.NoDomainError),
    ("VIR_ERR_NO_CONNECT", errors.InvalidURIError),
    ("VIR_ERR_SYSTEM_ERROR", errors.ConnectError),
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


def classify(exc: Exception, *, context: str = "") -> errors.VirtHotplugError:
    """Translate a ``libvirtError`` into the project's exception, message prefixed by context."""
    libvirt = libvirt_module()
    if not isinstance(exc, libvirt.libvirtError):
        return errors.VirtHotplugError(f"{context}: {exc}" if context else str(exc))
    code, domain = exc.get_error_code(), exc.get_error_domain()
    message = one_line(exc.get_error_message() or str(exc))
    text = f"{context}: {message}" if context else message
    return exception_class(libvirt, code, domain, message)(text, code=code)


def exception_class(
    libvirt: Any, code: int, domain: int, message: str
) -> type[errors.VirtHotplugError]:
    lowered = message.lower()
    if "permission denied" in lowered or "read only access" in lowered:
        return errors.PermissionDeniedError
    if "agent is not configured" in lowered:
        return errors.AgentNotConfiguredError
    if "not running" in lowered and code == getattr(libvirt, "VIR_ERR_OPERATION_INVALID", -1):
        return errors.NotRunningError
    if code == getattr(libvirt, "VIR_ERR_INTERNAL_ERROR", -1) and domain in (
        getattr(libvirt, "VIR_FROM_RPC", -1),
        getattr(libvirt, "VIR_FROM_REMOTE", -1),
    ):
        return errors.ConnectError
    for name, cls in _BY_CODE:
        if code == getattr(libvirt, name, None):
            return cls
    return errors.VirtHotplugError


def open_error(exc: Exception, uri: str) -> errors.VirtHotplugError:
    """Errors from ``open()`` are about the URI or the daemon, whatever their code."""
    libvirt = libvirt_module()
    err = classify(exc, context=f"cannot connect to '{uri}'")
    domain = exc.get_error_domain() if isinstance(exc, libvirt.libvirtError) else None
    bad_uri = domain == getattr(libvirt, "VIR_FROM_URI", -1) or "uri" in err.message.lower()
    if isinstance(err, (errors.PermissionDeniedError, errors.InvalidURIError)):
        return err
    # At open() the URI (and the node file it may name) is the only argument: a refused
    # argument or definition means the URI is unusable, not that the daemon is down.
    unusable = (errors.MalformedXMLError, errors.InvalidRequestError, errors.UnsupportedError)
    if bad_uri or isinstance(err, unusable):
        return errors.InvalidURIError(err.message, code=err.code)
    if isinstance(err, errors.ConnectError):
        return errors.ConnectError(f"{err.message} (is libvirtd running?)", code=err.code)
    return errors.ConnectError(err.message, code=err.code)


def one_line(text: str) -> str:
    return " ".join(text.split())


def last_error(libvirt: Any, context: str) -> errors.VirtHotplugError:
    """Build the exception from the thread's last libvirt error (read in the same thread)."""
    last = libvirt.virGetLastError()
    if not last:
        return errors.AgentError(f"{context}: guest agent call failed")
    code, domain, message = last[0], last[1], one_line(str(last[2] or "unknown error"))
    cls = exception_class(libvirt, code, domain, message)
    return cls(f"{context}: {message}", code=code)
