"""QEMU's own answer about its vCPUs, for ``status --qemu-monitor`` only.

libvirt's vCPU counts are its bookkeeping; after an unplug libvirt gave up on they still
count a vCPU QEMU has removed. Asking QEMU (``query-hotpluggable-cpus``) is possible only
through ``libvirt_qemu.qemuMonitorCommand``, which **taints** the domain (libvirt records
``custom-monitor`` and logs it). So this is opt-in, for one command an administrator runs,
and never used by ``watch``.
"""

from __future__ import annotations

import json

from virthotplug.core import errors
from virthotplug.core.view import QemuCpus
from virthotplug.host.domain import Domain

COMMAND = json.dumps({"execute": "query-hotpluggable-cpus"})
MAX_REPLY_CHARS = 1 << 20  # hundreds of slots are a few tens of KiB
MAX_SLOTS = 16384


def hotpluggable_cpus(dom: Domain) -> QemuCpus:
    """The domain's CPU slots as QEMU reports them (taints the domain: see above)."""
    return parse_reply(dom.qemu_monitor_command(COMMAND), domain=dom.name)


def parse_reply(text: str, *, domain: str) -> QemuCpus:
    """``{"return": [{"type": ..., "vcpus-count": 1, "props": {...}, "qom-path": ...}]}``:
    a slot with a ``qom-path`` has a CPU plugged."""
    if len(text) > MAX_REPLY_CHARS:
        raise errors.GuestDataError(f"domain '{domain}': QEMU monitor reply too large")
    try:
        slots = json.loads(text)["return"]
    except (ValueError, KeyError, TypeError):
        raise errors.GuestDataError(f"domain '{domain}': unexpected QEMU monitor reply") from None
    if not isinstance(slots, list) or len(slots) > MAX_SLOTS:
        raise errors.GuestDataError(f"domain '{domain}': unexpected QEMU monitor reply")
    plugged = [s for s in slots if isinstance(s, dict) and isinstance(s.get("qom-path"), str)]
    return QemuCpus(
        slots=len(slots),
        plugged=tuple(sorted(str(s["qom-path"])[:256] for s in plugged)),
    )
