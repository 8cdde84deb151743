"""The JSON-lines record of ``watch --json``: the documented keys, in order, and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

from virthotplug.core.records import Record, iso_time

MAN_PAGE = Path(__file__).resolve().parents[2] / "man" / "virthotplug.1.rst"


def test_a_plain_event_record_as_documented() -> None:
    record = Record(iso_time(0.5), "test:///default", "web1", "uuid-1", "lifecycle", {"event": 2})
    assert json.loads(record.to_json()) == {
        "time": "1970-01-01T00:00:00.500Z",
        "host": "test:///default",
        "domain": "web1",
        "uuid": "uuid-1",
        "event": "lifecycle",
        "details": {"event": 2},
        "findings": [],
        "action": "none",
        "outcome": "observed",
    }
    assert "\n" not in record.to_json() and ", " not in record.to_json()


def test_the_keys_are_the_man_pages() -> None:
    section = MAN_PAGE.read_text().split("watch --json\n------------\n", 1)[1]
    example = section.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r'"(\w+)":', example)
    record = Record("t", "h", None, None, "host")
    assert list(record.to_dict()) == documented
