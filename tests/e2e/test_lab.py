"""The lab's own guarantees: cleanup of leftovers, a cached guest, channels without taint."""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from pathlib import Path

from domains import NO_AGENT_CHANNEL, DomainSpec, domain_xml
from guest import ensure_image
from lab import LOCK_DIR, PREFIX, Lab, LabVM


def define_stray(lab: Lab, run_id: str) -> str:
    name = f"{PREFIX}-{run_id}-1-stray"
    spec = DomainSpec(name, lab.image.kernel, lab.image.initrd, Path("/dev/null"))
    lab.conn.defineXML(domain_xml(spec))
    return name


def domain_names(lab: Lab) -> set[str]:
    return {dom.name() for dom in lab.conn.listAllDomains(0)}


def test_sweep_removes_leftovers_of_dead_runs_only(lab: Lab, vm_noagent_channel: LabVM) -> None:
    dead = define_stray(lab, secrets.token_hex(3))
    live_id = secrets.token_hex(3)
    lock = LOCK_DIR / f"{live_id}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        live = define_stray(lab, live_id)

        removed = lab.sweep()

        assert dead in removed
        assert live not in removed and live in domain_names(lab)
        assert vm_noagent_channel.name in domain_names(lab)
    finally:
        os.close(fd)
        lab.sweep()
    assert live not in domain_names(lab)
    assert not lock.exists()


def test_guest_image_is_cached(lab: Lab) -> None:
    started = time.monotonic()
    mtime = lab.image.initrd.stat().st_mtime

    image = ensure_image()

    assert image == lab.image
    assert image.initrd.stat().st_mtime == mtime
    assert time.monotonic() - started < 10


def test_control_channel_works_without_agent(vm_noagent_channel: LabVM) -> None:
    assert vm_noagent_channel.behaviour == NO_AGENT_CHANNEL
    assert vm_noagent_channel.control("ping") == "pong"
    assert vm_noagent_channel.agent_status() == "stopped"
    state = vm_noagent_channel.cpu_state()
    assert state.present == {0} and state.online == {0}
    assert vm_noagent_channel.taints() == []
