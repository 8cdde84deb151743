"""Generate libvirt test-driver node files with many domains and realistic vCPU layouts.

Served by libvirtd's test driver (``test+unix:///abs/path/node.xml``) the domains answer
over real RPC, so a sweep over them measures the client side of a real host: the calls,
their round trips and the parsing, without needing thousands of real VMs.

The layouts are deterministic (seeded) and mixed like a real host:

* vCPU maximum 2-32; the current count below the maximum on most domains, with a
  ``<vcpus>`` block (vCPU 0 enabled and not hotpluggable, the rest hotpluggable, the
  enabled ones with an ``order``), on the others a fixed count;
* a guest-agent channel on about two domains in three;
* about 70 % running, 20 % shut off (``<test:runstate>5``), 10 % paused (``3``).

That is the ``mix``. The other mixes keep the vCPU layouts and change only the run state
and the agent channel, so each stresses one read path: ``agents`` (every domain running with
an agent channel: the most per-domain reads), ``no-agents`` (every domain running, no
channel), ``shut-off`` (every domain shut off: the config layer only), and
``agents-counts``: every domain running with an agent channel and a ``<vcpus>`` block, the
maximum 4, 8 or 16 and the current count every value from 1 to the maximum in turn (so the
vCPU counts and per-vCPU states, and with them the shared layers, vary the most).
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

SIZES = (10, 100, 1000, 5000)
RUNNING, PAUSED, SHUTOFF = 1, 3, 5
MIX = "mix"
AGENTS_COUNTS = "agents-counts"
MIXES = (MIX, "agents", "no-agents", "shut-off", AGENTS_COUNTS)
_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_NAMESPACE = uuid.UUID("6f1c1c3e-46a4-4e43-9d5b-7f8a2b1c0d9e")  # stable UUIDs across runs
_MAXIMA = (2, 4, 4, 8, 8, 8, 16, 16, 32)
# agents-counts: every (maximum, current) pair of these maxima, taken in turn.
_COUNT_PAIRS = tuple((m, c) for m in (4, 8, 16) for c in range(1, m + 1))


@dataclass(frozen=True)
class Layout:
    name: str
    uuid: str
    maximum: int
    current: int
    vcpus_block: bool
    agent: bool
    runstate: int


def layouts(count: int, *, seed: int = 7, mix: str = MIX) -> list[Layout]:
    """``count`` domain layouts, the same for the same arguments (see ``MIXES``)."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}: one of {', '.join(MIXES)}")
    rng = random.Random(seed)
    result = []
    for index in range(count):
        maximum = rng.choice(_MAXIMA)
        growable = rng.random() < 0.8
        current = rng.randint(1, maximum - 1) if growable else maximum
        draw = rng.random()
        runstate = RUNNING if draw < 0.7 else SHUTOFF if draw < 0.9 else PAUSED
        name = f"bench-{index:05d}"
        result.append(
            Layout(
                name=name,
                uuid=str(uuid.uuid5(_NAMESPACE, name)),
                maximum=maximum,
                current=current,
                vcpus_block=growable,
                agent=rng.random() < 0.65,
                runstate=runstate,
            )
        )
    if mix == AGENTS_COUNTS:
        return [_counted(layout, index) for index, layout in enumerate(result)]
    return [_remixed(layout, mix) for layout in result]


def _counted(layout: Layout, index: int) -> Layout:
    """Running with an agent channel, the ``index``-th (maximum, current) pair."""
    maximum, current = _COUNT_PAIRS[index % len(_COUNT_PAIRS)]
    return dataclasses.replace(
        layout,
        maximum=maximum,
        current=current,
        vcpus_block=True,
        agent=True,
        runstate=RUNNING,
    )


def _remixed(layout: Layout, mix: str) -> Layout:
    """The same vCPU layout with the run state and agent channel of ``mix``."""
    if mix == "agents":
        return dataclasses.replace(layout, runstate=RUNNING, agent=True)
    if mix == "no-agents":
        return dataclasses.replace(layout, runstate=RUNNING, agent=False)
    if mix == "shut-off":
        return dataclasses.replace(layout, runstate=SHUTOFF)
    return layout


def domain_xml(layout: Layout) -> str:
    lines = ['  <domain type="test">']
    if layout.runstate != RUNNING:
        lines.append(f"    <test:runstate>{layout.runstate}</test:runstate>")
    lines += [
        f"    <name>{escape(layout.name)}</name>",
        f"    <uuid>{layout.uuid}</uuid>",
        '    <memory unit="MiB">1024</memory>',
    ]
    if layout.current < layout.maximum:
        lines.append(
            f'    <vcpu placement="static" current="{layout.current}">{layout.maximum}</vcpu>'
        )
    else:
        lines.append(f'    <vcpu placement="static">{layout.maximum}</vcpu>')
    if layout.vcpus_block:
        lines.append("    <vcpus>")
        for vcpu in range(layout.maximum):
            enabled = vcpu < layout.current
            attrs = f'id="{vcpu}" enabled="{"yes" if enabled else "no"}"'
            attrs += f' hotpluggable="{"no" if vcpu == 0 else "yes"}"'
            if enabled:
                attrs += f' order="{vcpu + 1}"'
            lines.append(f"      <vcpu {attrs}/>")
        lines.append("    </vcpus>")
    lines += [
        '    <os><type arch="x86_64">hvm</type></os>',
        f'    <cpu><topology sockets="1" dies="1" cores="{layout.maximum}" threads="1"/></cpu>',
    ]
    if layout.agent:
        lines += [
            "    <devices>",
            '      <channel type="unix">',
            '        <target type="virtio" name="org.qemu.guest_agent.0"/>',
            "      </channel>",
            "    </devices>",
        ]
    lines.append("  </domain>")
    return "\n".join(lines)


def node_xml(count: int, *, seed: int = 7, mix: str = MIX) -> str:
    parts = [
        '<?xml version="1.0"?>',
        f'<node xmlns:test="{_TEST_NS}">',
        "  <cpu><mhz>2400</mhz><model>x86_64</model><active>64</active><nodes>1</nodes>"
        "<sockets>2</sockets><cores>16</cores><threads>2</threads></cpu>",
        "  <memory>1073741824</memory>",
    ]
    parts += [domain_xml(layout) for layout in layouts(count, seed=seed, mix=mix)]
    parts.append("</node>")
    return "\n".join(parts) + "\n"


def write_node(directory: Path, count: int, *, seed: int = 7, mix: str = MIX) -> Path:
    """Write ``node-<count>.xml`` (``node-<mix>-<count>.xml`` for another mix) into
    ``directory`` (if not already identical)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"node-{count}" if mix == MIX else f"node-{mix}-{count}"
    path = (directory / f"{stem}.xml").resolve()
    text = node_xml(count, seed=seed, mix=mix)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def unix_uri(path: Path) -> str:
    """The URI that serves ``path`` through libvirtd's test driver (real RPC)."""
    return f"test+unix://{path.resolve()}"


def summary(count: int, *, seed: int = 7, mix: str = MIX) -> dict[str, int]:
    items = layouts(count, seed=seed, mix=mix)
    return {
        "domains": count,
        "running": sum(1 for x in items if x.runstate == RUNNING),
        "paused": sum(1 for x in items if x.runstate == PAUSED),
        "shut_off": sum(1 for x in items if x.runstate == SHUTOFF),
        "agent_channel": sum(1 for x in items if x.agent),
        "growable": sum(1 for x in items if x.current < x.maximum),
    }


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results/nodes")
    for mix in MIXES:
        for size in SIZES:
            print(unix_uri(write_node(out, size, mix=mix)))
