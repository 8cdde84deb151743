"""``status`` and ``check`` over several libvirt URIs at once: rows and JSON labelled by host,
a host that is down reported but not fatal, named domains that live on some hosts only.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tdriver import MIXED, node_uri, run_cli

from virthotplug.core.errors import EXIT_FAILURE, EXIT_NO_DOMAIN, EXIT_OK
from virthotplug.core.report import CHECK_OK, CHECK_UNKNOWN

EDGE = node_uri("edge")
SYSTEM = "qemu:///system"


def down_uri(tmp_path: Path) -> str:
    return f"qemu+unix:///system?socket={tmp_path / 'nonexistent' / 'sock'}"


def test_named_domains_found_on_some_hosts_only(capsys: pytest.CaptureFixture[str]) -> None:
    # hotplug-agent lives on MIXED only, big-order on EDGE only: neither is an error.
    result = run_cli(
        capsys, "-c", MIXED, "-c", EDGE, "status", "--json", "big-order", "hotplug-agent"
    )
    assert result.status == EXIT_OK, result.err
    document = result.json()
    assert [(d["host"], d["name"]) for d in document["domains"]] == [
        (MIXED, "hotplug-agent"),
        (EDGE, "big-order"),
    ]
    assert document["errors"] == []


def test_a_name_found_on_no_host_is_the_one_host_error(capsys: pytest.CaptureFixture[str]) -> None:
    # The same error and exit status as a name one host does not know (no partial table).
    result = run_cli(capsys, "-c", MIXED, "-c", EDGE, "status", "nosuch", "hotplug-agent")
    assert result.status == EXIT_NO_DOMAIN
    assert result.out == ""
    assert result.err == (
        "virthotplug: error: failed to get domain 'nosuch': no such domain on any of the 2 hosts\n"
    )


def test_a_name_found_on_no_host_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "-c", EDGE, "status", "--json", "nosuch", "big-order")
    assert result.status == EXIT_NO_DOMAIN
    assert result.json() == {
        "version": 1,
        "error": "failed to get domain 'nosuch': no such domain on any of the 2 hosts",
        "exit_status": EXIT_NO_DOMAIN,
    }


def test_one_host_keeps_the_virsh_like_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "status", "nosuch")
    assert result.status == EXIT_NO_DOMAIN


def test_named_domain_with_one_host_down(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    down = down_uri(tmp_path)
    result = run_cli(capsys, "-c", down, "-c", MIXED, "status", "--json", "hotplug-agent", "nosuch")
    assert result.status == EXIT_FAILURE
    document = result.json()
    assert [(d["host"], d["name"]) for d in document["domains"]] == [(MIXED, "hotplug-agent")]
    hosts_down, names = zip(*[(e["host"], e["domain"]) for e in document["errors"]])
    assert hosts_down == (down, "")
    assert names == (None, "nosuch")
    assert document["errors"][1]["error"] == "no such domain on any host that could be read"


def test_check_named_domains_spread_over_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "-c", EDGE, "check", "hotplug-agent", "big-order")
    assert result.status == CHECK_OK, result.out
    assert result.out.startswith("VIRTHOTPLUG OK - 2 domains, vCPUs consistent |")


def test_check_one_host_down_is_reported_not_fatal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    down = down_uri(tmp_path)
    result = run_cli(capsys, "-c", down, "-c", EDGE, "check", "big-order")
    assert result.status == CHECK_UNKNOWN
    assert f"{down}: cannot connect to '{down}'" in result.out
    assert "domains=1 " in result.out and "unknown=1" in result.out


def test_hosts_are_read_at_once_in_the_order_given(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", EDGE, "-c", MIXED, "-c", EDGE, "status", "--all", "--json")
    assert result.status == EXIT_OK, result.err
    hosts = [d["host"] for d in result.json()["domains"]]
    assert hosts == [EDGE] * 2 + [MIXED] * 6 + [EDGE] * 2


# --- the real qemu:///system next to a test-driver host ----------------------------------


def _system_reachable() -> bool:
    if shutil.which("virsh") is None:
        return False
    done = subprocess.run(
        ["virsh", "-c", SYSTEM, "version"], capture_output=True, timeout=30, check=False
    )
    return done.returncode == 0


@pytest.mark.skipif(not _system_reachable(), reason="libvirtd with the QEMU driver not running")
def test_qemu_system_next_to_a_test_driver_host(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(
        capsys, "-c", SYSTEM, "-c", MIXED, "status", "--all", "--json", "--agent-timeout", "2"
    )
    document = result.json()
    # Domains on qemu:///system come and go as other tests run: check the labelling and
    # that the test host is complete and clean, not the exact qemu:///system list.
    hosts = [d["host"] for d in document["domains"]]
    assert set(hosts) <= {SYSTEM, MIXED}
    assert hosts == sorted(hosts, key=[SYSTEM, MIXED].index)  # grouped, in -c order
    assert len([h for h in hosts if h == MIXED]) == 6
    assert all(e["host"] != MIXED for e in document["errors"]), document["errors"]
    assert all(e["domain"] is not None for e in document["errors"]), "qemu:///system was down"
    assert result.status in (EXIT_OK, EXIT_FAILURE)
    table = run_cli(capsys, "-c", SYSTEM, "-c", MIXED, "status", "--all", "--agent-timeout", "2")
    assert table.out.splitlines()[0].split()[:2] == ["Host", "Domain"]


def test_apply_on_several_hosts_sorted_by_host_then_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run_cli(capsys, "-c", MIXED, "-c", EDGE, "apply", "--all", "--dry-run", "--json")
    document = result.json()
    keys = [(r["host"], r["name"]) for r in document["results"]]
    assert keys == sorted(keys)
    assert {host for host, _ in keys} == {MIXED, EDGE}
    # bad-metadata's invalid policy: an error of its own, naming its host.
    assert document["errors"][0]["host"] == MIXED
    assert document["errors"][0]["domain"] == "bad-metadata"


def test_apply_of_one_failed_domain_prints_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", MIXED, "apply", "bad-metadata", "--json")
    assert result.status == 8  # the domain's own error: an invalid policy
    document = result.json()
    assert document["results"] == []
    assert [(e["host"], e["domain"]) for e in document["errors"]] == [(MIXED, "bad-metadata")]
    assert result.err.startswith("virthotplug: error: domain 'bad-metadata': invalid policy")
