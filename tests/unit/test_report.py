"""Tests for virthotplug.core.report: the status table, the JSON document and the plugin line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

import pytest

from virthotplug.core import report
from virthotplug.core.view import (
    AGENT_CONNECTED,
    CRITICAL,
    INFO,
    WARNING,
    AgentStatus,
    CountLayer,
    Finding,
    GuestLayer,
    VcpuView,
)

PLUGIN_LINE = re.compile(
    r"^VIRTHOTPLUG (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+ \| "
    r"domains=\d+ warning=\d+ critical=\d+ unknown=\d+$"
)


@dataclass(frozen=True)
class Failure:
    """Shaped like collect.DomainError (report reads host, name and error)."""

    host: str
    name: str
    error: str


def make_view(name: str = "web1", *findings: Finding, host: str = "qemu:///system") -> VcpuView:
    return VcpuView(
        host=host,
        name=name,
        uuid=f"uuid-{name}",
        state="running",
        persistent=True,
        agent=AgentStatus(configured=True, state=AGENT_CONNECTED),
        domain_id=3,
        config=CountLayer(current=2, maximum=4),
        live=CountLayer(current=3, maximum=4),
        guest=GuestLayer(
            present=frozenset({0, 1, 2}), online=frozenset({0, 1}), offlinable=frozenset({1, 2})
        ),
        findings=findings,
    )


def stopped(name: str = "off1") -> VcpuView:
    return VcpuView(
        host="qemu:///system",
        name=name,
        uuid=f"uuid-{name}",
        state="shut off",
        persistent=True,
        agent=AgentStatus(configured=False, state="not-configured"),
        config=CountLayer(current=1, maximum=8),
        findings=(Finding("domain-not-running", INFO, "domain is shut off: only config known"),),
    )


OFFLINE = Finding("guest-cpu-offline", WARNING, "CPU 2 present in the guest but offline", (2,))
MISSING = Finding("guest-missing-vcpus", CRITICAL, "libvirt counts 2, the guest has 1")
CONFIG = Finding("config-live-mismatch", INFO, "live 3, config 2")


# --- table ------------------------------------------------------------------------------


def table_rows(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def test_table_columns_and_cells() -> None:
    text = report.status_table([make_view("web1", CONFIG, OFFLINE), stopped()])
    rows = table_rows(text)
    assert rows[0] == ["Domain", "State", "Config", "Live", "Guest", "Agent", "Findings"]
    assert set(rows[1][0]) == {"-"}
    # Info findings are left out of the table; counts are current/maximum, guest online/present.
    assert rows[2] == ["web1", "running", "2/4", "3/4", "2/3", "connected", "guest-cpu-offline"]
    assert rows[3] == ["off1", "shut off", "1/8", "-", "-", "not-configured", "-"]


def test_table_columns_are_aligned() -> None:
    lines = report.status_table([make_view("a"), make_view("a-much-longer-name")]).splitlines()
    header = lines[0]
    for line in lines[2:]:
        assert line.index("running") == header.index("State")
    assert all(line == line.rstrip() for line in lines)
    assert len(lines[1]) >= len(header)


def test_table_with_host_column() -> None:
    views = [make_view("a", host="qemu+ssh://h1/system"), make_view("b", host="qemu:///system")]
    rows = table_rows(report.status_table(views, show_host=True))
    assert rows[0][:2] == ["Host", "Domain"]
    assert rows[2][:2] == ["qemu+ssh://h1/system", "a"]
    assert rows[3][:2] == ["qemu:///system", "b"]


def test_table_lists_every_non_info_code() -> None:
    rows = table_rows(report.status_table([make_view("x", OFFLINE, CONFIG, MISSING)]))
    assert rows[2][-1] == "guest-cpu-offline,guest-missing-vcpus"


def test_empty_table_is_only_the_header() -> None:
    assert len(report.status_table([]).splitlines()) == 2


# --- JSON document ----------------------------------------------------------------------


def test_json_document_shape() -> None:
    views = [make_view("web1", OFFLINE), stopped()]
    errors = [Failure("qemu:///system", "broken", "bad XML"), Failure("qemu+ssh://h2/", "", "down")]
    document = json.loads(report.status_json(views, errors))
    assert list(document) == ["version", "domains", "errors", "not_read"]
    assert document["version"] == report.JSON_SCHEMA_VERSION == 1
    assert [d["name"] for d in document["domains"]] == ["web1", "off1"]
    for domain in document["domains"]:
        for layer in ("config", "live", "hypervisor", "guest"):
            assert layer in domain
    assert document["domains"][1]["live"] is None
    assert document["errors"] == [
        {"host": "qemu:///system", "domain": "broken", "error": "bad XML"},
        {"host": "qemu+ssh://h2/", "domain": None, "error": "down"},
    ]


def test_json_document_empty() -> None:
    assert report.status_document([], []) == {
        "version": 1,
        "domains": [],
        "errors": [],
        "not_read": [],
    }


# --- monitoring plugin ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("findings", "failures", "expected"),
    [
        ((), 0, report.CHECK_OK),
        ((CONFIG,), 0, report.CHECK_OK),
        ((OFFLINE,), 0, report.CHECK_WARNING),
        ((CONFIG, MISSING, OFFLINE), 0, report.CHECK_CRITICAL),
        ((), 1, report.CHECK_UNKNOWN),
        ((OFFLINE,), 2, report.CHECK_UNKNOWN),
        ((MISSING,), 1, report.CHECK_CRITICAL),  # a known critical outranks the unknown
    ],
)
def test_check_status(findings: tuple[Finding, ...], failures: int, expected: int) -> None:
    assert report.check_status([make_view("a", *findings), stopped()], failures) == expected


def test_check_status_values() -> None:
    assert (report.CHECK_OK, report.CHECK_WARNING, report.CHECK_CRITICAL) == (0, 1, 2)
    assert report.CHECK_UNKNOWN == 3


def test_check_status_without_domains() -> None:
    assert report.check_status([], 0) == report.CHECK_OK
    assert report.check_status([], 1) == report.CHECK_UNKNOWN


def test_check_line_ok() -> None:
    views = [make_view("a", CONFIG), stopped()]
    line = report.check_line(views, [], report.CHECK_OK)
    assert line == (
        "VIRTHOTPLUG OK - 2 domains, vCPUs consistent | domains=2 warning=0 critical=0 unknown=0"
    )
    assert PLUGIN_LINE.match(line)


def test_check_line_problems() -> None:
    views = [make_view("a", OFFLINE), make_view("b", CONFIG, MISSING), make_view("c")]
    status = report.check_status(views, 0)
    line = report.check_line(views, [], status)
    assert PLUGIN_LINE.match(line), line
    assert line.startswith("VIRTHOTPLUG CRITICAL - a: guest-cpu-offline (CPU 2 present")
    assert "; b: guest-missing-vcpus (libvirt counts 2, the guest has 1)" in line
    assert "config-live-mismatch" not in line
    assert line.endswith("| domains=3 warning=1 critical=1 unknown=0")


def test_check_line_with_failures() -> None:
    failures = ["qemu+ssh://h2/system: cannot connect", "qemu:///system x: bad XML", "3", "4"]
    line = report.check_line([make_view("a")], failures, report.CHECK_UNKNOWN)
    assert PLUGIN_LINE.match(line), line
    assert line.startswith("VIRTHOTPLUG UNKNOWN - qemu+ssh://h2/system: cannot connect; ")
    assert "; 3 |" in line  # at most three failures are spelled out
    assert line.endswith("unknown=4")


def test_check_line_caps_the_number_of_domains_named() -> None:
    views = [make_view(f"d{i}", OFFLINE) for i in range(8)]
    line = report.check_line(views, [], report.CHECK_WARNING)
    assert PLUGIN_LINE.match(line)
    assert "d4:" in line and "d5:" not in line
    assert "; and 3 more |" in line
    assert "warning=8" in line


def test_check_line_keeps_guest_text_out_of_the_perfdata() -> None:
    # Agent errors quote what the guest sent; a '|' in them must not start the perfdata.
    hostile = Finding("agent-bad-reply", CRITICAL, "guest agent 'vcpus': bad '0|x=1;2;3'")
    line = report.check_line([make_view("evil", hostile)], [], report.CHECK_CRITICAL)
    assert PLUGIN_LINE.match(line), line
    assert line.count("|") == 1
    assert line.split(" | ")[1] == "domains=1 warning=0 critical=1 unknown=0"


def test_check_line_status_names() -> None:
    for status, name in [(0, "OK"), (1, "WARNING"), (2, "CRITICAL"), (3, "UNKNOWN")]:
        assert report.check_line([], [], status).startswith(f"VIRTHOTPLUG {name} - ")


def test_views_are_not_modified() -> None:
    v = make_view("a", OFFLINE)
    before = replace(v)
    report.status_table([v])
    report.status_json([v], [])
    report.check_line([v], [], report.check_status([v], 0))
    assert v == before
