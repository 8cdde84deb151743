"""``policy``, ``apply`` and ``setvcpus`` against libvirt's test driver, plus ``reconcile()``.

The test driver keeps metadata (so ``policy --set`` round-trips) but has no guest agent:
every agent call is unsupported, so plans are no-ops with a reason and nothing is written.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from tdriver import MIXED, run_cli

from virthotplug.core.config import HostConfig
from virthotplug.core.errors import (
    EXIT_CONFIG,
    EXIT_INCOMPLETE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
)
from virthotplug.core.judge import Observations
from virthotplug.host.connection import Connection
from virthotplug.host.policysource import (
    SOURCE_LIVE,
    SOURCE_PERSISTENT,
    effective_policy,
    metadata_layer,
    write_policy,
)
from virthotplug.ops.reconcile import ReconcileResult, reconcile

Capsys = pytest.CaptureFixture[str]


def config_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "virthotplug.conf"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return str(path)


# --- policy: show -----------------------------------------------------------------------------


def test_policy_shows_metadata_values_and_sources(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", "hotplug-agent")
    assert result.status == EXIT_OK
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in result.out.splitlines()[1:]}
    assert rows["mode"] == ["online", SOURCE_LIVE]
    assert rows["grace"] == ["1.5", SOURCE_LIVE]
    assert rows["exclude"] == ["3", SOURCE_LIVE]
    assert rows["count"] == ["-", "default"]
    assert rows["retries"] == ["3", "default"]


def test_policy_json(capsys: Capsys) -> None:
    doc = run_cli(capsys, "-c", MIXED, "policy", "fixed-noagent", "--json").json()
    assert doc["domain"] == "fixed-noagent"
    assert doc["policy"]["mode"] == {"value": "report", "source": "default"}
    assert doc["policy"]["exclude"] == {"value": "", "source": "default"}


def test_policy_invalid_metadata_names_domain_and_source(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", "bad-metadata")
    assert result.status == EXIT_CONFIG
    assert "'bad-metadata'" in result.err and SOURCE_LIVE in result.err
    assert "mode='sometimes'" in result.err


def test_policy_from_config_file_with_sources(capsys: Capsys, tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        "[defaults]\nretries = 5\ngrace = 3\n\n[domain:*-noagent]\nmode = match\ncount = 2\n",
    )
    doc = run_cli(
        capsys, "--config-file", path, "-c", MIXED, "policy", "fixed-noagent", "--json"
    ).json()["policy"]
    assert doc["mode"] == {"value": "match", "source": f"config {path}: [domain:*-noagent]"}
    assert doc["count"] == {"value": 2, "source": f"config {path}: [domain:*-noagent]"}
    assert doc["retries"] == {"value": 5, "source": f"config {path}: [defaults]"}
    # Metadata wins over the file, field by field.
    doc = run_cli(
        capsys, "--config-file", path, "-c", MIXED, "policy", "hotplug-agent", "--json"
    ).json()["policy"]
    assert doc["mode"]["source"] == SOURCE_LIVE and doc["grace"]["value"] == 1.5
    assert doc["retries"] == {"value": 5, "source": f"config {path}: [defaults]"}


def test_config_file_writable_by_others_is_refused(capsys: Capsys, tmp_path: Path) -> None:
    path = config_file(tmp_path, "[defaults]\nmode = online\n", mode=0o666)
    result = run_cli(capsys, "--config-file", path, "-c", MIXED, "policy", "fixed-noagent")
    assert result.status == EXIT_CONFIG and "writable by group or others" in result.err


def test_missing_named_config_file_is_an_error(capsys: Capsys, tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.conf")
    result = run_cli(capsys, "--config-file", missing, "-c", MIXED, "apply", "--all")
    assert result.status == EXIT_CONFIG and "not found" in result.err


# --- policy: set / clear ---------------------------------------------------------------------


def test_policy_set_writes_metadata_and_reads_it_back(capsys: Capsys) -> None:
    result = run_cli(
        capsys,
        "-c",
        MIXED,
        "policy",
        "fixed-noagent",
        "--set",
        "match",
        "--count",
        "2",
        "--exclude",
        "3,1-2",
        "--grace",
        "0.50",
        "--json",
    )
    assert result.status == EXIT_OK, result.err
    doc = result.json()["policy"]
    assert doc["mode"] == {"value": "match", "source": SOURCE_LIVE}
    assert doc["count"]["value"] == 2 and doc["grace"]["value"] == 0.5
    assert doc["exclude"] == {"value": "1-3", "source": SOURCE_LIVE}
    assert doc["retries"]["source"] == "default"


def test_policy_set_round_trip_live_and_persistent() -> None:
    with Connection(MIXED) as conn:
        dom = conn.lookup("fixed-noagent")
        write_policy(conn, dom, {"mode": "online"}, live=False, config=True)
        assert metadata_layer(conn, dom) == (SOURCE_PERSISTENT, {"mode": "online"})
        write_policy(conn, dom, {"mode": "ignore", "grace": "2"}, live=True, config=False)
        assert metadata_layer(conn, dom) == (SOURCE_LIVE, {"mode": "ignore", "grace": "2"})
        effective = effective_policy(conn, dom, HostConfig())
        assert effective.policy.mode == "ignore" and effective.sources["mode"] == SOURCE_LIVE
        write_policy(conn, dom, None, live=True, config=True)
        assert metadata_layer(conn, dom) is None
        assert effective_policy(conn, dom, HostConfig()).sources["mode"] == "default"


def test_policy_clear(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", "hotplug-agent", "--clear", "--json")
    assert result.status == EXIT_OK, result.err
    assert result.json()["policy"]["mode"] == {"value": "report", "source": "default"}


def test_policy_set_validates_before_writing(capsys: Capsys) -> None:
    result = run_cli(
        capsys, "-c", MIXED, "policy", "fixed-noagent", "--set", "online", "--grace", "-1"
    )
    assert result.status == EXIT_CONFIG and "grace" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ("--count", "2"),  # values without --set
        ("--live",),
        ("--set", "online", "--count", "2"),  # count only for match
        ("--clear", "--grace", "1"),
    ],
)
def test_policy_usage_errors(capsys: Capsys, argv: tuple[str, ...]) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", "fixed-noagent", *argv)
    assert result.status == EXIT_USAGE


def test_policy_set_unknown_mode_is_refused_by_the_parser(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "-c", MIXED, "policy", "fixed-noagent", "--set", "sometimes")
    assert info.value.code == EXIT_USAGE


# --- apply -----------------------------------------------------------------------------------


def test_apply_dry_run_on_test_driver_is_a_noop_with_reason(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "apply", "hotplug-agent", "--dry-run", "--json")
    assert result.status == EXIT_OK, result.err
    (domain,) = result.json()["results"]
    assert domain["dry_run"] and domain["after"] is None
    assert domain["plan"]["online"] == [] and domain["plan"]["offline"] == []
    assert "no guest layer" in domain["plan"]["note"] and "unsupported" in domain["plan"]["note"]
    assert [o["code"] for o in domain["outcomes"]] == ["skipped"]
    assert domain["policy"]["mode"]["value"] == "online"


def test_apply_text_output(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "apply", "hotplug-agent")
    assert result.status == EXIT_OK
    lines = result.out.splitlines()
    assert lines[0] == f"hotplug-agent: policy online ({SOURCE_LIVE})"
    assert lines[1].startswith("  plan: no guest layer") and lines[2] == "  skipped"


def test_apply_all_reports_bad_metadata_and_goes_on(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "apply", "--all", "--dry-run", "--json")
    assert result.status == EXIT_INCOMPLETE
    doc = result.json()
    names = {r["name"] for r in doc["results"]}
    assert names == {
        "hotplug-agent",
        "fixed-noagent",
        "growable-noagent",
        "paused-agent",
        "stopped-big",
    }
    (error,) = doc["errors"]
    assert error["domain"] == "bad-metadata" and "metadata (live)" in error["error"]
    notes = {r["name"]: r["plan"]["note"] for r in doc["results"]}
    assert notes["stopped-big"] == "no guest layer: domain is shut off"
    assert notes["paused-agent"] == "no guest layer: domain is paused"


def test_apply_one_bad_domain_exits_with_its_status(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "apply", "bad-metadata")
    assert result.status == EXIT_CONFIG and "'bad-metadata'" in result.err


def test_apply_needs_a_selection(capsys: Capsys) -> None:
    assert run_cli(capsys, "-c", MIXED, "apply").status == EXIT_USAGE


# --- reconcile() directly ------------------------------------------------------------------


def test_reconcile_result_and_thread_safety() -> None:
    config = HostConfig()
    with Connection(MIXED) as conn:
        domains = [conn.lookup(n) for n in ("hotplug-agent", "fixed-noagent", "stopped-big")]
        results: list[object] = []
        lock = threading.Lock()

        def work(dom: object) -> None:
            for _ in range(5):
                outcome = reconcile(conn, dom, config, trigger="test", agent_timeout=2.0)
                with lock:
                    results.append(outcome)

        threads = [threading.Thread(target=work, args=(d,)) for d in domains * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(results) == 45
    for result in results:
        assert isinstance(result, ReconcileResult)
        assert result.trigger == "test" and result.plan.is_noop and not result.failed


def test_reconcile_invalid_policy_raises_before_reading() -> None:
    with Connection(MIXED) as conn, pytest.raises(ConfigError):
        reconcile(conn, conn.lookup("bad-metadata"), HostConfig(), agent_timeout=1.0)


def test_reconcile_hotadded_and_mode_override() -> None:
    observations = Observations()
    observations.hinted({1}, time.monotonic())
    with Connection(MIXED) as conn:
        result = reconcile(
            conn,
            conn.lookup("fixed-noagent"),
            HostConfig(),
            mode="online",
            observations=observations,
            agent_timeout=1.0,
        )
    assert result.policy.sources["mode"] == "command line"
    assert [o.code for o in result.outcomes] == ["skipped"]


# --- setvcpus --------------------------------------------------------------------------------


def test_setvcpus_grow_on_test_driver_cannot_verify_the_guest(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", "3", "--json")
    assert result.status == EXIT_INCOMPLETE
    doc = result.json()
    checks = {c["layer"]: c for c in doc["checks"]}
    assert checks["live"]["ok"] and checks["hypervisor"]["ok"]
    assert not checks["guest present"]["ok"] and "unsupported" in checks["guest present"]["now"]
    assert doc["events"] == []  # the test driver has no QEMU monitor


def test_setvcpus_config_only_on_a_stopped_domain(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3")
    assert result.status == EXIT_OK, result.out + result.err
    assert "config" in result.out and "ok" in result.out


def test_setvcpus_live_on_a_stopped_domain(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3", "--live")
    assert result.status == EXIT_NOT_RUNNING and "needs a running domain" in result.err


def test_setvcpus_above_maximum(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", "9")
    assert result.status != EXIT_OK and "maximum is 4" in result.err


@pytest.mark.parametrize("count", ["0", "-1", "x", "99999"])
def test_setvcpus_bad_count(capsys: Capsys, count: str) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", count)
    assert info.value.code == EXIT_USAGE
