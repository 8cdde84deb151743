"""``virthotplug apply``: reconcile domains once with their onlining policy."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from virthotplug.cli.commands.common import (
    add_selection,
    agent_timeout,
    missing_everywhere,
    selected_names,
    uris,
)
from virthotplug.core.errors import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    NoDomainError,
    VirtHotplugError,
    quote,
)

if TYPE_CHECKING:  # the real imports stay inside run(): start-up stays light
    from virthotplug.core.config import HostConfig
    from virthotplug.host.connection import Connection
    from virthotplug.host.domain import Domain
    from virthotplug.ops.reconcile import ReconcileResult


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


@dataclass(frozen=True)
class Failure:
    """A domain (``name``) or a whole host (``name`` empty) that could not be reconciled."""

    host: str
    name: str
    error: VirtHotplugError

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "domain": self.name or None, "error": str(self.error)}


def run(args: argparse.Namespace) -> int:
    from virthotplug.core.config import load_config

    names = selected_names(args)
    hosts = uris(args)
    config = load_config(args.config_file)
    applied = Applied()
    for uri in hosts:
        _apply_on_host(uri, names, config, args, len(hosts) > 1, applied)
    failures = sorted(applied.failures, key=lambda f: (f.host, f.name))
    hosts_down = sum(1 for f in failures if not f.name)
    missing_everywhere(names or [], applied.found, hosts, hosts_down)
    results = sorted(applied.results, key=lambda r: (r.host, r.name))
    if names is not None and len(names) == 1 and failures:
        # One named domain: its own error and exit status, like virsh.
        if not args.json:
            raise failures[0].error
        _print(results, failures, as_json=True, show_host=False)
        print(f"virthotplug: error: {failure_message(failures[0])}", file=sys.stderr)
        return failures[0].error.exit_status
    _print(results, failures, args.json, show_host=len(hosts) > 1)
    failed = failures or any(r.failed for r in results)
    return EXIT_INCOMPLETE if failed else EXIT_OK


@dataclass
class Applied:
    """What the hosts' reconciles gave, and the names found on some host."""

    results: list[ReconcileResult] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    found: set[str] = field(default_factory=set)


def _apply_on_host(
    uri: str | None,
    names: list[str] | None,
    config: HostConfig,
    args: argparse.Namespace,
    several: bool,
    into: Applied,
) -> None:
    """Reconcile the named (or all) domains of one host. With several hosts a name needs
    to exist on one of them only, and a host that fails is a failure of its own."""
    from virthotplug.host.connection import Connection

    conn = Connection(uri, readonly=args.readonly)
    try:
        with conn.open():
            domains = _lookup(conn, names, into.found, several)
            done, failed = _reconcile_all(conn, domains, config, args)
    except VirtHotplugError as exc:
        if not several:
            raise
        into.failures.append(Failure(conn.uri, "", exc))
        return
    into.results.extend(done)
    into.failures.extend(failed)


def _lookup(
    conn: Connection, names: list[str] | None, found: set[str], several: bool
) -> list[Domain]:
    if names is None:
        return conn.list_domains()
    domains = []
    for name in names:
        try:
            domains.append(conn.lookup(name))
        except NoDomainError:
            if not several:
                raise
            continue
        found.add(name)
    return domains


def _reconcile_all(
    conn: Connection, domains: list[Domain], config: HostConfig, args: argparse.Namespace
) -> tuple[list[ReconcileResult], list[Failure]]:
    from concurrent.futures import ThreadPoolExecutor

    from virthotplug.ops.reconcile import reconcile

    def one(dom: Domain) -> ReconcileResult | Failure:
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
            return Failure(conn.uri, dom.name, exc)

    if not domains:
        return [], []
    workers = max(1, min(config.watch.workers, len(domains)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apply") as pool:
        done = list(pool.map(one, domains))
    results = [r for r in done if not isinstance(r, Failure)]
    failures = [r for r in done if isinstance(r, Failure)]
    return results, failures


def _print(
    results: list[ReconcileResult], failures: list[Failure], as_json: bool, *, show_host: bool
) -> None:
    if as_json:
        from virthotplug.core.report import JSON_SCHEMA_VERSION, json_document

        doc = {
            "version": JSON_SCHEMA_VERSION,
            "results": [r.to_dict() for r in results],
            "errors": [f.to_dict() for f in failures],
        }
        print(json_document(doc))
        return
    for result in results:
        lines = describe(result)
        print("\n".join([f"{result.host} {lines[0]}" if show_host else lines[0], *lines[1:]]))
    for failure in failures:
        message = failure_message(failure)
        if show_host or not failure.name:
            message = f"{failure.host}: {message}"
        print(f"virthotplug: error: {message}", file=sys.stderr)


def failure_message(failure: Failure) -> str:
    """The error, naming the domain once (libvirt's messages often name it already)."""
    message = str(failure.error)
    if failure.name and quote(failure.name) not in message:
        message = f"domain {quote(failure.name)}: {message}"
    return message


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
