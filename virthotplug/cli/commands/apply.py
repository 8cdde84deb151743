"""``virthotplug apply``: reconcile domains once with their onlining policy."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from virthotplug.cli.commands.common import add_selection, agent_timeout, selected_names, uris
from virthotplug.core.errors import EXIT_INCOMPLETE, EXIT_OK, UsageError

if TYPE_CHECKING:  # the real imports stay inside run(): start-up stays light
    from virthotplug.core.config import HostConfig
    from virthotplug.core.errors import VirtHotplugError
    from virthotplug.host.connection import Connection
    from virthotplug.host.domain import Domain
    from virthotplug.ops.reconcile import ReconcileResult

JSON_SCHEMA_VERSION = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="apply each domain's onlining policy once (or show what it would do)",
        description="Read every layer of each domain, decide what its onlining policy asks "
        "for and carry it out through the guest agent, domains in parallel. Grace periods are "
        "ignored. Exit status 0 when everything went as planned, 11 when something failed.",
    )
    add_selection(parser)
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virthotplug.core.config import load_config
    from virthotplug.host.connection import Connection

    names = selected_names(args)
    hosts = uris(args)
    if len(hosts) > 1:
        raise UsageError("apply works on one host: give -c once")
    config = load_config(args.config_file)
    with Connection(hosts[0], readonly=args.readonly) as conn:
        domains = [conn.lookup(name) for name in names] if names else conn.list_domains()
        results, failures = _reconcile_all(conn, domains, config, args)
    if names is not None and len(names) == 1 and failures:
        raise failures[0][1]  # one named domain: its own error and exit status, like virsh
    _print(results, failures, args.json)
    failed = failures or any(r.failed for r in results)
    return EXIT_INCOMPLETE if failed else EXIT_OK


def _reconcile_all(
    conn: Connection, domains: list[Domain], config: HostConfig, args: argparse.Namespace
) -> tuple[list[ReconcileResult], list[tuple[str, VirtHotplugError]]]:
    from concurrent.futures import ThreadPoolExecutor

    from virthotplug.core.errors import VirtHotplugError
    from virthotplug.ops.reconcile import reconcile

    def one(dom: Domain) -> ReconcileResult | tuple[str, VirtHotplugError]:
        try:
            return reconcile(
                conn,
                dom,
                config,
                dry_run=args.dry_run,
                trigger="apply",
                agent_timeout=agent_timeout(args, config),
            )
        except VirtHotplugError as exc:
            return (dom.name, exc)

    workers = max(1, min(config.watch.workers, len(domains)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apply") as pool:
        done = list(pool.map(one, domains))
    results = [r for r in done if not isinstance(r, tuple)]
    failures = [r for r in done if isinstance(r, tuple)]
    return results, failures


def _print(
    results: list[ReconcileResult], failures: list[tuple[str, VirtHotplugError]], as_json: bool
) -> None:
    if as_json:
        doc = {
            "version": JSON_SCHEMA_VERSION,
            "results": [r.to_dict() for r in results],
            "errors": [{"domain": name, "error": str(exc)} for name, exc in failures],
        }
        print(json.dumps(doc, indent=2))
        return
    for result in results:
        print("\n".join(describe(result)))
    for name, exc in failures:
        message = str(exc) if f"'{name}'" in str(exc) else f"domain '{name}': {exc}"
        print(f"virthotplug: error: {message}", file=sys.stderr)


def describe(result: ReconcileResult) -> list[str]:
    """Lines for one reconcile: the policy, the plan, then every outcome."""
    from virthotplug.core.cpulist import format_cpulist

    policy = result.policy.policy
    head = f"{result.name}: policy {policy.mode} ({result.policy.sources['mode']})"
    lines = [head + (" [dry run]" if result.dry_run else "")]
    plan = result.plan
    lines.append(f"  plan: {plan.note}")
    for verb, cpus in (("online", plan.online), ("offline", plan.offline)):
        if cpus:
            prefix = "would " if result.dry_run else ""
            lines.append(f"  {prefix}{verb} CPU {format_cpulist(cpus)}")
    for outcome in result.outcomes:
        which = f" CPU {format_cpulist(outcome.cpus)}" if outcome.cpus else ""
        # The plan line already gave the reason shared by the plan as a whole.
        shown = outcome.reason and outcome.reason != plan.note
        reason = f": {outcome.reason}" if shown else ""
        lines.append(f"  {outcome.code}{which}{reason}")
    return lines
