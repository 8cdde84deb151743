"""Which host stack a lab runs on and which guest a lab domain boots (the e2e matrix).

Stack 1 is the host's own libvirtd (``qemu:///system``). Stacks 2 and 3 (stacks.py) are
reached through a socket inside their root; their QEMU sees only files inside that root, so a
lab on one copies the kernels, initrds and disk images in and names them by their path inside.

Guest kinds: ``busybox`` (the lab's tiny diskless guest, with the control channel) and the
real Debian guests of debian_image.py (``debian12``, ``debian12-rule``, ``debian13``,
``debian13-rule``, ``forky``): systemd, udev and Debian's own qemu-guest-agent, booted from a qcow2
overlay of their own; they have no control channel, so the lab reads their CPU state
through the agent and their kernel's words from the serial log. ``debian12-service``
(service_image.py) is Debian 12 with libvirtd and virthotplug's dependencies, and serves the
control channel (shell commands) from its own systemd unit.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import debian_image
import service_image
from domains import DomainSpec
from guest import GuestImage
from stacks import SOCKET, Stack, definition_of_root

if TYPE_CHECKING:
    from lab import VMRequest

BUSYBOX = "busybox"
GUEST_KINDS = (BUSYBOX, *debian_image.KINDS, service_image.KIND)
LOG_DIR = "/var/log/libvirt/qemu"
OVERLAY_DIR = "/var/lib/virthotplug-lab/overlays"
# Real guests boot in 17-38 s alone under TCG, much longer while several boot at once.
DEBIAN_READY_TIMEOUT = 480.0


def is_debian(kind: str) -> bool:
    return kind != BUSYBOX


def stack_root_of(uri: str) -> Path | None:
    """The root of a stack (2 or 3) that ``uri`` points into (by its socket), else None."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    socket = (query.get("socket") or [""])[0]
    if not socket.endswith(SOCKET) or len(socket) == len(SOCKET):
        return None
    root = Path(socket[: -len(SOCKET)])
    return root if (root / "usr/sbin/libvirtd").exists() else None


@dataclass(frozen=True)
class BootFiles:
    """A guest's files where the stack's QEMU can open them."""

    kernel: Path
    initrd: Path
    disk: Path | None = None


@dataclass(frozen=True)
class Placement:
    """Where a lab's files are: anywhere on the host (stack 1), inside a stack's root.

    A stack's root holds a link from its own path on the host to ``/``, so a path inside
    the root is the same string for the host and for the chrooted daemons (stacks.py).
    """

    stack: Stack | None

    @classmethod
    def for_uri(cls, uri: str) -> Placement:
        root = stack_root_of(uri)
        definition = definition_of_root(root) if root else None
        if root is None or definition is None:
            return cls(None)
        return cls(Stack(root, root.parent.name.rsplit("-", 1)[1], definition))

    @property
    def name(self) -> str:
        return self.stack.name if self.stack else "stack1"

    def host_path(self, path: str) -> Path:
        """A path a stack's daemon chose (e.g. a channel socket) as the host names it."""
        if self.stack is None or Path(path).is_relative_to(self.stack.root):
            return Path(path)
        if path.startswith("/run/"):
            # Sockets: through a short link, since a unix socket path has at most 107 bytes.
            return self.stack.short_run() / path[len("/run/") :]
        return self.stack.host_path(path)

    @property
    def log_dir(self) -> Path:
        return self.stack.host_path(LOG_DIR) if self.stack else Path(LOG_DIR)

    def stage(self, source: Path, group: str) -> Path:
        """``source`` as QEMU can open it: itself on stack 1, a copy in the stack's root."""
        return self.stack.copy_in(source, group) if self.stack else source

    def busybox(self, image: GuestImage) -> GuestImage:
        group = f"busybox-{image.key}"
        kernel, initrd = self.stage(image.kernel, group), self.stage(image.initrd, group)
        return dataclasses.replace(image, kernel=kernel, initrd=initrd)

    def debian(self, kind: str) -> BootFiles:
        """Build (or find) the image of ``kind`` and stage its files."""
        if kind == service_image.KIND:
            image = service_image.ensure_image()
        else:
            image = debian_image.ensure_image(kind)
        return BootFiles(
            kernel=self.stage(image.kernel, image.key),
            initrd=self.stage(image.initrd, image.key),
            disk=self.stage(image.disk, image.key),
        )

    def overlay(self, domain: str, files: BootFiles) -> Path:
        """A fresh qcow2 overlay over the guest's disk image for one domain."""
        if files.disk is None:
            raise ValueError(f"{domain}: the guest has no disk image")
        directory = self.stack.host_path(OVERLAY_DIR) if self.stack else Path(OVERLAY_DIR)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        path = directory / f"{domain}.qcow2"
        path.unlink(missing_ok=True)
        size_mib = files.disk.stat().st_size >> 20  # as big as the image behind it
        return debian_image.overlay(str(files.disk), path, size_mib)

    def overlays(self, pattern: re.Pattern[str]) -> list[Path]:
        """Overlay files whose name matches ``pattern`` (for the lab's sweep)."""
        directory = self.stack.host_path(OVERLAY_DIR) if self.stack else Path(OVERLAY_DIR)
        if not directory.is_dir():
            return []
        return [p for p in directory.glob("*.qcow2") if pattern.match(p.name)]


def debian_spec(
    name: str,
    request: VMRequest,
    files: BootFiles,
    overlay: Path,
    serial_log: Path,
    domain_type: str,
) -> DomainSpec:
    """A real Debian guest's domain: its own kernel and initramfs, the overlay as vda.

    The service guest also serves the lab control channel (service_image.py), needs more
    memory (libvirtd, a nested QEMU, apt) and runs two vCPUs, so that libvirtd's first probe
    of its QEMU runs beside other work.
    """
    service = request.guest == service_image.KIND
    minimum = service_image.MEMORY_MIB if service else debian_image.MEMORY_MIB
    return DomainSpec(
        name=name,
        kernel=files.kernel,
        initrd=files.initrd,
        serial_log=serial_log,
        behaviour=request.behaviour,
        max_vcpus=request.max_vcpus,
        current_vcpus=service_image.LIVE_VCPUS if service else 1,
        memory_mib=max(request.memory_mib, minimum),
        domain_type=domain_type,
        guest=request.guest,
        cmdline=debian_image.CMDLINE,
        disk=overlay,
        control_channel=service,
    )
