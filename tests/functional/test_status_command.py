"""``virthotplug status`` against libvirt's test driver and the project's node files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tdriver import MIXED, node_uri, run_cli, run_module

from virthotplug.core.errors import EXIT_FAILURE, EXIT_OK

LAYERS = ("config", "live", "hypervisor", "guest")
MIXED_ORDER = [  # like virsh list --all: running (and paused) by id, then the others by name
    "hotplug-agent",
    "fixed-noagent",
    "growable-noagent",
    "paused-agent",
    "bad-metadata",
    "stopped-big",
]
UUIDS = {
    "hotplug-agent": "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01",
    "paused-agent": "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e05",
    "stopped-big": "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e04",
}


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {domain["name"]: domain for domain in document["domains"]}


def counts(layer: dict[str, Any] | None) -> tuple[int, int] | None:
    return None if layer is None else (layer["current"], layer["maximum"])


def findings(domain: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f["code"], f["severity"]) for f in domain["findings"]]


@pytest.fixture
def mixed(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    result = run_cli(capsys, "-c", MIXED, "status", "--all", "--json")
    assert result.status == EXIT_OK, result.err
    assert result.err == ""
    document: dict[str, Any] = result.json()
    return document


# --- status --all --json ----------------------------------------------------------------


def test_json_document(mixed: dict[str, Any]) -> None:
    assert list(mixed) == ["version", "domains", "errors", "not_read"]
    assert mixed["version"] == 1
    assert mixed["errors"] == []
    assert [d["name"] for d in mixed["domains"]] == MIXED_ORDER
    for domain in mixed["domains"]:
        for layer in LAYERS:
            assert layer in domain, (domain["name"], layer)
        assert domain["host"] == MIXED


def test_hotplug_agent(mixed: dict[str, Any]) -> None:
    domain = by_name(mixed)["hotplug-agent"]
    assert domain["uuid"] == UUIDS["hotplug-agent"]
    assert (domain["id"], domain["state"], domain["persistent"]) == (1, "running", True)
    assert counts(domain["config"]) == (1, 4)
    assert domain["config"]["vcpus"] == [
        {"id": 0, "enabled": True, "hotpluggable": False, "order": 1},
        {"id": 1, "enabled": False, "hotpluggable": True, "order": None},
        {"id": 2, "enabled": False, "hotpluggable": True, "order": None},
        {"id": 3, "enabled": False, "hotpluggable": True, "order": None},
    ]
    assert counts(domain["live"]) == (1, 4)
    # The counts are libvirt's bookkeeping; ejects QEMU reported come from the history.
    assert domain["hypervisor"] == {
        "source": "libvirt",
        "count": 1,
        "vcpus": [{"id": 0, "state": "running"}],
        "ejected": [],
    }
    assert domain["history"] == {
        "initial": None,
        "plugged": 0,
        "since_start": False,
        "repeat_refused": None,
        "entries": [],
    }
    assert domain["guest"] is None
    # The test driver has no guest-agent support: a configured agent it cannot query.
    assert domain["agent"]["configured"] is True
    assert domain["agent"]["state"] == "unsupported"
    assert "virDomainGetGuestVcpus" in domain["agent"]["error"]
    assert findings(domain) == [("agent-unsupported", "info")]


def test_fixed_noagent(mixed: dict[str, Any]) -> None:
    domain = by_name(mixed)["fixed-noagent"]
    assert (domain["id"], domain["state"]) == (2, "running")
    assert counts(domain["config"]) == counts(domain["live"]) == (2, 2)
    assert domain["config"]["vcpus"] == []
    assert domain["hypervisor"]["count"] == 2
    assert domain["agent"] == {"configured": False, "state": "not-configured", "error": None}
    # Cannot grow: nothing to online, so a missing agent is only informational.
    assert findings(domain) == [("agent-not-configured", "info")]


def test_growable_noagent(mixed: dict[str, Any]) -> None:
    domain = by_name(mixed)["growable-noagent"]
    assert counts(domain["config"]) == counts(domain["live"]) == (2, 6)
    assert domain["hypervisor"]["count"] == 2
    assert findings(domain) == [("agent-not-configured", "warning")]


def test_stopped_big(mixed: dict[str, Any]) -> None:
    domain = by_name(mixed)["stopped-big"]
    assert (domain["id"], domain["state"], domain["persistent"]) == (None, "shut off", True)
    assert counts(domain["config"]) == (2, 8)
    assert domain["live"] is None
    assert domain["hypervisor"] is None
    assert domain["guest"] is None
    assert domain["agent"] == {"configured": True, "state": "not-queried", "error": None}
    assert findings(domain) == [("domain-not-running", "info")]


def test_paused_agent(mixed: dict[str, Any]) -> None:
    domain = by_name(mixed)["paused-agent"]
    assert (domain["id"], domain["state"]) == (4, "paused")
    assert counts(domain["config"]) == counts(domain["live"]) == (2, 4)
    assert domain["hypervisor"]["count"] == 2
    # A paused guest's vCPUs are stopped: its agent cannot answer, so it is not asked.
    assert domain["agent"] == {"configured": True, "state": "not-queried", "error": None}
    assert domain["guest"] is None
    assert findings(domain) == []


def test_bad_metadata_domain_is_still_read(mixed: dict[str, Any]) -> None:
    domain = by_name(mixed)["bad-metadata"]
    assert counts(domain["config"]) == counts(domain["live"]) == (1, 2)
    assert findings(domain) == [("invalid-policy", "warning"), ("agent-not-configured", "warning")]


# --- table ------------------------------------------------------------------------------


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "--all")
    assert result.status == EXIT_OK
    assert result.err == ""
    rows = [re.split(r"\s{2,}", line.strip()) for line in result.out.splitlines()]
    assert rows[0] == ["Domain", "State", "Config", "Live", "Guest", "Agent", "Findings"]
    assert rows[2:] == [
        ["hotplug-agent", "running", "1/4", "1/4", "-", "unsupported", "-"],
        ["fixed-noagent", "running", "2/2", "2/2", "-", "not-configured", "-"],
        [
            "growable-noagent",
            "running",
            "2/6",
            "2/6",
            "-",
            "not-configured",
            "agent-not-configured",
        ],
        ["paused-agent", "paused", "2/4", "2/4", "-", "not-queried", "-"],
        [
            "bad-metadata",
            "running",
            "1/2",
            "1/2",
            "-",
            "not-configured",
            "invalid-policy,agent-not-configured",
        ],
        ["stopped-big", "shut off", "2/8", "-", "-", "not-queried", "-"],
    ]


# --- naming domains ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ident", "name"),
    [
        ("hotplug-agent", "hotplug-agent"),
        ("1", "hotplug-agent"),
        ("4", "paused-agent"),
        (UUIDS["paused-agent"], "paused-agent"),
        (UUIDS["paused-agent"].upper(), "paused-agent"),
        (UUIDS["stopped-big"].replace("-", ""), "stopped-big"),
        ("stopped-big", "stopped-big"),
    ],
)
def test_named_domain(ident: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "--json", ident)
    assert result.status == EXIT_OK, result.err
    assert [d["name"] for d in result.json()["domains"]] == [name]


def test_named_domains_keep_the_given_order(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "--json", "stopped-big", "3", "hotplug-agent")
    assert result.status == EXIT_OK, result.err
    names = [d["name"] for d in result.json()["domains"]]
    assert names == ["stopped-big", "growable-noagent", "hotplug-agent"]


def test_named_domain_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "growable-noagent")
    assert result.status == EXIT_OK
    lines = result.out.splitlines()
    assert len(lines) == 3
    assert lines[2].split() == [
        "growable-noagent",
        "running",
        "2/6",
        "2/6",
        "-",
        "not-configured",
        "agent-not-configured",
    ]


def test_uri_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", MIXED)
    result = run_cli(capsys, "status", "--json", "fixed-noagent")
    assert result.status == EXIT_OK, result.err
    assert result.json()["domains"][0]["host"] == MIXED


def test_explicit_uri_wins_over_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "bogus:///should-not-be-used")
    result = run_cli(capsys, "-c", MIXED, "status", "--json", "fixed-noagent")
    assert result.status == EXIT_OK, result.err


# --- other layouts ----------------------------------------------------------------------


def test_transient_domain_has_no_config_layer(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", node_uri("edge"), "status", "--json", "transient-agent")
    assert result.status == EXIT_OK, result.err
    domain = result.json()["domains"][0]
    assert domain["persistent"] is False
    assert domain["config"] is None
    assert counts(domain["live"]) == (2, 4)
    # Without a persistent definition, the live layer carries the <vcpus> entries.
    assert [(v["id"], v["enabled"], v["hotpluggable"]) for v in domain["live"]["vcpus"]] == [
        (0, True, False),
        (1, True, True),
        (2, False, True),
        (3, False, True),
    ]
    assert domain["hypervisor"]["count"] == 2
    assert domain["agent"]["state"] == "unsupported"
    assert "config-live-mismatch" not in [code for code, _ in findings(domain)]


def test_transient_domain_in_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", node_uri("edge"), "status", "transient-agent")
    assert result.out.splitlines()[2].split()[:4] == ["transient-agent", "running", "-", "2/4"]


def test_order_values_libvirt_accepts_are_read(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", node_uri("edge"), "status", "--json", "big-order")
    assert result.status == EXIT_OK, result.err
    orders = [v["order"] for v in result.json()["domains"][0]["config"]["vcpus"]]
    assert orders == [1, 2147483647]


def test_several_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    edge = node_uri("edge")
    result = run_cli(capsys, "-c", MIXED, "-c", edge, "status", "--all", "--json")
    assert result.status == EXIT_OK, result.err
    hosts = [(d["host"], d["name"]) for d in result.json()["domains"]]
    assert hosts == [(MIXED, n) for n in MIXED_ORDER] + [
        (edge, "transient-agent"),
        (edge, "big-order"),
    ]


def test_several_hosts_table_has_a_host_column(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "-c", node_uri("edge"), "status", "--all")
    lines = result.out.splitlines()
    assert lines[0].split()[:2] == ["Host", "Domain"]
    assert lines[2].split()[:2] == [MIXED, "hotplug-agent"]


def test_one_host_down_among_several(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    down = f"qemu+unix:///system?socket={tmp_path / 'nonexistent' / 'sock'}"
    result = run_cli(capsys, "-c", MIXED, "-c", down, "status", "--all", "--json")
    assert result.status == EXIT_FAILURE
    document = result.json()
    assert len(document["domains"]) == len(MIXED_ORDER)
    [error] = document["errors"]
    assert error["host"] == down
    assert error["domain"] is None
    assert "is libvirtd running?" in error["error"]


# --- a domain the model refuses, among good ones ----------------------------------------

HUGE_METADATA_NODE = """<?xml version="1.0"?>
<node>
  <domain type="test">
    <name>huge-metadata</name>
    <uuid>5d1e7a2c-0b3f-4c8e-9a6d-2f4b8c0e1a11</uuid>
    <metadata>
      <note xmlns="http://example.org/note">{padding}</note>
    </metadata>
    <memory unit="MiB">256</memory>
    <vcpu placement="static">2</vcpu>
    <os><type arch="x86_64">hvm</type></os>
  </domain>
  <domain type="test">
    <name>fine</name>
    <uuid>5d1e7a2c-0b3f-4c8e-9a6d-2f4b8c0e1a12</uuid>
    <memory unit="MiB">256</memory>
    <vcpu placement="static">2</vcpu>
    <os><type arch="x86_64">hvm</type></os>
  </domain>
