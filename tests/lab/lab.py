"""The real-VM lab: boot tiny guests under libvirt, drive them, and always clean up.

    with Lab() as lab:
        vm = lab.create(behaviour=MANUAL)
        since = time.monotonic()
        vm.hot_add(2)
        event = lab.ost.wait_for(vm.name, since=since)
        print(describe_ost(event.details), vm.guest_vcpus())

Every domain is named ``vhplab-<run id>-<n>-<label>``. The lab only ever touches domains with
that prefix; at start it removes those left behind by runs that are no longer alive (a run
holds a lock file under /run/virthotplug-lab while it lives, so concurrent runs on one host
leave each other alone). At the end every domain of the run is destroyed and undefined, also
on test failures, KeyboardInterrupt, SIGTERM and interpreter exit.

Nothing here uses qemuAgentCommand or qemuMonitorCommand: both taint the domain. The guest is
driven through its own virtio-serial control channel instead (see initramfs/vhp-control).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, TextIO, TypeVar, cast

import libvirt
import libvirt_qemu
from domains import AGENT_CHANNEL, CONTROL_CHANNEL, MANUAL, Behaviour, DomainSpec, domain_xml
from guest import GuestImage, ensure_image
from matrix import BUSYBOX, DEBIAN_READY_TIMEOUT, BootFiles, Placement, debian_spec, is_debian

log = logging.getLogger("lab")

PREFIX = "vhplab"
URI_ENV = "VIRTHOTPLUG_LAB_URI"
DEFAULT_URI = os.environ.get(URI_ENV) or "qemu:///system"
LOCK_DIR = Path("/run/virthotplug-lab")
LOG_DIR = Path("/var/log/libvirt/qemu")
# Bounds for waits that normally end in well under a second (or, for boots, seconds): they
# only matter when something is wrong, and a host running many guests on TCG is slow.
READY_TIMEOUT = 180.0
WAIT_TIMEOUT = 30.0
# libvirt fails a call to an unsynced hung agent after 5 s (its guest-sync timeout).
AGENT_CALL_TIMEOUT = 10.0
POLL = 0.2
# How long the lab keeps trying to reach a libvirtd that went away (e.g. is restarting).
RECONNECT_TIMEOUT = 30.0
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says why (with guest console)."""


class AgentCallError(LabError):
    """A guest agent call through libvirt failed."""

    def __init__(self, domain: str, code: int, message: str) -> None:
        super().__init__(f"{domain}: guest agent call failed ({code}): {message}")
        self.code = code
        self.message = message


class AgentTimeout(LabError):
    """A libvirt call did not return within the lab's bound (it may still be waiting)."""


T = TypeVar("T")


