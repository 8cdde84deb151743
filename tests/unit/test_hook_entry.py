"""The hook's entry point cannot fail: whatever breaks before the hook program's own
``try`` (an interpreter that is broken or missing, a failed import, a crash, a signal), the
hook libvirtd runs exits 0 and writes nothing to stdout; only the program's explicit strict
refusal passes, as status 1 at prepare. A failing ``reconnect`` hook makes libvirtd kill the
running guest; a failing ``prepare``/``start``/``started`` one refuses to start it.

The broken interpreters are real: in a private mount namespace (nothing leaks to the host),
the system's python3, or a file of its standard library, is bind-mounted over."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "hooks" / "virthotplug"
PROGRAM = ROOT / "hooks" / "qemu"
PYTHON = os.path.realpath("/usr/bin/python3")
XML = (
    "<domain><name>web1</name><uuid>3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01</uuid>"
    "<vcpu current='1'>4</vcpu></domain>"
)
OPERATIONS = ("prepare", "start", "started", "reconnect", "migrate", "restore", "stopped")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private mount namespace",
)


def _stdlib_file() -> str:
    code = "import encodings; print(encodings.__file__)"
    done = subprocess.run([PYTHON, "-IS", "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _broken(tmp_path: Path, kind: str) -> tuple[str, str]:
    """(file to bind-mount, over which file) for one way of breaking the interpreter."""
    fake = tmp_path / f"{kind}.sh"
    if kind == "stdlib":  # Fatal Python error: init_fs_encoding, before any hook code
        fake.write_text("")
        return str(fake), _stdlib_file()
    body = {
        "fails": 'echo "<domain>garbage on stdout</domain>"; echo "broken" >&2; exit 1',
        "refusal-lookalike": "exit 3",  # not a refusal except at prepare
        "killed": "kill -9 $$",
        "hangs-up": "exec 1>&- 2>&-; exit 70",
    }[kind]
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)
    return str(fake), PYTHON


def _run(
    bind: tuple[str, str], operation: str, env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    source, target = bind
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            source,
            target,
            str(ENTRY),
            "web1",
            operation,
            "begin",
            "-",
        ],
        input=XML.encode(),
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "VIRTHOTPLUG_HOOK_PROGRAM": str(PROGRAM), **env},
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("kind", ["fails", "stdlib", "killed", "hangs-up", "refusal-lookalike"])
def test_a_broken_interpreter_never_fails_the_hook(tmp_path: Path, kind: str) -> None:
    bind = _broken(tmp_path, kind)
    for operation in OPERATIONS:
        done = _run(bind, operation, {})
        expected = 1 if (kind, operation) == ("refusal-lookalike", "prepare") else 0
        assert done.returncode == expected, (operation, done.stderr)
        assert done.stdout == b"", operation


def test_the_old_entry_point_failed_on_the_same_interpreter(tmp_path: Path) -> None:
    # Why the stub exists: the Python program run directly exits 1 on reconnect.
    source, target = _broken(tmp_path, "stdlib")
    script = 'mount --bind "$1" "$2" && exec "$3" web1 reconnect begin -'
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            source,
            target,
            str(PROGRAM),
        ],
        input=XML.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1


def test_a_missing_program_never_fails_the_hook(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ENTRY), "web1", "reconnect", "begin", "-"],
        input=XML.encode(),
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "VIRTHOTPLUG_HOOK_PROGRAM": str(tmp_path / "absent")},
        timeout=30,
        check=False,
    )
    # A removed package's kept entry point: nothing to run, nothing to say.
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_a_failing_program_is_logged_and_never_fails_the_hook(tmp_path: Path) -> None:
    program = tmp_path / "program"
    program.write_text("import sys\nsys.exit(7)\n")
    done = subprocess.run(
        [str(ENTRY), "web1", "reconnect", "begin", "-"],
        input=XML.encode(),
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "VIRTHOTPLUG_HOOK_PROGRAM": str(program)},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == b""
    assert b"hook program failed (exit status 7); ignored" in done.stderr


def test_the_strict_refusal_passes_only_at_prepare(tmp_path: Path) -> None:
    config = tmp_path / "strict.conf"
    config.write_text("[watch]\nstrict_agent = yes\n")
    config.chmod(0o600)
    xml = XML.replace(
        "<vcpu current='1'>4</vcpu>",
        "<vcpu current='1'>4</vcpu><vcpus>"
        "<vcpu id='0' enabled='yes' hotpluggable='no'/>"
        "<vcpu id='1' enabled='no' hotpluggable='yes'/></vcpus>",
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "VIRTHOTPLUG_HOOK_PROGRAM": str(PROGRAM),
        "VIRTHOTPLUG_CONFIG": str(config),
        "VIRTHOTPLUG_HOOK_SOCKET": str(tmp_path / "nobody.sock"),
    }
    for operation, status in (("prepare", 1), ("reconnect", 0), ("start", 0)):
        done = subprocess.run(
            [str(ENTRY), "web1", operation, "begin", "-"],
            input=xml.encode(),
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert done.returncode == status, (operation, done.stderr)


def test_make_install_points_the_entry_point_at_the_program(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    subprocess.run(
        ["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/vhp", f"INSTALL_PYTHON={PYTHON}"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    entry = (dest / "etc/libvirt/hooks/qemu.d/virthotplug").read_text()
    assert f"\nPYTHON={PYTHON}\n" in entry
    assert "\nPROGRAM=/opt/vhp/share/virthotplug/hooks/qemu\n" in entry
    assert (dest / "opt/vhp/share/virthotplug/hooks/qemu").read_text() == PROGRAM.read_text()
