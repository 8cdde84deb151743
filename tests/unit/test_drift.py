"""Tests for virthotplug.core.drift: each finding code, its severity and when it appears."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from virthotplug.core import drift
from virthotplug.core.policy import Policy
from virthotplug.core.view import (
    AGENT_BAD_REPLY,
    AGENT_CONNECTED,
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_CONNECTED,
    AGENT_NOT_QUERIED,
    AGENT_UNRESPONSIVE,
    AGENT_UNSUPPORTED,
    CRITICAL,
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_TIMEOUT,
    INFO,
    WARNING,
    AgentStatus,
    CountLayer,
    Finding,
    GuestLayer,
    History,
    HistoryEntry,
    HypervisorLayer,
    VcpuView,
)


def guest(present: str, online: Optional[str] = None) -> GuestLayer:
    """A guest layer from compact id strings: ``guest("0-3", "0-1")``."""

    def ids(text: str) -> frozenset[int]:
        result: set[int] = set()
        for part in filter(None, text.split(",")):
            first, _, last = part.partition("-")
            result.update(range(int(first), int(last or first) + 1))
        return frozenset(result)

    present_ids = ids(present)
    online_ids = present_ids if online is None else ids(online)
    return GuestLayer(present=present_ids, online=online_ids, offlinable=present_ids - {0})


def view(
    *,
    config: Optional[tuple[int, int]] = (2, 4),
    live: Optional[tuple[int, int]] = (2, 4),
    hypervisor: Optional[int] = -1,
    agent: str = AGENT_CONNECTED,
    agent_error: Optional[str] = None,
    guest_layer: Optional[GuestLayer] = None,
    state: str = "running",
) -> VcpuView:
    """A running, consistent view by default; ``hypervisor=-1`` means "as many as live"."""
    live_layer = CountLayer(*live) if live is not None else None
    if hypervisor == -1:
        hypervisor = live_layer.current if live_layer is not None else None
    if guest_layer is None and agent == AGENT_CONNECTED and live_layer is not None:
        guest_layer = guest(f"0-{live_layer.current - 1}")
    return VcpuView(
        host="test:///default",
        name="d1",
        uuid="3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01",
        state=state,
        persistent=config is not None,
        agent=AgentStatus(configured=agent != AGENT_NOT_CONFIGURED, state=agent, error=agent_error),
        domain_id=1 if live_layer is not None else None,
        config=CountLayer(*config) if config is not None else None,
        live=live_layer,
        hypervisor=(
            HypervisorLayer({i: "running" for i in range(hypervisor)})
            if hypervisor is not None
            else None
        ),
        guest=guest_layer,
    )


def codes(v: VcpuView) -> list[str]:
    return [f.code for f in drift.find_drift(v)]


def only(v: VcpuView, code: str) -> Finding:
    found = [f for f in drift.find_drift(v) if f.code == code]
    assert len(found) == 1, drift.find_drift(v)
    return found[0]


def test_codes_are_stable() -> None:
    assert drift.ALL_CODES == (
        "guest-cpu-offline",
        "guest-missing-vcpus",
        "guest-extra-vcpus",
        "config-live-mismatch",
        "hypervisor-live-mismatch",
        "agent-not-configured",
        "agent-not-connected",
        "agent-unresponsive",
        "agent-bad-reply",
        "agent-unsupported",
        "domain-not-running",
        "guest-cpu-kept-offline",
        "guest-rejected-vcpu",
        "match-unreachable",
        "ost-flood",
        "invalid-policy",
        "unplug-pending",
    )


def test_clean_running_domain_has_no_findings() -> None:
    assert drift.find_drift(view()) == ()


def test_clean_full_domain_has_no_findings() -> None:
    assert drift.find_drift(view(config=(4, 4), live=(4, 4))) == ()


def test_transient_domain_without_config_layer() -> None:
    assert drift.find_drift(view(config=None)) == ()


def test_guest_cpu_offline() -> None:
    # The problem virthotplug exists for: hot-added, detected, never onlined.
    finding = only(
        view(live=(4, 4), config=(4, 4), guest_layer=guest("0-3", "0-1")), "guest-cpu-offline"
    )
    assert finding.severity == WARNING
    assert finding.cpus == (2, 3)
    assert "2-3" in finding.message
    assert "\n" not in finding.message


def test_guest_cpu_offline_sparse() -> None:
    finding = only(view(live=(3, 4), guest_layer=guest("0-2", "0,2")), "guest-cpu-offline")
    assert finding.cpus == (1,)


def test_config_live_mismatch_is_info() -> None:
    finding = only(view(config=(1, 4), live=(3, 4)), "config-live-mismatch")
    assert finding.severity == INFO
    assert "3" in finding.message and "1" in finding.message
    assert "next cold boot" in finding.message


def test_guest_missing_vcpus_without_history_names_both_causes() -> None:
    # libvirt counts 2, the guest only has cpu0, and nothing is on record: a stale unplug
    # and a hot-add the guest did not take look the same from the layers alone.
    v = view(config=(2, 4), live=(2, 4), guest_layer=guest("0"))
    finding = only(v, "guest-missing-vcpus")
    assert finding.severity == CRITICAL
    assert "counts 2 live vCPUs but the guest has only 1 (0)" in finding.message
    assert "an unplug libvirt gave up on" in finding.message
    assert "did not take a hot-added vCPU" in finding.message
    assert "guest-extra-vcpus" not in codes(v)
    assert "guest-cpu-offline" not in codes(v)


def test_guest_missing_vcpus_after_a_recorded_stale_unplug() -> None:
    history = History().add(HistoryEntry(HISTORY_UNPLUG_TIMEOUT, 1, 10.0, "setvcpus"))
    history = history.add(HistoryEntry(HISTORY_EJECTED, 1, 10.2, "ost"))
    v = dataclasses.replace(view(live=(2, 4), guest_layer=guest("0")), history=history)
    finding = only(v, "guest-missing-vcpus")
    assert finding.severity == CRITICAL
    assert "vcpu1: libvirt's unplug timed out; QEMU reported it ejected (ost)" in finding.message
    assert "virthotplug setvcpus d1 1" in finding.message
    assert "did not take" not in finding.message


def test_guest_rejected_vcpu_from_history() -> None:
    # Debian 13 under TCG: OST said success, the guest lists only cpu0.
    history = History().add(HistoryEntry(HISTORY_REJECTED, 1, 10.0, "watch"))
    v = dataclasses.replace(view(live=(2, 4), guest_layer=guest("0")), history=history)
    finding = only(v, "guest-rejected-vcpu")
    assert finding.severity == WARNING
    assert finding.message.startswith("vcpu1 was hot-added and QEMU's OST said")
    assert "6.12.75" in finding.message and "nr_cpus=" in finding.message
    assert "\n" not in finding.message
    assert "guest-missing-vcpus" not in codes(v)


def test_a_plug_after_an_unplug_starts_the_vcpu_over() -> None:
    history = History().add(HistoryEntry(HISTORY_EJECTED, 1, 10.0, "ost"))
    history = history.add(HistoryEntry(HISTORY_PLUGGED, 1, 20.0, "ost"))
    assert drift.gone_text(history, 1) == "no unplug on record"
    history = history.add(HistoryEntry(HISTORY_EJECTED, 1, 30.0, "device-deleted"))
    assert drift.gone_text(history, 1) == "QEMU reported it ejected (device-deleted)"


def test_a_rejection_explains_only_its_own_vcpu() -> None:
    history = History().add(HistoryEntry(HISTORY_REJECTED, 2, 10.0, "watch"))
    v = dataclasses.replace(
        view(config=(3, 4), live=(3, 4), guest_layer=guest("0")), history=history
    )
    assert codes(v) == ["guest-rejected-vcpu", "guest-missing-vcpus"]


# --- the effective policy ---------------------------------------------------------------


def found(v: VcpuView, policy: Policy, settling: bool = False) -> list[tuple[str, str]]:
    return [(f.code, f.severity) for f in drift.find_drift(v, policy, settling=settling)]


def test_match_count_keeps_cpus_offline_on_purpose() -> None:
    v = view(live=(4, 4), config=(4, 4), guest_layer=guest("0-3", "0-1"))
    assert found(v, Policy(mode="match", count=2)) == [("guest-cpu-kept-offline", INFO)]


def test_match_below_target_still_warns_about_the_cpus_it_will_online() -> None:
    v = view(live=(4, 4), config=(4, 4), guest_layer=guest("0-3", "0"))
    f = drift.find_drift(v, Policy(mode="match", count=2))
    assert [(x.code, x.severity, x.cpus) for x in f] == [
        ("guest-cpu-offline", WARNING, (1,)),
        ("guest-cpu-kept-offline", INFO, (2, 3)),
    ]


def test_excluded_cpus_are_info() -> None:
    v = view(live=(4, 4), config=(4, 4), guest_layer=guest("0-3", "0-2"))
    policy = Policy(mode="online", exclude=frozenset({3}))
    finding = [f for f in drift.find_drift(v, policy) if f.code == "guest-cpu-kept-offline"]
    assert finding[0].severity == INFO and "exclude 3" in finding[0].message
    assert "guest-cpu-offline" not in [f.code for f in drift.find_drift(v, policy)]


def test_ignore_keeps_every_offline_cpu_as_info() -> None:
    v = view(live=(4, 4), config=(4, 4), guest_layer=guest("0-3", "0"))
    assert found(v, Policy(mode="ignore")) == [("guest-cpu-kept-offline", INFO)]


def test_report_still_warns() -> None:
    v = view(live=(4, 4), config=(4, 4), guest_layer=guest("0-3", "0"))
    assert found(v, Policy(mode="report")) == [("guest-cpu-offline", WARNING)]


def test_unreachable_match_target_is_a_warning() -> None:
    # match --count 2 with one CPU present used to be silent.
    v = view(live=(1, 4), config=(1, 4), guest_layer=guest("0"))
    assert found(v, Policy(mode="match", count=2)) == [("match-unreachable", WARNING)]
    finding = only_with(v, Policy(mode="match", count=2), "match-unreachable")
    assert "the guest has only 1 CPUs present" in finding.message


def test_reachable_match_target_is_silent() -> None:
    v = view(live=(2, 4), guest_layer=guest("0-1", "0"))
    assert found(v, Policy(mode="match", count=2)) == [("guest-cpu-offline", WARNING)]
    assert found(view(live=(2, 4)), Policy(mode="match")) == []


def test_settling_caps_guest_dependent_findings_at_warning() -> None:
    # Right after a resume the guest has not yet handled a hot-add made while paused.
    v = view(live=(2, 4), guest_layer=guest("0"))
    assert ("guest-missing-vcpus", WARNING) in found(v, Policy(), settling=True)
    assert ("guest-missing-vcpus", CRITICAL) in found(v, Policy())
    bad = view(agent=AGENT_BAD_REPLY)
    assert ("agent-bad-reply", CRITICAL) in found(bad, Policy(), settling=True)


def only_with(v: VcpuView, policy: Policy, code: str) -> Finding:
    matches = [f for f in drift.find_drift(v, policy) if f.code == code]
    assert len(matches) == 1
    return matches[0]


def test_guest_extra_vcpus() -> None:
    finding = only(view(live=(2, 4), guest_layer=guest("0-3")), "guest-extra-vcpus")
    assert finding.severity == WARNING
    assert finding.cpus == (2, 3)
    assert "the guest has 4 CPUs but libvirt counts 2" in finding.message


def test_hypervisor_live_mismatch() -> None:
    finding = only(view(live=(3, 4), config=(3, 4), hypervisor=2), "hypervisor-live-mismatch")
    assert finding.severity == WARNING
    assert "libvirt counts 3 live vCPUs but lists 2 in its per-vCPU states" in finding.message


def test_no_hypervisor_layer_is_not_a_mismatch() -> None:
    assert drift.find_drift(view(hypervisor=None)) == ()


def test_agent_not_configured_on_a_domain_that_can_grow_is_a_warning() -> None:
    finding = only(view(live=(2, 4), agent=AGENT_NOT_CONFIGURED), "agent-not-configured")
    assert finding.severity == WARNING


def test_agent_not_configured_on_a_full_domain_is_info() -> None:
    v = view(config=(4, 4), live=(4, 4), agent=AGENT_NOT_CONFIGURED)
    assert only(v, "agent-not-configured").severity == INFO
    assert v.guest is None
    assert codes(v) == ["agent-not-configured"]


@pytest.mark.parametrize(
    ("state", "code", "severity"),
    [
        (AGENT_NOT_CONNECTED, "agent-not-connected", WARNING),
        (AGENT_UNRESPONSIVE, "agent-unresponsive", WARNING),
        (AGENT_BAD_REPLY, "agent-bad-reply", CRITICAL),
        (AGENT_UNSUPPORTED, "agent-unsupported", INFO),
    ],
)
def test_agent_failures(state: str, code: str, severity: str) -> None:
    v = view(agent=state, agent_error="domain 'd1': it went wrong")
    finding = only(v, code)
    assert finding.severity == severity
    assert "the guest layer is unknown" in finding.message
    assert finding.message.endswith(": domain 'd1': it went wrong")
    assert codes(v) == [code]


def test_agent_failure_without_error_text() -> None:
    finding = only(view(agent=AGENT_UNRESPONSIVE), "agent-unresponsive")
    assert finding.message.endswith("the guest layer is unknown")


def test_agent_not_queried_is_not_a_finding() -> None:
    # Paused domains, and agents nobody asked: no guest layer, nothing to report.
    assert drift.find_drift(view(agent=AGENT_NOT_QUERIED, state="paused")) == ()


@pytest.mark.parametrize("state", ["shut off", "crashed", "pmsuspended"])
def test_domain_not_running(state: str) -> None:
    v = view(live=None, hypervisor=None, agent=AGENT_NOT_QUERIED, state=state)
    findings = drift.find_drift(v)
    assert [(f.code, f.severity) for f in findings] == [("domain-not-running", INFO)]
    assert state in findings[0].message


def test_inactive_domain_reports_nothing_else() -> None:
    v = view(config=(1, 8), live=None, hypervisor=None, agent=AGENT_NOT_CONFIGURED)
    assert codes(v) == ["domain-not-running"]


def test_order_is_most_fundamental_first() -> None:
    v = view(
        config=(1, 4),
        live=(3, 4),
        hypervisor=2,
        guest_layer=guest("0-1", "0"),
    )
    assert codes(v) == [
        "config-live-mismatch",
        "hypervisor-live-mismatch",
        "guest-missing-vcpus",
        "guest-cpu-offline",
    ]


def test_every_emitted_code_is_declared() -> None:
    rejected = History().add(HistoryEntry(HISTORY_REJECTED, 1, 1.0, "watch"))
    samples = [
        dataclasses.replace(view(live=(2, 4), guest_layer=guest("0")), history=rejected),
        view(config=(1, 4), live=(3, 4), hypervisor=2, guest_layer=guest("0-3", "0")),
        view(live=(3, 4), guest_layer=guest("0")),
        view(agent=AGENT_NOT_CONFIGURED),
        view(agent=AGENT_BAD_REPLY),
        view(live=None, hypervisor=None),
    ]
    emitted = {code for sample in samples for code in codes(sample)}
    emitted |= {c for c, _ in found(samples[2], Policy(mode="match", count=1))}
    emitted |= {c for c, _ in found(samples[2], Policy(mode="match", count=4))}
    assert emitted <= set(drift.ALL_CODES)
