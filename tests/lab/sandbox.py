"""Run commands in a Debian root without letting them reach the host's /dev, /proc or mounts.

Every step runs under ``unshare --mount --propagation private`` and chroots into the root
with a fresh ``proc``, a read-only ``sysfs`` and a small tmpfs ``/dev`` holding only a few
device nodes, its own devpts instance (``/dev/ptmx -> pts/ptmx``) and ``/dev/shm``. The
mounts live in the private namespace only: they go away with its last process and never
show on the host. The host's ``/dev`` is never bind-mounted: a package's postinst once wrote
through such a bind mount and broke the host's ``/dev/ptmx`` and ``/dev/kvm``.

Also: the Debian archive apt uses, read from the host's apt sources (never written into the
repository), and debootstrap in two stages (unpack on the host, configure in the sandbox).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

APT_SOURCES = Path("/etc/apt/sources.list.d")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the sandbox's /dev holds besides pts and shm: name -> (major, minor).
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8)}
DEVICES |= {"urandom": (1, 9), "tty": (5, 0)}

# $1 is the root; the rest is the command to run in it. The mounts are made in the private
# namespace unshare created, so nothing here is visible outside it.
_SANDBOX = r"""
set -eu
root=$1; shift
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o nosuid,mode=0755,size=8m dev "$root/dev"
DEVICE_NODES
mkdir -m 0755 "$root/dev/pts"
mkdir -m 1777 "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o nosuid,nodev,mode=1777,size=64m shm "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
cd /
exec chroot "$root" "$@"
"""
SANDBOX_SCRIPT = _SANDBOX.replace(
    "DEVICE_NODES",
    "\n".join(
        f'mknod -m 0666 "$root/dev/{name}" c {major} {minor}'
        for name, (major, minor) in DEVICES.items()
    ),
)


class SandboxError(RuntimeError):
    """A step in a root failed; the message carries its output."""


def chroot_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A small, fixed environment: nothing of the caller's leaks into package scripts."""
    env = {"PATH": CHROOT_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return {**env, **(extra or {})}


def _check(argv: Sequence[str], what: str, env: Mapping[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=dict(env or chroot_env())
        )
    except FileNotFoundError as exc:
        raise SandboxError(f"{argv[0]} is not installed (run tests/lab/host-setup.sh)") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise SandboxError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def unshared(argv: Sequence[str]) -> list[str]:
    """``argv`` in a new private mount namespace (mounts it makes never reach the host)."""
    return ["unshare", "--mount", "--propagation", "private", *argv]


def in_root_argv(root: Path, argv: Sequence[str]) -> list[str]:
    return unshared(["sh", "-c", SANDBOX_SCRIPT, "sandbox", str(root), *argv])


def in_root(root: Path, *argv: str, env: Mapping[str, str] | None = None, what: str = "") -> str:
    """Run ``argv`` chrooted in ``root``, in the sandbox; return its stdout."""
    return _check(in_root_argv(root, argv), what or " ".join(argv), chroot_env(env))


def host_mirror() -> str:
    """The main Debian archive's URI from the host's apt sources (deb822 or one-line)."""
    for path in sorted(APT_SOURCES.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and not suites.group(1).strip().endswith("-security"):
                return uris.group(1).rstrip("/")
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            found = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if found and not found.group(2).endswith("-security"):
                return found.group(1).rstrip("/")
    raise SandboxError("no Debian archive in the host's apt sources")


def debootstrap(
    root: Path, suite: str, include: Sequence[str] = (), script: str | None = None
) -> None:
    """A minbase root in two stages: unpack (host), then configure (in the sandbox).

    ``script``: debootstrap's script for a suite it has none for (bookworm's debootstrap
    knows no forky: its ``sid`` script makes any later suite).
    """
    argv = ["debootstrap", "--foreign", "--variant=minbase"]
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [suite, str(root), host_mirror()]
    if script is not None:
        argv.append(f"/usr/share/debootstrap/scripts/{script}")
    # The first stage only downloads and unpacks; it runs in its own namespace all the same.
    _check(unshared(argv), f"debootstrap {suite}")
    in_root(root, "/debootstrap/debootstrap", "--second-stage", what="debootstrap second stage")


def write_apt_sources(root: Path, suites: Sequence[str]) -> None:
    """Sources for ``suites`` from the host's archive URI; removed again by clear_apt()."""
    mirror = host_mirror()
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"Signed-By: {keyring}\n" if (root / keyring.lstrip("/")).exists() else ""
    text = f"Types: deb\nURIs: {mirror}\nSuites: {' '.join(suites)}\nComponents: main\n"
    (root / "etc/apt/sources.list.d/debian.sources").write_text(text + signed)
    (root / "etc/apt/sources.list").write_text("")
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")


def forbid_service_starts(root: Path) -> None:
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# Building: packages must not start services.\nexit 101\n")
    policy.chmod(0o755)


def apt_install(root: Path, packages: Sequence[str], options: Sequence[str] = ()) -> None:
    """``apt-get update`` and ``install`` in the root; ``options`` are apt's ``-o`` settings
    (e.g. ``Acquire::Check-Valid-Until=false`` for a dated snapshot of testing)."""
    settings = [arg for option in options for arg in ("-o", option)]
    in_root(root, "apt-get", *settings, "update", "-qq", what="apt-get update in the root")
    argv = ["apt-get", *settings, "install", "-y", "-qq", "--no-install-recommends", *packages]
    in_root(root, *argv, what="apt-get install in the root")


def clear_apt(root: Path) -> None:
    """No archive name, package lists or .debs left in the root."""
    in_root(root, "apt-get", "clean", what="apt-get clean")
    for sources in [root / "etc/apt/sources.list", *root.glob("etc/apt/sources.list.d/*")]:
        sources.write_text("") if sources.name.endswith(".list") else sources.unlink()
    lists = root / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.is_dir() else []:
        if entry.is_file():
            entry.unlink()
    (root / "etc/resolv.conf").unlink(missing_ok=True)


def host_device_facts() -> dict[str, str]:
    """What a lab step must never change: /dev/ptmx's type and /dev/kvm's owner and mode."""
    facts = {}
    ptmx = os.lstat("/dev/ptmx")
    facts["/dev/ptmx"] = "char device" if stat.S_ISCHR(ptmx.st_mode) else oct(ptmx.st_mode)
    if os.path.exists("/dev/kvm"):
        kvm = os.stat("/dev/kvm")
        facts["/dev/kvm"] = f"uid {kvm.st_uid} gid {kvm.st_gid} mode {stat.S_IMODE(kvm.st_mode):o}"
    return facts
