"""The JSON-lines record of ``watch --json``: one type, one serializer.

Every line is one ``Record``, whether it reports a plain event or a reconcile; the keys and
their order are the stable schema documented in virthotplug(1) (JSON OUTPUT, watch --json):

    time      ISO 8601 UTC with milliseconds
    host      libvirt URI
    domain    domain name, or null for host-level records
    uuid      domain UUID, or null
    event     "lifecycle", "agent", "ost", "device-removal", "device-deleted", "hook",
              "host" or "reconcile"
    details   decoded event details (for "ost": source/status codes and names)
    findings  drift findings after a reconcile ([] for plain events)
    action    what virthotplug did or would do ("none" for plain events)
    outcome   the result ("observed" for plain events)

The defaults are those of a plain event.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence


def iso_time(epoch: float) -> str:
    """Unix time as the records write it: ISO 8601 UTC with milliseconds and a 'Z'."""
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Record:
    """One line of ``watch --json``."""

    time: str
    host: str
    domain: Optional[str]
    uuid: Optional[str]
    event: str
    details: Mapping[str, Any] = field(default_factory=dict)
    findings: Sequence[Mapping[str, Any]] = ()
    action: str = "none"
    outcome: str = "observed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "host": self.host,
            "domain": self.domain,
            "uuid": self.uuid,
            "event": self.event,
            "details": dict(self.details),
            "findings": list(self.findings),
            "action": self.action,
            "outcome": self.outcome,
        }

    def to_json(self) -> str:
        """The record as one compact JSON line (without the newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))
