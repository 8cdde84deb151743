"""The watch's lock file of a host, as every command reads it: which watch runs now.

Each ``watch`` holds an exclusive ``flock`` on ``RUN_DIR/watch-<URI, %-escaped>.lock`` per
host for as long as it runs (``daemon.lock`` takes it) and writes its owner line there: its
pid and a random token drawn once per run. The kernel drops the lock when the process ends,
however it ends; the file stays, with the old owner line.

A domain's history may carry a watch's token as its ``since-start`` mark (``host.history``):
the mark says that watch has seen every monitor event since QEMU's start. It is worth
something only while that watch still runs and still watches the host, which is what
``vouches`` asks of the lock file: held right now (a shared, non-blocking ``flock`` fails),
by the owner whose token the mark names. Nothing here blocks or writes.

The run directory is ``/run/virthotplug`` (where the hook socket lives too), or
``$VIRTHOTPLUG_RUN_DIR``: tests and a second, private daemon use their own.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import urllib.parse
from dataclasses import dataclass
from typing import Optional

DEFAULT_RUN_DIR = "/run/virthotplug"
RUN_DIR_ENV = "VIRTHOTPLUG_RUN_DIR"
MAX_OWNER_BYTES = 128
TOKEN_BYTES = 16  # 128 random bits: no other run ever draws the same


@dataclass(frozen=True)
class LockOwner:
    """What a watch writes into its lock file: its pid and its run's token."""

    pid: int
    token: str

    def line(self) -> bytes:
        return f"{self.pid} {self.token}\n".encode("ascii")


def run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


def lock_path(uri: str, directory: str) -> str:
    return os.path.join(directory, f"watch-{urllib.parse.quote(uri, safe='')}.lock")


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def parse_owner(data: bytes) -> Optional[LockOwner]:
    """The owner line; None when it is not one (empty while its watch is writing it)."""
    fields = data.decode("ascii", "replace").split()
    if len(fields) != 2 or not fields[0].isascii() or not fields[0].isdigit():
        return None
    pid, token = fields
    if len(token) != 2 * TOKEN_BYTES or any(c not in "0123456789abcdef" for c in token):
        return None
    return LockOwner(int(pid), token)


def read_owner(fd: int) -> Optional[LockOwner]:
    return parse_owner(os.pread(fd, MAX_OWNER_BYTES, 0))


def holder(uri: str, directory: Optional[str] = None) -> Optional[LockOwner]:
    """The watch that holds the host's lock now; None when none does, or when this process
    cannot tell (no run directory, no lock file, not readable: another host's watch, one
    of another user, one out of sight)."""
    path = lock_path(uri, directory or run_dir())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            # Held for an instant only when nobody holds it (the close drops it): a watch
            # starting meanwhile tries again (``daemon.lock``).
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_owner(fd)
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def vouches(uri: Optional[str], token: str, directory: Optional[str] = None) -> bool:
    """Whether the watch whose token is ``token`` runs now and watches ``uri``."""
    if uri is None or not token:
        return False
    owner = holder(uri, directory)
    return owner is not None and owner.token == token
