"""The soak's pure parts: its seeded fault schedule (bench/soak_schedule.py) and its pass
criteria (bench/soak_series.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak_schedule
import soak_series
from soak_schedule import HOST, KIND_NAMES, Target, build

TARGETS = [
    Target("s1-on", "stack1", "busybox", True, False, True),
    Target("s1-deb", "stack1", "debian12", False, False, True),
    Target("s2-match", "stack2", "busybox", True, False, False),
    Target("s3-on", "stack3", "busybox", True, True, False),
]
BY_NAME = {t.name: t for t in TARGETS}


def test_a_five_minute_run_has_every_fault_kind() -> None:
    steps = build(7, 300, TARGETS)
    assert soak_schedule.kinds_in(steps) == set(KIND_NAMES)
    assert all(soak_schedule.LEAD_IN <= s.at <= 300 - soak_schedule.SETTLE for s in steps)
    assert [s.at for s in steps] == sorted(s.at for s in steps)


def test_an_hour_has_the_periods_of_an_hour() -> None:
    steps = build(7, 3600, TARGETS)
    count = {k: sum(1 for s in steps if s.kind == k) for k in KIND_NAMES}
    assert count["libvirtd-restart"] == 5  # every 10 minutes, lead-in and settling left out
    assert count["ost-flood"] == 2  # every 20 minutes
    assert count["hot-add"] == int((3600 - 50) // soak_schedule.HOTADD_PERIOD)


def test_the_same_seed_gives_the_same_schedule_another_seed_another() -> None:
    assert build(3, 600, TARGETS) == build(3, 600, TARGETS)
    assert build(3, 600, TARGETS) != build(4, 600, TARGETS)


def test_each_fault_goes_only_where_the_vm_allows_it() -> None:
    for step in build(11, 3600, TARGETS):
        if step.kind in ("libvirtd-restart", "sighup-config-change"):
            assert step.target == HOST
            continue
        target = BY_NAME[step.target]
        if step.kind == "unplug":
            assert target.unplug
        if step.kind == "save-restore":
            assert target.saves
        if step.kind == "ost-flood":
            assert target.control and target.stack != "stack1"
        if step.kind.startswith("agent-") or step.kind in ("reset", "destroy-start"):
            assert target.control
        if step.kind == "reboot":
            assert not target.control


def test_a_kind_no_vm_allows_is_left_out() -> None:
    steps = build(7, 300, [TARGETS[0]])
    kinds = soak_schedule.kinds_in(steps)
    assert "unplug" not in kinds and "reboot" not in kinds and "ost-flood" not in kinds
    assert "hot-add" in kinds


def sample(t: float, rss: float, fds: int = 20, threads: int = 9) -> soak_series.Sample:
    return soak_series.Sample(t, rss, fds, threads, 0.0, None, 0.0, None, None)


def test_a_flat_run_passes_and_a_leak_fails() -> None:
    flat = [sample(t, 40.0 + (0.05 if t % 20 else 0.0)) for t in range(0, 1800, 10)]
    found = {c.name: c for c in soak_series.criteria(flat, 1800, [0.4, 0.6, 1.1])}
    assert all(c.passed for c in found.values()), found
    leaking = [sample(t, 40.0 + t / 3600 * 3, fds=20 + t // 150) for t in range(0, 1800, 10)]
    found = {c.name: c for c in soak_series.criteria(leaking, 1800, [0.4, 2.5] * 50)}
    assert not found["rss_slope_mib_per_h"].passed
    assert found["rss_slope_mib_per_h"].value is not None
    assert abs(found["rss_slope_mib_per_h"].value - 3.0) < 0.01
    assert not found["fds_growth"].passed and found["threads_growth"].passed
    assert not found["hotadd_online_p99_s"].passed


def test_the_warm_up_is_not_judged() -> None:
    # Growth during the first minute (the first resyncs) only.
    samples = [sample(t, 30.0 + min(t, 360) / 36) for t in range(0, 1800, 10)]
    (slope, *_) = soak_series.criteria(samples, 1800, [0.5])
    assert slope.passed and slope.value == 0.0


def test_a_short_run_bounds_the_growth_instead_of_the_slope() -> None:
    noisy = [sample(t, 60.0 + (t % 60) / 20) for t in range(0, 300, 10)]  # +-3 MiB, no leak
    (rss, *_) = soak_series.criteria(noisy, 300, [0.5])
    assert rss.name == "rss_growth_mib" and rss.passed
    leaking = [sample(t, 60.0 + t / 10) for t in range(0, 300, 10)]  # 24 MiB in 4 minutes
    (rss, *_) = soak_series.criteria(leaking, 300, [0.5])
    assert not rss.passed


def test_no_measurement_is_no_pass() -> None:
    assert not any(c.passed for c in soak_series.criteria([], 300, []))


def test_percentile() -> None:
    assert soak_series.percentile(list(range(1, 101)), 99) == 99
    assert soak_series.percentile([3.0], 99) == 3.0
    assert soak_series.percentile([], 99) is None


def test_findings_agree_leaves_out_what_only_watch_can_know() -> None:
    import soak_checks

    doc = {
        "live": {"current": 3},
        "guest": {"online": [0], "present": [0, 1, 2]},
        "findings": [{"code": "guest-cpu-offline"}],
    }
    seen = {"live": 3, "online": 1, "findings": {"guest-cpu-offline", "ost-flood"}}
    assert soak_checks.findings_agree(seen, doc)
    assert not soak_checks.findings_agree({**seen, "online": 3}, doc)
    assert not soak_checks.findings_agree({**seen, "findings": {"ost-flood"}}, doc)
