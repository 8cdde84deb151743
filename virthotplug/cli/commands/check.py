"""``virthotplug check``: the status evaluation as a Nagios/Icinga monitoring plugin."""

from __future__ import annotations

import argparse
from typing import Any

from virthotplug.cli.commands.common import (
    add_selection,
    agent_timeout,
    check_read_result,
    selected_names,
    uris,
)

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
    from virthotplug.core.config import load_config
    from virthotplug.host import collect, history

    # Findings honour each domain's effective policy and history, as watch judges them.
    config = load_config(args.config_file)
    context = history.contexts(config)
    hosts, names = uris(args), selected_names(args)
    result = collect.read_hosts(
        hosts,
        names,
        readonly=args.readonly,
        agent_timeout=agent_timeout(args, config),
        context=context,
    )
    check_read_result(result, names, hosts)
    failures = [f"{e.host} {e.name}".strip() + f": {e.error}" for e in result.errors]
    status = report.check_status(result.views, len(failures))
    print(report.check_line(result.views, failures, status))
    return status
