"""Fixtures for every test tier."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every watch a test starts (in process or as a child) takes its one-per-host lock in a
    directory of the test run, never the host's /run/virthotplug: a real daemon and the
    tests never block each other."""
    saved = os.environ.get("VIRTHOTPLUG_RUN_DIR")
    os.environ["VIRTHOTPLUG_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))
    yield
    if saved is None:
        os.environ.pop("VIRTHOTPLUG_RUN_DIR", None)
    else:
        os.environ["VIRTHOTPLUG_RUN_DIR"] = saved


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli.main`` installs its own root handler; put the previous ones back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
