"""The code's documentation stands alone: no docstring or comment cites a document that is
not in the tree."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "virthotplug").rglob("*.py"), ROOT / "hooks" / "qemu"])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_a_missing_design_document(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "design.md" not in text or (ROOT / "design.md").exists()
