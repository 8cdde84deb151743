"""The watch's lock file as every command reads it (``host.watchlock``): which watch holds a
host's lock now, by its owner line (pid and the run's token); and a watch starting while a
command looks at the lock still gets it."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from virthotplug.daemon.lock import AlreadyRunningError, HostLocks
from virthotplug.host.watchlock import (
    LockOwner,
    holder,
    lock_path,
    new_token,
    parse_owner,
    vouches,
)

URI = "qemu:///system"


def test_the_owner_line_round_trips_and_garbage_is_nobody() -> None:
    owner = LockOwner(1234, new_token())
    assert parse_owner(owner.line()) == owner
    for junk in (
        b"",
        b"1234\n",  # an older watch's line: a pid only
        b"1234 " + b"G" * 32 + b"\n",
        b"1234 abc\n",
        b"-1 " + owner.token.encode() + b"\n",
        b"1234 " + owner.token.encode() + b" extra\n",
        b"\xff\xfe",
    ):
        assert parse_owner(junk) is None, junk


def test_the_holder_is_the_running_watch_only(tmp_path: Path) -> None:
    assert holder(URI, str(tmp_path / "missing")) is None  # no run directory
    assert holder(URI, str(tmp_path)) is None  # no lock file
    with HostLocks() as locks:
        locks.acquire([URI], str(tmp_path))
        assert holder(URI, str(tmp_path)) == LockOwner(os.getpid(), locks.token)
        assert vouches(URI, locks.token, str(tmp_path))
        assert not vouches(URI, new_token(), str(tmp_path))
        assert not vouches(URI, "", str(tmp_path))
        assert holder("qemu:///session", str(tmp_path)) is None  # another host's lock
    # The file stays with the last owner's line, but nobody holds it.
    assert Path(lock_path(URI, str(tmp_path))).read_text().split()[1] == locks.token
    assert holder(URI, str(tmp_path)) is None
    assert not vouches(URI, locks.token, str(tmp_path))


def test_a_lock_path_that_is_no_regular_file_is_nobodys(tmp_path: Path) -> None:
    os.mkfifo(lock_path(URI, str(tmp_path)))
    started = time.monotonic()
    assert holder(URI, str(tmp_path)) is None
    assert time.monotonic() - started < 1.0  # never blocks on a FIFO


def test_a_watch_starting_while_a_command_looks_still_gets_the_lock(tmp_path: Path) -> None:
    path = lock_path(URI, str(tmp_path))
    Path(path).write_text("")
    reader = os.open(path, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as ``holder`` does, for an instant
    threading.Timer(0.1, os.close, (reader,)).start()
    with HostLocks() as locks:
        locks.acquire([URI], str(tmp_path))
        assert holder(URI, str(tmp_path)) == LockOwner(os.getpid(), locks.token)


def test_a_second_watch_still_refuses_naming_the_first(tmp_path: Path) -> None:
    with HostLocks() as first:
        first.acquire([URI], str(tmp_path))
        with pytest.raises(AlreadyRunningError, match=f"another watch \\(pid {os.getpid()}\\)"):
            HostLocks().acquire([URI], str(tmp_path))
        assert holder(URI, str(tmp_path)) == LockOwner(os.getpid(), first.token)
