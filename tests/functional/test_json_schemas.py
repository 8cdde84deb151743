"""Every command's --json output against the schema published in schemas/ (run_cli and
run_module validate whatever --json output any test produces; here every command and its
failure form is produced on purpose), in the one layout of every document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from jsonschemas import SCHEMAS, validate, validator
from tdriver import MIXED, run_cli

from virthotplug.core.report import json_document

Capsys = pytest.CaptureFixture[str]
EDGE = str(Path(__file__).resolve().parent / "nodes" / "edge.xml")


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.json")), ids=lambda p: p.name)
def test_every_schema_is_a_valid_schema(path: Path) -> None:
    validator(path.stem)  # check_schema, and every $ref resolves when used below


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("status", ["status", "--all", "--json"]),
        ("status", ["-c", f"test://{EDGE}", "status", "--all", "--json"]),
        ("status", ["status", "nosuch", "--json"]),  # the failure document
        ("policy", ["policy", "hotplug-agent", "--json"]),
        ("policy", ["policy", "fixed-noagent", "--set", "match", "--count", "2", "--json"]),
        ("policy", ["policy", "stopped-big", "--set", "online", "--exclude", "1-3", "--json"]),
        ("policy", ["policy", "stopped-big", "--set", "online", "--live", "--json"]),
        ("apply", ["apply", "--all", "--dry-run", "--json"]),
        ("apply", ["apply", "bad-metadata", "--json"]),
        ("apply", ["apply", "nosuch", "--json"]),
        ("setvcpus", ["setvcpus", "stopped-big", "3", "--json"]),
        ("setvcpus", ["setvcpus", "hotplug-agent", "2", "--json"]),
        ("setvcpus", ["setvcpus", "hotplug-agent", "9", "--json"]),
    ],
)
def test_json_output_fits_its_schema_and_layout(
    command: str, argv: list[str], capsys: Capsys
) -> None:
    if "-c" not in argv:
        argv = ["-c", MIXED, *argv]
    result = run_cli(capsys, *argv)  # validates too; again here, explicitly
    document = json.loads(result.out)
    validate(command, document)
    assert document["version"] == 1
    assert result.out == json_document(document) + "\n"  # the one layout


def test_a_document_without_version_is_refused() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate("policy", {"domain": "d", "uuid": "u", "policy": {}, "changed": None})


def test_exclude_is_a_list(capsys: Capsys) -> None:
    result = run_cli(capsys, "-c", MIXED, "policy", "hotplug-agent", "--json")
    assert result.json()["policy"]["exclude"]["value"] == [3]


def test_watch_records_fit_their_schema(tmp_path: Path) -> None:
    config = tmp_path / "empty.conf"
    config.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    env["VIRTHOTPLUG_RUN_DIR"] = str(tmp_path)
    argv = ["-c", MIXED, "--config-file", str(config), "watch", "--no-hook-socket", "--json"]
    child = subprocess.Popen(
        [sys.executable, "-m", "virthotplug", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    try:
        records = [json.loads(child.stdout.readline()) for _ in range(6)]
    finally:
        child.terminate()
        child.wait(timeout=30)
    for record in records:
        validate("watch-record", record)
    assert "reconcile" in {r["event"] for r in records}


def test_a_reconcile_deferred_for_grace_fits_the_watch_record_schema() -> None:
    """What watch writes while a policy's grace period runs (seen on a lab VM): only the
    trigger and the hot-add, no policy or plan yet. A full reconcile still needs them."""
    deferred = {
        "time": "2026-12-07T12:48:19.902Z",
        "host": "qemu:///system",
        "domain": "lab",
        "uuid": "c636e81e-3dba-4edf-b1fe-a9921e1f216d",
        "event": "reconcile",
        "details": {"trigger": ["ost"], "hotadded": [1]},
        "findings": [],
        "action": "wait",
        "outcome": "deferred",
    }
    validate("watch-record", deferred)
    with pytest.raises(jsonschema.ValidationError):
        validate("watch-record", {**deferred, "action": "none", "outcome": "onlined"})
