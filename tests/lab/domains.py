"""Domain XML for lab guests: q35, diskless, direct kernel boot, hot-pluggable vCPUs.

A domain carries only what the lab needs: a pty serial console logged to a file, the guest
agent's channel (unless the behaviour says otherwise) and the lab's control channel. No disk,
network, USB, video or balloon. Guest behaviour is selected on the kernel command line.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

AGENT_CHANNEL = "org.qemu.guest_agent.0"
CONTROL_CHANNEL = "org.virthotplug.lab.0"
BASE_CMDLINE = "console=ttyS0 quiet panic=-1"

Online = Literal["manual", "auto"]
Agent = Literal["on", "stopped", "none"]


@dataclass(frozen=True)
class Behaviour:
    """How a lab guest behaves; ``/init`` in the initramfs reads the vhp.* switches."""

    # manual: hot-added CPUs stay offline (Debian/Ubuntu); auto: onlined as by the udev rule.
    online: Online = "manual"
    # on: qemu-ga runs; stopped: held down until the control channel starts it; none: absent.
    agent: Agent = "on"
    # False: no agent channel in the domain at all ("not configured" rather than "not running").
    agent_channel: bool = True

    def kernel_switches(self) -> str:
        return f"vhp.online={self.online} vhp.agent={self.agent}"

    @property
    def agent_expected(self) -> bool:
        """Whether the agent answers once the guest has booted."""
        return self.agent == "on" and self.agent_channel


MANUAL = Behaviour(online="manual")
AUTO = Behaviour(online="auto")
NO_AGENT_CHANNEL = Behaviour(agent="none", agent_channel=False)
AGENT_NOT_RUNNING = Behaviour(agent="none")
AGENT_STOPPED = Behaviour(agent="stopped")


@dataclass(frozen=True)
class DomainSpec:
    name: str
    kernel: Path
    initrd: Path
    serial_log: Path
    behaviour: Behaviour = field(default_factory=Behaviour)
    max_vcpus: int = 4
    current_vcpus: int = 1
    memory_mib: int = 160
    # "qemu" (TCG) or "kvm"; see accelerator() in lab.py.
    domain_type: str = "qemu"
    # A real guest (matrix.py): its own kernel command line and a virtio disk (the domain's
    # qcow2 overlay), and no lab control channel, since nothing in it would serve one.
    guest: str = "busybox"
    cmdline: str | None = None
    disk: Path | None = None
    control_channel: bool = True


def domain_xml(spec: DomainSpec) -> str:
    domain = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(domain, "name").text = spec.name
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    _vcpus(domain, spec)
    _os(domain, spec)
    features = ET.SubElement(domain, "features")
    # ACPI carries CPU hotplug notifications to the guest (and _OST back).
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.domain_type == "kvm":
        ET.SubElement(domain, "cpu", mode="host-passthrough")
    ET.SubElement(domain, "on_crash").text = "destroy"
    _devices(domain, spec)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def _vcpus(domain: ET.Element, spec: DomainSpec) -> None:
    vcpu = ET.SubElement(domain, "vcpu", placement="static", current=str(spec.current_vcpus))
    vcpu.text = str(spec.max_vcpus)
    vcpus = ET.SubElement(domain, "vcpus")
    for n in range(spec.max_vcpus):
        enabled = "yes" if n < spec.current_vcpus else "no"
        # vCPU 0 is the boot CPU: present from the start and never unpluggable.
        hotpluggable = "no" if n == 0 else "yes"
        attrs = {"id": str(n), "enabled": enabled, "hotpluggable": hotpluggable}
        if enabled == "yes":
            attrs["order"] = str(n + 1)
        ET.SubElement(vcpus, "vcpu", attrs)


def _os(domain: ET.Element, spec: DomainSpec) -> None:
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(spec.kernel)
    ET.SubElement(os_el, "initrd").text = str(spec.initrd)
    cmdline = spec.cmdline or f"{BASE_CMDLINE} {spec.behaviour.kernel_switches()}"
    ET.SubElement(os_el, "cmdline").text = cmdline


def _devices(domain: ET.Element, spec: DomainSpec) -> None:
    devices = ET.SubElement(domain, "devices")
    if spec.disk is not None:
        _disk(devices, spec.disk)
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(spec.serial_log), append="off")
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(ET.SubElement(devices, "console", type="pty"), "target", type="serial")
    if spec.behaviour.agent_channel:
        _channel(devices, AGENT_CHANNEL)
    if spec.control_channel:
        _channel(devices, CONTROL_CHANNEL)
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")


def _disk(devices: ET.Element, overlay: Path) -> None:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=str(overlay))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")


def _channel(devices: ET.Element, name: str) -> None:
    # No <source>: libvirt makes a unix socket per channel under its channel target directory
    # and shows the path in the live XML.
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=name)
