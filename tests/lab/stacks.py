"""The lab's other host stacks: newer libvirt and QEMU from Debian roots, beside the host's.

Stack 1 is the host's own libvirtd. Every other stack is a Debian root made with debootstrap
(minbase, then the libvirt and QEMU packages) and described by a ``StackDefinition``:

    STACK2  Debian trixie: libvirt 11.3 + QEMU 10.0
    STACK3  Debian forky:  libvirt 12.8 + QEMU 11.1, python3 3.14 with python3-libvirt 12.8
            and the Debian package's dependencies, so that the package installs offline

A root is cached under the lab cache in ``<name>-<hash>/root``, where the hash covers the
suite, the package list, the configuration files written into it and the builder version.
It is rebuilt, into a temporary directory renamed into place, only when one of those changes.

A stack's own ``virtlogd`` and ``libvirtd`` run chrooted in a private mount namespace with
their own tmpfs ``/dev`` and devpts instance (see sandbox.py), and the root's own ``/run``;
host clients reach it as ``qemu+unix:///system?socket=<root>/run/libvirt/libvirt-sock``. It
never touches the host's libvirtd, ``/dev``, ``/etc`` or packages: nothing is installed on
the host and nothing stays mounted there. QEMU runs inside the root, so whatever a domain
uses (kernel, initrd, disk images) is copied into it first (``copy_in``).

    python3 tests/lab/stacks.py stack2|stack3 build|start|stop|status
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest import cache_root
from sandbox import (
    SandboxError,
    apt_install,
    chroot_env,
    clear_apt,
    debootstrap,
    forbid_service_starts,
    in_root,
    in_root_argv,
    write_apt_sources,
)

log = logging.getLogger("lab.stacks")

DAEMON_PACKAGES = (
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "qemu-system-x86",
    "libvirt-clients",
)
# What the Debian package of virthotplug needs (debian/control: Depends and Recommends), so
# that ``apt-get install ./virthotplug_*.deb`` in the root needs no archive.
PACKAGE_DEPENDENCIES = (
    "python3",
    "python3-libvirt",
    "python3-lxml",
    "python3-tenacity",
    "python3-prometheus-client",
)
# Written into the root after the packages (the hash covers them).
CONFIG_FILES = {
    # libvirt's per-QEMU mount namespace cannot make the pty serial console in this setup
    # ("Failed to create PTY"); the daemon's own namespace is private already.
    "etc/libvirt/qemu.conf": 'namespaces = [ ]\nstdio_handler = "logd"\n',
    "etc/libvirt/libvirtd.conf": (
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        'unix_sock_group = "root"\nunix_sock_rw_perms = "0770"\n'
    ),
}
# The network driver would make a bridge and firewall rules in the host's network namespace;
# nwfilter would add firewall rules. The lab's domains have no network: drop both drivers.
DROPPED_DRIVERS = ("network", "nwfilter")
DRIVER_DIR = "usr/lib/x86_64-linux-gnu/libvirt/connection-driver"
LOGD_PID = "/run/virtlogd.pid"
LIBVIRTD_PID = "/run/libvirtd.pid"
SOCKET = "/run/libvirt/libvirt-sock"
IMAGES_DIR = "/var/lib/virthotplug-lab/images"
LOG_DIR = "/var/log/libvirt/qemu"
LOCK_DIR = Path("/run/virthotplug-lab")
SHORT_LINKS = Path("/run/virthotplug-lab")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
KEEP_ROOTS = 2


class StackError(RuntimeError):
    """A stack cannot be built, started or stopped; the message says why."""


@dataclass(frozen=True)
class StackDefinition:
    """One stack: its name (the cache directory's prefix), its suite and its packages."""

    name: str
    title: str
    suite: str
    packages: tuple[str, ...]
    # The suites of the root's apt sources while it is built.
    apt_suites: tuple[str, ...]
    # debootstrap's script where bookworm's debootstrap has none for the suite.
    script: str | None = None
    apt_options: tuple[str, ...] = ()
    # Bump when the builder's output changes for the same inputs.
    builder: int = 1

    def inputs(self) -> BuildInputs:
        return BuildInputs(
            self.suite,
            list(self.packages),
            dict(CONFIG_FILES),
            list(DROPPED_DRIVERS),
            self.builder,
            {"script": self.script, "apt_options": list(self.apt_options)},
        )


STACK2 = StackDefinition(
    name="stack2",
    title="stack 2",
    suite="trixie",
    packages=DAEMON_PACKAGES,
    apt_suites=("trixie", "trixie-updates"),
)
STACK3 = StackDefinition(
    name="stack3",
    title="stack 3",
    suite="forky",
    packages=(*DAEMON_PACKAGES, *PACKAGE_DEPENDENCIES),
    apt_suites=("forky",),
    script="sid",
    # The archive serves a dated snapshot of testing whose Release file is past Valid-Until.
    apt_options=("Acquire::Check-Valid-Until=false",),
)
STACKS = {s.name: s for s in (STACK2, STACK3)}


@dataclass(frozen=True)
class BuildInputs:
    suite: str
    packages: list[str]
    config: dict[str, str]
    dropped_drivers: list[str]
    builder: int
    # How the root is made where that differs from stack 2's (debootstrap script, apt
    # options); left out of the key while empty, so stack 2's cached root keeps its key.
    recipe: dict[str, object] = field(default_factory=dict)

    def key(self) -> str:
        fields = dict(self.__dict__)
        recipe = {k: v for k, v in self.recipe.items() if v}
        fields.pop("recipe")
        if recipe:
            fields["recipe"] = recipe
        text = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:16]


