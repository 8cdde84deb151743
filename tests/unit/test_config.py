"""Tests for virthotplug.core.config: the host configuration file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virthotplug.core import config
from virthotplug.core.config import HostConfig, WatchSettings, load_config, parse_config
from virthotplug.core.errors import ConfigError
from virthotplug.core.policy import merge_policy

EXAMPLE = """\
# comments are fine
[defaults]
mode = report
retries = 2

[domain:web-*]
mode = online
grace = 2

[domain:web-db]
mode = match

[domain:3B3C0E4F-8A6E-4D9A-9F0E-1D4A5C6B7E01]
mode = match
count = 2

[watch]
resync_interval = 30
agent_timeout = 2.5
workers = 4
hotadd_settle = 0
hook_socket = /run/vhp/hook.sock
strict_agent = yes
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "virthotplug.conf"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return str(path)


def test_load_example(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    loaded = load_config(path)
    assert loaded.path == path
    assert loaded.defaults == {"mode": "report", "retries": "2"}
    assert [s.pattern for s in loaded.domains] == [
        "web-*",
        "web-db",
        "3B3C0E4F-8A6E-4D9A-9F0E-1D4A5C6B7E01",
    ]
    assert loaded.watch == WatchSettings(
        resync_interval=30.0,
        agent_timeout=2.5,
        workers=4,
        hotadd_settle=0.0,
        hook_socket="/run/vhp/hook.sock",
        strict_agent=True,
    )
    loaded.check_policies()


def test_first_matching_domain_section_wins(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, EXAMPLE))
    layers = loaded.policy_layers("web-db", "00000000-0000-0000-0000-000000000000")
    assert [source for source, _ in layers] == [
        f"config {loaded.path}: [domain:web-*]",
        f"config {loaded.path}: [defaults]",
    ]
    effective = merge_policy(layers, domain="web-db")
    assert effective.policy.mode == "online" and effective.policy.retries == 2
    assert effective.sources["grace"] == f"config {loaded.path}: [domain:web-*]"
    assert effective.sources["count"] == "default"


def test_uuid_section_matches_case_insensitively(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, EXAMPLE))
    layers = loaded.policy_layers("other", "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01")
    effective = merge_policy(layers, domain="other")
    assert effective.policy.mode == "match" and effective.policy.count == 2


def test_globs_are_case_sensitive(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, EXAMPLE))
    layers = loaded.policy_layers("WEB-1", "00000000-0000-0000-0000-000000000000")
    assert [source for source, _ in layers] == [f"config {loaded.path}: [defaults]"]


def test_missing_default_file_means_builtin_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.conf"))
    assert load_config(None) == HostConfig()
    assert load_config(None).policy_layers("x", "y") == []


def test_default_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[defaults]\nmode = online\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    assert load_config(None).defaults == {"mode": "online"}


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.conf"))


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660])
def test_refuses_file_writable_by_group_or_others(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, EXAMPLE, mode)
    with pytest.raises(ConfigError, match="writable by group or others") as info:
        load_config(path)
    assert path in str(info.value) and "chmod go-w" in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400])
def test_accepts_owner_only_writable_file(tmp_path: Path, mode: int) -> None:
    load_config(write(tmp_path, EXAMPLE, mode))


def test_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"directory|not a regular file"):
        load_config(str(tmp_path))


def test_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.conf"
    path.write_bytes(b"[defaults]\nmode = \xff\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[policy]\nmode = online\n", "unknown section"),
        ("[domain:]\nmode = online\n", "unknown section"),
        ("[DEFAULT]\nmode = online\n", "unknown section"),
        ("mode = online\n", "no section header"),
        ("[defaults]\nmode = a\nmode = b\n", "already exists"),
        ("[defaults]\n[defaults]\n", "already exists"),
        ("[watch]\nworkers = 0\n", "workers"),
        ("[watch]\nworkers = lots\n", "workers"),
        ("[watch]\nresync_interval = nan\n", "resync_interval"),
        ("[watch]\nagent_timeout = -1\n", "agent_timeout"),
        ("[watch]\nhook_socket = relative.sock\n", "hook_socket"),
        ("[watch]\nstrict_agent = maybe\n", "strict_agent"),
        ("[watch]\ncolour = blue\n", "unknown setting 'colour'"),
    ],
)
def test_structural_errors_at_load(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert path in str(info.value)


def test_bad_policy_value_fails_only_for_matching_domains(tmp_path: Path) -> None:
    loaded = parse_config("[domain:web-*]\nmode = sometimes\n", path="/etc/x.conf")
    with pytest.raises(ConfigError) as info:
        merge_policy(loaded.policy_layers("web-1", "u"), domain="web-1")
    message = str(info.value)
    assert "'web-1'" in message and "config /etc/x.conf: [domain:web-*]" in message
    assert merge_policy(loaded.policy_layers("db1", "u"), domain="db1").policy.mode == "report"
    with pytest.raises(ConfigError):
        loaded.check_policies()


def test_unknown_policy_key_is_an_error_for_the_domain() -> None:
    loaded = parse_config("[defaults]\nexlude = 3\n", path="/etc/x.conf")
    with pytest.raises(ConfigError, match="exlude"):
        merge_policy(loaded.policy_layers("d", "u"), domain="d")


def test_keys_are_case_insensitive_and_interpolation_is_off() -> None:
    loaded = parse_config("[defaults]\nMode = online\nexclude = 1%(x)s\n", path="p")
    assert loaded.defaults == {"mode": "online", "exclude": "1%(x)s"}
