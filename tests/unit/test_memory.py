"""Tests for virthotplug.daemon.memory: the C allocator settings are best effort."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from virthotplug.daemon import memory


@pytest.fixture(autouse=True)
def fresh_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_libc", None)


def test_on_glibc_the_call_reaches_the_library() -> None:
    memory.trim()
    assert memory._libc is not None


def test_a_c_library_that_is_not_glibc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:  # no malloc_trim
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda _name: Musl())
    memory.trim()
    assert memory._libc is None


def test_a_library_that_cannot_be_loaded_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_name: Any) -> None:
        raise OSError("cannot open shared object")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    memory.trim()
    assert memory._libc is None
