"""Follow a process's JSON lines as they come (``watch --json``): a thread reads its stdout
and keeps every line that parses as JSON with its arrival time; other lines are skipped.

Shared by the lab (``inroot``) and the benchmarks (``bench/hotadd.py``,
``bench/footprint.py``), which put this directory on ``sys.path``.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterable

Record = dict[str, Any]


class JsonLineReader:
    """The records read so far from ``stream``, each with its arrival (monotonic seconds)."""

    def __init__(self, stream: Iterable[str], name: str = "json-lines") -> None:
        self._arrivals: list[tuple[float, Record]] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), name=name, daemon=True)
        self.thread.start()

    def _read(self, stream: Iterable[str]) -> None:
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self._arrivals.append((time.monotonic(), record))

    def arrivals(self) -> list[tuple[float, Record]]:
        """(arrival, record) of every record so far, in the order they came."""
        with self._lock:
            return list(self._arrivals)

    def records(self) -> list[Record]:
        return [record for _, record in self.arrivals()]