def bounded(call: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``call`` in a daemon thread and wait at most ``timeout`` seconds for it.

    A plain thread, not an executor: a call stuck in libvirt must not hold up interpreter
    exit, and the caller's wait stays interruptible by signals.
    """
    outcome: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            outcome.put((True, call()))
        except BaseException as exc:  # handed to the caller, who re-raises it
            outcome.put((False, exc))

    threading.Thread(target=run, name=f"lab-call {what}", daemon=True).start()
    try:
        ok, value = outcome.get(timeout=timeout)
    except queue.Empty:
        raise AgentTimeout(f"{what} did not return within {timeout:.1f} s") from None
    if not ok:
        raise value
    return cast(T, value)


# ---- host facts ---------------------------------------------------------------------------


def accelerator() -> str:
    """libvirt domain type for this host: "kvm" only with hardware virtualisation flags.

    A /dev/kvm without vmx/svm (a software KVM module) accepts VMs but cannot run a Debian
    kernel, so the flags decide, not the device node.
    """
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    return "kvm" if flags & {"vmx", "svm"} and os.path.exists("/dev/kvm") else "qemu"


def accelerator_description() -> str:
    if accelerator() == "kvm":
        return "KVM (hardware virtualisation)"
    return "TCG (<domain type='qemu'>; no vmx/svm flag in /proc/cpuinfo)"


# ---- libvirt process-wide setup -----------------------------------------------------------

_setup_lock = threading.Lock()
_event_loop: threading.Thread | None = None


def setup_libvirt() -> None:
    """Event loop and quiet errors, once per process and before the first connection."""
    global _event_loop
    with _setup_lock:
        if _event_loop is not None:
            return
        # libvirt prints every failed call on stderr by default; errors are reported here.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()
        _event_loop = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        _event_loop.start()


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def last_libvirt_error() -> tuple[int, str]:
    err = libvirt.virGetLastError()
    return (err[0], err[2]) if err else (0, "unknown error")


# ---- parsing ------------------------------------------------------------------------------


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse a Linux cpulist such as ``0-2,5`` (the empty string is the empty set)."""
    cpus: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


@dataclass(frozen=True)
class GuestVcpus:
    """The guest agent's view, from ``dom.guestVcpus()``."""

    vcpus: frozenset[int]
    online: frozenset[int]
    offlinable: frozenset[int]

    @classmethod
    def from_libvirt(cls, info: dict[str, str]) -> GuestVcpus:
        return cls(*(parse_cpulist(info.get(k, "")) for k in ("vcpus", "online", "offlinable")))

    @property
    def offline(self) -> frozenset[int]:
        return self.vcpus - self.online


@dataclass(frozen=True)
class FloodStatus:
    """The guest's ACPI_DEVICE_OST flood (flood/ost-flood.c), as ``flood-status`` reports it."""

    running: bool
    pid: int | None
    sent: int
    seconds: float

    @classmethod
    def parse(cls, reply: str) -> FloodStatus:
        # "running PID sent=N seconds=S" | "stopped [sent=N seconds=S]"
        words = reply.split()
        fields = dict(w.split("=", 1) for w in words if "=" in w)
        pid = int(words[1]) if words[0] == "running" and len(words) > 1 else None
        sent, seconds = int(fields.get("sent", 0)), float(fields.get("seconds", 0))
        return cls(words[0] == "running", pid, sent, seconds)

    @property
    def rate(self) -> float:
        """Events per second the guest sent (its own count; QEMU emits one per write)."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class CpuState:
    """The guest kernel's view from sysfs, read through the control channel (no agent)."""

    present: frozenset[int]
    online: frozenset[int]

    @classmethod
    def parse(cls, reply: str) -> CpuState:
        fields = dict(item.split("=", 1) for item in reply.split())
        return cls(parse_cpulist(fields["present"]), parse_cpulist(fields["online"]))


# ---- QEMU monitor events ------------------------------------------------------------------

# The ACPI_DEVICE_OST codes the tests look for: a hot-add's device check, an unplug's eject
# request, and success.
DEVICE_CHECK = 0x01
EJECT_REQUEST = 0x03
SUCCESS = 0x00
OST_SOURCES = {
    0x00: "bus check",
    0x01: "device check (hot-add)",
    0x03: "eject request",
    0x100: "OSPM shutdown processing",
    0x103: "OSPM ejection processing",
    0x200: "OSPM insertion processing",
}
OST_STATUSES = {0x00: "success", 0x01: "non-specific failure", 0x02: "unrecognized notify"}
OST_EJECT_STATUSES = {
    0x80: "ejection not supported",
    0x81: "device in use",
    0x82: "device busy",
    0x83: "ejection dependency busy or unsupported",
    0x84: "ejection in progress",
}


def describe_ost(details: dict[str, Any]) -> str:
    """Plain words for an ACPI_DEVICE_OST event's data (ACPI 6.x section 6.3.5)."""
    info = details.get("info", {})
    source, status = info.get("source"), info.get("status")
    what = OST_SOURCES.get(source, f"source {source:#x}" if isinstance(source, int) else "?")
    statuses = OST_EJECT_STATUSES if source in (0x03, 0x103) else {}
    outcome = {**OST_STATUSES, **statuses}.get(status, f"status {status!r}")
    device = info.get("device") or "(no device)"
    slot = f"{info.get('slot-type', '?')} slot {info.get('slot', '?')}"
    return f"{device} ({slot}): {what} -> {outcome}"


@dataclass(frozen=True)
class MonitorEvent:
    domain: str
    event: str
    # QEMU's wall-clock timestamp, and when it reached this process (time.monotonic()).
    timestamp: float
    received: float
    details: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """ACPI_DEVICE_OST's ``info`` member ({} for other events)."""
        info = self.details.get("info")
        return info if isinstance(info, dict) else {}

    @property
    def source(self) -> int | None:
        return _int_or_none(self.info.get("source"))

    @property
    def status(self) -> int | None:
        return _int_or_none(self.info.get("status"))

    @property
    def device(self) -> str | None:
        device = self.info.get("device")
        return device if isinstance(device, str) else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


class MonitorEvents:
    """Collects one QEMU monitor event (of one domain or all) until close().

    The registration does not taint domains (qemuMonitorCommand would). It belongs to one
    connection: after a reconnect, register() again; events in between are lost.
    """

    def __init__(self, event: str = "ACPI_DEVICE_OST", domain: str | None = None) -> None:
        self.event = event
        self.domain = domain
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.RLock()
        self._open = False
        self._id: int | None = None
        self._events: list[MonitorEvent] = []
        self._cond = threading.Condition()

    def register(self, conn: libvirt.virConnect) -> None:
        self.close()
        dom = conn.lookupByName(self.domain) if self.domain else None
        self._id = libvirt_qemu.qemuMonitorEventRegister(
            conn, dom, self.event, self._on_event, None, 0
        )
        self._conn = conn

    def _on_event(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: str,
        seconds: int,
        micros: int,
        details: str | dict[str, Any] | None,
        _opaque: object,
    ) -> None:
        # Runs on the event loop thread: record and return.
        data = json.loads(details) if isinstance(details, str) else details or {}
        record = MonitorEvent(dom.name(), event, seconds + micros / 1e6, time.monotonic(), data)
        with self._cond:
            self._events.append(record)
            self._cond.notify_all()

    def events(self, domain: str | None = None) -> list[MonitorEvent]:
        with self._cond:
            return [e for e in self._events if domain is None or e.domain == domain]

    def wait_for(
        self,
        domain: str,
        since: float = 0.0,
        where: Callable[[MonitorEvent], bool] = lambda _e: True,
        timeout: float = WAIT_TIMEOUT,
    ) -> MonitorEvent:
        """The first event for ``domain`` received at or after ``since`` matching ``where``."""

        def match() -> MonitorEvent | None:
            hits = [e for e in self._events if e.domain == domain and e.received >= since]
            return next(filter(where, hits), None)

        with self._cond:
            found = self._cond.wait_for(match, timeout)
        if found is None:
            raise LabError(f"{domain}: no matching {self.event} within {timeout:.0f} s")
        return found

    def close(self) -> None:
        if self._id is not None:
            # If the connection is already gone, the registration went with it.
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._id)
            self._id = None
            self._conn = None