# ---- building -----------------------------------------------------------------------------


def _configure(root: Path) -> None:
    for rel, text in CONFIG_FILES.items():
        (root / rel).write_text(text)
    for name in DROPPED_DRIVERS:
        (root / DRIVER_DIR / f"libvirt_driver_{name}.so").unlink(missing_ok=True)
    shutil.rmtree(root / "etc/libvirt/qemu/networks", ignore_errors=True)
    # Nothing of a build's run time is kept.
    for entry in (root / "run").iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def build_root(cache: Path, definition: StackDefinition) -> Path:
    """Build into a temporary directory beside the final one, then rename it into place."""
    inputs = definition.inputs()
    tmp = Path(tempfile.mkdtemp(prefix=f".{definition.name}-build-", dir=cache))
    try:
        root = tmp / "root"
        root.mkdir()
        debootstrap(root, definition.suite, script=definition.script)
        forbid_service_starts(root)
        write_apt_sources(root, definition.apt_suites)
        try:
            apt_install(root, definition.packages, definition.apt_options)
        finally:
            clear_apt(root)
        _configure(root)
        manifest = {**inputs.__dict__, "versions": _package_versions(root, definition.packages)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        final = cache / f"{definition.name}-{inputs.key()}"
        os.rename(tmp, final)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _package_versions(root: Path, packages: tuple[str, ...]) -> dict[str, str]:
    argv = in_root_argv(root, ["dpkg-query", "-W", "-f=${Package} ${Version}\n", *packages])
    out = subprocess.run(argv, capture_output=True, text=True, env=chroot_env()).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def prune(cache: Path, definition: StackDefinition, keep: Path) -> None:
    """Drop older roots of the same stack (never a running one)."""
    roots = [d for d in cache.glob(f"{definition.name}-*") if d.is_dir() and d != keep]
    roots.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in roots[KEEP_ROOTS - 1 :]:
        if not Stack(old / "root", old.name, definition).running():
            shutil.rmtree(old, ignore_errors=True)


def find_stack(definition: StackDefinition, cache: Path | None = None) -> Stack | None:
    """The stack for the current inputs if it is built, else None (never builds)."""
    cache = cache or cache_root()
    key = definition.inputs().key()
    directory = cache / f"{definition.name}-{key}"
    if (directory / "manifest.json").is_file():
        return Stack(directory / "root", key, definition)
    return None


def ensure_stack(definition: StackDefinition, cache: Path | None = None) -> Stack:
    """The stack for the current inputs, built only if the cache has none."""
    cache = cache or cache_root()
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    found = find_stack(definition, cache)
    if found is not None:
        log.info("%s root %s is cached in %s", definition.title, found.key, found.root)
        return found
    key = definition.inputs().key()
    started = time.monotonic()
    log.info("building %s root %s (debootstrap %s)", definition.title, key, definition.suite)
    try:
        directory = build_root(cache, definition)
    except SandboxError as exc:
        raise StackError(f"cannot build {definition.title}: {exc}") from exc
    log.info("built %s root %s in %.1f s", definition.title, key, time.monotonic() - started)
    prune(cache, definition, directory)
    return Stack(directory / "root", key, definition)


def ensure_stack2(cache: Path | None = None) -> Stack:
    return ensure_stack(STACK2, cache)


def ensure_stack3(cache: Path | None = None) -> Stack:
    return ensure_stack(STACK3, cache)


def definition_of_root(root: Path) -> StackDefinition | None:
    """Which stack a built root is, from its cache directory's name (``stack3-<hash>``)."""
    name = root.parent.name.rsplit("-", 1)[0]
    return STACKS.get(name)


# ---- running ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A built stack's root, and its daemons once started."""

    root: Path
    key: str
    definition: StackDefinition

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def title(self) -> str:
        return self.definition.title

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.root}{SOCKET}"

    def host_path(self, inside: str | Path) -> Path:
        """Where a path as the stack's daemons see it is on the host."""
        return self.root / str(inside).lstrip("/")

    def run(self, *argv: str, what: str = "") -> str:
        """``argv`` chrooted in the root, in a sandbox of its own (it sees the root's /run,
        so a client there reaches the stack's daemon at ``qemu:///system``)."""
        return in_root(self.root, *argv, what=what or f"{' '.join(argv)} in {self.title}")

    def manifest(self) -> dict[str, object]:
        manifest: dict[str, object] = json.loads((self.root.parent / "manifest.json").read_text())
        return manifest

    # -- processes --

    def _pid(self, pidfile: str) -> int | None:
        """The PID in a pid file of the root, if that process lives chrooted in this root."""
        try:
            pid = int(self.host_path(pidfile).read_text().strip())
            return pid if os.readlink(f"/proc/{pid}/root") == str(self.root) else None
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return self._pid(LIBVIRTD_PID) is not None and self._pid(LOGD_PID) is not None

    def _answers(self) -> bool:
        done = subprocess.run(
            ["virsh", "-q", "-c", self.uri, "version"], capture_output=True, text=True
        )
        return done.returncode == 0

    def start(self) -> bool:
        """Start virtlogd and libvirtd unless they run; True if started now."""
        if self.running():
            return False
        self._clear_run()
        self._link_own_path()
        self.host_path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
        # The daemons detach; their early output goes to a file in the root.
        script = (
            "exec >>/var/log/libvirt/daemons.log 2>&1 </dev/null; "
            f"virtlogd -d -p {LOGD_PID} && libvirtd -d -p {LIBVIRTD_PID}"
        )
        self._spawn(in_root_argv(self.root, ["sh", "-c", script]), "start the daemons")
        self._wait(START_TIMEOUT, f"libvirtd of {self.title} to answer", self._answers)
        log.info("%s up: %s", self.title, self.uri)
        return True

    def _link_own_path(self) -> None:
        """Make the root's host path lead to ``/`` inside it: the host and the chrooted
        daemons then name every file in the root (images, overlays, logs) the same way."""
        link = self.host_path(self.root)
        if link.is_symlink() and os.readlink(link) == "/":
            return
        link.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        link.symlink_to("/")

    @property
    def _short_link(self) -> Path:
        return SHORT_LINKS / f"{self.name}-{self.key[-8:]}-run"

    def short_run(self) -> Path:
        """A short host path to the root's /run (made on first use): unix socket paths are
        limited to 107 bytes, and libvirt's channel sockets are deep in /run."""
        link = self._short_link
        if not (link.is_symlink() and os.readlink(link) == str(self.host_path("/run"))):
            SHORT_LINKS.mkdir(mode=0o755, parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.host_path("/run"))
            os.rename(tmp, link)
        return link

    def _spawn(self, argv: list[str], what: str) -> None:
        done = subprocess.run(
            argv, env=chroot_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        if done.returncode != 0:
            reason = f"{done.stderr.strip()}{self._log_tail()}"
            raise StackError(f"{self.title}: cannot {what}: {reason}")

    def _log_tail(self) -> str:
        try:
            lines = self.host_path("/var/log/libvirt/daemons.log").read_text().splitlines()
        except OSError:
            return ""
        return "\ndaemon output:\n" + "\n".join(lines[-15:]) if lines else ""

    def _clear_run(self) -> None:
        """Stale pid files and sockets of a stack that is not running."""
        run = self.host_path("/run")
        for entry in run.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _wait(self, timeout: float, what: str, done: object) -> None:
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise StackError(f"timed out waiting for {what}{self._log_tail()}")
            time.sleep(0.1)

    def restart_libvirtd(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop libvirtd by PID and start it again in the same namespace; guests keep running."""
        logd = self._pid(LOGD_PID)
        if logd is None or self._pid(LIBVIRTD_PID) is None:
            raise StackError(f"{self.title} is not running")
        self._kill(LIBVIRTD_PID, timeout)
        # virtlogd holds the namespace (its /dev and devpts, which the running QEMUs use).
        argv = ["nsenter", "-t", str(logd), "-m", "-r", "-w"]
        argv += ["libvirtd", "-d", "-p", LIBVIRTD_PID]
        self._spawn(argv, "restart libvirtd")
        self._wait(START_TIMEOUT, f"libvirtd of {self.title} to answer again", self._answers)

    def _kill(self, pidfile: str, timeout: float) -> None:
        pid = self._pid(pidfile)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                log.warning("%s: %s did not stop in %.0f s: SIGKILL", self.title, pidfile, timeout)
                os.kill(pid, signal.SIGKILL)
                deadline += timeout
            time.sleep(0.05)
        self.host_path(pidfile).unlink(missing_ok=True)

    def stop(self) -> None:
        """Destroy and undefine every domain on the stack, then stop its daemons by PID."""
        if self._pid(LIBVIRTD_PID) is not None and self._answers():
            self.remove_all_domains()
        self._kill(LIBVIRTD_PID, STOP_TIMEOUT)
        self._kill(LOGD_PID, STOP_TIMEOUT)
        for pid in self._processes():
            log.warning("%s: ending leftover process %d", self.title, pid)
            os.kill(pid, signal.SIGKILL)
        self._short_link.unlink(missing_ok=True)

    def _processes(self) -> list[int]:
        """Processes chrooted in this root (QEMUs whose domain could not be destroyed)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "root") == str(self.root):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def remove_all_domains(self) -> list[str]:
        names = self._virsh("list", "--all", "--name").split()
        for name in names:
            subprocess.run(["virsh", "-q", "-c", self.uri, "destroy", name], capture_output=True)
            self._virsh("undefine", name)
        return names

    def _virsh(self, *args: str) -> str:
        done = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise StackError(f"virsh {' '.join(args)} on {self.title}: {done.stderr.strip()}")
        return done.stdout

    def versions(self) -> dict[str, str]:
        """``virsh version --daemon``: the versions as the stack's daemon reports them."""
        out = self._virsh("version", "--daemon")
        found = dict(re.findall(r"^\s*([^:]+):\s*(.+)$", out, re.M))
        return {k.strip(): v.strip() for k, v in found.items()}

    # -- files --

    def copy_in(self, source: Path, group: str) -> Path:
        """Copy a file into the root once (under ``group``); return the copy's path."""
        target = self.host_path(f"{IMAGES_DIR}/{group}/{source.name}")
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return target
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        for parent in [target.parent, *target.parent.parents]:
            if parent == self.root:
                break
            parent.chmod(0o755)
        tmp = target.with_name(f".{target.name}.tmp")
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(source), str(tmp)], check=True
        )
        tmp.chmod(0o644)
        os.rename(tmp, target)
        self._prune_copies(target.parent)
        return target

    def _prune_copies(self, fresh: Path) -> None:
        """Keep the two newest copies of a guest family (e.g. every debian-bookworm-<hash>):
        rebuilt images would otherwise pile up in the root."""
        family = fresh.name.rsplit("-", 1)[0]
        groups = [d for d in fresh.parent.glob(f"{family}-*") if d.is_dir() and d != fresh]
        groups.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        for old in groups[1:]:
            shutil.rmtree(old, ignore_errors=True)


