"""status --qemu-monitor: QEMU's own answer (query-hotpluggable-cpus) parsed strictly, shown
beside libvirt's counts, and a mismatch between them reported; never asked by default."""

from __future__ import annotations

import dataclasses
import json

import pytest

from virthotplug.core import errors
from virthotplug.core.drift import find_drift
from virthotplug.core.view import (
    AGENT_CONNECTED,
    AgentStatus,
    CountLayer,
    GuestLayer,
    HypervisorLayer,
    QemuCpus,
    VcpuView,
    to_dict,
)
from virthotplug.host import history
from virthotplug.host.qemu_monitor import COMMAND, parse_reply

# The shape of QEMU's reply after an unplug libvirt gave up on (q35, TCG): QEMU has only
# vcpu0 plugged, libvirt still counts 2.
REPLY = json.dumps(
    {
        "return": [
            {
                "props": {"core-id": 0, "socket-id": 3, "thread-id": 0},
                "vcpus-count": 1,
                "type": "qemu64-x86_64-cpu",
            },
            {
                "props": {"core-id": 0, "socket-id": 2, "thread-id": 0},
                "vcpus-count": 1,
                "type": "qemu64-x86_64-cpu",
            },
            {
                "props": {"core-id": 0, "socket-id": 1, "thread-id": 0},
                "vcpus-count": 1,
                "type": "qemu64-x86_64-cpu",
            },
            {
                "props": {"core-id": 0, "socket-id": 0, "thread-id": 0},
                "vcpus-count": 1,
                "qom-path": "/machine/unattached/device[0]",
                "type": "qemu64-x86_64-cpu",
            },
        ],
        "id": "libvirt-42",
    }
)


def test_reply_is_parsed() -> None:
    assert json.loads(COMMAND) == {"execute": "query-hotpluggable-cpus"}
    assert parse_reply(REPLY, domain="d") == QemuCpus(4, ("/machine/unattached/device[0]",))


@pytest.mark.parametrize("text", ["", "[]", '{"return": 3}', '{"error": {}}', "x" * (2 << 20)])
def test_garbage_is_an_error(text: str) -> None:
    with pytest.raises(errors.GuestDataError):
        parse_reply(text, domain="d")


def view(qemu: QemuCpus) -> VcpuView:
    v = VcpuView(
        host="qemu:///system",
        name="d",
        uuid="u",
        state="running",
        persistent=True,
        agent=AgentStatus(True, AGENT_CONNECTED),
        config=CountLayer(2, 4),
        live=CountLayer(2, 4),
        hypervisor=HypervisorLayer({0: "running", 1: "running"}),
        guest=GuestLayer(frozenset({0}), frozenset({0}), frozenset()),
        qemu=qemu,
    )
    return dataclasses.replace(v, findings=find_drift(v))


def test_qemu_and_libvirt_disagreeing_is_a_finding_and_in_json() -> None:
    v = view(parse_reply(REPLY, domain="d"))
    mismatch = [f for f in v.findings if f.code == "hypervisor-live-mismatch"]
    assert "QEMU itself reports 1 plugged (query-hotpluggable-cpus)" in mismatch[0].message
    doc = to_dict(v)["hypervisor"]
    assert doc["source"] == "libvirt" and doc["count"] == 2
    assert doc["qemu"] == {
        "source": "query-hotpluggable-cpus",
        "slots": 4,
        "count": 1,
        "plugged": ["/machine/unattached/device[0]"],
    }


class Dom:
    name, context, uri = "d", "domain 'd'", "qemu:///system"

    def __init__(self) -> None:
        self.asked = 0

    def qemu_monitor_command(self, command: str) -> str:
        self.asked += 1
        return REPLY

    def metadata(self, namespace: str, *, live: bool) -> None:
        return None

    def xml(self, *, inactive: bool) -> str:
        return "<domain type='qemu' id='1'><name>d</name><uuid>u</uuid></domain>"


def test_the_monitor_is_asked_only_when_asked_for() -> None:
    from virthotplug.host.domxml import parse_domain_xml

    dom = Dom()
    definition = parse_domain_xml(dom.xml(inactive=False))
    assert history.contexts(None)(dom, definition, True).qemu is None  # type: ignore[arg-type]
    assert dom.asked == 0
    found = history.contexts(None, qemu_monitor=True)(dom, definition, True)  # type: ignore[arg-type]
    assert dom.asked == 1 and found.qemu is not None
    assert history.contexts(None, qemu_monitor=True)(dom, definition, False).qemu is None  # type: ignore[arg-type]
