"""Tests for virthotplug.host.domxml: the domain XML model and the project's metadata element."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from virthotplug.core.errors import EXIT_CONFIG, ConfigError, MalformedXMLError
from virthotplug.host.domxml import (
    AGENT_CHANNEL,
    MAX_XML_BYTES,
    NAMESPACE,
    DomainXML,
    Topology,
    VcpuEntry,
    parse_domain_xml,
    parse_policy_element,
    policy_element,
)

UUID = "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01"

# What libvirt returns for a hotplug-ready domain (trimmed, attribute quoting as libvirt does).
FULL = f"""<domain type='kvm' id='7'>
  <name>web1</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <virthotplug:policy xmlns:virthotplug="{NAMESPACE}" mode="online" grace="2" exclude="3"/>
    <other:thing xmlns:other="http://example.org/other" mode="ignored"/>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static' current='2'>4</vcpu>
  <vcpus>
    <vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>
    <vcpu id='3' enabled='no' hotpluggable='yes'/>
    <vcpu id='1' enabled='yes' hotpluggable='yes' order='2'/>
    <vcpu id='2' enabled='no' hotpluggable='yes'/>
  </vcpus>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <cpu mode='host-model'><topology sockets='1' dies='1' cores='4' threads='1'/></cpu>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/7-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
    </channel>
  </devices>
