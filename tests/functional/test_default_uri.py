"""Without -c, libvirt chooses the host (LIBVIRT_DEFAULT_URI, uri_default of libvirt.conf,
the session daemon for non-root): virthotplug opens None and names the host as libvirt
does (virConnectGetURI). An empty -c is refused, not taken for the default."""

from __future__ import annotations

import argparse
from typing import Any, Optional

import pytest
from tdriver import MIXED, run_cli

from virthotplug.core.errors import EXIT_OK
from virthotplug.core.report import CHECK_UNKNOWN
from virthotplug.host.libvirt_module import libvirt_module

# What libvirt's default resolves to in these tests (as uri_default would make it).
LIBVIRTS_DEFAULT = "test:///default"


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Optional[str]]:
    """The names libvirt's open and openReadOnly were called with; None opens the default."""
    libvirt = libvirt_module()
    calls: list[Optional[str]] = []

    def recording(real: Any) -> Any:
        def open_(name: Optional[str]) -> Any:
            calls.append(name)
            return real(LIBVIRTS_DEFAULT if name is None else name)

        return open_

    monkeypatch.setattr(libvirt, "open", recording(libvirt.open))
    monkeypatch.setattr(libvirt, "openReadOnly", recording(libvirt.openReadOnly))
    return calls


@pytest.mark.parametrize("readonly", [[], ["-r"]])
def test_no_uri_leaves_the_choice_to_libvirt(
    readonly: list[str], opened: list[Optional[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, *readonly, "status", "--all", "--json")
    assert result.status == EXIT_OK, result.err
    assert opened == [None]  # not qemu:///system
    assert result.json()["domains"][0]["host"] == LIBVIRTS_DEFAULT  # as libvirt names it


def test_watch_names_the_default_host_as_libvirt_does(opened: list[Optional[str]]) -> None:
    from virthotplug.cli.commands.watch import _host_uris

    assert _host_uris(argparse.Namespace(uris=None)) == [LIBVIRTS_DEFAULT]
    assert _host_uris(argparse.Namespace(uris=[MIXED])) == [MIXED]
    assert opened == [None]


@pytest.mark.parametrize("uri", ["", " "])
def test_an_empty_uri_is_refused(uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "-c", uri, "status", "--all")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(
        "error: argument -c/--connect: an empty URI; leave -c out to connect to libvirt's "
        "default URI\n"
    )


def test_check_refuses_an_empty_uri_as_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "-c", "", "check", "--all")
    assert result.status == CHECK_UNKNOWN
    assert result.out.startswith("VIRTHOTPLUG UNKNOWN - argument -c/--connect: an empty URI")


def test_a_default_host_that_cannot_be_reached_is_named_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "bogus:///x")
    result = run_cli(capsys, "status", "--all")
    assert result.err.startswith("virthotplug: error: cannot connect to libvirt's default URI: ")
