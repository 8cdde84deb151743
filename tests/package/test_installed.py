"""The installed Debian package: its files, the program under the system python3, a
``watch`` smoke test, and libvirtd running the package's own hook for a lab VM start.

The hook is two files: the /bin/sh entry point libvirtd runs (a conffile) and the Python
hook program it runs, in /usr/share/virthotplug/hooks. The hook test follows
tests/e2e/test_hook.py: the package's hook stays as installed; only
``/etc/virthotplug/virthotplug.conf`` is swapped for one naming the test's socket, and put
back afterwards; libvirtd re-reads its hooks on SIGHUP (never a restart).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from hook_install import INSTALLED, SYSTEM_CONFIG, Saved, reload_libvirt_hooks
from lab import LabVM
from test_hook import hook_record
from watchproc import WatchProcess, scoped_config, write_config

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = Path("/usr/bin/virthotplug")
HOOK_PROGRAM = Path("/usr/share/virthotplug/hooks/qemu")  # what the entry point runs
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter the entry point runs it with
UNIT = Path("/lib/systemd/system/virthotplug.service")
COMPLETION = Path("/usr/share/bash-completion/completions/virthotplug")
MAN_PAGES = (
    Path("/usr/share/man/man1/virthotplug.1.gz"),
    Path("/usr/share/man/man5/virthotplug.conf.5.gz"),
    Path("/usr/share/man/man8/virthotplug-hook.8.gz"),
)
ENABLED_LINK = Path("/etc/systemd/system/multi-user.target.wants/virthotplug.service")
SERVING = re.compile(r"metrics: serving http://127\.0\.0\.1:(\d+)/metrics")
TEST_URI = "test:///default"


def dpkg_query(field: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", f"-f=${{{field}}}", "virthotplug"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def program(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROGRAM), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def owner(path: Path) -> str:
    found = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True)
    return found.stdout.split(":", 1)[0] if found.returncode == 0 else found.stderr


def assignments(script: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of a shell script."""
    lines = script.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))


def test_files_in_place() -> None:
    assert PROGRAM.read_text().splitlines()[0] == "#!/usr/bin/python3"
    assert mode(PROGRAM) == 0o755
    # The hook: the entry point unchanged (its defaults are the package's layout) and the
    # hook program it names, both the package's and executable.
    assert INSTALLED.read_bytes() == (ROOT / "hooks" / "virthotplug").read_bytes()
    assert HOOK_PROGRAM.read_bytes() == (ROOT / "hooks" / "qemu").read_bytes()
    for path in (INSTALLED, HOOK_PROGRAM):
        assert mode(path) == 0o755, path
        assert owner(path) == "virthotplug", path
    names = assignments(INSTALLED)
    assert names["PROGRAM"] == str(HOOK_PROGRAM)
    assert names["PYTHON"] == SYSTEM_PYTHON
    assert mode(SYSTEM_CONFIG) == 0o600
    assert "ExecStart=/usr/bin/virthotplug watch" in UNIT.read_text()
    assert "virthotplug" in COMPLETION.read_text()
    for page in MAN_PAGES:
        assert page.stat().st_size > 0, page
    # The conffiles, unchanged since installation (dpkg's recorded md5 sums).
    conffiles = {
        line.split()[0]: line.split()[1]
        for line in dpkg_query("Conffiles").splitlines()
        if line.strip()
    }
    assert set(conffiles) == {str(INSTALLED), str(SYSTEM_CONFIG)}
    for path, md5 in conffiles.items():
        assert hashlib.md5(Path(path).read_bytes()).hexdigest() == md5, path


def test_service_installed_but_not_enabled() -> None:
    assert UNIT.exists()
    assert not ENABLED_LINK.exists() and not ENABLED_LINK.is_symlink()


