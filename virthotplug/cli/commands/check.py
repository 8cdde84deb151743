"""``virthotplug check``: the status evaluation as a Nagios/Icinga monitoring plugin."""

from __future__ import annotations

import argparse
from typing import Any

from virthotplug.cli.commands.common import add_selection
from virthotplug.cli.commands.reading import read_for_report

NAME = "check"
CHECK_UNKNOWN = 3  # report.CHECK_UNKNOWN; report stays out of start-up (it loads the view model)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="monitoring plugin: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
        description="Evaluate vCPU drift like 'status' and print one monitoring-plugin line; "
        "the exit status is 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN.",
    )
    add_selection(parser)
    parser.set_defaults(run=run, plugin_unknown_status=CHECK_UNKNOWN)


def run(args: argparse.Namespace) -> int:
    from virthotplug.core import report

    # Findings honour each domain's effective policy and history, as watch judges them.
    reading = read_for_report(args)
    result = reading.result
    failures = [f"{e.host} {e.name}".strip() + f": {e.error}" for e in result.errors]
    status = report.check_status(result.views, len(failures))
    print(report.check_line(result.views, failures, status, not_read=reading.not_read))
    return status
