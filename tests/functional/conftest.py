"""Functional tier: the real libvirt library with its test driver, on the project's node XML.

Every test in tests/functional is marked ``functional``. No libvirt daemon is needed: a
``test:///<absolute path>`` URI makes libvirt build a private in-process host from the node
file, fresh for every connection, so tests cannot leak state into each other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FUNCTIONAL_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: mark only those under tests/functional.
    for item in items:
        if FUNCTIONAL_DIR in item.path.parents:
            item.add_marker(pytest.mark.functional)


@pytest.fixture(autouse=True)
def _no_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their URI and configuration file; an inherited LIBVIRT_DEFAULT_URI or
    VIRTHOTPLUG_CONFIG must not change what runs."""
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    monkeypatch.delenv("VIRTHOTPLUG_CONFIG", raising=False)
