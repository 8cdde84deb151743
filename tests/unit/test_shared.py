"""``core.shared.SharedValues``: equal values held once, bounded, nothing stored on a failure."""

from __future__ import annotations

import pytest

from virthotplug.core.shared import SharedValues


def test_equal_values_are_one_object() -> None:
    shared = SharedValues()
    first = ("vcpu", 1, "running")
    again = tuple(["vcpu", 1, "running"])
    assert again is not first
    assert shared.one(first) is first
    assert shared.one(again) is first


def test_a_key_is_built_once() -> None:
    shared = SharedValues()
    built: list[int] = []

    def build() -> list[int]:
        built.append(1)
        return [len(built)]

    assert shared.get("k", build) is shared.get("k", build)
    assert built == [1]


def test_a_failed_build_stores_nothing() -> None:
    shared = SharedValues()

    def bad() -> int:
        raise ValueError("malformed")

    with pytest.raises(ValueError):
        shared.get("k", bad)
    assert len(shared) == 0
    assert shared.get("k", lambda: 3) == 3


def test_it_is_bounded() -> None:
    shared = SharedValues(limit=10)
    for i in range(25):
        shared.one(("value", i))
    assert len(shared) <= 10
