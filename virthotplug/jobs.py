"""One daemon job: reconcile one domain and describe the outcome for the event log."""

from __future__ import annotations

import time
from typing import Any

from virthotplug.collect import read_view
from virthotplug.config import HostConfig, WatchSettings
from virthotplug.connection import Connection, Domain
from virthotplug.cpulist import format_cpulist
from virthotplug.eventlog import iso_time
from virthotplug.schedule import Job
from virthotplug.view import VcpuView, to_dict
from virthotplug.watch import Outcome


class JobRunner:
    """Holds the current configuration (replaced on SIGHUP) and runs jobs with it."""

    def __init__(self, config: HostConfig, settings: WatchSettings) -> None:
        self.config = config
        self.settings = settings

    def update(self, config: HostConfig, settings: WatchSettings) -> None:
        self.config, self.settings = config, settings

    def run(self, conn: Connection, dom: Domain, job: Job) -> Outcome:
        view = read_view(conn, dom, agent_timeout=self.settings.agent_timeout)
        return _report_outcome(job, view)


def _report_outcome(job: Job, view: VcpuView) -> Outcome:
    guest = view.guest
    summary = "guest layer unknown"
    if guest is not None:
        summary = f"guest online {format_cpulist(guest.online) or '-'}"
        if guest.offline:
            summary += f", offline {format_cpulist(guest.offline)}"
    codes = ",".join(f.code for f in view.findings) or "no findings"
    line = f"domain '{view.name}': reconciled ({'+'.join(job.reasons)}): {summary}; {codes}"
    return Outcome(record=_record(job, view, action="none", outcome="reported"), line=line)


def _record(job: Job, view: VcpuView, *, action: str, outcome: str) -> dict[str, Any]:
    data = to_dict(view)
    return {
        "time": iso_time(time.time()),
        "host": view.host,
        "domain": view.name,
        "uuid": view.uuid,
        "event": "reconcile",
        "details": {
            "trigger": list(job.reasons),
            "coalesced": job.coalesced,
            "hotadded": sorted(job.hotadded),
            "since_first_event": round(time.monotonic() - job.first_request, 3),
            "live": data["live"],
            "guest": data["guest"],
            "agent": data["agent"],
        },
        "findings": data["findings"],
        "action": action,
        "outcome": outcome,
    }
