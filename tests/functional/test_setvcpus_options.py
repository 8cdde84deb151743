"""``setvcpus --maximum``, ``--hotpluggable`` and ``--guest`` with virsh's meaning, against
libvirt's test driver: virsh's option rules, validation before any change, and the guest
count through a guest agent played by the test (the test driver has none)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
from tdriver import MIXED, node_uri, run_cli

from virthotplug.core.cpulist import format_cpulist, parse_cpulist
from virthotplug.core.errors import (
    EXIT_AGENT,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INCOMPLETE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
)
from virthotplug.host.domain import Domain
from virthotplug.host.support import Capabilities

Capsys = pytest.CaptureFixture[str]

NODE = """<node xmlns:test="http://libvirt.org/schemas/domain/test/1.0">
  <domain type="test">
    <name>web</name>
    <uuid>6a0e9e1e-54b5-4b61-9c52-3e5f4a9c0a01</uuid>
    {metadata}
    <memory unit="MiB">256</memory>
    <vcpu placement="static" current="3">4</vcpu>
    <os><type arch="x86_64">hvm</type></os>
    <devices>
      <channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0"/></channel>
    </devices>
  </domain>
</node>
"""
POLICY = (
    '<metadata><virthotplug:policy xmlns:virthotplug="http://virthotplug.org/xmlns/policy/1.0"'
    " {attributes}/></metadata>"
)


def node(tmp_path: Path, policy: Optional[str]) -> str:
    """A host with one running domain 'web', 3 of 4 vCPUs, a guest agent channel and the
    policy attributes ``policy`` (None: no policy element, so the default 'report')."""
    metadata = POLICY.format(attributes=policy) if policy is not None else ""
    path = tmp_path / "node.xml"
    path.write_text(NODE.format(metadata=metadata))
    return node_uri(path)


class FakeGuest:
    """The guest agent of every domain: its CPUs, and the writes made to it."""

    def __init__(self, present: str, online: str, offlinable: str) -> None:
        self.present = parse_cpulist(present)
        self.online = parse_cpulist(online)
        self.offlinable = parse_cpulist(offlinable) if offlinable else frozenset()
        self.writes: list[tuple[str, bool]] = []

    def reply(self, _dom: Domain) -> dict[str, str]:
        return {
            "vcpus": format_cpulist(self.present),
            "online": format_cpulist(self.online),
            "offlinable": format_cpulist(self.offlinable),
        }

    def write(self, _dom: Domain, cpulist: str, online: bool) -> None:
        self.writes.append((cpulist, online))
        cpus = parse_cpulist(cpulist)
        self.online = self.online | cpus if online else self.online - cpus


@pytest.fixture
def guest(monkeypatch: pytest.MonkeyPatch) -> FakeGuest:
    fake = FakeGuest("0-2", "0-2", "1-2")
    monkeypatch.setattr(Capabilities, "guest_agent_api", property(lambda _self: True))
    monkeypatch.setattr(Domain, "guest_vcpus", lambda dom: fake.reply(dom))
    monkeypatch.setattr(Domain, "set_guest_vcpus", lambda dom, cpus, on: fake.write(dom, cpus, on))
    return fake


# --- virsh's option rules --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["--maximum"],  # virsh: --maximum requires --config
        ["--maximum", "--live"],
        ["--maximum", "--current"],
        ["--maximum", "--config", "--live"],  # libvirt: a live maximum cannot change
        ["--maximum", "--config", "--guest"],
        ["--guest", "--config"],  # virsh: --guest and --config are exclusive
        ["--guest", "--current", "--live"],
        ["--guest", "--online"],
        ["--guest", "--force"],
        ["--override-policy"],
    ],
)
def test_option_combinations_virsh_or_libvirt_refuse(options: list[str], capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "2", *options)
    assert result.status == EXIT_USAGE, result.err


# --- --maximum --------------------------------------------------------------------------------


def test_maximum_changes_the_persistent_maximum(capsys: Capsys) -> None:
    result = run_cli(
        capsys, "-c", MIXED, "setvcpus", "stopped-big", "6", "--maximum", "--config", "--json"
    )
    assert result.status == EXIT_OK, result.err
    doc = result.json()
    assert doc["maximum"] and doc["config"] and not doc["live"]
    assert doc["checks"] == [{"layer": "config maximum", "now": "2/6", "target": "-/6", "ok": True}]


def test_maximum_above_the_count_is_no_over_maximum_refusal(capsys: Capsys) -> None:
    """9 vCPUs are over the maximum of 8 for a count, not for a new maximum."""
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "9", "--maximum", "--config")
    assert result.status == EXIT_OK, result.err
    assert result.out.splitlines()[0] == "stopped-big: maximum 8 -> 9 vCPUs (config)"


# --- --hotpluggable ---------------------------------------------------------------------------


def test_hotpluggable_reaches_libvirt_as_its_flag(capsys: Capsys) -> None:
    """The test driver knows no VIR_DOMAIN_VCPU_HOTPLUGGABLE (0x10) and says so, as virsh
    shows it: the flag is passed, and the refusal changes nothing."""
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3", "--hotpluggable")
    assert result.status == EXIT_FAILURE
    assert "unsupported flags (0x10)" in result.err


# --- --guest ----------------------------------------------------------------------------------


def test_guest_offlines_the_highest_cpus_never_cpu0(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys
) -> None:
    uri = node(tmp_path, 'mode="online"')
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", "1", "--guest", "--json")
    assert result.status == EXIT_OK, result.err
    assert guest.writes == [("1-2", False)] and guest.online == {0}
    doc = result.json()
    assert doc["guest"] and doc["checks"] == [
        {"layer": "guest online", "now": "1 (0)", "target": "1", "ok": True}
    ]
    assert any("policy 'online' will online CPU 1-2 again" in n for n in doc["notes"])


def test_guest_onlines_the_lowest_offline_cpus(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys
) -> None:
    guest.online = frozenset({0})
    uri = node(tmp_path, 'mode="match" count="2"')
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", "2", "--guest")
    assert result.status == EXIT_OK, result.err
    assert guest.writes == [("1", True)]
    assert result.out.splitlines()[0] == "web: 1 -> 2 CPUs online in the guest (guest)"


def test_guest_keeps_excluded_cpus_and_refuses_what_it_cannot_reach(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys
) -> None:
    uri = node(tmp_path, 'mode="online" exclude="1"')
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", "1", "--guest")
    assert result.status == EXIT_UNSUPPORTED, result.err
    assert "cannot set 1 CPUs online" in result.err
    assert guest.writes == []


@pytest.mark.parametrize(
    ("count", "why"),
    [
        ("4", "the domain has 3 enabled vCPUs"),  # libvirt: more than the enabled vCPUs
        ("1", "cannot set 1 CPUs online"),  # nothing offlinable
    ],
)
def test_guest_refuses_before_any_change(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys, count: str, why: str
) -> None:
    guest.offlinable = frozenset()
    uri = node(tmp_path, 'mode="online"')
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", count, "--guest")
    assert result.status == EXIT_UNSUPPORTED and why in result.err
    assert guest.writes == []


def test_guest_refuses_more_cpus_than_the_guest_lists(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys
) -> None:
    guest.present = guest.online = frozenset({0, 1})
    guest.offlinable = frozenset({1})
    result = run_cli(
        capsys, "-c", node(tmp_path, 'mode="online"'), "setvcpus", "web", "3", "--guest"
    )
    assert result.status == EXIT_UNSUPPORTED and "the guest lists 2" in result.err
    assert guest.writes == []


@pytest.mark.parametrize("policy", [None, 'mode="report"', 'mode="ignore"'])
def test_guest_leaves_a_report_or_ignore_guest_alone(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys, policy: Optional[str]
) -> None:
    uri = node(tmp_path, policy)
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", "2", "--guest")
    assert result.status == EXIT_UNSUPPORTED and "--override-policy" in result.err
    assert guest.writes == []
    overridden = run_cli(capsys, "-c", uri, "setvcpus", "web", "2", "--guest", "--override-policy")
    assert overridden.status == EXIT_OK, overridden.err
    assert guest.writes == [("2", False)]


def test_guest_with_an_invalid_policy_is_refused(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys
) -> None:
    uri = node(tmp_path, 'mode="sometimes"')
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", "2", "--guest", "--override-policy")
    assert result.status == EXIT_CONFIG and "invalid policy" in result.err
    assert guest.writes == []


def test_guest_needs_a_running_domain_and_a_writable_connection(capsys: Capsys) -> None:
    stopped = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "1", "--guest")
    assert stopped.status == EXIT_NOT_RUNNING
    readonly = run_cli(capsys, "-r", "-c", MIXED, "setvcpus", "hotplug-agent", "1", "--guest")
    assert readonly.status == EXIT_PERMISSION


def test_guest_without_an_agent(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", "1", "--guest")
    assert result.status == EXIT_AGENT
    assert result.err.count("domain 'hotplug-agent'") == 1


# --- the domain's state, as virsh treats it ------------------------------------------------


@pytest.mark.parametrize("options", [["--live"], ["--current"], []])
def test_paused_domain_is_changed_and_its_guest_left_unverified(
    options: list[str], capsys: Capsys
) -> None:
    # libvirt (and so virsh) hot-plugs into a paused domain; its guest runs no code, so the
    # guest layer is reported as not known, not as refused (exit status 11, not 10).
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "paused-agent", "3", *options, "--json")
    assert result.status == EXIT_INCOMPLETE, result.err
    checks = {c["layer"]: c for c in result.json()["checks"]}
    assert checks["live"]["ok"] and checks["hypervisor"]["ok"]
    assert checks["guest present"] == {
        "layer": "guest present",
        "now": "unknown (paused)",
        "target": "3",
        "ok": False,
    }
    assert any("the domain is paused" in note for note in result.json()["notes"])


def test_shut_off_domain_live_is_refused_config_and_current_are_changed(capsys: Capsys) -> None:
    live = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3", "--live")
    assert live.status == EXIT_NOT_RUNNING
    for options in (["--config"], ["--current"]):
        result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3", *options, "--json")
        assert result.status == EXIT_OK, result.err
        assert [c["layer"] for c in result.json()["checks"]] == ["config"]


def test_guest_without_an_agent_channel_says_so_before_any_change(
    tmp_path: Path, guest: FakeGuest, capsys: Capsys
) -> None:
    # virsh: "argument unsupported: QEMU guest agent is not configured".
    uri = node(tmp_path, 'mode="online"')
    path = tmp_path / "node.xml"
    channel = '<channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0"/></channel>'
    path.write_text(path.read_text().replace(channel, ""))
    result = run_cli(capsys, "-c", uri, "setvcpus", "web", "1", "--guest")
    assert result.status == EXIT_AGENT, result.err
    assert "which is not configured: the running domain has no org.qemu.guest_agent.0 channel" in (
        result.err
    )
    assert guest.writes == []
