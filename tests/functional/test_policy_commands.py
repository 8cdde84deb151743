"""``policy``, ``apply`` and ``setvcpus`` against libvirt's test driver, plus ``reconcile()``.

The test driver keeps metadata (so ``policy --set`` round-trips) but has no guest agent:
every agent call is unsupported, so plans are no-ops with a reason and nothing is written.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

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
    assert doc["policy"]["exclude"] == {"value": [], "source": "default"}  # a CPU list


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
    assert doc["exclude"] == {"value": [1, 2, 3], "source": SOURCE_LIVE}
    assert doc["retries"]["source"] == "default"


def test_policy_set_round_trip_live_and_persistent() -> None:
    with Connection(MIXED) as conn:
        dom = conn.lookup("fixed-noagent")
        write_policy(dom, {"mode": "online"}, live=False, config=True)
        assert metadata_layer(dom) == (SOURCE_PERSISTENT, {"mode": "online"})
        write_policy(dom, {"mode": "ignore", "grace": "2"}, live=True, config=False)
        assert metadata_layer(dom) == (SOURCE_LIVE, {"mode": "ignore", "grace": "2"})
        effective = effective_policy(conn, dom, HostConfig())
        assert effective.policy.mode == "ignore" and effective.sources["mode"] == SOURCE_LIVE
        write_policy(dom, None, live=True, config=True)
        assert metadata_layer(dom) is None
        assert effective_policy(conn, dom, HostConfig()).sources["mode"] == "default"


def test_policy_clear(capsys: Capsys) -> None:
    argv = ["-c", MIXED, "policy", "hotplug-agent", "--clear", "--live", "--config", "--json"]
    result = run_cli(capsys, *argv)
    assert result.status == EXIT_OK, result.err
    assert result.json()["policy"]["mode"] == {"value": "report", "source": "default"}


def test_policy_clear_of_a_running_domain_keeps_its_persistent_policy(capsys: Capsys) -> None:
    # --current, the default: only the running definition, as virsh does.
    result = run_cli(capsys, "-c", MIXED, "policy", "hotplug-agent", "--clear", "--json")
    assert result.status == EXIT_OK, result.err
    assert result.json()["policy"]["mode"]["source"] == "metadata (persistent)"


def test_policy_set_validates_before_writing(capsys: Capsys) -> None:
    # A bad value on the command line is a usage error (2), found before connecting.
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "-c", "bogus:///never", "policy", "x", "--set", "online", "--grace", "-1")
    assert info.value.code == EXIT_USAGE
    assert "argument --grace: must be between 0 and 3600 seconds" in capsys.readouterr().err


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


@pytest.mark.parametrize("online", [[], ["--online"], ["--no-online"]])
def test_setvcpus_refuses_an_invalid_policy_before_the_hot_add(
    capsys: Capsys, monkeypatch: pytest.MonkeyPatch, online: list[str]
) -> None:
    """Validate before any change: the grow is refused with the policy's error, and libvirt
    is never asked to plug anything (before, the vCPU was hot-added and then refused)."""
    from virthotplug.host.domain import Domain

    plugs: list[int] = []
    real = Domain.set_vcpus

    def spy(self: Domain, count: int, **flags: bool) -> None:
        plugs.append(count)
        real(self, count, **flags)

    monkeypatch.setattr(Domain, "set_vcpus", spy)
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "bad-metadata", "2", *online)
    assert result.status == EXIT_CONFIG, result.out + result.err
    assert "invalid policy" in result.err
    assert plugs == []


@pytest.mark.parametrize("count", ["0", "-1", "x", "99999"])
def test_setvcpus_bad_count(capsys: Capsys, count: str) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "-c", MIXED, "setvcpus", "hotplug-agent", count)
    assert info.value.code == EXIT_USAGE


# --- --live, --config, --current: virsh's meaning and default ----------------------------


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """(live, config) of every policy metadata write the command makes."""
    from virthotplug.host import policysource

    calls: list[tuple[bool, bool]] = []
    real = policysource.write_policy

    def recording(dom: Any, fields: Any, *, live: bool, config: bool) -> None:
        calls.append((live, config))
        real(dom, fields, live=live, config=config)

    monkeypatch.setattr(policysource, "write_policy", recording)
    return calls


@pytest.mark.parametrize(
    ("domain", "flags", "expected"),
    [
        ("fixed-noagent", [], (True, False)),  # running: live only, like virsh
        ("fixed-noagent", ["--current"], (True, False)),
        ("fixed-noagent", ["--config"], (False, True)),
        ("fixed-noagent", ["--live"], (True, False)),
        ("fixed-noagent", ["--live", "--config"], (True, True)),
        ("stopped-big", [], (False, True)),  # shut off: the persistent definition
        ("stopped-big", ["--current"], (False, True)),
        ("stopped-big", ["--config"], (False, True)),
    ],
)
@pytest.mark.parametrize("action", [["--set", "online"], ["--clear"]])
def test_policy_affects_like_virsh(
    domain: str,
    flags: list[str],
    expected: tuple[bool, bool],
    action: list[str],
    writes: list[tuple[bool, bool]],
    capsys: Capsys,
) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", domain, *action, *flags, "--json")
    assert result.status == EXIT_OK, result.err
    assert writes == [expected]
    assert result.json()["changed"] == {"live": expected[0], "config": expected[1]}


@pytest.mark.parametrize("flag", ["--live", "--config"])
def test_policy_current_is_exclusive_with_live_and_config(flag: str, capsys: Capsys) -> None:
    result = run_cli(
        capsys, "-c", MIXED, "policy", "fixed-noagent", "--set", "online", "--current", flag
    )
    assert result.status == EXIT_USAGE
    assert result.err == "virthotplug: error: --current is exclusive with --live and --config\n"


def test_policy_show_changes_nothing(writes: list[tuple[bool, bool]], capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", "fixed-noagent", "--json")
    assert result.status == EXIT_OK
    assert writes == [] and result.json()["changed"] is None


def test_setvcpus_current_is_exclusive_with_live(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3", "--current", "--live")
    assert result.status == EXIT_USAGE


def test_setvcpus_current_on_a_stopped_domain_changes_its_config(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "setvcpus", "stopped-big", "3", "--current")
    assert result.status == EXIT_OK, result.err
    assert "(config)" in result.out.splitlines()[0]


# --- VIRTHOTPLUG_CONFIG: the file the hook reads, for every command too ---------------------


def _match_config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("[defaults]\nmode = match\ncount = 2\n")
    path.chmod(0o600)
    return path


def test_the_environment_names_the_configuration_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    path = _match_config(tmp_path, "env.conf")
    monkeypatch.setenv("VIRTHOTPLUG_CONFIG", str(path))
    result = run_cli(capsys, "-c", MIXED, "policy", "fixed-noagent", "--json")
    assert result.status == EXIT_OK, result.err
    assert result.json()["policy"]["mode"] == {
        "value": "match",
        "source": f"config {path}: [defaults]",
    }


def test_config_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    monkeypatch.setenv("VIRTHOTPLUG_CONFIG", str(tmp_path / "absent.conf"))
    path = _match_config(tmp_path, "given.conf")
    result = run_cli(capsys, "-c", MIXED, "--config-file", str(path), "policy", "fixed-noagent")
    assert result.status == EXIT_OK, result.err


def test_a_file_the_environment_names_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Capsys
) -> None:
    monkeypatch.setenv("VIRTHOTPLUG_CONFIG", str(tmp_path / "absent.conf"))
    result = run_cli(capsys, "-c", MIXED, "status", "--all")
    assert result.status == EXIT_CONFIG
    assert result.err == f"virthotplug: error: config file {tmp_path / 'absent.conf'}: not found\n"
