"""Real Debian guests for the lab: Debian 12 (bookworm), 13 (trixie) and 14 (forky, testing),
from Debian packages.

Each suite is debootstrapped (minbase plus systemd, udev, dbus, the distribution's
qemu-guest-agent and cloud kernel) and configured in the sandbox (sandbox.py: never the
host's /dev): root autologin on ttyS0, an fstab for /dev/vda, an initramfs with the virtio
disk modules. Two raw ext4 images are made from that tree with ``mke2fs -d`` (no loop
mount): ``stock.img`` exactly as Debian ships it (a hot-added CPU stays offline) and
``rule.img`` with the RHEL auto-online udev rule added. The kernel and initramfs are copied
out for direct kernel boot. Domains boot a qcow2 overlay of their own (``overlay()``), so the
cached images are never written.

Cached in ``$VIRTHOTPLUG_LAB_CACHE`` (default /var/cache/virthotplug-lab) under
``debian-<suite>-<hash>``, the hash covering the suite, the package list, the files written
in and the builder version; rebuilt into a temporary directory renamed into place only when
one changes.

Bookworm's debootstrap has no script for forky: its ``sid`` script makes a minbase root, and
the packages are then installed with apt in the root (a one-step ``--include`` fails there,
configuring initramfs-tools), with ``Acquire::Check-Valid-Until=false`` (the archive's forky
Release file is past its Valid-Until); the root's apt sources and lists are emptied after.

    python3 tests/lab/debian_image.py [debian12|debian13|debian14 ...]    build (or find)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest import cache_root
from sandbox import (
    SandboxError,
    apt_install,
    clear_apt,
    debootstrap,
    forbid_service_starts,
    in_root,
    write_apt_sources,
)

log = logging.getLogger("lab.debian")

BUILDER_VERSION = 1
SUITES = {"debian12": "bookworm", "debian13": "trixie", "debian14": "forky"}
# debootstrap's script for a suite bookworm's debootstrap has none for; such a suite gets its
# packages from apt in the root, with these apt options.
SCRIPTS = {"debian14": "sid"}
APT_OPTIONS = {"debian14": ("Acquire::Check-Valid-Until=false",)}
# Guest kind -> (distribution, image file).
KINDS = {
    "debian12": ("debian12", "stock.img"),
    "debian12-rule": ("debian12", "rule.img"),
    "debian13": ("debian13", "stock.img"),
    "debian13-rule": ("debian13", "rule.img"),
    # Linux 7.2: under TCG it rejects every hot-added vCPU, like Debian 13's 6.12 (lab notes).
    "debian14": ("debian14", "stock.img"),
    "debian14-rule": ("debian14", "rule.img"),
}
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "qemu-guest-agent",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "zstd",
)
AUTOLOGIN = (
    "[Service]\nExecStart=\n"
    "ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 - $TERM\n"
)
FILES = {
    "etc/hostname": "vhplab-guest\n",
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": AUTOLOGIN,
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\next4\n",
    # Each booted overlay makes its own machine id.
    "etc/machine-id": "",
}
# RHEL's rule: a hot-added CPU is onlined by udev. Stock Debian has none.
RULE_PATH = "etc/udev/rules.d/40-redhat.rules"
RULE = 'SUBSYSTEM=="cpu", ACTION=="add", TEST=="online", ATTR{online}=="0", ATTR{online}="1"\n'
IMAGE_SIZE_MIB = 768
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"
# Direct kernel boot of the virtio disk.
CMDLINE = "root=/dev/vda console=ttyS0 panic=-1"
MEMORY_MIB = 384
KEEP_BUILDS = 2


class ImageError(RuntimeError):
    """A Debian guest image cannot be built; the message says why."""


@dataclass(frozen=True)
class BuildInputs:
    suite: str
    packages: list[str]
    files: dict[str, str]
    rule: str
    size_mib: int
    builder: int = BUILDER_VERSION
    script: str | None = None
    apt_options: list[str] = field(default_factory=list)

    def key(self) -> str:
        # No script and no apt options: left out, so the keys of the suites debootstrap knows
        # stay as they were.
        fields = {k: v for k, v in self.__dict__.items() if k not in ("script", "apt_options")}
        fields |= {k: v for k in ("script", "apt_options") if (v := self.__dict__[k])}
        text = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:16]


def build_inputs(distro: str) -> BuildInputs:
    return BuildInputs(
        SUITES[distro],
        list(PACKAGES),
        dict(FILES),
        RULE,
        IMAGE_SIZE_MIB,
        script=SCRIPTS.get(distro),
        apt_options=list(APT_OPTIONS.get(distro, ())),
    )


@dataclass(frozen=True)
class DebianImage:
    """One guest kind: what a domain's <kernel>, <initrd> and disk backing file are."""

    kind: str
    suite: str
    kernel: Path
    initrd: Path
    disk: Path
    key: str
    kernel_version: str

    @property
    def has_rule(self) -> bool:
        return self.disk.name == "rule.img"


# ---- building -----------------------------------------------------------------------------


