"""Build the lab's tiny diskless guest from Debian packages, and cache it.

The guest is a Debian cloud kernel (unpacked from its .deb, never installed on the host) and
a gzip'd newc initramfs holding busybox-static, the host's real qemu-ga with its libraries,
the virtio modules and the scripts in ``initramfs/`` (``/init`` documents the kernel
command-line switches that select the guest's behaviour).

Images are cached under ``$VIRTHOTPLUG_LAB_CACHE`` (default /var/cache/virthotplug-lab) in a
directory named by a hash of every input, and rebuilt only when an input changes. QEMU runs
as its own user (libvirt-qemu on Debian), so everything there is world-readable.

Run as a script to build (or find) the image and print where it is.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("lab.guest")

# Bump when the builder's output changes for the same inputs.
BUILDER_VERSION = 1
CACHE_ENV = "VIRTHOTPLUG_LAB_CACHE"
DEFAULT_CACHE = Path("/var/cache/virthotplug-lab")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
HOST_PACKAGES = ("busybox-static", "qemu-guest-agent")
BUSYBOX = Path("/bin/busybox")
AGENT = Path("/usr/sbin/qemu-ga")
GUEST_FILES = Path(__file__).resolve().parent / "initramfs"
# Guest path -> (file in GUEST_FILES, mode).
GUEST_SCRIPTS = {
    "init": ("init", 0o755),
    "sbin/vhp-uevent": ("vhp-uevent", 0o755),
    "sbin/vhp-agent": ("vhp-agent", 0o755),
    "sbin/vhp-control": ("vhp-control", 0o755),
    "sbin/shutdown": ("shutdown", 0o755),
    "lib/vhp.sh": ("vhp.sh", 0o644),
}
# Guest path -> C source, built static with the host's compiler (libc.a from libc6-dev).
GUEST_PROGRAMS = {"sbin/ost-flood": Path(__file__).resolve().parent / "flood" / "ost-flood.c"}
CC = ("gcc", "-static", "-O2", "-s")
# Dependency order: the .deb ships no modules.dep, and /init insmods them in this order.
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
)
GUEST_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "lib/modules", "lib64", "etc", "root")
MOUNT_POINTS = ("dev", "proc", "sys", "run", "tmp", "var")
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"
KEEP_IMAGES = 3


class BuildError(RuntimeError):
    """The guest image cannot be built on this host; the message says why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: what a domain's <kernel> and <initrd> point at."""

    kernel: Path
    initrd: Path
    key: str
    kernel_package: str
    kernel_version: str


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def run(*argv: str, cwd: Path | None = None) -> str:
    """Run a host command; a failure becomes a BuildError carrying its stderr."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]} is not installed (run tests/lab/host-setup.sh)") from exc
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{' '.join(argv)} failed: {exc.stderr.strip()}") from exc
    return done.stdout


# ---- inputs -------------------------------------------------------------------------------


def kernel_package() -> tuple[str, str]:
    """The versioned kernel package the cloud meta-package depends on, and its version."""
    try:
        return _resolve_kernel_package()
    except BuildError:
        # A fresh host may have no package lists yet.
        log.info("apt does not know %s yet: apt-get update", KERNEL_META_PACKAGE)
        run("apt-get", "update", "-qq")
        return _resolve_kernel_package()


def _resolve_kernel_package() -> tuple[str, str]:
    # e.g. "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
    depends = _apt_field(KERNEL_META_PACKAGE, "Depends")
    found = re.match(r"(linux-image-[^\s,]+)(?: \(= ([^)]+)\))?", depends)
    if not found:
        raise BuildError(f"{KERNEL_META_PACKAGE} depends on no linux-image package: {depends}")
    name, version = found.groups()
    return name, version or _apt_field(name, "Version")


def _apt_field(package: str, field: str) -> str:
    record = run("apt-cache", "show", "--no-all-versions", package)
    found = re.search(rf"^{field}: (.+)$", record, re.M)
    if not found:
        raise BuildError(f"apt-cache shows no {field} for {package}")
    return found.group(1)


def agent_files() -> list[Path]:
    """qemu-ga, every library ldd lists for it, and the dynamic loader."""
    libs = re.findall(r"(/\S+) \(0x", run("ldd", str(AGENT)))
    if not libs:
        raise BuildError(f"ldd lists no libraries for {AGENT}")
    return [AGENT, *(Path(p) for p in libs)]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class BuildInputs:
    """Everything an image is made from; their hash names the cache entry."""

    kernel_package: str
    kernel_version: str
    host_packages: list[str]
    # Libraries come from whichever packages provide them: their contents are hashed.
    host_files: dict[str, str]
    guest_files: dict[str, str]
    modules: list[str]
    builder: int = BUILDER_VERSION
    # Guest programs built from source: their sources' hashes and the compiler's version.
    programs: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def build_inputs() -> BuildInputs:
    kernel_name, kernel_version = kernel_package()
    versions = run("dpkg-query", "-W", "-f=${Package} ${Version}\n", *HOST_PACKAGES)
    return BuildInputs(
        kernel_package=kernel_name,
        kernel_version=kernel_version,
        host_packages=versions.splitlines(),
        host_files={str(p): sha256_file(p) for p in [BUSYBOX, *agent_files()]},
        guest_files={g: sha256_file(GUEST_FILES / src) for g, (src, _) in GUEST_SCRIPTS.items()},
        modules=list(VIRTIO_MODULES),
        programs={
            **{g: sha256_file(src) for g, src in GUEST_PROGRAMS.items()},
            "cc": run(CC[0], "--version").splitlines()[0],
        },
    )


def compile_programs(scratch: Path) -> dict[str, bytes]:
    """Each of GUEST_PROGRAMS built static (the guest has no libc) from its source."""
    built: dict[str, bytes] = {}
    for guest, source in GUEST_PROGRAMS.items():
        out = scratch / Path(guest).name
        try:
            run(*CC, "-o", str(out), str(source))
        except BuildError as exc:
            hint = "a static build needs libc6-dev: tests/lab/host-setup.sh"
            raise BuildError(f"{exc} ({hint})") from exc
        built[guest] = out.read_bytes()
    return built


# ---- the newc archive ---------------------------------------------------------------------


class NewcArchive:
    """A cpio archive in the kernel's initramfs format (newc), written deterministically."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._entry(path, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, path: str, data: bytes, mode: int) -> None:
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int) -> None:
        self._entry(path, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1)
        return self._out.getvalue()

    def _entry(
        self, path: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        name = path.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name), 0)
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        self._write(data)

    def _write(self, chunk: bytes) -> None:
        # newc pads each header+name and each body to a multiple of four bytes.
        self._out.write(chunk + b"\0" * (-len(chunk) % 4))


