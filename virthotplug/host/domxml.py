"""Domain XML model: maps the parts of libvirt's domain XML that virthotplug needs to objects.

Only mapping lives here (XML ↔ objects); what the values mean for drift or policy is decided
elsewhere. No libvirt import: the XML comes in as text.

The project's metadata element lives in its own namespace (see ``NAMESPACE``)::

    <metadata>
      <virthotplug:policy xmlns:virthotplug="http://virthotplug.org/xmlns/policy/1.0"
                          mode="online" grace="2" exclude="3" count="2"/>
    </metadata>

Its attribute values are kept as raw strings; the policy module validates them.

The domain's vCPU history (``host.history``) is a separate element in a namespace of its own
(``HISTORY_NAMESPACE``), written to the live definition only, so that it ends with the
domain run and a METADATA_CHANGE subscription filtered on ``NAMESPACE`` never sees it::

    <virthotplug-history:history
        xmlns:virthotplug-history="http://virthotplug.org/xmlns/history/1.0"
        initial="1" plugged="2">
      <entry kind="unplug-timeout" vcpu="2" time="1764581234.512" source="setvcpus"/>
    </virthotplug-history:history>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from lxml import etree

from virthotplug.core.errors import MalformedXMLError
from virthotplug.core.shared import SharedValues
from virthotplug.core.view import VcpuEntry

NAMESPACE = "http://virthotplug.org/xmlns/policy/1.0"
METADATA_KEY = "virthotplug"  # the prefix libvirt uses when it stores the element
METADATA_ELEMENT = "policy"
HISTORY_NAMESPACE = "http://virthotplug.org/xmlns/history/1.0"
HISTORY_KEY = "virthotplug-history"
HISTORY_ELEMENT = "history"
HISTORY_ENTRY = "entry"
MAX_HISTORY_XML_ENTRIES = 256  # what we read back; we write far fewer (view.MAX_HISTORY_ENTRIES)
AGENT_CHANNEL = "org.qemu.guest_agent.0"
_POLICY_TAG = f"{{{NAMESPACE}}}{METADATA_ELEMENT}"
_HISTORY_TAG = f"{{{HISTORY_NAMESPACE}}}{HISTORY_ELEMENT}"
MAX_XML_BYTES = 8 * 1024 * 1024  # far above any real domain; bounds what we hand to lxml

# Identical parsed parts share one object (``core.shared``): the daemon caches the definitions
# of every running domain, and a host of a thousand domains has a few dozen distinct <vcpu>
# entries and topologies.
_parts = SharedValues()


# Entities are never resolved and the network is never touched: domain XML may carry
# metadata written by anyone with write access to the domain. Blank text between elements is
# kept (only tails, never read): removing it costs a fifth of the parse.
_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    huge_tree=False,
    collect_ids=False,  # nothing looks elements up by xml:id; the hash table costs time
)


@dataclass(frozen=True, slots=True)
class Topology:
    """``<cpu><topology .../></cpu>``; absent attributes are None."""

    sockets: Optional[int] = None
    dies: Optional[int] = None
    cores: Optional[int] = None
    threads: Optional[int] = None


@dataclass(frozen=True, slots=True)
class RawHistory:
    """Our history element's raw attributes and entries' attributes (``host.history``
    validates them)."""

    attributes: Mapping[str, str]
    entries: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DomainXML:
    """What virthotplug reads from one domain XML document (inactive or live)."""

    name: str
    uuid: str
    domain_type: str
    vcpu_max: int
    vcpu_current: int
    placement: Optional[str] = None
    vcpus: tuple[VcpuEntry, ...] = ()
    topology: Optional[Topology] = None
    agent_channel: bool = False
    # The agent channel's state in live XML ("connected", "disconnected"); None elsewhere.
    agent_channel_state: Optional[str] = None
    policy: Optional[Mapping[str, str]] = None  # raw attributes of our metadata element
    domain_id: Optional[int] = None  # only in live XML of a running domain
    history: Optional[RawHistory] = None  # our history element (live XML only)


@dataclass(frozen=True)
class _Ctx:
    """Names the document in error messages."""

    label: str

    def error(self, what: str) -> MalformedXMLError:
        return MalformedXMLError(f"{self.label}: malformed domain XML: {what}")


def parse_domain_xml(text: str | bytes, *, domain: str = "") -> DomainXML:
    """Parse domain XML. ``domain`` names the domain in errors when the XML cannot."""
    ctx = _Ctx(f"domain '{domain}'" if domain else "domain XML")
    root = _parse_root(text, ctx)
    if root.tag != "domain":
        raise ctx.error(f"root element is <{root.tag}>, expected <domain>")
    children = _children(root)
    name = _required_text(children, "name", ctx)
    ctx = _Ctx(f"domain '{name}'")
    vcpu_max, vcpu_current, placement = _parse_vcpu(children, ctx)
    agent_target = _agent_target(children)
    metadata = children.get("metadata", ())
    return DomainXML(
        name=name,
        uuid=_required_text(children, "uuid", ctx),
        domain_type=root.get("type", ""),
        vcpu_max=vcpu_max,
        vcpu_current=vcpu_current,
        placement=placement,
        vcpus=_parse_vcpus(children, vcpu_max, ctx),
        topology=_parse_topology(children, ctx),
        agent_channel=agent_target is not None,
        agent_channel_state=_agent_channel_state(agent_target),
        policy=_parse_policy(metadata),
        domain_id=_optional_int(root.get("id"), "domain id", ctx),
        history=_parse_history(_first(metadata, _HISTORY_TAG)),
    )


# The elements below <domain>, by tag, in document order: one pass over them instead of a
# path search per value (lxml's find() is Python code, and a domain has ~20 children).
Children = dict[Any, list[etree._Element]]


def _children(root: etree._Element) -> Children:
    """The children read below (``_READ``), by tag; the others (memory, os, clock, ...) are
    passed over."""
    children: Children = {}
    for child in root:  # comments too: their tag is a function, never asked for
        tag = child.tag
        if tag in _READ:
            children.setdefault(tag, []).append(child)
    return children


_READ = frozenset({"name", "uuid", "vcpu", "vcpus", "cpu", "devices", "metadata"})


def _first(parents: Sequence[etree._Element], tag: str) -> Optional[etree._Element]:
    """The first ``tag`` child of any of ``parents``, in document order: ``find("p/tag")``."""
    for parent in parents:
        for child in parent.iterchildren(tag):
            return child
    return None


def policy_element(attributes: Mapping[str, str]) -> str:
    """Serialize our metadata element, as ``virDomainSetMetadata`` expects it: unqualified
    (libvirt adds the namespace under ``METADATA_KEY`` and refuses an element that already
    declares that prefix: "failed to create a new XML namespace")."""
    elem = etree.Element(METADATA_ELEMENT)
    for key in sorted(attributes):
        elem.set(key, attributes[key])
    return etree.tostring(elem, encoding="unicode")


def history_element(history: RawHistory) -> str:
    """Serialize our history element for ``virDomainSetMetadata`` (unqualified, like
    ``policy_element``)."""
    elem = etree.Element(HISTORY_ELEMENT)
    for key in sorted(history.attributes):
        elem.set(key, history.attributes[key])
    for entry in history.entries:
        child = etree.SubElement(elem, HISTORY_ENTRY)
        for key in sorted(entry):
            child.set(key, entry[key])
    return etree.tostring(elem, encoding="unicode")


def parse_history_element(text: str, *, domain: str) -> RawHistory:
    """Parse our history element as returned by ``virDomainGetMetadata``."""
    ctx = _Ctx(f"domain '{domain}' history metadata")
    root = _parse_root(text, ctx)
    if root.tag not in (f"{{{HISTORY_NAMESPACE}}}{HISTORY_ELEMENT}", HISTORY_ELEMENT):
        raise ctx.error(f"unexpected element <{root.tag}>")
    history = _parse_history(root)
    assert history is not None
    return history


def _parse_history(elem: Optional[etree._Element]) -> Optional[RawHistory]:
    if elem is None:
        return None
    children = [
        c for c in elem if isinstance(c.tag, str) and etree.QName(c).localname == HISTORY_ENTRY
    ]
    entries = tuple(_attributes(c) for c in children[-MAX_HISTORY_XML_ENTRIES:])
    return RawHistory(attributes=_attributes(elem), entries=entries)


def parse_policy_element(text: str, *, domain: str) -> dict[str, str]:
    """Parse our metadata element as returned by ``virDomainGetMetadata``."""
    ctx = _Ctx(f"domain '{domain}' metadata")
    root = _parse_root(text, ctx)
    # virDomainGetMetadata returns the element without its namespace prefix.
    if root.tag not in (f"{{{NAMESPACE}}}{METADATA_ELEMENT}", METADATA_ELEMENT):
        raise ctx.error(f"unexpected element <{root.tag}>")
    return _attributes(root)


def _parse_root(text: str | bytes, ctx: _Ctx) -> etree._Element:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if not data.strip():
        raise ctx.error("empty document")
    if len(data) > MAX_XML_BYTES:
        raise ctx.error(f"document larger than {MAX_XML_BYTES} bytes")
    try:
        return etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ctx.error(str(exc).splitlines()[0]) from None


def _required_text(children: Children, tag: str, ctx: _Ctx) -> str:
    elems = children.get(tag)
    value = (elems[0].text or "").strip() if elems else ""
    if not value:
        raise ctx.error(f"missing <{tag}>")
    return value


def _int(value: Optional[str], what: str, ctx: _Ctx, *, minimum: int = 0) -> int:
    if value is None:
        raise ctx.error(f"missing {what}")
    text = value.strip()
    # libvirt stores these as (unsigned) int: 10-digit values such as order='2147483647'
    # are valid domain XML.
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise ctx.error(f"{what} is not a non-negative integer: {text[:20]!r}")
    number = int(text)
    if number > 0xFFFFFFFF:
        raise ctx.error(f"{what} is out of range: {number}")
    if number < minimum:
        raise ctx.error(f"{what} must be at least {minimum}, got {number}")
    return number


def _optional_int(value: Optional[str], what: str, ctx: _Ctx) -> Optional[int]:
    return None if value is None else _int(value, what, ctx)


def _yes_no(value: Optional[str], what: str, ctx: _Ctx) -> bool:
    if value in ("yes", "no"):
        return value == "yes"
    raise ctx.error(f"{what} must be 'yes' or 'no', got {value!r}")


def _parse_vcpu(children: Children, ctx: _Ctx) -> tuple[int, int, Optional[str]]:
    elems = children.get("vcpu")
    if not elems:
        # libvirt defaults to one vCPU when <vcpu> is absent.
        return 1, 1, None
    elem = elems[0]
    text, current_text, placement = elem.text, elem.get("current"), elem.get("placement")

    def validated() -> tuple[int, int, Optional[str]]:
        maximum = _int(text, "<vcpu> count", ctx, minimum=1)
        current = _int(
            current_text if current_text is not None else str(maximum),
            "<vcpu current>",
            ctx,
            minimum=1,
        )
        if current > maximum:
            raise ctx.error(f"<vcpu current='{current}'> exceeds the maximum {maximum}")
        return maximum, current, placement

    return _vcpu_by_attributes.get((text, current_text, placement), validated)


# Each distinct <vcpu> element is validated once: (text, current, placement) → the counts.
_vcpu_by_attributes = SharedValues()


def _parse_vcpus(children: Children, vcpu_max: int, ctx: _Ctx) -> tuple[VcpuEntry, ...]:
    blocks = children.get("vcpus", ())
    # The serialized blocks stand for their elements' attributes (what the entries are made
    # of): serializing is C code, a fraction of reading four attributes of each <vcpu>.
    key = (vcpu_max, tuple(etree.tostring(block, with_tail=False) for block in blocks))
    return _vcpus_by_text.get(key, lambda: _vcpus_of(blocks, vcpu_max, ctx))


def _vcpus_of(blocks: Sequence[etree._Element], vcpu_max: int, ctx: _Ctx) -> tuple[VcpuEntry, ...]:
    elements = [
        (e.get("id"), e.get("enabled"), e.get("hotpluggable", "no"), e.get("order"))
        for block in blocks
        for e in block.iterchildren("vcpu")
    ]
    return _vcpus_by_attributes.get(
        (vcpu_max, tuple(elements)), lambda: _validated_vcpus(elements, vcpu_max, ctx)
    )


def _validated_vcpus(
    elements: Sequence[tuple[Optional[str], Optional[str], Optional[str], Optional[str]]],
    vcpu_max: int,
    ctx: _Ctx,
) -> tuple[VcpuEntry, ...]:
    entries = []
    seen: set[int] = set()
    for attributes in elements:
        entry = _parts.one(_vcpu_entry(*attributes, ctx=ctx))
        if entry.id >= vcpu_max or entry.id in seen:
            raise ctx.error(f"<vcpus><vcpu id='{entry.id}'> is duplicate or beyond {vcpu_max}")
        seen.add(entry.id)
        entries.append(entry)
    return _parts.one(tuple(sorted(entries, key=lambda v: v.id)))


# Each distinct <vcpus> element is validated once: (maximum, its elements' raw attributes)
# → its entries. A host's domains repeat the same few.
_vcpus_by_attributes = SharedValues()
_vcpus_by_text = SharedValues()  # (maximum, the serialized <vcpus> blocks) → the same entries


def _vcpu_entry(
    vcpu_id: Optional[str],
    enabled: Optional[str],
    hotpluggable: Optional[str],
    order: Optional[str],
    *,
    ctx: _Ctx,
) -> VcpuEntry:
    number = _int(vcpu_id, "<vcpus><vcpu id>", ctx)
    return VcpuEntry(
        id=number,
        enabled=_yes_no(enabled, f"vcpu {number} enabled", ctx),
        hotpluggable=_yes_no(hotpluggable, f"vcpu {number} hotpluggable", ctx),
        order=_optional_int(order, f"vcpu {number} order", ctx),
    )


def _parse_topology(children: Children, ctx: _Ctx) -> Optional[Topology]:
    elem = _first(children.get("cpu", ()), "topology")
    if elem is None:
        return None
    attributes = tuple(elem.get(key) for key in _TOPOLOGY_KEYS)

    def validated() -> Topology:
        values = {
            key: _optional_int(value, f"topology {key}", ctx)
            for key, value in zip(_TOPOLOGY_KEYS, attributes)
        }
        return _parts.one(Topology(**values))

    return _topologies_by_attributes.get(attributes, validated)


_TOPOLOGY_KEYS = ("sockets", "dies", "cores", "threads")
_topologies_by_attributes = SharedValues()


def _agent_target(children: Children) -> Optional[etree._Element]:
    """The guest agent channel's <target>, if the domain has one."""
    for devices in children.get("devices", ()):
        for channel in devices.iterchildren("channel"):
            for target in channel.iterchildren("target"):
                if target.get("type") == "virtio" and target.get("name") == AGENT_CHANNEL:
                    return target
    return None


def _agent_channel_state(target: Optional[etree._Element]) -> Optional[str]:
    state = target.get("state") if target is not None else None
    return state if state in ("connected", "disconnected") else None


def _parse_policy(metadata: Sequence[etree._Element]) -> Optional[dict[str, str]]:
    elem = _first(metadata, _POLICY_TAG)
    return None if elem is None else _attributes(elem)


def _attributes(elem: etree._Element) -> dict[str, str]:
    return {str(key): str(value) for key, value in elem.attrib.items()}
