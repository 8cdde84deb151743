"""One ``watch`` per host: a lock file per connection URI in the run directory.

Two daemons on one host would both act on every domain (and only the first gets the hook
socket). Each watch holds an exclusive ``flock`` on ``RUN_DIR/watch-<URI, %-escaped>.lock``
(``host.watchlock``) for as long as it runs; the kernel releases it when the process ends,
however it ends, so a stale file never blocks a restart. The file holds the owner's pid,
for the error message, and the run's token, which the domain histories this watch vouches
for name (``host.history``): every command can tell whether that watch still runs.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Sequence

from virthotplug.core.errors import VirtHotplugError
from virthotplug.host.watchlock import LockOwner, lock_path, new_token, read_owner, run_dir

# A command that asks whether a watch vouches for a history holds a shared lock for an
# instant (``watchlock.holder``): a watch starting then tries again for this long.
READER_WAIT = 0.5
READER_POLL = 0.01


class AlreadyRunningError(VirtHotplugError):
    """Another watch holds the lock of a host this one was asked to watch."""


class HostLocks:
    """The locks of every host of one watch, held until ``release`` (or the process ends).
    ``token``: this run's, written into every lock it takes."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        self.token = new_token()

    def acquire(self, uris: Sequence[str], directory: str | None = None) -> None:
        directory = directory or run_dir()
        owner = LockOwner(os.getpid(), self.token)
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            for uri in dict.fromkeys(uris):
                self._fds.append(_lock(uri, lock_path(uri, directory), owner))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> HostLocks:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _lock(uri: str, path: str, owner: LockOwner) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VirtHotplugError(f"cannot open the lock {path}: {exc.strerror or exc}") from None
    try:
        _flock_exclusive(fd)
    except BlockingIOError:
        other = read_owner(fd)
        os.close(fd)
        named = f" (pid {other.pid})" if other is not None else ""
        raise AlreadyRunningError(
            f"another watch{named} already watches {uri} (lock {path}); stop it first"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise VirtHotplugError(f"cannot lock {path}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.line(), 0)
    return fd


def _flock_exclusive(fd: int) -> None:
    """Take the lock, waiting out a reader's instant (BlockingIOError: another watch)."""
    deadline = time.monotonic() + READER_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(READER_POLL)
