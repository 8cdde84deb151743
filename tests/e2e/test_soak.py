"""The soak (bench/soak.py) for five minutes: one ``watch`` over lab VMs on the three stacks
and 1,000 churning test-driver domains, every fault kind of the schedule at least once, every
invariant held and every pass criterion met (``make soak`` runs the same for an hour).

Run only with ``VIRTHOTPLUG_SOAK_TEST=1`` for now: its last run in the full tier left stack 3's
libvirtd unanswering and never ended, which is not understood yet; ``make soak`` runs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak
from soak_schedule import KIND_NAMES
from soak_series import criteria_table

MINUTES = 5.0

pytestmark = pytest.mark.skipif(
    os.environ.get("VIRTHOTPLUG_SOAK_TEST") != "1",
    reason="the 5-minute soak runs with VIRTHOTPLUG_SOAK_TEST=1 (or make soak)",
)


def test_five_minute_soak_holds_every_invariant(tmp_path: Path) -> None:
    result = soak.run(soak.Options(minutes=MINUTES, seed=23, out=tmp_path))
    print(criteria_table(result.criteria))
    print(f"results: {result.path}; plot: {result.plot}")
    assert result.kinds_done == set(KIND_NAMES)
    violations = [f"{v.t:.0f} s {v.invariant} {v.target}: {v.message}" for v in result.violations]
    assert not violations, "\n".join(violations)
    assert all(c.passed for c in result.criteria), criteria_table(result.criteria)
