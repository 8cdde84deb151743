"""``virthotplug status``: per-layer vCPU counts and drift findings."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from virthotplug.cli.commands.common import add_selection
from virthotplug.cli.commands.reading import read_for_report
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

    # Findings honour each domain's effective policy and history, as watch judges them.
    reading = read_for_report(args, qemu_monitor=args.qemu_monitor)
    result = reading.result
    if args.json:
        print(report.status_json(result.views, result.errors, reading.not_read))
    else:
        show_host = len(reading.hosts) > 1
        table = report.status_table(result.views, show_host=show_host, headers=not args.quiet)
        if table:
            print(table)
        for failure in result.errors:
            where = f"{failure.host} {failure.name}".strip()
            print(f"virthotplug: error: {where}: {failure.error}", file=sys.stderr)
    for what in reading.not_read:
        print(f"virthotplug: warning: not read: {what}", file=sys.stderr)
    return EXIT_FAILURE if result.errors else EXIT_OK
