"""One ``watch`` per host: a lock file per connection URI in the run directory.

Two daemons on one host would both act on every domain (and only the first gets the hook
socket). Each watch holds an exclusive ``flock`` on ``RUN_DIR/watch-<URI, %-escaped>.lock``
for as long as it runs; the kernel releases it when the process ends, however it ends, so a
stale file never blocks a restart. The file holds the owner's pid, for the error message.

The run directory is ``/run/virthotplug`` (where the hook socket lives too), or
``$VIRTHOTPLUG_RUN_DIR``: tests and a second, private daemon use their own.
"""

from __future__ import annotations

import fcntl
import os
import urllib.parse
from typing import Sequence

from virthotplug.core.errors import VirtHotplugError

DEFAULT_RUN_DIR = "/run/virthotplug"
RUN_DIR_ENV = "VIRTHOTPLUG_RUN_DIR"
MAX_PID_BYTES = 32


class AlreadyRunningError(VirtHotplugError):
    """Another watch holds the lock of a host this one was asked to watch."""


def run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


def lock_path(uri: str, directory: str) -> str:
    return os.path.join(directory, f"watch-{urllib.parse.quote(uri, safe='')}.lock")


class HostLocks:
    """The locks of every host of one watch, held until ``release`` (or the process ends)."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def acquire(self, uris: Sequence[str], directory: str | None = None) -> None:
        directory = directory or run_dir()
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            for uri in dict.fromkeys(uris):
                self._fds.append(_lock(uri, lock_path(uri, directory)))
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


def _lock(uri: str, path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VirtHotplugError(f"cannot open the lock {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(fd)
        os.close(fd)
        raise AlreadyRunningError(
            f"another watch{owner} already watches {uri} (lock {path}); stop it first"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise VirtHotplugError(f"cannot lock {path}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _owner(fd: int) -> str:
    text = os.pread(fd, MAX_PID_BYTES, 0).decode("ascii", "replace").strip()
    return f" (pid {text})" if text.isdigit() else ""