</domain>
"""


def domain(body: str = "", *, name: str = "d1", head: str = "") -> str:
    """A minimal domain document with ``body`` inside <domain>."""
    return f"{head}<domain type='kvm'><name>{name}</name><uuid>{UUID}</uuid>{body}</domain>"


def channel(target_type: str, name: str) -> str:
    return (
        f"<devices><channel type='unix'><target type='{target_type}' name='{name}'/>"
        "</channel></devices>"
    )


# --- the parts virthotplug reads ---------------------------------------------------------


def test_full_document() -> None:
    xml = parse_domain_xml(FULL)
    assert xml == DomainXML(
        name="web1",
        uuid=UUID,
        domain_type="kvm",
        vcpu_max=4,
        vcpu_current=2,
        placement="static",
        vcpus=(
            VcpuEntry(id=0, enabled=True, hotpluggable=False, order=1),
            VcpuEntry(id=1, enabled=True, hotpluggable=True, order=2),
            VcpuEntry(id=2, enabled=False, hotpluggable=True, order=None),
            VcpuEntry(id=3, enabled=False, hotpluggable=True, order=None),
        ),
        topology=Topology(sockets=1, dies=1, cores=4, threads=1),
        agent_channel=True,
        agent_channel_state="connected",
        policy={"mode": "online", "grace": "2", "exclude": "3"},
        domain_id=7,
    )
    assert {v.id for v in xml.vcpus if v.hotpluggable} == {1, 2, 3}
    assert {v.id for v in xml.vcpus if v.enabled} == {0, 1}


def test_bytes_input_is_accepted() -> None:
    assert parse_domain_xml(FULL.encode("utf-8")).name == "web1"


def test_minimal_defaults() -> None:
    xml = parse_domain_xml(domain())
    assert (xml.vcpu_max, xml.vcpu_current) == (1, 1)  # libvirt's default without <vcpu>
    assert xml.placement is None
    assert xml.vcpus == ()
    assert xml.topology is None
    assert xml.agent_channel is False
    assert xml.policy is None
    assert xml.domain_id is None  # inactive XML has no id


def test_current_defaults_to_maximum() -> None:
    xml = parse_domain_xml(domain("<vcpu placement='auto'>6</vcpu>"))
    assert (xml.vcpu_max, xml.vcpu_current, xml.placement) == (6, 6, "auto")


def test_vcpu_count_with_surrounding_whitespace() -> None:
    assert parse_domain_xml(domain("<vcpu current=' 2 '>\n  8\n</vcpu>")).vcpu_current == 2


def test_hotpluggable_defaults_to_no() -> None:
    xml = parse_domain_xml(domain("<vcpu>2</vcpu><vcpus><vcpu id='1' enabled='yes'/></vcpus>"))
    assert xml.vcpus == (VcpuEntry(id=1, enabled=True, hotpluggable=False),)


def test_order_accepts_libvirt_unsigned_int_range() -> None:
    # libvirt accepts (and returns) order values up to 2147483647: 10 digits.
    body = "<vcpu>2</vcpu><vcpus><vcpu id='0' enabled='yes' order='2147483647'/></vcpus>"
    assert parse_domain_xml(domain(body)).vcpus[0].order == 2147483647
    body = body.replace("2147483647", "4294967295")  # still bounded: UINT_MAX is the limit
    assert parse_domain_xml(domain(body)).vcpus[0].order == 4294967295


def test_partial_topology() -> None:
    xml = parse_domain_xml(domain("<cpu><topology sockets='2' cores='2' threads='2'/></cpu>"))
    assert xml.topology == Topology(sockets=2, dies=None, cores=2, threads=2)


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (channel("virtio", AGENT_CHANNEL), True),
        (channel("virtio", "org.libguestfs.channel.0"), False),
        (channel("guestfwd", AGENT_CHANNEL), False),
        ("<devices><console type='pty'/></devices>", False),
        ("", False),
    ],
)
def test_agent_channel_detection(devices: str, expected: bool) -> None:
    assert parse_domain_xml(domain(devices)).agent_channel is expected


def test_agent_channel_among_several_channels() -> None:
    devices = (
        "<devices>"
        "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>"
        f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>"
        "</devices>"
    )
    assert parse_domain_xml(domain(devices)).agent_channel is True


def test_metadata_of_other_namespaces_is_ignored() -> None:
    body = "<metadata><policy xmlns='http://example.org/x' mode='online'/></metadata>"
    assert parse_domain_xml(domain(body)).policy is None


def test_policy_values_stay_raw_strings() -> None:
    body = (
        f"<metadata><v:policy xmlns:v='{NAMESPACE}' mode='sometimes' grace='-3'"
        " exclude='0-99999999'/></metadata>"
    )
    assert parse_domain_xml(domain(body)).policy == {
        "mode": "sometimes",
        "grace": "-3",
        "exclude": "0-99999999",
    }


# --- the metadata element ----------------------------------------------------------------


def test_policy_element_round_trip() -> None:
    attributes = {"mode": "online", "grace": "1.5", "exclude": "2-3", "count": "2"}
    text = policy_element(attributes)
    # Unqualified, as virDomainSetMetadata wants it (libvirt adds the namespace itself).
    assert text.startswith("<policy ")
    assert "xmlns" not in text
    assert parse_policy_element(text, domain="d1") == attributes


def test_policy_element_escapes_values() -> None:
    attributes = {"mode": "a\"b'<c>&d"}
    assert parse_policy_element(policy_element(attributes), domain="d1") == attributes


def test_policy_as_libvirt_stores_it_in_domain_xml() -> None:
    body = (
        f"<metadata><virthotplug:policy xmlns:virthotplug='{NAMESPACE}' mode='report'/></metadata>"
    )
    assert parse_domain_xml(domain(body)).policy == {"mode": "report"}


def test_policy_element_as_libvirt_returns_it_with_another_prefix() -> None:
    text = f"<hp:policy xmlns:hp='{NAMESPACE}' mode='online'/>"
    assert parse_policy_element(text, domain="d1") == {"mode": "online"}


@pytest.mark.parametrize(
    "text",
    [
        "<other mode='online'/>",  # unqualified, but not our element
        "<v:other xmlns:v='http://virthotplug.org/xmlns/policy/1.0'/>",
        "<v:policy xmlns:v='http://virthotplug.org/xmlns/policy/2.0'/>",
        "<v:policy xmlns:v='http://virthotplug.org/xmlns/policy/1.0'",
        "",
    ],
)
def test_parse_policy_element_rejects(text: str) -> None:
    with pytest.raises(MalformedXMLError, match=r"domain 'web9' metadata"):
        parse_policy_element(text, domain="web9")


# --- malformed documents -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty document"),
        ("   \n", "empty document"),
        ("<domain><name>d1</name>", "line 1"),
        ("not xml at all", "Start tag expected"),
        ("<network><name>n</name></network>", "root element is <network>"),
        (f"<domain><uuid>{UUID}</uuid></domain>", "missing <name>"),
        ("<domain><name>  </name></domain>", "missing <name>"),
    ],
)
def test_malformed_without_a_name(text: str, reason: str) -> None:
    with pytest.raises(MalformedXMLError) as info:
        parse_domain_xml(text, domain="web9")
    message = str(info.value)
    assert message.startswith("domain 'web9': malformed domain XML: ")
    assert reason in message
    assert "\n" not in message


def test_malformed_without_domain_hint() -> None:
    with pytest.raises(MalformedXMLError, match=r"^domain XML: malformed domain XML: "):
        parse_domain_xml("<domain>")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "missing <uuid>"),
        ("<vcpu current='5'>4</vcpu>", "exceeds the maximum 4"),
        ("<vcpu>0</vcpu>", "must be at least 1"),
        ("<vcpu current='0'>2</vcpu>", "must be at least 1"),
        ("<vcpu>-1</vcpu>", "not a non-negative integer"),
        ("<vcpu>four</vcpu>", "not a non-negative integer"),
        ("<vcpu>2.0</vcpu>", "not a non-negative integer"),
        ("<vcpu>\u0664</vcpu>", "not a non-negative integer"),  # Arabic-Indic digit four
        ("<vcpu>99999999999</vcpu>", "not a non-negative integer"),
        ("<vcpu>4294967296</vcpu>", "out of range"),
        ("<vcpu/>", "missing <vcpu> count"),
        ("<vcpu>2</vcpu><vcpus><vcpu id='2' enabled='yes'/></vcpus>", "beyond 2"),
        (
            "<vcpu>2</vcpu><vcpus><vcpu id='0' enabled='yes'/><vcpu id='0' enabled='no'/></vcpus>",
            "duplicate",
        ),
        ("<vcpu>2</vcpu><vcpus><vcpu enabled='yes'/></vcpus>", "missing <vcpus><vcpu id>"),
        ("<vcpu>2</vcpu><vcpus><vcpu id='0'/></vcpus>", "enabled must be 'yes' or 'no'"),
        ("<vcpu>2</vcpu><vcpus><vcpu id='0' enabled='on'/></vcpus>", "got 'on'"),
        ("<vcpu>2</vcpu><vcpus><vcpu id='0' enabled='YES'/></vcpus>", "got 'YES'"),
        (
            "<vcpu>2</vcpu><vcpus><vcpu id='1' enabled='yes' hotpluggable='true'/></vcpus>",
            "vcpu 1 hotpluggable must be 'yes' or 'no', got 'true'",
        ),
        ("<vcpu>2</vcpu><vcpus><vcpu id='0' enabled='yes' order='x'/></vcpus>", "order"),
        ("<cpu><topology sockets='one'/></cpu>", "topology sockets"),
    ],
)
def test_malformed_names_the_domain(body: str, reason: str) -> None:
    text = f"<domain type='kvm'><name>web9</name>{body}</domain>"
    if "missing <uuid>" not in reason:
        text = text.replace("</name>", f"</name><uuid>{UUID}</uuid>")
    with pytest.raises(MalformedXMLError) as info:
        parse_domain_xml(text, domain="ignored-hint")
    message = str(info.value)
    # Once <name> is known, the document's own name is used, not the caller's hint.
    assert message.startswith("domain 'web9': malformed domain XML: ")
    assert reason in message
    assert "\n" not in message


def test_bad_domain_id() -> None:
    with pytest.raises(MalformedXMLError, match="domain id"):
        parse_domain_xml(domain().replace("type='kvm'", "type='kvm' id='x'"))


def test_error_quotes_are_bounded() -> None:
    with pytest.raises(MalformedXMLError) as info:
        parse_domain_xml(domain("<vcpu>" + "x" * 10_000 + "</vcpu>"))
    assert len(str(info.value)) < 200


def test_malformed_is_a_config_error() -> None:
    assert issubclass(MalformedXMLError, ConfigError)
    assert MalformedXMLError("x").exit_status == EXIT_CONFIG


# --- hostile documents -------------------------------------------------------------------


def billion_laughs(use: str) -> str:
    entities = ['<!ENTITY lol0 "lol">']
    entities += [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    ]  # 10**9 "lol"s when expanded
    head = "<!DOCTYPE domain [" + "".join(entities) + "]>"
    return head + use


def assert_small(xml: DomainXML) -> None:
    fields = [xml.name, xml.uuid, xml.domain_type, *(xml.policy or {}).values()]
    assert all(len(value) < 100 for value in fields)


@pytest.mark.parametrize(
    "use",
    [
        f"<domain type='kvm'><name>&lol9;</name><uuid>{UUID}</uuid></domain>",
        f"<domain type='kvm'><name>d1</name><uuid>{UUID}</uuid><metadata>"
        f"<v:policy xmlns:v='{NAMESPACE}' mode='&lol9;'/></metadata></domain>",
        f"<domain type='kvm'><name>d1</name><uuid>{UUID}</uuid><description>&lol9;"
        "</description></domain>",
    ],
)
def test_billion_laughs_is_not_expanded(use: str) -> None:
    started = time.monotonic()
    try:
        xml = parse_domain_xml(billion_laughs(use), domain="lol")
    except MalformedXMLError as exc:
        assert str(exc).startswith("domain '")
    else:
        assert_small(xml)
    assert time.monotonic() - started < 2.0


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("SECRET-MARKER-7f3a\n", encoding="utf-8")
    return path


def external_entity_documents(uri: str) -> list[str]:
    general = f'<!DOCTYPE domain [<!ENTITY xxe SYSTEM "{uri}">]>'
    parameter = f'<!DOCTYPE domain [<!ENTITY % xxe SYSTEM "{uri}"> %xxe;]>'
    return [
        domain(name="&xxe;", head=general),
        domain(name="d1&xxe;", head=general),
        domain(
            f"<metadata><v:policy xmlns:v='{NAMESPACE}'>&xxe;</v:policy></metadata>", head=general
        ),
        domain(head=parameter),
        domain(head=f'<!DOCTYPE domain SYSTEM "{uri}">'),
    ]


def test_external_entities_are_never_read(secret_file: Path) -> None:
    for text in external_entity_documents(secret_file.as_uri()):
        try:
            xml = parse_domain_xml(text, domain="xxe")
        except MalformedXMLError as exc:
            assert "SECRET-MARKER" not in str(exc)
        else:
            assert "SECRET-MARKER" not in repr(xml)
            assert_small(xml)


@pytest.mark.skipif(not Path("/etc/passwd").exists(), reason="no /etc/passwd")
def test_etc_passwd_is_not_read() -> None:
    for text in external_entity_documents("file:///etc/passwd"):
        try:
            xml = parse_domain_xml(text, domain="xxe")
        except MalformedXMLError as exc:
            assert "root:" not in str(exc)
        else:
            assert "root:" not in repr(xml)


def test_external_entity_in_metadata_element() -> None:
    text = '<!DOCTYPE p [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>' + (
        f"<v:policy xmlns:v='{NAMESPACE}' mode='online'>&xxe;</v:policy>"
    )
    assert parse_policy_element(text, domain="d1") == {"mode": "online"}


def test_network_entities_are_not_fetched() -> None:
    # An unroutable address: a parser that tried to fetch it would hang or fail differently.
    text = domain(
        name="d1&xxe;", head='<!DOCTYPE domain [<!ENTITY xxe SYSTEM "http://192.0.2.1/x">]>'
    )
    started = time.monotonic()
    try:
        xml = parse_domain_xml(text)
    except MalformedXMLError:
        pass
    else:
        assert xml.name == "d1"
    assert time.monotonic() - started < 2.0


def test_oversized_document_is_refused_before_parsing() -> None:
    padding = "<!--" + "x" * MAX_XML_BYTES + "-->"
    with pytest.raises(MalformedXMLError, match=f"larger than {MAX_XML_BYTES} bytes"):
        parse_domain_xml(domain(padding), domain="huge")


def test_oversized_policy_element_is_refused() -> None:
    text = f"<v:policy xmlns:v='{NAMESPACE}' mode='{'x' * MAX_XML_BYTES}'/>"
    with pytest.raises(MalformedXMLError, match=r"^domain 'huge' metadata: .*larger than"):
        parse_policy_element(text, domain="huge")


def test_size_limit_counts_encoded_bytes() -> None:
    # 'é' is two bytes in UTF-8: a text under the limit in characters can be over it in bytes.
    filler = "é" * (MAX_XML_BYTES // 2 + 1)
    with pytest.raises(MalformedXMLError, match="larger than"):
        parse_domain_xml(domain(f"<description>{filler}</description>"))


def test_deeply_nested_document_does_not_crash() -> None:
    depth = 100_000
    text = domain("<a>" * depth + "</a>" * depth)
    try:
        xml = parse_domain_xml(text, domain="deep")
    except MalformedXMLError as exc:
        assert str(exc).startswith("domain 'deep': ")
    else:
        assert xml.name == "d1"


# --- identical parts are shared, and checked as strictly the second time --------------------

VCPUS_BODY = (
    "<vcpu current='1'>2</vcpu><vcpus><vcpu id='0' enabled='yes' hotpluggable='no'/>"
    "<vcpu id='1' enabled='no' hotpluggable='yes'/></vcpus>"
    "<cpu><topology sockets='1' dies='1' cores='2' threads='1'/></cpu>"
)


def test_identical_vcpu_entries_and_topologies_are_one_object() -> None:
    first = parse_domain_xml(domain(VCPUS_BODY, name="a"))
    second = parse_domain_xml(domain(VCPUS_BODY, name="b"))
    assert first.vcpus == second.vcpus and first.vcpus is second.vcpus
    assert first.topology is second.topology
    assert first.name == "a" and second.name == "b"


def test_a_known_vcpus_element_is_checked_against_each_documents_maximum() -> None:
    parse_domain_xml(domain(VCPUS_BODY))
    # The same <vcpus> elements under a smaller maximum: vcpu 1 is beyond it.
    smaller = VCPUS_BODY.replace("<vcpu current='1'>2</vcpu>", "<vcpu>1</vcpu>")
    with pytest.raises(MalformedXMLError, match="beyond 1"):
        parse_domain_xml(domain(smaller))


def test_a_malformed_vcpu_entry_fails_every_time() -> None:
    bad = VCPUS_BODY.replace("enabled='no'", "enabled='maybe'")
    for _ in range(2):
        with pytest.raises(MalformedXMLError, match="enabled"):
            parse_domain_xml(domain(bad))


def test_a_repeated_entry_next_to_a_known_one_is_still_a_duplicate() -> None:
    parse_domain_xml(domain(VCPUS_BODY))
    twice = VCPUS_BODY.replace(
        "<vcpu id='1' enabled='no' hotpluggable='yes'/>",
        "<vcpu id='0' enabled='yes' hotpluggable='no'/>",
    )
    with pytest.raises(MalformedXMLError, match="duplicate"):
        parse_domain_xml(domain(twice))
