"""Run ``virthotplug watch --json`` as a real process and follow its JSON lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jsonschema
from jsonschemas import validate

Record = dict[str, Any]
_SERVING = re.compile(r"metrics: serving http://127\.0\.0\.1:(\d+)/metrics")


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
        self.schema_errors: list[str] = []  # records that do not fit schemas/watch-record.json
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line)
            try:
                validate("watch-record", record)  # the published schema (schemas/)
            except jsonschema.ValidationError as exc:
                self.schema_errors.append(f"{exc.message}: {line.strip()}")
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

    def metrics_port(self, timeout: float = 10.0) -> int:
        """The loopback port ``--metrics-listen 127.0.0.1:0`` chose, from the log line."""
        deadline = time.monotonic() + timeout
        while not (found := _SERVING.search(self.stderr_path.read_text())):
            assert time.monotonic() < deadline, self.stderr_tail()
            time.sleep(0.05)
        return int(found.group(1))

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
        assert not self.schema_errors, self.schema_errors[:3]
        return time.monotonic() - started


def for_domain(name: str, event: str, **details: Any) -> Callable[[Record], bool]:
    def match(record: Record) -> bool:
        if record["domain"] != name or record["event"] != event:
            return False
        return all(record["details"].get(k) == v for k, v in details.items())

    return match


def host_event(what: str) -> Callable[[Record], bool]:
    return lambda r: r["event"] == "host" and r["details"]["what"] == what


class Watches:
    """The watch processes one test starts: each waits for its host to connect, and each is
    stopped at the end, where it must exit 0 within 2 s of SIGTERM."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._started: list[WatchProcess] = []

    def start(
        self,
        policies: dict[str, str],
        *extra: str,
        vms: tuple[Any, ...] = (),
        watch: str = "",
        env: Optional[dict[str, str]] = None,
    ) -> WatchProcess:
        for vm in vms:  # judge guests only once their agent answers
            vm.wait_agent()
        proc = WatchProcess(scoped_config(self._tmp_path, policies, watch), *extra, env=env)
        self._started.append(proc)
        proc.wait_for(host_event("connected"))
        return proc

    def stop_all(self) -> None:
        for proc in self._started:
            stopped_in = proc.stop()
            assert proc.proc.returncode == 0, proc.stderr_tail()
            assert stopped_in < 2.0, f"SIGTERM took {stopped_in:.2f} s"
