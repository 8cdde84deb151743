"""How libvirt reports the guest agent's troubles: the failures virthotplug has to classify.

The agent is driven from the host through the lab's own control channel, never through
qemuAgentCommand (which would taint the domain).
"""

from __future__ import annotations

import time

import libvirt
import pytest
from domains import AGENT_STOPPED
from lab import AgentCallError, AgentTimeout, LabVM, VMFactory

# libvirt waits this long for guest-sync before declaring an unsynced agent unavailable.
GUEST_SYNC_TIMEOUT = 5.0


def timed_failure(vm: LabVM, timeout: float = 10.0) -> tuple[float, AgentCallError]:
    started = time.monotonic()
    with pytest.raises(AgentCallError) as failure:
        vm.guest_vcpus(timeout=timeout)
    return time.monotonic() - started, failure.value


def test_no_agent_channel_is_not_configured(vm_noagent_channel: LabVM) -> None:
    elapsed, error = timed_failure(vm_noagent_channel)

    assert error.code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
    assert "not configured" in error.message
    assert elapsed < 1.0
    assert vm_noagent_channel.agent_channel_state() is None


def test_channel_without_agent_is_not_connected(vm_agent_not_running: LabVM) -> None:
    elapsed, error = timed_failure(vm_agent_not_running)

    assert error.code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
    assert "not connected" in error.message
    assert elapsed < 1.0
    assert vm_agent_not_running.agent_channel_state() == "disconnected"


def test_stopped_agent_fails_at_once_and_comes_back(vm_agent_control: LabVM) -> None:
    vm = vm_agent_control
    vm.control_ok("agent-stop")
    vm.wait_agent_channel("disconnected")

    elapsed, error = timed_failure(vm)
    assert error.code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
    assert elapsed < 1.0

    vm.control_ok("agent-start")
    vm.wait_agent(30)
    assert vm.guest_vcpus().vcpus == {0}
    assert vm.taints() == []


def test_hung_unsynced_agent_fails_after_guest_sync_timeout(vm_agent_control: LabVM) -> None:
    # A freshly connected agent is not yet in sync: libvirt sends guest-sync first. Seeing
    # the channel go down and up again proves libvirt has dropped the old agent's sync.
    vm = vm_agent_control
    vm.control_ok("agent-stop")
    vm.wait_agent_channel("disconnected")
    vm.control_ok("agent-start")
    vm.wait_agent_channel("connected")
    vm.control_ok("agent-hang")

    elapsed, error = timed_failure(vm, timeout=GUEST_SYNC_TIMEOUT * 3)
    assert error.code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
    assert "not available" in error.message
    # libvirt's own timeout, plus slack for a loaded host.
    assert GUEST_SYNC_TIMEOUT - 0.5 < elapsed < GUEST_SYNC_TIMEOUT + 4.0

    vm.control_ok("agent-cont")
    assert vm.guest_vcpus().vcpus == {0}
    assert vm.taints() == []


def test_hung_synced_agent_blocks_until_continued(vm_agent_control: LabVM) -> None:
    # Once in sync (the fixture's readiness check made a call), libvirt sends the command
    # with no timeout of its own: the caller must bound the wait.
    vm = vm_agent_control
    vm.control_ok("agent-hang")

    with pytest.raises(AgentTimeout):
        vm.guest_vcpus(timeout=GUEST_SYNC_TIMEOUT + 3.0)

    vm.control_ok("agent-cont")
    vm.wait_agent(30)
    assert vm.guest_vcpus().vcpus == {0}
    assert vm.taints() == []


def test_restarted_agent_answers_again(vm_agent_control: LabVM) -> None:
    vm = vm_agent_control
    before = vm.agent_status()

    vm.control_ok("agent-restart")

    assert vm.agent_status() != before
    vm.wait_agent(30)
    assert vm.guest_vcpus().online == {0}
    assert vm.taints() == []


def test_agent_held_down_at_boot_starts_on_request(make_vm: VMFactory) -> None:
    vm = make_vm(AGENT_STOPPED)
    _, error = timed_failure(vm)
    assert error.code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE

    vm.control_ok("agent-start")

    vm.wait_agent(30)
    assert vm.guest_vcpus().vcpus == {0}
