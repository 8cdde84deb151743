"""The configuration file is read the same way by the daemon and by the hook, and safely:
a FIFO (or any non-regular file) is refused instead of blocking open(); text that the two
parsers could split into lines differently (NUL, NEL, U+2028/2029, vertical tab, form feed,
file/group/record separators, a lone CR) or that is not UTF-8 is refused by both (the hook
then uses its defaults, as for every file the daemon refuses); a NUL in hook_socket is a
configuration error; and the hook parses a 1 MiB file in linear time."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest

from virthotplug.core.config import load_config, parse_config
from virthotplug.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hookmod() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("virthotplug_hook_cfg", str(ROOT / "hooks/qemu"))
    spec = importlib.util.spec_from_loader("virthotplug_hook_cfg", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _file(tmp_path: Path, data: bytes, name: str = "v.conf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_a_fifo_as_config_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo, 0o600)
    outcome: list[Any] = []

    def load() -> None:
        try:
            load_config(str(fifo))
        except ConfigError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock it: a writer opens the FIFO
        with open(fifo, "wb"):
            pass
        thread.join(5)
        pytest.fail("load_config blocked on a FIFO")
    assert outcome and "not a regular file" in str(outcome[0])


def test_a_nul_in_hook_socket_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config("[watch]\nhook_socket = /run/virthotplug/a\0b.sock\n", path="x.conf")


TRICKY = {
    "nel": b"[watch]\nstrict_agent = no\xc2\x85strict_agent = yes\n",
    "u2028": "[watch]\nstrict_agent = no\u2028hook_socket = /tmp/x.sock\n".encode(),
    "u2029": "[defaults]\nmode = report\u2029[domain:web*]\nmode = online\n".encode(),
    "vt": b"[watch]\nstrict_agent = no\x0bstrict_agent = yes\n",
    "ff": b"[watch]\nstrict_agent = no\x0c[defaults]\n",
    "fs": b"[watch]\nstrict_agent = no\x1cmode = x\n",
    "lone-cr": b"[watch]\nstrict_agent = no\rstrict_agent = yes\n",
    "nul-section": b"[\x00]\nmode = online\n[defaults]\n",
    "nul-value": b"[watch]\nhook_socket = /run/a\x00b\n",
    "not-utf8": b"[defaults]\nmode = report\xff\n",
    "crlf": b"[watch]\r\nstrict_agent = yes\r\n",  # accepted by both, the same way
    "plain": b"[defaults]\nmode = online\n[domain:web*]\nmode = ignore\n",
}


def _daemon(path: Path) -> Optional[dict[str, Any]]:
    try:
        config = load_config(str(path))
    except ConfigError:
        return None
    return {"strict_agent": config.watch.strict_agent, "defaults": dict(config.defaults)}


def _hook(hookmod: ModuleType, path: Path) -> Optional[dict[str, Any]]:
    parsed = hookmod.read_config(str(path))
    if not parsed:
        return None
    strict = hookmod.yes(parsed.get("watch", {}).get("strict_agent", "no"))
    return {"strict_agent": strict, "defaults": parsed.get("defaults", {})}


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_the_hook_and_the_daemon_read_the_same_file_the_same_way(
    hookmod: ModuleType, tmp_path: Path, case: str
) -> None:
    path = _file(tmp_path, TRICKY[case])
    assert _hook(hookmod, path) == _daemon(path)
    if case not in ("crlf", "plain"):
        assert _daemon(path) is None  # refused (the hook: defaults)


def test_the_hook_parses_a_large_file_in_linear_time(hookmod: ModuleType) -> None:
    lines = ["[domain:x]", "exclude = 1"] + ["    2"] * 200_000  # ~1.2 MB of continuation
    text = "\n".join(lines)[: 1024 * 1024]
    started = time.perf_counter()
    parsed = hookmod.parse_ini(text)
    seconds = time.perf_counter() - started
    assert parsed["domain:x"]["exclude"].startswith("1\n2")
    assert seconds < 0.5, f"{seconds:.2f} s"


# --- the hook's policy mode is the daemon's merge --------------------------------------------

UUID = "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01"
POLICY_CASES = {
    "nothing": ("", None),
    "defaults": ("[defaults]\nmode = online\n", None),
    "first section wins": (
        "[defaults]\nmode = online\n[domain:web1]\ngrace = 2\n[domain:web*]\nmode = ignore\n",
        None,
    ),
    "glob": ("[domain:w?b[0-9]]\nmode = match\n[defaults]\nmode = ignore\n", None),
    "uuid in another case": (f"[domain:{UUID.upper()}]\nmode = ignore\n", None),
    "metadata over all": ("[domain:web1]\nmode = ignore\n[defaults]\nmode=online\n", "match"),
    "no match": ("[domain:db*]\nmode = online\n", None),
}


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_the_hook_and_the_daemon_merge_policies_alike(hookmod: ModuleType, case: str) -> None:
    from virthotplug.core.policy import merge_policy

    text, metadata = POLICY_CASES[case]
    config = parse_config(text, path="p.conf")
    layers = list(config.policy_layers("web1", UUID))
    if metadata is not None:
        layers.insert(0, ("metadata (live)", {"mode": metadata}))
    daemon = merge_policy(layers, domain="web1").policy.mode
    domain = hookmod.Domain()
    domain.name, domain.uuid, domain.policy_mode = "web1", UUID, metadata
    assert hookmod.policy_mode(domain, hookmod.parse_ini(text)) == daemon
