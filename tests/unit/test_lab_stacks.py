"""tests/lab/stacks.py and sandbox.py: the stack definitions, their cache keys, debootstrap's
arguments and which stack a URI leads to (no root is built here)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "lab"))

import debian_image
import sandbox
import stacks
from matrix import Placement

ROOT = Path(__file__).resolve().parents[2]

# The keys of the roots and images built before stack 3 joined: unchanged, so that a cache
# made then is found (the recipe fields of the forky builds stay out of them).
STACK2_KEY = "7ab2d0de165bc3c9"
DEBIAN12_KEY = "e31624a4497560ea"
DEBIAN13_KEY = "c0a28ae4e1046ee8"


def test_earlier_cache_keys_are_unchanged() -> None:
    assert stacks.STACK2.inputs().key() == STACK2_KEY
    assert debian_image.build_inputs("debian12").key() == DEBIAN12_KEY
    assert debian_image.build_inputs("debian13").key() == DEBIAN13_KEY


def test_forky_builds_differ_by_their_recipe() -> None:
    assert stacks.STACK3.inputs().key() != stacks.STACK2.inputs().key()
    assert stacks.STACK3.script == "sid" and debian_image.SCRIPTS["debian14"] == "sid"
    assert "Acquire::Check-Valid-Until=false" in stacks.STACK3.apt_options
    assert stacks.STACK2.apt_options == ()


def _control_relations(field: str) -> set[str]:
    control = (ROOT / "debian" / "control").read_text()
    binary = control[control.index("\nPackage: virthotplug\n") :]
    found = re.search(rf"^{field}:\n((?: .*\n)+)", binary, re.M)
    assert found, field
    names = {line.strip().rstrip(",").split()[0] for line in found.group(1).splitlines()}
    return {name for name in names if not name.startswith("${")}


def test_stack3_has_what_the_package_needs_so_it_installs_offline() -> None:
    needed = _control_relations("Depends") | _control_relations("Recommends") | {"python3"}
    assert needed <= set(stacks.STACK3.packages), needed - set(stacks.STACK3.packages)


def test_debootstrap_passes_the_script_after_the_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def record(argv: Sequence[str], what: str, env: object = None) -> str:
        calls.append(list(argv))
        return ""

    monkeypatch.setattr(sandbox, "_check", record)
    monkeypatch.setattr(sandbox, "host_mirror", lambda: "MIRROR")
    sandbox.debootstrap(Path("/nonexistent/root"), "forky", script="sid")
    first = calls[0]
    assert first[-4:] == [
        "forky",
        "/nonexistent/root",
        "MIRROR",
        "/usr/share/debootstrap/scripts/sid",
    ]
    sandbox.debootstrap(Path("/nonexistent/root"), "trixie")
    assert calls[2][-3:] == ["trixie", "/nonexistent/root", "MIRROR"]


def _fake_root(cache: Path, name: str) -> Path:
    root = cache / name / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/libvirtd").touch()
    return root


@pytest.mark.parametrize("stack", ["stack2", "stack3"])
def test_placement_knows_the_stack_by_its_root(tmp_path: Path, stack: str) -> None:
    root = _fake_root(tmp_path, f"{stack}-0123456789abcdef")
    placement = Placement.for_uri(f"qemu+unix:///system?socket={root}{stacks.SOCKET}")
    assert placement.stack is not None
    assert (placement.name, placement.stack.root, placement.stack.key) == (
        stack,
        root,
        "0123456789abcdef",
    )
    assert placement.stack.definition is stacks.STACKS[stack]


def test_placement_of_the_host_and_of_an_unknown_root(tmp_path: Path) -> None:
    assert Placement.for_uri("qemu:///system").name == "stack1"
    root = _fake_root(tmp_path, "other-0123456789abcdef")
    assert Placement.for_uri(f"qemu+unix:///system?socket={root}{stacks.SOCKET}").stack is None


def test_apt_options_go_to_update_and_install(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def record(root: Path, *argv: str, what: str = "") -> str:
        calls.append(argv)
        return ""

    monkeypatch.setattr(sandbox, "in_root", record)
    sandbox.apt_install(Path("/r"), ["libvirt-clients"], ["Acquire::Check-Valid-Until=false"])
    assert calls[0] == ("apt-get", "-o", "Acquire::Check-Valid-Until=false", "update", "-qq")
    assert calls[1][:4] == ("apt-get", "-o", "Acquire::Check-Valid-Until=false", "install")
