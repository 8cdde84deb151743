"""The soak's fault schedule: which fault, when and on which lab VM; seeded, scaled to the run.

Each fault kind has a period: how often it comes in an hour-long run. A run of any length
gets ``max(1, duration // period)`` of each kind (so a 5-minute run still sees every kind
once, the rare ones compressed into it), each at a seeded random moment of its own slot of
the run; hot-adds come at random moments throughout. Nothing is scheduled in the first
``LEAD_IN`` seconds (watch has just read every domain) nor in the last ``SETTLE`` seconds
(the last fault's recovery is still checked before the end).

The schedule depends only on the seed, the duration and the targets (``Target``: what a
VM allows), so the same arguments give the same schedule: a failure can be replayed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

LEAD_IN = 20.0
SETTLE = 30.0
HOST = "-"  # the target of a host-wide fault (libvirtd, SIGHUP, the test driver's churn)


@dataclass(frozen=True)
class Target:
    """What the schedule needs to know about one lab VM."""

    name: str
    stack: str
    guest: str  # "busybox" or "debian12"
    control: bool  # the lab's control channel (busybox): agent faults, floods, sysfs reads
    unplug: bool  # the stack completes an unplug (stack 3: a repeated request is accepted)
    saves: bool  # save/restore to a file the stack's QEMU can write (stack 1)


@dataclass(frozen=True)
class FaultKind:
    name: str
    period: float  # seconds between two of this kind in an hour-long run
    eligible: Optional[Callable[[Target], bool]]  # None: a host-wide fault, no VM


def _any(_target: Target) -> bool:
    return True


def _busybox(target: Target) -> bool:
    return target.control


def _fast_boot(target: Target) -> bool:
    # A Debian guest boots for one to several minutes under TCG; a busybox guest in seconds.
    return target.control


def _debian(target: Target) -> bool:
    return not target.control


def _onlines_out_of_order(target: Target) -> bool:
    # Not on stack 1: after a vCPU is plugged out of order there (QEMU 7.2 under TCG), the
    # guest hangs onlining the next CPU plugged (busybox and Debian 12 alike, its agent call
    # and the lab's control channel unanswered for minutes), whoever onlines it; CPUs plugged
    # in order online in half a second there, and out of order on stacks 2 and 3.
    return target.stack != "stack1"


KINDS: tuple[FaultKind, ...] = (
    FaultKind("setvcpu-out-of-order", 240, _onlines_out_of_order),
    FaultKind("unplug", 300, lambda t: t.unplug),
    FaultKind("suspend-resume", 240, _any),
    FaultKind("save-restore", 420, lambda t: t.saves),
    FaultKind("managedsave", 420, _any),
    # busybox has no ACPI or agent reboot (its shutdown powers off); a Debian guest has both.
    FaultKind("reboot", 1200, _debian),
    FaultKind("reset", 420, _fast_boot),
    FaultKind("destroy-start", 360, _fast_boot),
    FaultKind("transient-undefine-define", 420, _any),
    FaultKind("agent-kill", 300, _busybox),
    FaultKind("agent-hang", 360, _busybox),
    FaultKind("agent-restart", 360, _busybox),
    FaultKind("policy-change", 240, _any),
    FaultKind("sighup-config-change", 360, None),
    FaultKind("libvirtd-restart", 600, None),
    # Only into a private libvirtd (stacks 2 and 3): a flood may wedge the daemon it reaches.
    FaultKind("ost-flood", 1200, lambda t: t.control and t.stack != "stack1"),
)
HOTADD = "hot-add"
HOTADD_PERIOD = 25.0  # on average, across all VMs
KIND_NAMES = (HOTADD, *(kind.name for kind in KINDS))


@dataclass(frozen=True)
class Step:
    at: float  # seconds after the schedule's start
    kind: str
    target: str  # a VM's name, or HOST

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build(seed: int, duration: float, targets: list[Target]) -> list[Step]:
    """The steps of a run of ``duration`` seconds, in time order."""
    if not targets:
        raise ValueError("a soak needs at least one lab VM")
    rng = random.Random(seed)
    start, end = LEAD_IN, max(LEAD_IN + 1.0, duration - SETTLE)
    steps = [_hotadd(rng, start, end, targets) for _ in range(_count(end - start, HOTADD_PERIOD))]
    for kind in KINDS:
        eligible = [t for t in targets if kind.eligible is None or kind.eligible(t)]
        if kind.eligible is not None and not eligible:
            continue  # e.g. no stack here completes an unplug
        count = _count(end - start, kind.period)
        slot = (end - start) / count
        for index in range(count):
            at = start + slot * (index + rng.uniform(0.05, 0.95))
            target = rng.choice(eligible).name if kind.eligible is not None else HOST
            steps.append(Step(round(at, 3), kind.name, target))
    return sorted(steps, key=lambda s: (s.at, s.kind, s.target))


def _count(span: float, period: float) -> int:
    return max(1, int(span // period))


def _hotadd(rng: random.Random, start: float, end: float, targets: list[Target]) -> Step:
    return Step(round(rng.uniform(start, end), 3), HOTADD, rng.choice(targets).name)


def kinds_in(steps: list[Step]) -> set[str]:
    return {s.kind for s in steps}
