"""``virthotplug status``: per-layer vCPU counts and drift findings."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from virthotplug.cli.commands.common import (
    add_selection,
    agent_timeout,
    check_read_result,
    selected_names,
    uris,
)
from virthotplug.core.errors import EXIT_FAILURE, EXIT_OK


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show vCPUs at every layer and where they drift",
        description="Show each domain's vCPUs as the persistent config, the live definition, "
        "the hypervisor and the guest see them, and the drift findings between them.",
    )
    add_selection(parser)
    parser.add_argument("--json", action="store_true", help="print JSON (stable schema)")
    parser.add_argument(
        "--qemu-monitor",
        action="store_true",
        help="also ask QEMU itself which vCPUs it has plugged (query-hotpluggable-cpus "
        "through libvirt_qemu.qemuMonitorCommand); this TAINTS every running domain asked "
        "(libvirt records custom-monitor). Off by default; watch never does it",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virthotplug.core import report
    from virthotplug.core.config import load_config
    from virthotplug.host import collect, history

    hosts = uris(args)
    # Findings honour each domain's effective policy and history, as watch judges them.
    config = load_config(args.config_file)
    context = history.contexts(config, qemu_monitor=args.qemu_monitor)
    names = selected_names(args)
    result = collect.read_hosts(
        hosts,
        names,
        readonly=args.readonly,
        agent_timeout=agent_timeout(args, config),
        context=context,
    )
    check_read_result(result, names, hosts)
    if args.json:
        print(report.status_json(result.views, result.errors))
    else:
        table = report.status_table(result.views, show_host=len(hosts) > 1, headers=not args.quiet)
        if table:
            print(table)
        for failure in result.errors:
            where = f"{failure.host} {failure.name}".strip()
            print(f"virthotplug: error: {where}: {failure.error}", file=sys.stderr)
    return EXIT_FAILURE if result.errors else EXIT_OK