def _configure(rootfs: Path) -> str:
    """Configure the debootstrapped tree; return the kernel version in it."""
    for rel, text in FILES.items():
        path = rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in /boot, found {[k.name for k in kernels]}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    # Again with the virtio modules listed (the kernel's postinst made one without them).
    for old in (rootfs / "boot").glob("initrd.img-*"):
        old.unlink()
    in_root(rootfs, "update-initramfs", "-c", "-k", version, what="update-initramfs")
    clear_apt(rootfs)
    return version


def _bootstrap(rootfs: Path, inputs: BuildInputs) -> None:
    """A root with the packages: in one debootstrap, or (a suite debootstrap has no script
    for) debootstrap minbase and then apt in the root."""
    if inputs.script is None:
        debootstrap(rootfs, inputs.suite, include=inputs.packages)
        return
    debootstrap(rootfs, inputs.suite, script=inputs.script)
    write_apt_sources(rootfs, [inputs.suite])
    forbid_service_starts(rootfs)
    try:
        apt_install(rootfs, inputs.packages, inputs.apt_options)
    finally:
        (rootfs / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        clear_apt(rootfs)


def _mke2fs(rootfs: Path, image: Path, size_mib: int = IMAGE_SIZE_MIB) -> None:
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(rootfs)]
    done = subprocess.run([*argv, str(image), f"{size_mib}M"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageError(f"mke2fs -d for {image.name} failed: {done.stderr.strip()}")


def publish(tmp: Path, manifest: dict[str, Any], final: Path) -> Path:
    """A finished build: its manifest written, its files readable by QEMU, renamed into
    place in one step (a half-built image is never found in the cache)."""
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for path in tmp.iterdir():
        path.chmod(0o644)
    tmp.chmod(0o755)
    os.rename(tmp, final)
    return final


def build(cache: Path, inputs: BuildInputs) -> Path:
    """Build into a temporary directory beside the final one, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".debian-{inputs.suite}-build-", dir=cache))
    try:
        rootfs = tmp / "rootfs"
        rootfs.mkdir()
        _bootstrap(rootfs, inputs)
        version = _configure(rootfs)
        shutil.copyfile(rootfs / f"boot/vmlinuz-{version}", tmp / KERNEL_FILE)
        shutil.copyfile(rootfs / f"boot/initrd.img-{version}", tmp / INITRD_FILE)
        _mke2fs(rootfs, tmp / "stock.img")
        (rootfs / RULE_PATH).write_text(inputs.rule)
        _mke2fs(rootfs, tmp / "rule.img")
        shutil.rmtree(rootfs)
        manifest = {**inputs.__dict__, "kernel_version": version}
        return publish(tmp, manifest, cache / f"debian-{inputs.suite}-{inputs.key()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(directory: Path) -> bool:
    files = (KERNEL_FILE, INITRD_FILE, MANIFEST_FILE, "stock.img", "rule.img")
    return all((directory / f).is_file() for f in files)


def prune(cache: Path, suite: str, keep: Path) -> None:
    builds = [d for d in cache.glob(f"debian-{suite}-*") if d.is_dir() and d != keep]
    builds.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_distro(distro: str, cache: Path | None = None) -> Path:
    """The build directory of ``distro`` (debian12, debian13, debian14), built if the cache
    has none."""
    cache = cache or cache_root()
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    inputs = build_inputs(distro)
    directory = cache / f"debian-{inputs.suite}-{inputs.key()}"
    if is_complete(directory):
        log.info("%s image %s is cached in %s", distro, inputs.key(), directory)
        return directory
    started = time.monotonic()
    log.info("building %s image %s (debootstrap %s)", distro, inputs.key(), inputs.suite)
    try:
        build(cache, inputs)
    except SandboxError as exc:
        raise ImageError(f"cannot build the {distro} guest: {exc}") from exc
    log.info("built %s image %s in %.1f s", distro, inputs.key(), time.monotonic() - started)
    prune(cache, inputs.suite, directory)
    return directory


def ensure_image(kind: str, cache: Path | None = None) -> DebianImage:
    """The image of one guest kind (``KINDS``: debian12, debian12-rule, debian13, ...)."""
    if kind not in KINDS:
        raise ImageError(f"unknown Debian guest kind {kind!r} (known: {', '.join(KINDS)})")
    distro, disk = KINDS[kind]
    directory = ensure_distro(distro, cache)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    return DebianImage(
        kind=kind,
        suite=SUITES[distro],
        kernel=directory / KERNEL_FILE,
        initrd=directory / INITRD_FILE,
        disk=directory / disk,
        key=directory.name,
        kernel_version=manifest["kernel_version"],
    )


def overlay(backing: str, path: Path, size_mib: int = IMAGE_SIZE_MIB) -> Path:
    """A qcow2 overlay over ``backing`` (a path as QEMU sees it: it may be in stack 2's root)
    of ``size_mib``, the size of the image behind it."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, "-u"]
    done = subprocess.run([*argv, str(path), f"{size_mib}M"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageError(f"qemu-img create {path.name} failed: {done.stderr.strip()}")
    path.chmod(0o644)
    return path


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for distro in argv or list(SUITES):
        if distro not in SUITES:
            print(f"unknown distribution {distro} (known: {', '.join(SUITES)})", file=sys.stderr)
            return 2
        try:
            started = time.monotonic()
            directory = ensure_distro(distro)
        except ImageError as exc:
            log.error("%s", exc)
            return 1
        print(f"{distro}: {directory} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
