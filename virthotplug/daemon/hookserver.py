"""The daemon's end of the libvirt hook (``hooks/qemu``, virthotplug-hook(8)).

``HookServer`` is an event source for ``watch.Watch``: it binds a unix datagram socket
(``[watch] hook_socket``, default ``/run/virthotplug/hook.sock``; directory 0755, socket
0600, so only root can send), receives the hook's messages in a thread, validates each one
strictly and enqueues an ``events.HookEvent``. Anything else is logged (rate-limited) and
dropped: a message is only a hint to re-read a domain, never trusted for its content.

Message, protocol version 1 (one JSON object per datagram, at most 4096 bytes, exactly
these keys and types)::

    {"v": 1, "op": "started", "subop": "begin", "name": "web1",
     "uuid": "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01",
     "vcpus": {"current": 1, "maximum": 4, "hotpluggable": 3}, "agent_channel": true}

``op`` is a libvirt QEMU hook operation, ``subop`` its sub-operation, ``vcpus`` may be null.
The sender must be root or the daemon's own user (checked with SCM_CREDENTIALS).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

from virthotplug.core.events import DomainRef, Event, HookEvent

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4096
MAX_NAME_CHARS = 1024
MAX_VCPUS = 65535
OPERATIONS = frozenset(
    (
        "prepare",
        "start",
        "started",
        "stopped",
        "release",
        "migrate",
        "restore",
        "reconnect",
        "attach",
    )
)
SUB_OPERATIONS = frozenset(("begin", "end", "-"))
KEYS = frozenset(("v", "op", "subop", "name", "uuid", "vcpus", "agent_channel"))
VCPU_KEYS = frozenset(("current", "maximum", "hotpluggable"))
GARBAGE_LOG_INTERVAL = 60.0  # at most one warning a minute about dropped messages

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class MessageError(ValueError):
    """A datagram that is not a valid hook message."""


@dataclass(frozen=True)
class HookMessage:
    operation: str
    sub_operation: str
    name: str
    uuid: str  # lower case, canonical form
    vcpus: Optional[tuple[int, int, int]]  # (current, maximum, hotpluggable)
    agent_channel: bool


def parse_message(data: bytes) -> HookMessage:
    """Validate one datagram; raises ``MessageError`` saying what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"not JSON: {_short(str(exc))}") from None
    if not isinstance(doc, dict):
        raise MessageError("not a JSON object")
    if set(doc) != KEYS:
        missing, extra = sorted(KEYS - set(doc)), sorted(set(doc) - KEYS)
        raise MessageError(f"wrong keys (missing {missing}, unknown {_short(str(extra))})")
    if type(doc["v"]) is not int or doc["v"] != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {_short(repr(doc['v']))}, expected 1")
    op, subop, name, uuid = doc["op"], doc["subop"], doc["name"], doc["uuid"]
    if not isinstance(op, str) or op not in OPERATIONS:
        raise MessageError(f"unknown operation {_short(repr(op))}")
    if not isinstance(subop, str) or subop not in SUB_OPERATIONS:
        raise MessageError(f"unknown sub-operation {_short(repr(subop))}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or _CONTROL.search(name):
        raise MessageError("invalid domain name")
    if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
        raise MessageError(f"invalid UUID {_short(repr(uuid))}")
    if type(doc["agent_channel"]) is not bool:
        raise MessageError("agent_channel is not true or false")
    return HookMessage(
        operation=op,
        sub_operation=subop,
        name=name,
        uuid=uuid.lower(),
        vcpus=_vcpus(doc["vcpus"]),
        agent_channel=doc["agent_channel"],
    )


def _vcpus(value: Any) -> Optional[tuple[int, int, int]]:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != VCPU_KEYS:
        raise MessageError("vcpus is not an object with current, maximum and hotpluggable")
    numbers = [value[key] for key in ("current", "maximum", "hotpluggable")]
    if not all(type(n) is int and 0 <= n <= MAX_VCPUS for n in numbers):
        raise MessageError(f"vcpus counts must be integers from 0 to {MAX_VCPUS}")
    current, maximum, hotpluggable = numbers
    if current > maximum or hotpluggable > maximum:
        raise MessageError("vcpus counts exceed the maximum")
    return current, maximum, hotpluggable


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _short(text: str, limit: int = 60) -> str:
    text = _CONTROL.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."


def local_qemu_uri(uris: Sequence[str]) -> str:
    """The URI hook messages belong to: the hook runs for this machine's QEMU driver.

    The first ``qemu...`` URI without a host part, else the first URI.
    """
    for uri in uris:
        if uri.startswith("qemu") and not urlsplit(uri).netloc:
            return uri
    if not uris:
        raise ValueError("no connection URI")
    return uris[0]


class HookServer:
    """An ``EventSource`` for ``Watch``: hook messages in, ``HookEvent`` records out.

    ``start`` never raises: when the socket cannot be bound (another daemon holds it, no
    permission, a non-socket file in the way), the daemon runs on without hook messages
    (libvirt's own events still arrive) and says so in an error line.
    """

    def __init__(self, path: str, host: str) -> None:
        self.path = path
        self.host = host
        self.received = 0
        self.dropped = 0
        self._sock: Optional[socket.socket] = None
        self._identity: Optional[tuple[int, int]] = None  # (st_dev, st_ino) of our socket
        self._wake_r, self._wake_w = -1, -1
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._last_warning = float("-inf")
        self._unlogged = 0

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self, enqueue: Callable[[Event], None]) -> None:
        try:
            self._sock = self._bind()
        except OSError as exc:
            log.error("hook socket %s: %s; running without hook messages", self.path, _reason(exc))
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(
            target=self._loop, args=(self._sock, enqueue), name="hook-socket", daemon=True
        )
        self._thread.start()
        log.info("listening for hook messages on %s", self.path)

    def close(self) -> None:
        self._stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(1.0)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._unlink_ours()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # binding

    def _bind(self) -> socket.socket:
        directory = os.path.dirname(self.path) or "."
        self._prepare_directory(directory)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # Bind under a temporary name, restrict it, then rename: the socket is never
            # reachable at its real path with wider permissions, whatever the umask.
            temporary = os.path.join(directory, f".hk{os.getpid()}")
            _unlink_quietly(temporary)
            sock.bind(temporary)
            try:
                os.chmod(temporary, 0o600)
                os.rename(temporary, self.path)
            except OSError:
                _unlink_quietly(temporary)
                raise
            info = os.lstat(self.path)
            self._identity = (info.st_dev, info.st_ino)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def _prepare_directory(directory: str) -> None:
        try:
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
        info = os.stat(directory)
        if not stat.S_ISDIR(info.st_mode):
            raise OSError(errno.ENOTDIR, f"{directory} is not a directory")
        # Another user who can create names there (even in a sticky directory such as /tmp)
        # could take the path first and read every hook message: the hook refuses to send
        # there too.
        if info.st_uid not in (0, os.geteuid()):
            raise OSError(errno.EPERM, f"directory {directory} is owned by uid {info.st_uid}")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(errno.EPERM, f"directory {directory} is writable by group or others")

    def _remove_stale(self) -> None:
        """Remove a socket file nobody answers on; refuse anything else in the way."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            log.info("hook socket %s: removing a stale socket", self.path)
            _unlink_quietly(self.path)
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "in use by another process (another virthotplug watch?)")

    def _unlink_ours(self) -> None:
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == self._identity:
            _unlink_quietly(self.path)

    # receiving

    def _loop(self, sock: socket.socket, enqueue: Callable[[Event], None]) -> None:
        space = socket.CMSG_SPACE(_UCRED.size)
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([sock.fileno(), self._wake_r], [], [])
                if self._wake_r in ready or self._stopping.is_set():
                    return
                data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE_BYTES + 1, space)
            except InterruptedError:
                continue
            except (OSError, ValueError) as exc:
                if not self._stopping.is_set():
                    log.error("hook socket %s: %s; no more hook messages", self.path, exc)
                return
            try:
                self._handle(data, ancillary, flags, enqueue)
            except Exception:  # a bug here must not end the listener
                log.exception("hook socket %s: failed to handle a message", self.path)

    def _handle(
        self,
        data: bytes,
        ancillary: list[tuple[int, int, bytes]],
        flags: int,
        enqueue: Callable[[Event], None],
    ) -> None:
        sender = _sender_uid(ancillary)
        if sender is None or sender not in (0, os.geteuid()):
            self._drop(f"sender uid {sender} is neither root nor ours")
            return
        if flags & socket.MSG_TRUNC:
            self._drop(f"larger than {MAX_MESSAGE_BYTES} bytes")
            return
        try:
            message = parse_message(data)
        except MessageError as exc:
            self._drop(str(exc))
            return
        self.received += 1
        log.debug(
            "hook message: %s %s for domain '%s' (vcpus %s, agent channel %s)",
            message.operation,
            message.sub_operation,
            message.name,
            message.vcpus,
            message.agent_channel,
        )
        enqueue(
            HookEvent(
                DomainRef(self.host, message.uuid, message.name),
                operation=message.operation,
                sub_operation=message.sub_operation,
            )
        )

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_warning < GARBAGE_LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more dropped since the last warning)" if self._unlogged else ""
        log.warning("hook socket %s: dropped an invalid message: %s%s", self.path, why, more)
        self._last_warning, self._unlogged = now, 0


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> Optional[int]:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return int(_UCRED.unpack_from(data)[1])
    return None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
