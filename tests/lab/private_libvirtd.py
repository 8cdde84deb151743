"""A libvirtd of the lab's own, for tests that may wedge it (a guest flooding QEMU events).

    with PrivateLibvirtd("flood") as daemon, Lab(uri=daemon.uri, log_dir=daemon.log_dir) as lab:
        vm = lab.create()
        latency = daemon.list_latency()  # one virConnectListAllDomains, None if no answer
        print(daemon.rss_bytes(), daemon.cpu_seconds())

The host's libvirtd in session mode, run as the unprivileged lab user (``vhplab``, made by
host-setup.sh): its own socket, configuration, domains, QEMU processes and logs under
``/var/lib/vhplab/<name>``; nothing it does reaches the host's system daemon, and a regression
that wedges it is ended by killing it by PID. Root reaches it through its socket
(``qemu+unix:///session?socket=...``), and the lab's guest image is world-readable, so the
lab boots its guests there as on the system daemon (TCG; the session daemon has no /dev/kvm).

A daemon is started only if none of that name runs: one left behind by a dead run is adopted
(its domains removed) when it answers, killed when it does not. A run holds ``lock`` in the
daemon's directory while it uses it; a second run asking for the same name is refused.
At the end every domain is destroyed and undefined, and the daemon stopped by PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional

import libvirt

log = logging.getLogger("lab.private")

LAB_USER = "vhplab"
# Short: libvirt puts sockets below it (channel/target/domain-N-NAME/PORT), 108 bytes at most.
ROOT = Path("/var/lib/vhplab")
MAX_NAME = 8
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# A call that takes longer than this means the daemon is wedged (it normally answers in ms).
WEDGE_SECONDS = 5.0
# What the session daemon's QEMU driver needs here: no virtlogd (QEMU writes the serial log
# itself), nothing that needs root.
QEMU_CONF = 'stdio_handler = "file"\n'


class PrivateLibvirtdError(RuntimeError):
    """The private daemon could not be started or reached; the message says why."""


class InUse(PrivateLibvirtdError):
    """Another run holds the daemon of that name."""


def _quiet_libvirt() -> None:
    # libvirt prints every failed call on stderr by default; callers report errors.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def bounded(call: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """(True, result) if ``call`` returns within ``timeout``; (False, None) if it does not.

    A daemon thread: a call stuck in a wedged libvirtd must not hold up the caller or exit.
    Exceptions are re-raised in the caller.
    """
    box: list[tuple[bool, Any]] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, call()))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))
        done.set()

    threading.Thread(target=run, name="private-libvirtd-call", daemon=True).start()
    if not done.wait(timeout):
        return False, None
    ok, value = box[0]
    if not ok:
        raise value
    return True, value


class PrivateLibvirtd:
    """A session-mode libvirtd of the lab user; see the module doc."""

    def __init__(self, name: str = "flood", user: str = LAB_USER, root: Path = ROOT) -> None:
        if not name.isalnum() or len(name) > MAX_NAME:
            raise ValueError(f"name must be 1-{MAX_NAME} letters or digits: {name!r}")
        self.name = name
        self.user = user
        self.base = root / name
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.socket = self.run_dir / "libvirt" / "libvirt-sock"
        self.pidfile = self.run_dir / "libvirtd.pid"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self.pid: Optional[int] = None
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._lock_fd: Optional[int] = None

    @classmethod
    def first_free(cls, prefix: str, count: int = 4) -> PrivateLibvirtd:
        """Started under the first of PREFIX, PREFIX2 ... PREFIX<count> that no other run
        holds (a small fixed set: a daemon left by a dead run is adopted by the next one)."""
        for n in range(1, count + 1):
            daemon = cls(prefix if n == 1 else f"{prefix}{n}")
            try:
                return daemon.start()
            except InUse:
                continue
        raise InUse(f"private libvirtd {prefix} ... {prefix}{count} are all in use")

    # -- lifecycle --

    def __enter__(self) -> PrivateLibvirtd:
        return self.start()

    def __exit__(
        self,
        _type: Optional[type[BaseException]],
        _exc: Optional[BaseException],
        _tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def start(self) -> PrivateLibvirtd:
        """Adopt the daemon of this name if it runs and answers, else start a fresh one.
        Once started (e.g. by first_free), ``with`` uses it as it is."""
        if self._lock_fd is not None:
            return self
        _quiet_libvirt()
        account = self._account()
        self._prepare(account)
        self._claim()
        leftover = self._running_pid()
        if leftover is not None and self.list_latency() is not None:
            log.warning(
                "adopting private libvirtd %s (pid %d) of an earlier run", self.name, leftover
            )
            self.pid = leftover
            self.remove_domains()
            return self
        if leftover is not None:
            log.warning("killing unresponsive private libvirtd %s (pid %d)", self.name, leftover)
            self.pid = leftover
            self.kill()
        self._spawn(account)
        return self

    def stop(self) -> None:
        """Destroy and undefine every domain, stop the daemon by PID (kill it if it must)."""
        try:
            if self.pid is not None and self.alive():
                try:
                    self.remove_domains()
                except PrivateLibvirtdError as exc:
                    log.warning("%s; killing it", exc)
                self._terminate()
            self.kill()  # leftovers of a daemon that did not clean up (or was wedged)
        finally:
            self._release()

    def kill(self) -> None:
        """SIGKILL the daemon and every QEMU it started (by PID), and forget its domains.

        For a wedged daemon: nothing is asked of it. The next start() is a fresh daemon.
        """
        for pid in self._own_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reap()
        self.pid = None
        # Domain definitions and run state of the dead daemon; the capability cache stays.
        for stale in (self.base / "libvirt" / "qemu", self.run_dir):
            shutil.rmtree(stale, ignore_errors=True)

    def restart(self) -> PrivateLibvirtd:
        """A fresh daemon of the same name (the old one killed, its domains gone)."""
        self.kill()
        self._spawn(self._account())
        return self

    # -- probes --

    def alive(self) -> bool:
        return self.pid is not None and _is_libvirtd(self.pid, self._account().pw_uid)

    def rss_bytes(self) -> int:
        """The daemon's VmRSS from /proc/PID/status."""
        return _proc_status_kib(self._require_pid(), "VmRSS") * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon."""
        with open(f"/proc/{self._require_pid()}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def list_latency(self, timeout: float = WEDGE_SECONDS) -> Optional[float]:
        """Seconds one virConnectListAllDomains took on a new connection, None if no answer
        (connect included) within ``timeout``."""

        def call() -> float:
            conn = libvirt.open(self.uri)
            try:
                started = time.monotonic()
                conn.listAllDomains(0)
                return time.monotonic() - started
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        try:
            ok, seconds = bounded(call, timeout)
        except libvirt.libvirtError:
            return None
        return seconds if ok else None

    def remove_domains(self, timeout: float = STOP_TIMEOUT) -> list[str]:
        """Destroy and undefine every domain of the daemon; their names."""

        def call() -> list[str]:
            conn = libvirt.open(self.uri)
            try:
                names = []
                for dom in conn.listAllDomains(0):
                    names.append(dom.name())
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefine()
                return names
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

        try:
            ok, names = bounded(call, timeout)
        except libvirt.libvirtError as exc:
            raise PrivateLibvirtdError(f"private libvirtd {self.name}: {exc}") from exc
        if not ok:
            raise PrivateLibvirtdError(
                f"private libvirtd {self.name} did not remove its domains within {timeout:.0f} s"
            )
        return list(names)

    # -- internals --

    def _account(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            raise PrivateLibvirtdError(
                f"no user {self.user}: run tests/lab/host-setup.sh (it creates the lab user)"
            ) from None

    def _prepare(self, account: pwd.struct_passwd) -> None:
        for directory in (self.base.parent, self.base, self.log_dir, self.base / "libvirt"):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chown(directory, account.pw_uid, account.pw_gid)
            # Root reads the serial logs; QEMU (the lab user) must reach the base directory.
            directory.chmod(0o755)
        conf = self.base / "libvirt" / "qemu.conf"
        conf.write_text(QEMU_CONF, encoding="utf-8")
        os.chown(conf, account.pw_uid, account.pw_gid)

    def _claim(self) -> None:
        fd = os.open(self.base / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InUse(
                f"private libvirtd {self.name} is in use by another run ({self.base / 'lock'})"
            ) from None
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _running_pid(self) -> Optional[int]:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_libvirtd(pid, self._account().pw_uid) else None

    def _require_pid(self) -> int:
        if self.pid is None:
            raise PrivateLibvirtdError(f"private libvirtd {self.name} is not running")
        return self.pid

    def _spawn(self, account: pwd.struct_passwd) -> None:
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.run_dir, account.pw_uid, account.pw_gid)
        env = {
            "HOME": str(self.base),
            "XDG_CONFIG_HOME": str(self.base),
            "XDG_CACHE_HOME": str(self.base / "cache"),
            "XDG_RUNTIME_DIR": str(self.run_dir),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        with open(self.log_dir / "libvirtd.log", "wb") as output:
            os.fchown(output.fileno(), account.pw_uid, account.pw_gid)
            self._proc = subprocess.Popen(
                ["libvirtd", "--pid-file", str(self.pidfile)],
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                env=env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while self.list_latency() is None:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.log_dir / "libvirtd.log").read_text(errors="replace")[-800:]
                self.kill()
                raise PrivateLibvirtdError(f"private libvirtd {self.name} did not start: {tail}")
            time.sleep(0.1)
        log.info("private libvirtd %s: pid %d, %s", self.name, self.pid, self.uri)

    def _terminate(self) -> None:
        pid = self._require_pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.alive() and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if self.alive():
            log.warning("private libvirtd %s (pid %d) ignored SIGTERM: killing it", self.name, pid)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _own_processes(self) -> list[int]:
        """PIDs of the lab user whose command line names this daemon's directory: the
        daemon (its pid file) and its QEMUs (their monitor sockets). Other private daemons
        of the same user are left alone."""
        uid = self._account().pw_uid
        marker = f"{self.base}/".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid or marker not in (entry / "cmdline").read_bytes():
                    continue
            except OSError:
                continue
            pids.append(int(entry.name))
        return pids


def _is_libvirtd(pid: int, uid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        owner = Path(f"/proc/{pid}").stat().st_uid
        state = _proc_status_field(pid, "State")
    except (OSError, ValueError):
        return False
    return comm == "libvirtd" and owner == uid and not state.startswith("Z")


def _proc_status_field(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return line.split(":", 1)[1].strip()
    raise ValueError(f"/proc/{pid}/status has no {key}")


def _proc_status_kib(pid: int, key: str) -> int:
    return int(_proc_status_field(pid, key).split()[0])


# ---- responsiveness ---------------------------------------------------------------------


@dataclass
class Responsiveness:
    """Samples virConnectListAllDomains latency every ``interval`` seconds in a thread.

    One connection, reopened when it fails. A call still running counts with its time so far,
    so a wedged daemon shows up in ``max_seconds()`` and ``stalled()`` while it is wedged.
    """

    uri: str
    interval: float = 0.25
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)
    errors: int = 0
    _inflight: Optional[float] = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Responsiveness:
        self._thread = threading.Thread(target=self._loop, name="responsiveness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling; a call stuck in a wedged daemon is left to its daemon thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 1.0)

    def _loop(self) -> None:
        conn: Optional[libvirt.virConnect] = None
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                self._inflight = started
            try:
                conn = conn or libvirt.open(self.uri)
                conn.listAllDomains(0)
            except libvirt.libvirtError:
                self.errors += 1
                with contextlib.suppress(libvirt.libvirtError, AttributeError):
                    conn.close()  # type: ignore[union-attr]
                conn = None
            took = time.monotonic() - started
            with self._lock:
                self._inflight = None
                self.samples.append((started, took))
            self._stop.wait(max(0.0, self.interval - took))
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def stalled(self) -> float:
        """Seconds the call in flight has been waiting (0 when none is)."""
        with self._lock:
            return 0.0 if self._inflight is None else time.monotonic() - self._inflight

    def max_seconds(self) -> float:
        with self._lock:
            done = max((s for _, s in self.samples), default=0.0)
        return max(done, self.stalled())

    def p50_seconds(self) -> float:
        with self._lock:
            values = [s for _, s in self.samples]
        return float(statistics.median(values)) if values else float("nan")

    def count(self) -> int:
        with self._lock:
            return len(self.samples)

    def over(self, threshold: float) -> int:
        """Samples (and a call in flight) that took longer than ``threshold`` seconds."""
        with self._lock:
            slow = sum(1 for _, s in self.samples if s > threshold)
        return slow + (1 if self.stalled() > threshold else 0)