# ---- building -----------------------------------------------------------------------------


def busybox_links() -> list[str]:
    """Guest paths of busybox's applet links (``bin/sh``, ``sbin/init``, ...)."""
    return [p for p in run(str(BUSYBOX), "--list-full").split() if p != "bin/busybox"]


def kernel_tree(deb: Path, scratch: Path) -> tuple[Path, dict[str, Path]]:
    """Unpack the kernel .deb; return its vmlinuz and the virtio modules by name."""
    run("dpkg", "-x", str(deb), str(scratch))
    kernels = sorted((scratch / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError(f"{deb.name} holds no /boot/vmlinuz-*")
    modules: dict[str, Path] = {}
    for module in VIRTIO_MODULES:
        found = sorted(scratch.glob(f"lib/modules/*/kernel/**/{module}.ko*"))
        if not found:
            raise BuildError(f"{deb.name} has no module {module}")
        modules[module] = found[0]
    return kernels[0], modules


def module_bytes(path: Path) -> bytes:
    # Newer Debian kernels ship xz-compressed modules; busybox insmod wants them plain.
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def initramfs(modules: dict[str, Path], programs: dict[str, bytes]) -> bytes:
    """The gzip'd newc initramfs: busybox, qemu-ga with its libraries, modules, scripts."""
    archive = NewcArchive()
    files: dict[str, tuple[bytes, int]] = {"bin/busybox": (BUSYBOX.read_bytes(), 0o755)}
    for path in agent_files():
        # Store each library under the path ldd named, with the content of what it resolves to.
        files[str(path).lstrip("/")] = (path.resolve().read_bytes(), 0o755)
    for name, path in modules.items():
        files[f"lib/modules/{name}.ko"] = (module_bytes(path), 0o644)
    for guest, (src, mode) in GUEST_SCRIPTS.items():
        files[guest] = ((GUEST_FILES / src).read_bytes(), mode)
    for guest, data in programs.items():
        files[guest] = (data, 0o755)
    links = {p: "/bin/busybox" for p in busybox_links() if p not in files}
    links["var/run"] = "../run"
    for directory in sorted(_parents([*files, *links]) | set(GUEST_DIRS) | set(MOUNT_POINTS)):
        archive.directory(directory)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1, 0o600)
    for file_path in sorted(files):
        archive.file(file_path, *files[file_path])
    for link_path in sorted(links):
        archive.symlink(link_path, links[link_path])
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


def _parents(paths: list[str]) -> set[str]:
    parents: set[str] = set()
    for path in paths:
        parents.update(str(p) for p in Path(path).parents if str(p) != ".")
    return parents


def fetch_kernel_deb(cache: Path, name: str, version: str) -> Path:
    """The kernel .deb, downloaded once into the cache (older ones are dropped)."""
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    wanted = f"{name}_{version}_"
    for deb in debs.glob("*.deb"):
        if deb.name.startswith(wanted):
            return deb
        deb.unlink()
    log.info("downloading %s %s", name, version)
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # The cache is root's; apt's unprivileged download user could not write there.
        sandbox_off = ("-o", "APT::Sandbox::User=root")
        run("apt-get", "download", "-qq", *sandbox_off, f"{name}={version}", cwd=Path(tmp))
        (fetched,) = Path(tmp).glob("*.deb")
        return Path(shutil.move(str(fetched), str(debs / fetched.name)))


def build_image(cache: Path, inputs: BuildInputs) -> Path:
    """Build into a temporary directory beside the final one, then rename it into place."""
    deb = fetch_kernel_deb(cache, inputs.kernel_package, inputs.kernel_version)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        with tempfile.TemporaryDirectory(prefix="vhplab-kernel-") as scratch:
            vmlinuz, modules = kernel_tree(deb, Path(scratch))
            shutil.copyfile(vmlinuz, tmp / KERNEL_FILE)
            programs = compile_programs(Path(scratch))
            (tmp / INITRD_FILE).write_bytes(initramfs(modules, programs))
        manifest = json.dumps(asdict(inputs), indent=2, sort_keys=True)
        (tmp / MANIFEST_FILE).write_text(manifest + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        final = cache / inputs.key()
        try:
            os.rename(tmp, final)
        except OSError:
            # Another build of the same inputs won the race; its result is as good as ours.
            if not is_complete(final):
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in (KERNEL_FILE, INITRD_FILE, MANIFEST_FILE))


def prune(cache: Path, keep: Path) -> None:
    """Drop all but the newest few images; running guests hold their files open anyway."""
    images = [d for d in cache.iterdir() if re.fullmatch(r"[0-9a-f]{16}", d.name) and d != keep]
    images.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def warn_if_unreachable(directory: Path) -> None:
    # QEMU runs as its own user (libvirt-qemu on Debian). libvirt relabels the kernel and
    # initrd for it, but not the directories above them.
    for path in [directory, *directory.parents]:
        if not path.stat().st_mode & stat.S_IXOTH:
            log.warning("%s is not searchable by others: QEMU may not reach the image", path)
            return


def ensure_image(cache: Path | None = None) -> GuestImage:
    """The guest image for the current inputs, built only if the cache has none."""
    cache = cache or cache_root()
    cache.mkdir(mode=0o755, parents=True, exist_ok=True)
    cache.chmod(0o755)
    warn_if_unreachable(cache)
    inputs = build_inputs()
    key = inputs.key()
    directory = cache / key
    if is_complete(directory):
        log.info("guest image %s is cached in %s", key, directory)
    else:
        started = time.monotonic()
        log.info("building guest image %s", key)
        build_image(cache, inputs)
        log.info("built guest image %s in %.1f s", key, time.monotonic() - started)
        prune(cache, directory)
    return GuestImage(
        kernel=directory / KERNEL_FILE,
        initrd=directory / INITRD_FILE,
        key=key,
        kernel_package=inputs.kernel_package,
        kernel_version=inputs.kernel_version,
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        image = ensure_image()
    except BuildError as exc:
        log.error("cannot build the lab guest: %s", exc)
        return 1
    print(f"kernel {image.kernel}  ({image.kernel_package} {image.kernel_version})")
    print(f"initrd {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
