"""``host.domain.Domain`` is the only code that calls libvirt on a domain.

A libvirt handle (``.raw``: a ``virDomain`` of a ``Domain``, the ``virConnect`` of a
``Connection``) is touched only in ``host/connection.py`` and ``host/domain.py``; the
connection hands domain handles only to its own calls that take them (stats of a list of
domains) and never calls a method on one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "virthotplug"
OWNERS = {"host/connection.py", "host/domain.py"}


def raw_uses(source: str) -> list[tuple[int, str, bool]]:
    """Each ``X.raw`` in ``source``: its line, what X is, and whether a method of it is
    called (``X.raw.method(...)``)."""
    tree = ast.parse(source)
    called = {
        id(node.func.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    return [
        (node.lineno, ast.unparse(node.value), id(node) in called)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "raw"
    ]


def modules(*layers: str) -> list[Path]:
    return sorted(p for layer in layers for p in (PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize(
    "path", modules("host", "daemon", "cli"), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_libvirt_handle_outside_the_connection_and_the_domain(path: Path) -> None:
    name = str(path.relative_to(PACKAGE))
    uses = raw_uses(path.read_text(encoding="utf-8"))
    if name not in OWNERS:
        assert uses == [], f"{name} reaches for a libvirt handle"
    elif name == "host/connection.py":
        # Its own handle is self.raw; a domain's is only passed on, never called.
        assert [u for u in uses if u[1] != "self" and u[2]] == []


def test_the_check_finds_an_escape() -> None:
    source = "def f(dom):\n    return dom.raw.guestVcpus(0)\n"
    assert raw_uses(source) == [(2, "dom", True)]
    assert raw_uses("rows = [d.raw for d in ds]\n") == [(1, "d", False)]
