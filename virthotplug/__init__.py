"""virthotplug: make vCPU hotplug on libvirt/QEMU hosts work end to end."""

__version__ = "0.1.0"
