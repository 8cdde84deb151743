"""The shipped example configuration (``conf/virthotplug.conf``) parses and shows the
built-in defaults: as installed it changes nothing, and uncommenting a setting keeps its
default value.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from virthotplug.core.config import WatchSettings, parse_config
from virthotplug.core.policy import FIELDS, Policy, parse_policy_fields

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "virthotplug.conf"
SETTING = re.compile(r"(?m)^#(\w+) =(.*)$")  # "#key = value": a setting at its default


def test_example_as_installed_is_all_defaults() -> None:
    config = parse_config(EXAMPLE.read_text(), path=str(EXAMPLE))
    assert config.defaults == {}
    assert config.domains == ()
    assert config.watch == WatchSettings()


def test_uncommented_settings_are_the_defaults() -> None:
    text = SETTING.sub(r"\1 =\2", EXAMPLE.read_text())
    config = parse_config(text, path=str(EXAMPLE))
    assert config.watch == WatchSettings()
    values = parse_policy_fields(config.defaults, source="example", domain="*")
    default = Policy()
    assert values == {name: getattr(default, name) for name in values}


def test_every_setting_is_shown() -> None:
    text = EXAMPLE.read_text()
    shown = set(SETTING.findall(text))
    keys = {key for key, _ in shown}
    watch_keys = {f.name for f in dataclasses.fields(WatchSettings)}
    assert watch_keys <= keys
    # count has no value as default (the live vCPU count): it is described, not set.
    assert set(FIELDS) - {"count"} <= keys
    assert re.search(r"(?m)^# count = ", text)
    assert keys <= watch_keys | set(FIELDS)


def test_example_sections_are_commented_out() -> None:
    sections = re.findall(r"(?m)^\[([^\]]+)\]", EXAMPLE.read_text())
    assert sections == ["defaults", "watch"]
