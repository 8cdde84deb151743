"""The Debian package on the next Debian: installed with apt inside stack 3's forky root
(tests/lab/stacks.py) and run there with forky's python3 (3.14) and python3-libvirt 12.8
against the root's own libvirtd 12.8 and a lab VM on it.

The root carries the package's dependencies from its build (stacks.PACKAGE_DEPENDENCIES) and
no archive (its apt sources and lists are empty): ``apt-get install ./virthotplug_*.deb``
there needs no network, and fails if the package came to need something new. The package is
purged again at the end; the root is left as it was built. tests/package/run.sh builds the
package and names it in ``$VIRTHOTPLUG_DEB``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from domains import MANUAL
from lab import Lab, LabVM
from sandbox import SandboxError
from stacks import STACK3, Stack, Users, ensure_stack

IN_ROOT_DEB_DIR = "/var/cache/virthotplug-lab-package"
URI_INSIDE = "qemu:///system"
CHECK_WARNING = 1


def built_package() -> Path:
    named = os.environ.get("VIRTHOTPLUG_DEB", "")
    if not named or not Path(named).is_file():
        pytest.fail(
            f"VIRTHOTPLUG_DEB names no package ({named!r}): run tests/package/run.sh",
            pytrace=False,
        )
    return Path(named)


@pytest.fixture(scope="module")
def stack3() -> Iterator[Stack]:
    stack = ensure_stack(STACK3)
    users = Users(STACK3)
    try:
        started = time.monotonic()
        if stack.start():
            print(f"stack 3 started in {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        if users.leave():
            stack.stop()


def dpkg_state(stack: Stack) -> str:
    try:
        return stack.run("dpkg-query", "-W", "-f=${db:Status-Status}", "virthotplug")
    except SandboxError:
        return "not-installed"


@pytest.fixture(scope="module")
def installed(stack3: Stack) -> Iterator[Stack]:
    """The package apt-installed in the root from the local file, purged afterwards."""
    deb = built_package()
    if dpkg_state(stack3) not in ("", "not-installed"):
        # Left by a run that died before its purge: the root is the lab's, not a host.
        stack3.run("apt-get", "purge", "-y", "-qq", "virthotplug")
    inside = f"{IN_ROOT_DEB_DIR}/{deb.name}"
    stack3.host_path(IN_ROOT_DEB_DIR).mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(deb, stack3.host_path(inside))
    try:
        started = time.monotonic()
        stack3.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", inside)
        print(f"apt-get install ./{deb.name} in stack 3: {time.monotonic() - started:.1f} s")
        yield stack3
    finally:
        stack3.run("apt-get", "purge", "-y", "-qq", "virthotplug")
        shutil.rmtree(stack3.host_path(IN_ROOT_DEB_DIR), ignore_errors=True)
    assert dpkg_state(stack3) in ("", "not-installed")
    assert not stack3.host_path("/usr/bin/virthotplug").exists()


@pytest.fixture(scope="module")
def stack3_vm(stack3: Stack) -> Iterator[LabVM]:
    """A busybox lab VM on stack 3 with one hot-added vCPU left offline (a finding)."""
    with Lab(stack3.uri) as lab:
        vm = lab.create(behaviour=MANUAL)
        vm.hot_add(2)
        vm.wait_cpu_state(lambda s: s.present == {0, 1}, what="cpu1 present")
        yield vm


def inside(stack: Stack, *argv: str) -> tuple[int, str]:
    """``virthotplug -c qemu:///system ARGV`` in the root: its exit status and output."""
    script = 'virthotplug -c "$0" "$@" 2>&1; echo "exit $?"'
    out = stack.run("sh", "-c", script, URI_INSIDE, *argv).rstrip("\n")
    text, _, status = out.rpartition("\n")
    assert status.startswith("exit "), out
    return int(status.split()[1]), text


def test_installed_with_forkys_python(installed: Stack) -> None:
    assert installed.run("head", "-n", "1", "/usr/bin/virthotplug").strip() == "#!/usr/bin/python3"
    python = installed.run("python3", "--version").strip()
    assert python.startswith("Python 3.14"), python
    version = installed.run("dpkg-query", "-W", "-f=${Version}", "virthotplug")
    assert installed.run("virthotplug", "--version").strip() == f"virthotplug {version}"
    module = installed.run("python3", "-c", "import virthotplug; print(virthotplug.__file__)")
    assert module.startswith("/usr/lib/python3/dist-packages/virthotplug/"), module


def test_status_all_in_the_root_sees_the_lab_vm(installed: Stack, stack3_vm: LabVM) -> None:
    status, out = inside(installed, "status", "--all", "--json")
    assert status == 0, out
    domains = {d["name"]: d for d in json.loads(out)["domains"]}
    assert stack3_vm.name in domains, out
    print(json.dumps(domains[stack3_vm.name])[:600])


def test_check_in_the_root_warns_of_the_offline_cpu(installed: Stack, stack3_vm: LabVM) -> None:
    status, out = inside(installed, "check", stack3_vm.name)
    print(out)
    assert status == CHECK_WARNING, out
    assert out.startswith("VIRTHOTPLUG WARNING"), out
    assert stack3_vm.taints() == []
