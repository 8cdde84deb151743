"""Run ``virthotplug watch --json`` as a real process and follow its JSON lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

Record = dict[str, Any]


def write_config(path: Path, text: str) -> Path:
    """A config file as virthotplug requires it: not writable by group or others."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def scoped_config(tmp_path: Path, sections: dict[str, str], watch: str = "") -> Path:
    """Policy only for the named domains; every other domain on the host is reported only,
    so a test never changes guests that are not its own.
    """
    text = "[defaults]\nmode = report\n\n"
    text += "".join(f"[domain:{name}]\n{body}\n" for name, body in sections.items())
    # Each daemon of a test gets its own hook socket: never the host's.
    text += f"[watch]\nresync_interval = 60\nhook_socket = {tmp_path / 'hook.sock'}\n{watch}\n"
    return write_config(tmp_path / "virthotplug.conf", text)


class WatchProcess:
    def __init__(
        self,
        config: Path,
        *extra: str,
        env: Optional[dict[str, str]] = None,
        connect: tuple[str, ...] = (),
    ) -> None:
        # connect: the hosts (-c URI, repeated); none: virthotplug's default.
        hosts = [arg for uri in connect for arg in ("-c", uri)]
        cmd = [sys.executable, "-m", "virthotplug", *hosts, "--config-file", str(config), "watch"]
        self.stderr_path = config.with_suffix(".stderr")
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [*cmd, "--json", *extra],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.records: list[tuple[float, Record]] = []  # (monotonic arrival, record)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line)
            with self._cond:
                self.records.append((time.monotonic(), record))
                self._cond.notify_all()

    def wait_for(
        self, match: Callable[[Record], bool], timeout: float = 10.0, since: float = 0.0
    ) -> tuple[float, Record]:
        """The first record (arrival time, record) after ``since`` that matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for arrived, record in self.records:
                    if arrived >= since and match(record):
                        return arrived, record
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no matching watch record within {timeout} s; "
                        f"stderr tail:\n{self.stderr_tail()}"
                    )
                self._cond.wait(left)

    def stderr_tail(self, lines: int = 25) -> str:
        return "\n".join(self.stderr_path.read_text().splitlines()[-lines:])

    def stop(self) -> float:
        """SIGTERM; returns the seconds until the process exited."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return time.monotonic() - started


def for_domain(name: str, event: str, **details: Any) -> Callable[[Record], bool]:
    def match(record: Record) -> bool:
        if record["domain"] != name or record["event"] != event:
            return False
        return all(record["details"].get(k) == v for k, v in details.items())

    return match


def host_event(what: str) -> Callable[[Record], bool]:
    return lambda r: r["event"] == "host" and r["details"]["what"] == what
