"""The connection owner and the collector against the real libvirt library (test driver).

Errors are real ``libvirtError``s raised by libvirt itself, so ``classify`` is tested on what
libvirt really says, not on hand-made errors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from tdriver import MIXED, node_uri

from virthotplug.core import errors
from virthotplug.core.drift import CONFIG_LIVE_MISMATCH
from virthotplug.core.view import AGENT_UNSUPPORTED, INFO
from virthotplug.core.workpool import CallTimeout, call_with_timeout
from virthotplug.host.agentread import read_guest
from virthotplug.host.collect import read_view, read_views
from virthotplug.host.connection import Connection, OpeningConnection, classify
from virthotplug.host.domain import Domain
from virthotplug.host.domxml import (
    NAMESPACE,
    Topology,
    parse_domain_xml,
    parse_policy_element,
    policy_element,
)


@pytest.fixture
def conn() -> Iterator[Connection]:
    with Connection(MIXED) as connection:
        yield connection


@pytest.fixture
def ro_conn() -> Iterator[Connection]:
    with Connection(MIXED, readonly=True) as connection:
        yield connection


def libvirt_error(fn: Any) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as info:
        fn()
    return info.value


# --- classify, on errors libvirt really raises ------------------------------------------


def test_no_domain(conn: Connection) -> None:
    exc = libvirt_error(lambda: conn.raw.lookupByName("nosuch"))
    err = classify(exc, context="looking")
    assert type(err) is errors.NoDomainError
    assert err.exit_status == errors.EXIT_NO_DOMAIN
    assert err.code == libvirt.VIR_ERR_NO_DOMAIN
    assert str(err).startswith("looking: ")


def test_operation_on_an_inactive_domain(conn: Connection) -> None:
    exc = libvirt_error(lambda: conn.lookup("stopped-big").raw.vcpus())
    assert exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert isinstance(classify(exc), errors.InvalidRequestError)


def test_invalid_argument(conn: Connection) -> None:
    dom = conn.lookup("hotplug-agent")
    exc = libvirt_error(lambda: dom.raw.setVcpusFlags(99, libvirt.VIR_DOMAIN_AFFECT_LIVE))
    err = classify(exc)
    assert type(err) is errors.InvalidRequestError
    assert "\n" not in str(err)


def test_unsupported_by_the_driver(conn: Connection) -> None:
    dom = conn.lookup("hotplug-agent")
    exc = libvirt_error(lambda: dom.raw.setGuestVcpus("1", 1, 0))
    err = classify(exc)
    assert isinstance(err, errors.UnsupportedError)
    assert err.exit_status == errors.EXIT_UNSUPPORTED


def test_malformed_xml(conn: Connection) -> None:
    exc = libvirt_error(lambda: conn.raw.defineXML("<domain"))
    err = classify(exc)
    assert isinstance(err, errors.MalformedXMLError)
    assert "\n" not in str(err)


def test_read_only_write_is_permission_denied(ro_conn: Connection) -> None:
    dom = ro_conn.lookup("hotplug-agent")
    exc = libvirt_error(lambda: dom.raw.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE))
    assert exc.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    err = classify(exc)
    assert isinstance(err, errors.PermissionDeniedError)
    assert err.exit_status == errors.EXIT_PERMISSION


def test_non_libvirt_exception_is_wrapped() -> None:
    err = classify(ValueError("odd"), context="ctx")
    assert type(err) is errors.VirtHotplugError
    assert str(err) == "ctx: odd"


def test_call_translates(conn: Connection) -> None:
    with pytest.raises(errors.NoDomainError, match=r"^here: "):
        conn.call(lambda: conn.raw.lookupByName("nosuch"), context="here")


# --- guest_vcpus: the binding returns None instead of raising ----------------------------


def test_binding_returns_none_on_failure(conn: Connection) -> None:
    # The quirk guest_vcpus papers over: no exception from the binding itself.
    assert conn.lookup("hotplug-agent").raw.guestVcpus(0) is None


def test_guest_vcpus_raises_unsupported(conn: Connection) -> None:
    with pytest.raises(errors.UnsupportedError) as info:
        conn.guest_vcpus(conn.lookup("hotplug-agent"))
    assert str(info.value).startswith("domain 'hotplug-agent': ")
    assert "virDomainGetGuestVcpus" in str(info.value)


def test_guest_vcpus_raises_in_a_worker_thread(conn: Connection) -> None:
    # libvirt's last error is per thread: it must be read in the thread that made the call.
    dom = conn.lookup("hotplug-agent")
    with pytest.raises(errors.UnsupportedError):
        call_with_timeout(lambda: conn.guest_vcpus(dom), 30.0)


def test_guest_vcpus_read_only(ro_conn: Connection) -> None:
    with pytest.raises(errors.PermissionDeniedError, match="read only access"):
        ro_conn.guest_vcpus(ro_conn.lookup("hotplug-agent"))


def test_read_guest_parses_the_agents_list_within_its_timeout(
    conn: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    dom = conn.lookup("hotplug-agent")
    reply = {"vcpus": "0-2", "online": "0-1", "offlinable": "1-2"}
    monkeypatch.setattr(Domain, "guest_vcpus", lambda _dom: reply)
    guest = read_guest(conn, dom, maximum=4, timeout=5.0)
    assert guest.present == {0, 1, 2} and guest.online == {0, 1}
    with pytest.raises(errors.GuestDataError):
        read_guest(conn, dom, maximum=2, timeout=5.0)  # more CPUs than the domain can have
    monkeypatch.setattr(Domain, "guest_vcpus", lambda _dom: time.sleep(2.0))
    with pytest.raises(CallTimeout):
        read_guest(conn, dom, maximum=4, timeout=0.05)


def test_read_guest_raises_what_the_driver_says(conn: Connection) -> None:
    with pytest.raises(errors.UnsupportedError, match=r"^domain 'hotplug-agent': "):
        read_guest(conn, conn.lookup("hotplug-agent"), maximum=4, timeout=30.0)


# --- lookups ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ident", "name"),
    [
        ("1", "hotplug-agent"),
        ("5", "bad-metadata"),
        ("3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e04", "stopped-big"),
        ("3b3c0e4f8a6e4d9a9f0e1d4a5c6b7e04", "stopped-big"),
        ("fixed-noagent", "fixed-noagent"),
    ],
)
def test_lookup(conn: Connection, ident: str, name: str) -> None:
    assert conn.lookup(ident).name == name


def test_lookup_numeric_name_falls_back_to_the_name(conn: Connection) -> None:
    xml = (
        "<domain type='test'><name>42</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    conn.raw.defineXML(xml)
    assert conn.lookup("42").name == "42"


def test_lookup_unknown(conn: Connection) -> None:
    with pytest.raises(errors.NoDomainError, match=rf"no such domain on {MIXED}$"):
        conn.lookup("12345")


def test_closed_connection(conn: Connection) -> None:
    conn.close()
    with pytest.raises(errors.ConnectError, match="not connected"):
        conn.lookup("hotplug-agent")
    conn.close()  # closing twice is harmless


def test_opening_connection_hands_over_an_open_connection() -> None:
    opening = OpeningConnection(MIXED)
    with opening.result() as conn:
        assert conn.transient_uuids() == set()
        opening.discard()  # handed over: the caller's to close, discard leaves it open
        assert conn.is_alive()
    assert not conn.is_alive()


def test_opening_connection_raises_the_open_error_in_the_caller() -> None:
    with pytest.raises(errors.VirtHotplugError) as direct:
        Connection("bogus:///x").open()
    opening = OpeningConnection("bogus:///x")
    with pytest.raises(type(direct.value), match="no connection driver available"):
        opening.result()
    opening.discard()  # nothing was opened: nothing to close


def test_opening_connection_discarded_unused_is_closed() -> None:
    opening = OpeningConnection(MIXED)
    opening.discard()
    assert opening._conn is not None and not opening._conn.is_alive()


def test_transient_uuids() -> None:
    with Connection(node_uri("edge")) as edge:
        assert edge.transient_uuids() == {"5d1e7a2c-0b3f-4c8e-9a6d-2f4b8c0e1a01"}
    with Connection(MIXED) as mixed:
        assert mixed.transient_uuids() == set()


# --- the domain XML model on what libvirt really returns --------------------------------


def test_model_of_libvirt_xml(conn: Connection) -> None:
    dom = conn.lookup("hotplug-agent")
    config = parse_domain_xml(dom.xml(inactive=True), domain="hotplug-agent")
    live = parse_domain_xml(dom.xml(inactive=False), domain="hotplug-agent")
    assert (config.vcpu_current, config.vcpu_max, config.placement) == (1, 4, "static")
    assert config.topology == Topology(sockets=1, dies=1, cores=4, threads=1)
    assert {v.id for v in config.vcpus if v.hotpluggable} == {1, 2, 3}
    assert {v.id for v in config.vcpus if v.enabled} == {0}
    assert config.agent_channel
    assert config.policy == {"mode": "online", "grace": "1.5", "exclude": "3"}
    assert config.domain_id is None
    assert live.domain_id == 1


def test_model_without_agent_channel(conn: Connection) -> None:
    dom = conn.lookup("fixed-noagent")
    xml = parse_domain_xml(dom.xml(inactive=False))
    assert not xml.agent_channel
    assert xml.topology is None


def test_stopped_domain_topology(conn: Connection) -> None:
    xml = parse_domain_xml(conn.lookup("stopped-big").xml(inactive=True))
    assert xml.topology == Topology(sockets=2, dies=1, cores=2, threads=2)


def test_metadata_as_libvirt_returns_it(conn: Connection) -> None:
    dom = conn.lookup("hotplug-agent")
    text = dom.raw.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
    assert parse_policy_element(text, domain="hotplug-agent") == {
        "mode": "online",
        "grace": "1.5",
        "exclude": "3",
    }


def test_policy_element_round_trip_through_libvirt(conn: Connection) -> None:
    dom = conn.lookup("stopped-big")
    attributes = {"mode": "report", "grace": "2", "exclude": "0,3"}
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    dom.raw.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        policy_element(attributes),
        "virthotplug",
        NAMESPACE,
        flags,
    )
    text = dom.raw.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags)
    assert parse_policy_element(text, domain="stopped-big") == attributes
    stored = parse_domain_xml(dom.xml(inactive=True))
    assert stored.policy == attributes


# --- the collector, after changes made through libvirt ----------------------------------


def test_live_hot_add_shows_config_live_mismatch(conn: Connection) -> None:
    dom = conn.lookup("hotplug-agent")
    dom.raw.setVcpusFlags(3, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    [view] = read_views(conn, ["hotplug-agent"]).views
    assert view.config is not None and view.live is not None and view.hypervisor is not None
    assert (view.config.current, view.live.current, view.hypervisor.count) == (1, 3, 3)
    assert sorted(view.hypervisor.vcpus) == [0, 1, 2]
    codes = [(f.code, f.severity) for f in view.findings]
    assert codes == [(CONFIG_LIVE_MISMATCH, INFO), ("agent-unsupported", INFO)]
    assert view.agent.state == AGENT_UNSUPPORTED


def test_config_change_of_a_stopped_domain(conn: Connection) -> None:
    dom = conn.lookup("stopped-big")
    dom.raw.setVcpusFlags(6, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    view = read_view(conn, dom, agent_timeout=5.0)
    assert view.config is not None
    assert (view.config.current, view.config.maximum) == (6, 8)
    assert view.live is None


def test_started_domain_gets_live_layers(conn: Connection) -> None:
    dom = conn.lookup("stopped-big")
    dom.raw.create()
    view = read_view(conn, dom, agent_timeout=5.0)
    assert view.state == "running"
    assert view.domain_id is not None and view.domain_id > 0
    assert view.live is not None and (view.live.current, view.live.maximum) == (2, 8)
    assert view.agent.state == AGENT_UNSUPPORTED


def test_read_all_domains(conn: Connection) -> None:
    result = read_views(conn)
    assert result.errors == []
    assert [v.name for v in result.views] == [
        "hotplug-agent",
        "fixed-noagent",
        "growable-noagent",
        "paused-agent",
        "bad-metadata",
        "stopped-big",
    ]
    assert all(v.host == MIXED for v in result.views)


def test_read_views_read_only_without_agent_domains(ro_conn: Connection) -> None:
    result = read_views(ro_conn, ["fixed-noagent", "stopped-big"])
    assert [v.name for v in result.views] == ["fixed-noagent", "stopped-big"]


def test_read_views_read_only_with_an_agent_domain(ro_conn: Connection) -> None:
    with pytest.raises(errors.PermissionDeniedError):
        read_views(ro_conn, ["hotplug-agent"])
