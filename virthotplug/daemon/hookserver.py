"""The daemon's end of the libvirt hook (``hooks/qemu``, virthotplug-hook(8)).

``HookServer`` is an event source for ``watch.Watch``: it binds a unix datagram socket
(``[watch] hook_socket``, default ``/run/virthotplug/hook.sock``; directory 0755, socket
0600, so only root can send), receives the hook's messages in a thread, validates each one
strictly and enqueues an ``events.HookEvent``. Anything else is logged (rate-limited) and
dropped: a message is only a hint to re-read a domain, never trusted for its content.

The message (its keys, limits and encoding) is ``core.hookproto``'s, which the hook imports
too. The sender must be root or the daemon's own user (checked with SCM_CREDENTIALS).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

from virthotplug.core import hookproto
from virthotplug.core.events import DomainRef, Event, HookEvent
from virthotplug.core.hookproto import MAX_MESSAGE_BYTES, MessageError

log = logging.getLogger(__name__)

OPERATIONS = frozenset(hookproto.OPERATIONS)
GARBAGE_LOG_INTERVAL = 60.0  # at most one warning a minute about dropped messages

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class HookMessage:
    operation: str
    sub_operation: str
    name: str
    uuid: str  # lower case, canonical form
    vcpus: Optional[tuple[int, int, int]]  # (current, maximum, hotpluggable)
    agent_channel: bool


def parse_message(data: bytes) -> HookMessage:
    """Validate one datagram (``hookproto.decode``); raises ``MessageError`` saying what is
    wrong."""
    return HookMessage(*hookproto.decode(data))


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