# ---- one VM -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VMRequest:
    behaviour: Behaviour = MANUAL
    max_vcpus: int = 4
    memory_mib: int = 160
    # Readable part of the domain name.
    label: str = "vm"
    # busybox, or a real Debian guest (matrix.GUEST_KINDS).
    guest: str = BUSYBOX


@dataclass(eq=False)
class LabVM:
    """One lab domain. ``hot_add``/``unplug`` take the new total vCPU count, like libvirt."""

    lab: Lab = field(repr=False)
    spec: DomainSpec
    _dom: libvirt.virDomain = field(repr=False)
    # Set by a failed unplug: QEMU 7.2 segfaults on the next hot-add until a restart.
    hotplug_broken: bool = False
    boot_seconds: float = 0.0
    _control_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The control socket of the running domain: known without asking libvirt, so that a
    # guest that wedges libvirtd (an OST flood) can still be told to stop.
    _control_path: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dom(self) -> libvirt.virDomain:
        """The domain on the lab's current connection (renewed after libvirtd restarts)."""
        conn = self.lab.conn
        if self._dom.connect() is not conn:
            self._dom = conn.lookupByName(self.name)
        return self._dom

    @property
    def behaviour(self) -> Behaviour:
        return self.spec.behaviour

    @property
    def max_vcpus(self) -> int:
        return self.spec.max_vcpus

    # -- lifecycle --

    def start(self, timeout: float = READY_TIMEOUT, *, agent: bool = True) -> float:
        """Boot and wait until the guest is ready; returns the seconds it took. ``agent``
        False: its agent is not waited for (a definition without the agent's channel)."""
        started = time.monotonic()
        if not self.spec.control_channel:
            timeout = max(timeout, DEBIAN_READY_TIMEOUT)
        self._control_path = None
        self.dom.create()
        self.hotplug_broken = False
        self.wait_ready(timeout, agent=agent)
        self.boot_seconds = time.monotonic() - started
        log.info("%s ready in %.1f s", self.name, self.boot_seconds)
        return self.boot_seconds

    def restart(self, timeout: float = READY_TIMEOUT, *, agent: bool = True) -> float:
        """Power-cycle to a fresh guest (the only cure after a failed unplug)."""
        if self.dom.isActive():
            self.dom.destroy()
        return self.start(timeout, agent=agent)

    def wait_ready(self, timeout: float = READY_TIMEOUT, *, agent: bool = True) -> None:
        deadline = time.monotonic() + timeout
        if not self.spec.control_channel:
            # A real guest: ready once its own qemu-guest-agent answers.
            self.wait_agent(timeout)
            return
        self.wait_control(timeout)
        if agent and self.behaviour.agent_expected:
            self.wait_agent(max(1.0, deadline - time.monotonic()))

    def destroy(self) -> None:
        """Destroy (if running) and undefine; safe to call twice."""
        remove_domain(self.dom)
        if self.spec.disk is not None:
            self.spec.disk.unlink(missing_ok=True)

    @property
    def guest(self) -> str:
        """busybox or the Debian guest kind (matrix.GUEST_KINDS)."""
        return self.spec.guest

    # -- the control channel --

    def control(self, command: str, timeout: float = 10.0) -> str:
        """Send one command to the guest's control loop and return its one-line reply."""
        if not self.spec.control_channel:
            raise LabError(
                f"{self.name}: control '{command}': a {self.guest} guest has no lab control "
                "channel (only the busybox guest serves one)"
            )
        request = secrets.token_hex(4)
        with self._control_lock, socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            try:
                self._connect_control(sock)
                sock.sendall(f"{request} {command}\n".encode())
                reply = self._read_reply(sock.makefile("r", encoding="utf-8"), request)
            except OSError as exc:
                raise LabError(f"{self.name}: control '{command}' failed: {exc}") from exc
        if reply is None:
            raise LabError(f"{self.name}: control '{command}': no reply")
        return reply

    @staticmethod
    def _read_reply(replies: TextIO, request: str) -> str | None:
        # Replies to requests that timed out earlier may still be queued: skip them.
        for line in replies:
            found, _, reply = line.strip().partition(" ")
            if found == request:
                return reply
        return None

    def control_ok(self, command: str, timeout: float = 10.0) -> str:
        """Like control(), but a reply other than ``ok ...`` raises LabError."""
        reply = self.control(command, timeout)
        if reply != "ok" and not reply.startswith("ok "):
            raise LabError(f"{self.name}: control '{command}' answered '{reply}'")
        return reply

    def _connect_control(self, sock: socket.socket) -> None:
        if self._control_path is not None:
            try:
                sock.connect(self._control_path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass  # restarted behind the lab's back: another path now
        self._control_path = self._control_socket()
        sock.connect(self._control_path)

    def _control_socket(self) -> str:
        # libvirt picks the path at start (it names the domain id): read it from the live XML.
        channel = self._live_channel(CONTROL_CHANNEL)
        source = channel.find("source") if channel is not None else None
        if source is None or not source.get("path"):
            raise LabError(f"{self.name}: no control channel in the live XML")
        # On stacks 2 and 3 libvirt names it as seen inside its root.
        return str(self.lab.placement.host_path(source.get("path", "")))

    def _live_channel(self, name: str) -> ET.Element | None:
        for channel in ET.fromstring(self.dom.XMLDesc(0)).iterfind("devices/channel"):
            if channel.find(f"target[@name='{name}']") is not None:
                return channel
        return None

    def wait_control(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait until the guest's control loop answers; it needs neither agent nor channel."""
        return self._poll(timeout, "control channel", self._pings)

    def _pings(self) -> bool:
        try:
            return self.control("ping", timeout=2.0) == "pong"
        except LabError:
            return False

    # -- the guest agent --

    def wait_agent(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait until dom.guestVcpus() answers; returns the seconds waited."""
        return self._poll(timeout, "guest agent", self._agent_answers)

    def _agent_answers(self) -> bool:
        try:
            self.guest_vcpus(timeout=AGENT_CALL_TIMEOUT)
        except AgentCallError:
            return False
        return True

    def guest_vcpus(self, timeout: float = AGENT_CALL_TIMEOUT) -> GuestVcpus:
        """The agent's view; raises AgentCallError with libvirt's error when it fails.

        The wait is bounded here because libvirt's is not: once libvirt is in sync with the
        agent it waits for a hung agent forever. On AgentTimeout the call keeps waiting in a
        daemon thread until the agent answers or the domain goes away.
        """
        info = bounded(self._guest_vcpus_now, timeout, f"{self.name}: dom.guestVcpus()")
        return GuestVcpus.from_libvirt(info)

    def _guest_vcpus_now(self) -> dict[str, str]:
        try:
            # Returns None instead of raising on failure; the error is libvirt's last error.
            info = self.dom.guestVcpus()
        except libvirt.libvirtError as exc:
            raise AgentCallError(self.name, exc.get_error_code(), str(exc)) from exc
        if info is None:
            raise AgentCallError(self.name, *last_libvirt_error())
        return dict(info)

    def agent_status(self) -> str:
        """``running PID``, ``hung PID`` or ``stopped``, as the guest's supervisor sees it."""
        return self.control("agent-status")

    def agent_channel_state(self) -> str | None:
        """libvirt's view of the agent channel: "connected", "disconnected" or None (none)."""
        channel = self._live_channel(AGENT_CHANNEL)
        target = channel.find("target") if channel is not None else None
        return target.get("state") if target is not None else None

    def wait_agent_channel(self, state: str, timeout: float = WAIT_TIMEOUT) -> float:
        """Wait until libvirt sees the guest open (connected) or close the agent's port."""
        return self._poll(
            timeout, f"agent channel {state}", lambda: self.agent_channel_state() == state
        )

    # -- vCPUs --

    def cpu_state(self) -> CpuState:
        """The guest kernel's CPUs: sysfs via the control channel, else the agent's view."""
        if not self.spec.control_channel:
            guest = self.guest_vcpus()
            return CpuState(guest.vcpus, guest.online)
        return CpuState.parse(self.control("cpu-state"))

    def live_vcpus(self) -> int:
        return int(self.dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE))

    def hot_add(self, count: int) -> None:
        """Hot-plug vCPUs up to ``count`` in total (setVcpusFlags with AFFECT_LIVE)."""
        if self.hotplug_broken:
            raise LabError(
                f"{self.name}: refusing to hot-add after a failed unplug: QEMU 7.2 crashes "
                "on it; restart() the domain first"
            )
        self.dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    # -- a hostile guest: the ACPI_DEVICE_OST flood (flood/ost-flood.c) --

    def flood_start(self, rate: int = 0, seconds: int = 60, selector: int = 1) -> int:
        """Make the guest write QEMU's CPU-hotplug OST registers: ``rate`` ACPI_DEVICE_OST
        events/s (0: as fast as it can) for at most ``seconds``, faking CPU slot
        ``selector`` (source 1, status 0: a hot-add). The event names the device (vcpuN)
        only while that slot's vCPU is plugged. Returns the helper's PID in the guest."""
        return int(self.control_ok(f"flood-start {rate} {seconds} {selector}").split()[1])

    def flood_stop(self) -> FloodStatus:
        """Stop the flood (if it runs); what it sent."""
        return FloodStatus.parse("stopped " + self.control_ok("flood-stop")[2:])

    def flood_status(self) -> FloodStatus:
        return FloodStatus.parse(self.control("flood-status"))

    def unplug(self, count: int) -> libvirt.libvirtError | None:
        """Try to hot-unplug down to ``count`` vCPUs; return libvirt's error, if any.

        On libvirt 9.0 + QEMU 7.2 this times out ("vcpu unplug request timed out") although
        the guest really lost the CPU; libvirt keeps counting it. Hot-add is then refused
        until restart().
        """
        try:
            self.dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            self.hotplug_broken = True
            return exc
        return None

    def wait_cpu_state(
        self,
        want: Callable[[CpuState], bool],
        timeout: float = WAIT_TIMEOUT,
        what: str = "CPU state",
    ) -> CpuState:
        """Poll the guest's sysfs view (via the control channel) until ``want`` holds."""
        seen: list[CpuState] = []

        def wanted() -> bool:
            seen.append(self.cpu_state())
            return want(seen[-1])

        self._poll(timeout, what, wanted)
        return seen[-1]

    # -- facts for reports --

    def taints(self) -> list[str]:
        return list(self.dom.messages(libvirt.VIR_DOMAIN_MESSAGE_TAINTING))

    def serial_text(self) -> str:
        """The whole serial console log of the current boot ('' before the first line)."""
        try:
            return self.spec.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(
        self, pattern: str, after: int = 0, timeout: float = WAIT_TIMEOUT
    ) -> re.Match[str]:
        """The first match of ``pattern`` in the serial log at or after offset ``after``."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.compile(pattern, re.M).search(self.serial_text(), after)
            found[:] = [match] if match else []
            return bool(match)

        self._poll(timeout, f"serial log line /{pattern}/", seen)
        return found[0]

    def serial_tail(self, lines: int = 15) -> str:
        try:
            text = self.spec.serial_log.read_text(errors="replace")
        except OSError as exc:
            return f"(no serial log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def is_pristine(self) -> bool:
        """Running exactly as freshly booted: 1 vCPU everywhere, agent as configured."""
        if not self.dom.isActive() or self.hotplug_broken or self.live_vcpus() != 1:
            return False
        if not self.spec.control_channel:
            try:
                return self.cpu_state() == CpuState(frozenset({0}), frozenset({0}))
            except LabError:
                return False
        try:
            if self.cpu_state() != CpuState(frozenset({0}), frozenset({0})):
                return False
            if self.agent_status().startswith("running") != (self.behaviour.agent == "on"):
                return False
        except LabError:
            return False
        try:
            return not self.behaviour.agent_expected or self._agent_answers()
        except AgentTimeout:
            return False

    def _poll(self, timeout: float, what: str, ready: Callable[[], bool]) -> float:
        started = time.monotonic()
        while not ready():
            if time.monotonic() - started > timeout:
                raise LabError(
                    f"{self.name}: {what} not ready after {timeout:.0f} s; "
                    f"serial console ({self.spec.serial_log}):\n{self.serial_tail()}"
                )
            time.sleep(POLL)
        return time.monotonic() - started


# ---- the lab ------------------------------------------------------------------------------

_DOMAIN_NAME = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-")


class Lab:
    """A libvirt connection, a guest image and the domains of one run (see module doc)."""

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        image: GuestImage | None = None,
        log_dir: Path = LOG_DIR,
        ost: bool = True,
    ) -> None:
        self.uri = uri
        # Serial console logs: QEMU writes them, so a daemon of another user needs its own.
        self.log_dir = log_dir
        # False: no ACPI_DEVICE_OST registration for all domains (lab.ost); for measurements
        # that must have no subscriber, lab.monitor(event, vm) registers for one VM only.
        self._subscribe_ost = ost
        self.run_id = secrets.token_hex(3)
        self.domain_type = accelerator()
        # Stack 1 (the host's libvirtd) or stack 2 or 3 (stacks.py) behind a socket in its root.
        self.placement = Placement.for_uri(uri)
        if self.placement.stack is not None:
            # Its QEMU has no /dev/kvm; serial logs are written inside its root.
            self.domain_type = "qemu"
            self.log_dir = self.placement.log_dir if log_dir == LOG_DIR else log_dir
        self._debian: dict[str, BootFiles] = {}
        self.vms: list[LabVM] = []
        self._image = image
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.RLock()
        self._open = False
        self._ost: MonitorEvents | None = None
        self._monitors: list[MonitorEvents] = []
        self._lock_fd: int | None = None
        self._serial = 0
        self._vms_lock = threading.Lock()

    # -- lifecycle --

    def open(self) -> Lab:
        """Connect, claim a run id, sweep leftovers, build (or find) the guest image."""
        setup_libvirt()
        self._claim_run()
        atexit.register(self.close)
        _close_on_sigterm()
        self._open = True
        try:
            self._connect()
            self.sweep()
            self._image = self.placement.busybox(self._image or ensure_image())
            if self._subscribe_ost:
                self._ost = self.monitor("ACPI_DEVICE_OST")
        except BaseException:
            self.close()
            raise
        log.info("lab run %s on %s, %s", self.run_id, self.uri, accelerator_description())
        return self

    def _connect(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            hint = "is libvirtd running? see tests/lab/host-setup.sh"
            raise LabError(f"cannot connect to {self.uri}: {exc} ({hint})") from exc
        conn.setKeepAlive(5, 3)
        self._conn = conn
        return conn

    def restart_libvirtd(self, timeout: float = 45.0) -> None:
        """Stop libvirtd (the PID in its pid file), start it again and reconnect the lab.

        Guests keep running. Only for a libvirtd started by hand, as host-setup.sh does where
        no init system runs; a libvirtd managed by systemd is left alone. A worker blocked in
        a guest-agent call (libvirt's agent timeout blocks by default) holds libvirtd's
        shutdown until libvirtd forces it after 30 s: the wait is longer than that, then
        SIGKILL, and libvirtd is started again in every case so later tests find it.
        """
        if self.placement.stack is not None:
            self.placement.stack.restart_libvirtd(timeout)
            self._reconnect(timeout)
            return
        if Path("/run/systemd/system").is_dir():
            raise LabError("libvirtd is managed by systemd here: not restarting it by hand")
        pid = int(LIBVIRTD_PIDFILE.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        try:
            self._poll_until(timeout, "libvirtd to stop", lambda: not Path(f"/proc/{pid}").exists())
        except LabError:
            log.warning("libvirtd (pid %d) did not stop in %.0f s: SIGKILL", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            self._poll_until(timeout, "libvirtd to die", lambda: not Path(f"/proc/{pid}").exists())
        subprocess.run(["libvirtd", "-d"], check=True)
        self._reconnect(timeout)

    @staticmethod
    def _poll_until(timeout: float, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise LabError(f"timed out waiting for {what}")
            time.sleep(POLL)

    def _reconnect(self, timeout: float = RECONNECT_TIMEOUT) -> libvirt.virConnect:
        """A new connection after the daemon went away; monitors are registered on it again.

        LabVM.dom follows by itself. Events between the two connections are lost.
        """
        with self._conn_lock:
            stale, self._conn = self._conn, None
            if stale is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    stale.close()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    conn = self._connect()
                    break
                except LabError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(POLL)
            for monitor in self._monitors:
                monitor.register(conn)
        log.warning("reconnected to %s (libvirtd went away)", self.uri)
        return conn

    def close(self) -> None:
        """Destroy and undefine every domain of this run; idempotent."""
        vms = self._take_vms()
        if vms:
            # Destroying a busy TCG guest takes a second or two: do them all at once.
            with ThreadPoolExecutor(len(vms), thread_name_prefix="lab-destroy") as pool:
                pool.map(_destroy_logged, vms)
        for monitor in self._monitors:
            monitor.close()
        self._monitors.clear()
        self._ost = None
        self._open = False
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.unlink(self._lock_path())
            os.close(self._lock_fd)
            self._lock_fd = None
        atexit.unregister(self.close)

    def __enter__(self) -> Lab:
        return self.open()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def conn(self) -> libvirt.virConnect:
        """The lab's connection; a new one if libvirtd has gone away (restarted) meanwhile."""
        with self._conn_lock:
            if not self._open:
                raise LabError("the lab is not open")
            if self._conn is None or not self._conn.isAlive():
                return self._reconnect()
            return self._conn

    @property
    def ost(self) -> MonitorEvents:
        """ACPI_DEVICE_OST events of all domains since the lab opened."""
        if self._ost is None:
            raise LabError("the lab is not open (or opened with ost=False)")
        return self._ost

    def monitor(self, event: str, vm: LabVM | None = None) -> MonitorEvents:
        """Start collecting a QEMU monitor event (e.g. DEVICE_DELETED) of one VM or all."""
        monitor = MonitorEvents(event, vm.name if vm else None)
        monitor.register(self.conn)
        self._monitors.append(monitor)
        return monitor

    @property
    def image(self) -> GuestImage:
        if self._image is None:
            raise LabError("the lab is not open")
        return self._image

    # -- domains --

    def define(self, request: VMRequest) -> LabVM:
        """Define (not start) a domain for ``request``."""
        with self._vms_lock:
            self._serial += 1
            name = f"{PREFIX}-{self.run_id}-{self._serial}-{request.label}"
        spec = DomainSpec(
            name=name,
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            serial_log=self.log_dir / f"{name}-serial.log",
            behaviour=request.behaviour,
            max_vcpus=request.max_vcpus,
            memory_mib=request.memory_mib,
            domain_type=self.domain_type,
        )
        if is_debian(request.guest):
            spec = self._debian_spec(name, request)
        vm = LabVM(self, spec, self.conn.defineXML(domain_xml(spec)))
        with self._vms_lock:
            self.vms.append(vm)
        return vm

    def _debian_spec(self, name: str, request: VMRequest) -> DomainSpec:
        if request.guest not in self._debian:
            self._debian[request.guest] = self.placement.debian(request.guest)
        files = self._debian[request.guest]
        overlay = self.placement.overlay(name, files)
        serial_log = self.log_dir / f"{name}-serial.log"
        return debian_spec(name, request, files, overlay, serial_log, self.domain_type)

    def versions(self) -> tuple[str, str]:
        """(libvirt, hypervisor) versions as the daemon reports them, e.g. ("11.3.0",
        "QEMU 10.0.13")."""
        return _version(self.conn.getLibVersion()), f"QEMU {_version(self.conn.getVersion())}"

    def start_many(
        self, requests: Sequence[VMRequest], timeout: float = READY_TIMEOUT
    ) -> list[LabVM]:
        """Define and boot VMs in parallel; raise LabError naming each one that failed."""
        vms = [self.define(r) for r in requests]
        self.boot(vms, timeout)
        return vms

    def boot(self, vms: Sequence[LabVM], timeout: float = READY_TIMEOUT) -> None:
        """Boot defined VMs in parallel; raise LabError naming each one that failed."""
        if not vms:
            return
        with ThreadPoolExecutor(max_workers=len(vms), thread_name_prefix="lab-boot") as pool:
            futures = [pool.submit(vm.start, timeout) for vm in vms]
        errors = [(vm, f.exception()) for vm, f in zip(vms, futures) if f.exception()]
        # LabError messages name their domain already.
        failures = [str(e) if isinstance(e, LabError) else f"{vm.name}: {e}" for vm, e in errors]
        if failures:
            raise LabError("lab VMs failed to boot:\n" + "\n".join(failures))

    def create(
        self,
        behaviour: Behaviour = MANUAL,
        max_vcpus: int = 4,
        memory_mib: int = 160,
        label: str = "vm",
        timeout: float = READY_TIMEOUT,
    ) -> LabVM:
        """Define and boot one VM, and wait until it is ready."""
        (vm,) = self.start_many([VMRequest(behaviour, max_vcpus, memory_mib, label)], timeout)
        return vm

    def remove(self, vm: LabVM) -> None:
        """Destroy and undefine one VM before the lab closes."""
        vm.destroy()
        with self._vms_lock:
            self.vms.remove(vm)

    def _take_vms(self) -> list[LabVM]:
        with self._vms_lock:
            vms, self.vms = self.vms, []
        return vms

    # -- leftovers --

    def _lock_path(self) -> Path:
        return LOCK_DIR / f"{self.run_id}.lock"

    def _claim_run(self) -> None:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        path = self._lock_path()
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A sweep may have taken the fresh file for a dead run's and unlinked it.
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                self._lock_fd = fd
                return
            os.close(fd)

    def sweep(self) -> list[str]:
        """Remove lab domains (and logs) of runs that are no longer alive; return their names."""
        removed = []
        for dom in self.conn.listAllDomains(0):
            found = _DOMAIN_NAME.match(dom.name())
            if found and found.group(1) != self.run_id and not _run_alive(found.group(1)):
                log.warning("removing %s left behind by an earlier lab run", dom.name())
                remove_domain(dom)
                removed.append(dom.name())
        logs = self.log_dir.glob(f"{PREFIX}-*.log")
        for path in [*logs, *self.placement.overlays(_DOMAIN_NAME)]:
            found = _DOMAIN_NAME.match(path.name)
            if found and found.group(1) != self.run_id and not _run_alive(found.group(1)):
                path.unlink(missing_ok=True)
        return removed


class VMFactory:
    """Boots VMs for one user (a test); remove_all() removes exactly those."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab
        self._made: list[LabVM] = []

    def __call__(
        self, behaviour: Behaviour = MANUAL, max_vcpus: int = 4, memory_mib: int = 160
    ) -> LabVM:
        (vm,) = self.many([VMRequest(behaviour, max_vcpus, memory_mib, label="own")])
        return vm

    def many(self, requests: Sequence[VMRequest]) -> list[LabVM]:
        """Boot several VMs in parallel."""
        vms = [self._lab.define(r) for r in requests]
        self._made.extend(vms)
        self._lab.boot(vms)
        return vms

    def remove_all(self) -> None:
        for vm in self._made:
            self._lab.remove(vm)
        self._made.clear()


def _version(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def _destroy_logged(vm: LabVM) -> None:
    try:
        vm.destroy()
    except libvirt.libvirtError as exc:
        log.error("could not remove %s: %s", vm.name, exc)


def remove_domain(dom: libvirt.virDomain) -> None:
    """Destroy (if running) and undefine; a domain that is already gone is fine."""
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def _run_alive(run_id: str) -> bool:
    """Whether the run that owns ``run_id`` still holds its lock (and so still lives)."""
    path = LOCK_DIR / f"{run_id}.lock"
    try:
        with open(path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Unlink while holding the lock; see Lab._claim_run for the other side.
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def _close_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that finalizers and ``with`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
