"""Tests for the policy metadata element as libvirt stores and returns it."""

from __future__ import annotations

import pytest

from virthotplug.core.errors import ConfigError, MalformedXMLError
from virthotplug.core.policy import merge_policy
from virthotplug.host.domxml import (
    NAMESPACE,
    parse_domain_xml,
    parse_policy_element,
    policy_element,
)
from virthotplug.host.policysource import SOURCE_LIVE


def test_virdomaingetmetadata_form_is_accepted() -> None:
    # What libvirt 9.0 returns for the element (qemu and test drivers): prefix stripped.
    assert parse_policy_element('<policy mode="online" grace="1.5"/>', domain="d") == {
        "mode": "online",
        "grace": "1.5",
    }


def test_namespaced_form_is_accepted() -> None:
    text = f'<v:policy xmlns:v="{NAMESPACE}" mode="match" count="2"/>'
    assert parse_policy_element(text, domain="d") == {"mode": "match", "count": "2"}


def test_policy_element_is_unqualified_for_setmetadata() -> None:
    # virDomainSetMetadata adds the namespace itself and refuses an element declaring it.
    text = policy_element({"mode": "online", "exclude": "3"})
    assert text == '<policy exclude="3" mode="online"/>'
    assert "xmlns" not in text


def test_policy_element_round_trips_and_escapes() -> None:
    fields = {"mode": "a\"b'<c>&d", "grace": "1"}
    assert parse_policy_element(policy_element(fields), domain="d") == fields


def test_metadata_in_domain_xml_keeps_raw_strings() -> None:
    xml = f"""<domain type='kvm'><name>d1</name><uuid>u</uuid><metadata>
      <virthotplug:policy xmlns:virthotplug="{NAMESPACE}" mode="sometimes" grace="-3"/>
      </metadata></domain>"""
    assert parse_domain_xml(xml).policy == {"mode": "sometimes", "grace": "-3"}


def test_invalid_metadata_values_name_source_and_domain() -> None:
    raw = parse_policy_element('<policy mode="sometimes"/>', domain="bad-metadata")
    with pytest.raises(ConfigError) as info:
        merge_policy([(SOURCE_LIVE, raw)], domain="bad-metadata")
    assert "'bad-metadata'" in str(info.value) and SOURCE_LIVE in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["<other mode='online'/>", f"<v:policy xmlns:v='{NAMESPACE}x' mode='online'/>", "<policy"],
)
def test_foreign_or_broken_elements_are_refused(text: str) -> None:
    with pytest.raises(MalformedXMLError, match="domain 'd1' metadata"):
        parse_policy_element(text, domain="d1")
