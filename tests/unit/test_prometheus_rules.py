"""The shipped Prometheus rules (contrib/prometheus/virthotplug.rules.yml) pass
``promtool check rules`` and their unit tests (tests/unit/prometheus/*.test.yml, run with
``promtool test rules``); a changed ``for:`` of the seed alert makes those tests fail.

promtool comes from Debian's ``prometheus`` package (tests/lab/host-setup.sh installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "virthotplug.rules.yml"
RULE_TESTS = Path(__file__).resolve().parent / "prometheus" / "virthotplug.rules.test.yml"
SEED_ALERT = "VirthotplugGuestCpuOffline"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: install Debian's prometheus package (make host)"
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def with_for(rules: str, alert: str, duration: str) -> str:
    """The rules text with ``alert``'s ``for:`` set to ``duration``."""
    lines = rules.splitlines(keepends=True)
    start = lines.index(f"      - alert: {alert}\n")
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("- "):
            break  # the next rule: this alert has no "for:"
        if lines[i].startswith("        for: "):
            lines[i] = f"        for: {duration}\n"
            return "".join(lines)
    raise AssertionError(f"no 'for:' found for {alert}")


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_changed_for(tmp_path: Path) -> None:
    # The same tests against a copy whose seed alert fires after 5 minutes instead of 10.
    (tmp_path / "contrib" / "prometheus").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "prometheus").mkdir(parents=True)
    copy = tmp_path / "contrib" / "prometheus" / RULES.name
    copy.write_text(with_for(RULES.read_text(), SEED_ALERT, "5m"))
    tests = tmp_path / "tests" / "unit" / "prometheus" / RULE_TESTS.name
    shutil.copyfile(RULE_TESTS, tests)
    result = promtool("test", "rules", tests.name, cwd=tests.parent)
    assert result.returncode != 0
    assert SEED_ALERT in result.stdout + result.stderr


@pytest.mark.parametrize("duration", ["15s", "1m"])
def test_with_for_changes_only_the_named_alert(duration: str) -> None:
    text = RULES.read_text()
    changed = with_for(text, SEED_ALERT, duration)
    assert changed.count(f"for: {duration}") == text.count(f"for: {duration}") + 1
    assert len(changed.splitlines()) == len(text.splitlines())
