"""A reconcile that libvirt refused is tried again: once after ``FAILED_RETRY``, and then by
the next periodic resync, which no longer counts the domain as known. Never a spin."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from virthotplug.core import errors
from virthotplug.core.config import WatchSettings
from virthotplug.core.events import DomainRef
from virthotplug.core.schedule import Job
from virthotplug.daemon.eventlog import EventLog
from virthotplug.daemon.results import JobDone, JobResult
from virthotplug.daemon.watch import Watch
from virthotplug.daemon.worker import FAILED_RETRY, RETRY_FAILED

HOST = "test:///default"
REF = DomainRef(HOST, "uuid-1", "dom1")


class _Conn:
    uri = HOST

    def domain_by_uuid(self, uuid: str) -> Any:
        return uuid


class _Bulk:
    def __init__(self) -> None:
        self.forgotten: list[tuple[str, str]] = []

    def forget(self, host: str, uuid: str) -> None:
        self.forgotten.append((host, uuid))


def _refused(_conn: Any, _dom: Any, _job: Job) -> JobResult:
    raise errors.VirtHotplugError("domain 'dom1' metadata: virDomainGetMetadata() failed")


def _run(watch: Watch, reasons: list[str]) -> JobDone:
    watch._run_job(Job(REF, due=0.0, first_request=0.0, reasons=reasons))
    item = watch._queue.get_nowait()  # what the worker handed back to the main loop
    assert isinstance(item, JobDone)
    return item


def test_a_failed_reconcile_is_retried_once_and_forgotten_by_the_resync() -> None:
    bulk = _Bulk()
    watch = Watch([HOST], WatchSettings(), _refused, EventLog(None), resync=bulk)  # type: ignore[arg-type]
    watch.sessions[HOST]._conn = _Conn()  # type: ignore[assignment]
    first = _run(watch, ["host"])
    assert (first.retry_after, first.reason) == (FAILED_RETRY, RETRY_FAILED)
    assert bulk.forgotten == [(HOST, "uuid-1")]  # the next resync reconciles it
    again = _run(watch, ["host", RETRY_FAILED])
    assert again.retry_after is None  # no timer after the retry: the resync takes over
    assert watch.stats.failures == 2


def _crashes(_conn: Any, _dom: Any, _job: Job) -> JobResult:
    raise KeyError("a bug in one reconcile")


def test_a_crashed_reconcile_counts_as_failed_and_is_retried() -> None:
    bulk = _Bulk()
    watch = Watch([HOST], WatchSettings(), _crashes, EventLog(None), resync=bulk)  # type: ignore[arg-type]
    watch.sessions[HOST]._conn = _Conn()  # type: ignore[assignment]
    first = _run(watch, ["ost"])
    assert (first.retry_after, first.reason) == (FAILED_RETRY, RETRY_FAILED)
    assert first.unresponsive is None  # a crash says nothing of the guest's agent
    assert bulk.forgotten == [(HOST, "uuid-1")]
    again = _run(watch, ["ost", RETRY_FAILED])
    assert again.retry_after is None
    assert watch.stats.failures == 2


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            "domain 'dom1' metadata: virDomainGetMetadata() failed",
            "domain 'dom1' metadata: virDomainGetMetadata() failed",
        ),
        ("domain 'dom1': guest agent refused", "domain 'dom1': guest agent refused"),
        ("no vCPU maximum in the definition", "domain 'dom1': no vCPU maximum in the definition"),
    ],
)
def test_a_failed_reconcile_names_its_domain_once(
    message: str, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(_conn: Any, _dom: Any, _job: Job) -> JobResult:
        raise errors.VirtHotplugError(message)

    watch = Watch([HOST], WatchSettings(), refused, EventLog(None))
    watch.sessions[HOST]._conn = _Conn()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger="virthotplug.daemon"):
        _run(watch, ["host"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [line]
