"""A typed per-domain wrapper (Nova's ``guest.py`` habit).

``Domain`` is what the rest of virthotplug holds for one libvirt domain: its name and UUID,
read once, and the few calls virthotplug makes on it, each translating libvirt's errors into
the project's (``host.errors``) with the domain named in the message. Guest-agent calls go
through the connection's agent leases (see ``Connection.agent_call``).

It is the only code that calls libvirt on a domain: the handle (``raw``) leaves it only for
the connection's own calls that take domain handles (stats of a list of domains) and for
tests that set a domain up behind virthotplug's back.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, TypeVar

from virthotplug.host.errors import classify, last_error
from virthotplug.host.libvirt_types import VirConnect, VirDomain

T = TypeVar("T")


class DomainOwner(Protocol):
    """What a Domain needs of the connection it came from (``host.connection.Connection``)."""

    uri: str
    libvirt: Any

    @property
    def raw(self) -> VirConnect: ...
    def call(self, fn: Callable[[], T], *, context: str = "") -> T: ...
    def affect_flags(self, *, live: bool, config: bool) -> int: ...
    def agent_call(self, uuid: str, fn: Callable[[VirDomain], T], *, context: str = "") -> T: ...


class Domain:
    """One domain on one connection. Cheap to make; holds no state besides its identity."""

    __slots__ = ("_conn", "name", "raw", "uuid")

    def __init__(self, conn: DomainOwner, raw: VirDomain) -> None:
        self._conn = conn
        self.raw = raw
        self.name = raw.name()
        self.uuid = raw.UUIDString()

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, {self.uuid})"

    @property
    def uri(self) -> str:
        """The URI of the host the domain is on, as its connection names it."""
        return self._conn.uri

    @property
    def context(self) -> str:
        """How messages name this domain."""
        return f"domain '{self.name}'"

    def _call(self, fn: Callable[[], T], what: str = "") -> T:
        return self._conn.call(fn, context=f"{self.context}{what}")

    # state

    def id(self) -> Optional[int]:
        """The running domain's id; None when it is not running (libvirt says -1)."""
        dom_id = self._call(self.raw.ID)
        return dom_id if dom_id > 0 else None

    def is_active(self) -> bool:
        return self._call(self.raw.isActive) == 1

    def is_persistent(self) -> bool:
        return self._call(self.raw.isPersistent) == 1

    def vcpu_count(self) -> int:
        """The live (current) vCPU count, from ``virDomainGetInfo``: one small call, no XML."""
        info = self._call(self.raw.info)
        return int(info[3])

    def vcpu_maximum(self, *, live: bool) -> int:
        """The maximum vCPU count of the live (else the persistent) definition."""
        lv = self._conn.libvirt
        affect = lv.VIR_DOMAIN_AFFECT_LIVE if live else lv.VIR_DOMAIN_AFFECT_CONFIG
        flags = lv.VIR_DOMAIN_VCPU_MAXIMUM | affect
        return int(self._call(lambda: self.raw.vcpusFlags(flags), " maximum"))

    def vcpu_times(self) -> dict[int, int]:
        """CPU time used so far by each running vCPU (ns), from ``virDomainGetVcpus``."""
        info, _cpumaps = self._call(self.raw.vcpus, " vCPU times")
        return {number: cpu_time for number, _state, cpu_time, _cpu in info}

    # reads

    def xml(self, *, inactive: bool) -> str:
        flags = self._conn.libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self._call(lambda: self.raw.XMLDesc(flags)))

    def guest_vcpus(self) -> dict[str, str]:
        """The guest agent's view, on a leased connection of its own; always raises on
        failure (the binding returns None)."""
        libvirt, context = self._conn.libvirt, self.context

        def query(leased: VirDomain) -> dict[str, str]:
            reply = leased.guestVcpus(0)
            if reply is None:
                # Read now: freeing the leased handle resets the thread's last error.
                raise last_error(libvirt, context)
            return reply

        return self._conn.agent_call(self.uuid, query, context=context)

    def guest_vcpus_unleased(self) -> dict[str, str]:
        """``guestVcpus`` on the shared connection: only for a driver that the capability
        record says has no guest-agent API, so that no guest can hold the call up (and no
        lease, a connection of its own, is opened for an answer the driver gives itself)."""

        def query() -> dict[str, str]:
            reply = self.raw.guestVcpus(0)
            if reply is None:  # the binding's quirk: the error is only in the last error
                raise last_error(self._conn.libvirt, self.context)
            return reply

        return self._call(query)

    def metadata(self, namespace: str, *, live: bool) -> Optional[str]:
        """An element of the live (or persistent) definition's metadata; None when absent."""
        libvirt = self._conn.libvirt
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
        kind = libvirt.VIR_DOMAIN_METADATA_ELEMENT
        try:
            return str(self.raw.metadata(kind, namespace, flags))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == getattr(libvirt, "VIR_ERR_NO_DOMAIN_METADATA", 80):
                return None
            raise classify(exc, context=f"{self.context} metadata") from None

    # writes

    def set_metadata(
        self, xml: Optional[str], key: str, namespace: str, *, live: bool, config: bool
    ) -> None:
        """Write a metadata element, or remove it when ``xml`` is None."""
        libvirt = self._conn.libvirt
        flags = self._conn.affect_flags(live=live, config=config)
        kind = libvirt.VIR_DOMAIN_METADATA_ELEMENT
        self._call(
            lambda: self.raw.setMetadata(kind, xml, key if xml else None, namespace, flags),
            " metadata",
        )

    def set_guest_vcpus(self, cpulist: str, online: bool) -> None:
        """Online or offline guest CPUs through the agent (first-class API: no taint).

        A failure may follow a partial success: re-read the guest afterwards.
        """
        self._conn.agent_call(
            self.uuid,
            lambda leased: leased.setGuestVcpus(cpulist, int(online), 0),
            context=self.context,
        )

    def set_vcpus(
        self,
        count: int,
        *,
        live: bool,
        config: bool,
        maximum: bool = False,
        hotpluggable: bool = False,
        async_flag: int = 0,
    ) -> None:
        """Hot-plug or unplug vCPUs (live) and/or change the persistent count (config).
        ``maximum``: change the persistent maximum instead (``VIR_DOMAIN_VCPU_MAXIMUM``);
        ``hotpluggable``: the vCPUs it enables are hotpluggable (``..._HOTPLUGGABLE``);
        ``async_flag``: the connection's ``VIR_DOMAIN_VCPU_ASYNC_UNPLUG`` (its capability
        record's), to return once an unplug request is fired instead of waiting for it."""
        lv = self._conn.libvirt
        flags = self._conn.affect_flags(live=live, config=config) | async_flag
        if maximum:
            flags |= lv.VIR_DOMAIN_VCPU_MAXIMUM
        if hotpluggable:
            flags |= lv.VIR_DOMAIN_VCPU_HOTPLUGGABLE
        self._call(lambda: self.raw.setVcpusFlags(count, flags))

    # taints the domain

    def qemu_monitor_command(self, command: str) -> str:
        """A QMP command through ``libvirt_qemu.qemuMonitorCommand``. This **taints** the
        domain (``custom-monitor``): only for what an administrator asked for explicitly
        (``status --qemu-monitor``), never from ``watch``."""
        import libvirt_qemu

        return str(self._call(lambda: libvirt_qemu.qemuMonitorCommand(self.raw, command, 0)))

    # QEMU monitor events (passthrough: no taint)

    def register_monitor_event(self, event: str, callback: Callable[..., None]) -> int:
        """Subscribe ``callback`` to one QEMU monitor event of this domain; its callback id."""
        import libvirt_qemu

        conn = self._conn.raw
        return int(
            self._call(
                lambda: libvirt_qemu.qemuMonitorEventRegister(
                    conn, self.raw, event, callback, None, 0
                ),
                f" monitor event {event}",
            )
        )
