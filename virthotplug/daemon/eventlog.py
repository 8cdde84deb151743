"""What the daemon tells people and programs: log lines on stderr, JSON lines on stdout.

JSON lines (``watch --json``): one ``core.records.Record`` per line, the stable schema of
virthotplug(1).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Optional, TextIO

from virthotplug.core.events import Event, HostEvent
from virthotplug.core.records import Record, iso_time

log = logging.getLogger(__name__)


def setup_daemon_logging(debug: bool, quiet: bool) -> None:
    """Timestamps for terminals; under systemd (JOURNAL_STREAM set) journald adds its own
    and reads the syslog priority prefix.
    """
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _JournalFormatter(logging.Formatter):
    _PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


class EventLog:
    """Writes each record as a log line and, with ``json_out``, as one JSON line."""

    def __init__(self, json_out: Optional[TextIO] = None) -> None:
        self._json_out = json_out
        self._lock = threading.Lock()  # reconcile workers report concurrently

    def event(self, ev: Event) -> None:
        where = _where(ev)
        level = logging.DEBUG if isinstance(ev, HostEvent) and ev.what == "listed" else logging.INFO
        log.log(level, "%s: %s", where, ev.describe())
        host = ev.host if isinstance(ev, HostEvent) else ev.domain.host if ev.domain else ""
        self._emit(
            Record(
                time=iso_time(ev.at),
                host=host,
                domain=ev.domain.name if ev.domain else None,
                uuid=ev.domain.uuid if ev.domain else None,
                event=ev.kind,
                details=ev.details(),
            )
        )

    def reconcile(
        self, record: Record, line: str, *, failed: bool = False, routine: bool = False
    ) -> None:
        """A reconcile's outcome. Routine ones (a periodic resync that changed nothing and
        found nothing new) are logged at debug level, so a large host's log stays quiet;
        the JSON line is always written.
        """
        level = logging.WARNING if failed else logging.DEBUG if routine else logging.INFO
        log.log(level, "%s", line)
        self._emit(record)

    def _emit(self, record: Record) -> None:
        if self._json_out is None:
            return
        text = record.to_json()
        with self._lock:
            self._json_out.write(text + "\n")
            self._json_out.flush()


def _where(ev: Event) -> str:
    if ev.domain is not None:
        return f"domain '{ev.domain.name}'"
    return ev.host if isinstance(ev, HostEvent) else "host"