</node>
"""


@pytest.fixture
def huge_metadata_uri(tmp_path: Path) -> str:
    # libvirt accepts any amount of metadata; virthotplug bounds what it parses (8 MiB).
    path = tmp_path / "huge.xml"
    path.write_text(HUGE_METADATA_NODE.format(padding="x" * (9 * 1024 * 1024)), encoding="utf-8")
    return node_uri(path)


def test_oversized_domain_xml_is_one_error_and_the_rest_is_read(
    capsys: pytest.CaptureFixture[str], huge_metadata_uri: str
) -> None:
    result = run_cli(capsys, "-c", huge_metadata_uri, "status", "--all")
    assert result.status == EXIT_FAILURE
    assert [line.split()[0] for line in result.out.splitlines()[2:]] == ["fine"]
    assert result.err_lines == [
        f"virthotplug: error: {huge_metadata_uri} huge-metadata: domain 'huge-metadata': "
        "malformed domain XML: document larger than 8388608 bytes"
    ]


def test_oversized_domain_xml_in_json(
    capsys: pytest.CaptureFixture[str], huge_metadata_uri: str
) -> None:
    result = run_cli(capsys, "-c", huge_metadata_uri, "status", "--all", "--json")
    assert result.status == EXIT_FAILURE
    document = result.json()
    assert [d["name"] for d in document["domains"]] == ["fine"]
    assert document["errors"] == [
        {
            "host": huge_metadata_uri,
            "domain": "huge-metadata",
            "error": "domain 'huge-metadata': malformed domain XML: "
            "document larger than 8388608 bytes",
        }
    ]


# --- python -m virthotplug --------------------------------------------------------------


def test_python_m_status_json() -> None:
    result = run_module("-c", MIXED, "status", "--all", "--json")
    assert result.status == EXIT_OK, result.err
    assert result.err == ""
    assert [d["name"] for d in result.json()["domains"]] == MIXED_ORDER


def test_python_m_uses_libvirt_default_uri() -> None:
    result = run_module("status", "fixed-noagent", env={"LIBVIRT_DEFAULT_URI": MIXED})
    assert result.status == EXIT_OK, result.err
    assert result.out.splitlines()[2].split()[0] == "fixed-noagent"