def test_version_is_the_package_version() -> None:
    result = program("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"virthotplug {dpkg_query('Version')}"


def test_manual_pages_are_found() -> None:
    result = subprocess.run(["man", "-w", "virthotplug"], capture_output=True, text=True)
    assert result.stdout.strip() == str(MAN_PAGES[0]), result.stderr


def test_status_with_system_libvirt() -> None:
    result = program("-c", TEST_URI, "status", "--all", "--json")
    assert result.returncode == 0, result.stderr
    assert "test" in {d["name"] for d in json.loads(result.stdout)["domains"]}


@pytest.fixture
def smoke_watch(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    config = write_config(tmp_path / "virthotplug.conf", "[defaults]\nmode = report\n")
    stderr = (tmp_path / "watch.stderr").open("w+")
    argv = [str(PROGRAM), "-c", TEST_URI, "--config-file", str(config), "watch"]
    argv += ["--json", "--no-hook-socket", "--metrics-listen", "127.0.0.1:0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_watch_smoke(smoke_watch: subprocess.Popen[str], tmp_path: Path) -> None:
    """watch with the system python3-libvirt and python3-prometheus-client: connects,
    reconciles the test driver's domain, serves metrics, stops on SIGTERM."""
    assert smoke_watch.stdout is not None
    records = []
    for line in smoke_watch.stdout:
        records.append(json.loads(line))
        if records[-1]["event"] == "reconcile" and records[-1]["domain"] == "test":
            break
    assert any(r["event"] == "host" and r["details"]["what"] == "connected" for r in records)
    found = SERVING.search((tmp_path / "watch.stderr").read_text())
    assert found, (tmp_path / "watch.stderr").read_text()
    url = f"http://127.0.0.1:{found.group(1)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    assert f'virthotplug_host_connected{{host="{TEST_URI}"}} 1.0' in text
    started = time.monotonic()
    smoke_watch.send_signal(signal.SIGTERM)
    assert smoke_watch.wait(10) == 0
    assert time.monotonic() - started < 2.0


@pytest.fixture
def hook_config(tmp_path: Path) -> Iterator[Path]:
    """The package's hook as installed, told (through the system configuration file) to
    send to this test's socket; the configuration is restored afterwards."""
    for path in (INSTALLED, HOOK_PROGRAM):
        assert owner(path) == "virthotplug", path
    socket_path = tmp_path / "hook.sock"  # where scoped_config puts watch's socket
    saved = Saved()
    try:
        saved.file(SYSTEM_CONFIG)
        write_config(SYSTEM_CONFIG, f"[watch]\nhook_socket = {socket_path}\n")
        reload_libvirt_hooks()
        yield socket_path
    finally:
        saved.restore()
        reload_libvirt_hooks()
    assert saved.restored(), "the configuration file was not put back"


def test_libvirtd_runs_the_packaged_hook(
    hook_config: Path, tmp_path: Path, make_vm: Callable[..., LabVM]
) -> None:
    watch = WatchProcess(scoped_config(tmp_path, {}))  # /usr/bin/python3 -m virthotplug
    try:
        watch.wait_for(lambda r: r["event"] == "host" and r["details"]["what"] == "connected")
        since = time.monotonic()
        vm = make_vm()
        for operation in ("prepare", "start", "started"):
            _, record = watch.wait_for(hook_record(vm.name, operation), since=since)
            assert record["uuid"] == vm.dom.UUIDString()
        started_at, _ = watch.wait_for(hook_record(vm.name, "started"), since=since)
        print(f"packaged hook: 'started' reached watch {started_at - since:.2f} s after start")
        since = time.monotonic()
        vm.destroy()
        for operation in ("stopped", "release"):
            watch.wait_for(hook_record(vm.name, operation), since=since)
    finally:
        stopped_in = watch.stop()
    assert watch.proc.returncode == 0, watch.stderr_tail()
    assert stopped_in < 2.0
    assert os.path.exists(INSTALLED) and os.path.exists(HOOK_PROGRAM)  # the package's hook