class Users:
    """Runs using a stack hold a shared lock (``<name>.users``); the last one to leave
    stops it."""

    def __init__(self, definition: StackDefinition) -> None:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock = LOCK_DIR / f"{definition.name}.users"
        self._fd: int | None = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def leave(self) -> bool:
        """Release; True if no other run uses the stack any more."""
        if self._fd is None:
            return False
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True


# ---- command line -------------------------------------------------------------------------

USAGE = f"usage: stacks.py {'|'.join(STACKS)} build|start|stop|status"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if len(argv) != 2 or argv[0] not in STACKS or argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return run_command(STACKS[argv[0]], argv[1])
    except (StackError, SandboxError) as exc:
        log.error("%s", exc)
        return 1


COMMANDS = ("build", "start", "stop", "status")


def run_command(definition: StackDefinition, command: str) -> int:
    title = definition.title
    if command == "build":
        started = time.monotonic()
        built = ensure_stack(definition)
        print(f"{title} root {built.root} ({time.monotonic() - started:.1f} s)")
        return 0
    stack = find_stack(definition)
    if stack is None:
        print(f"{title} is not built (build first)", file=sys.stderr)
        return 1 if command != "stop" else 0
    if command == "start":
        print("started" if stack.start() else "already running")
    elif command == "stop":
        stack.stop()
        print("stopped")
    if command in ("start", "status"):
        if not stack.running():
            print(f"{title} ({stack.root}) is not running")
            return 3 if command == "status" else 1
        print(f"uri: {stack.uri}")
        for what, version in stack.versions().items():
            print(f"{what}: {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
