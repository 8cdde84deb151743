"""``virthotplug policy``: show a domain's effective policy, or set/clear its metadata."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

from virthotplug.cli.commands.common import uris
from virthotplug.core.errors import EXIT_OK, NotRunningError, UsageError, quote

if TYPE_CHECKING:  # the real imports stay inside run(): start-up stays light
    from virthotplug.core.config import HostConfig
    from virthotplug.host.connection import Connection
    from virthotplug.host.domain import Domain

MODES = ("online", "match", "report", "ignore")  # policy.MODES, without importing it here


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "policy",
        help="show a domain's onlining policy and where each value comes from, or set it",
        description="Without --set/--clear: show the domain's effective onlining policy and "
        "the source of every value (metadata, configuration file, default). With --set: "
        "replace the policy stored in the domain's metadata; with --clear: remove it. "
        "Like virsh: --live, --config (both may be given), or --current (the default): the "
        "running definition if the domain runs, else the persistent one.",
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")
    parser.add_argument("--json", action="store_true", help="print JSON")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--set", choices=MODES, metavar="MODE", help=f"one of {', '.join(MODES)}")
    action.add_argument("--clear", action="store_true", help="remove the metadata element")
    for name, metavar, help_text in (
        ("count", "N", "online CPUs for mode match"),
        ("grace", "SECONDS", "wait after a hot-add before acting"),
        ("exclude", "CPULIST", "guest CPUs never changed by us"),
        ("retries", "N", "retries of transient agent errors"),
    ):
        parser.add_argument(f"--{name}", type=_field_type(name), metavar=metavar, help=help_text)
    parser.add_argument("--live", action="store_true", help="change the running definition")
    parser.add_argument("--config", action="store_true", help="change the persistent definition")
    parser.add_argument(
        "--current",
        action="store_true",
        help="change the running definition if the domain runs, else the persistent one "
        "(the default, like virsh)",
    )
    parser.set_defaults(run=run)


def _field_type(name: str) -> Callable[[str], str]:
    """An argparse type: the policy field's own rule, so a bad value is a usage error
    (exit status 2) found before connecting; the text is kept, normalised when written."""

    def check(text: str) -> str:
        from virthotplug.core.policy import parse_field

        try:
            parse_field(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}: {quote(text)}") from None
        return text

    check.__name__ = name
    return check


def run(args: argparse.Namespace) -> int:
    from virthotplug.core.config import load_config
    from virthotplug.host.connection import Connection

    options = _field_options(args)
    if (options or args.live or args.config or args.current) and not (args.set or args.clear):
        raise UsageError(
            "--count, --grace, --exclude, --retries, --live, --config and --current need "
            "--set or --clear"
        )
    if args.clear and options:
        raise UsageError("--clear takes no policy values")
    if args.current and (args.live or args.config):
        raise UsageError("--current is exclusive with --live and --config")
    config = load_config(args.config_file)
    with Connection(_one_uri(args), readonly=args.readonly) as conn:
        dom = conn.lookup(args.domain)
        changed = _write(dom, args, options) if args.set or args.clear else None
        _show(conn, dom, config, args.json, changed, quiet=args.quiet)
    return EXIT_OK


def _field_options(args: argparse.Namespace) -> dict[str, str]:
    names = ("count", "grace", "exclude", "retries")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _one_uri(args: argparse.Namespace) -> str | None:
    hosts = uris(args)
    if len(hosts) > 1:
        raise UsageError("policy works on one host: give -c once")
    return hosts[0]


def _write(dom: Domain, args: argparse.Namespace, options: dict[str, str]) -> dict[str, bool]:
    """Write (or clear) the metadata; which definitions were changed."""
    from virthotplug.core.policy import format_field, parse_policy_fields
    from virthotplug.host.policysource import write_policy

    fields = None
    if args.set:
        raw = {"mode": args.set, **options}
        if "count" in raw and args.set != "match":
            raise UsageError("--count applies only to --set match")
        # Validate and normalise before anything is written.
        values = parse_policy_fields(raw, source="the command line", domain=dom.name)
        fields = {name: format_field(name, value) for name, value in values.items()}
    live, persistent = affected(args.live, args.config, running=dom.is_active())
    if live and not dom.is_active():
        raise NotRunningError(f"domain {quote(dom.name)} is not running: --live needs it running")
    write_policy(dom, fields, live=live, config=persistent)
    return {"live": live, "config": persistent}


def affected(live: bool, config: bool, *, running: bool) -> tuple[bool, bool]:
    """virsh's rule: --live and/or --config as given; neither (--current, the default): the
    running definition if the domain runs, else the persistent one."""
    if live or config:
        return live, config
    return running, not running


def _show(
    conn: Connection,
    dom: Domain,
    config: HostConfig,
    as_json: bool,
    changed: dict[str, bool] | None,
    *,
    quiet: bool,
) -> None:
    from virthotplug.core.policy import FIELDS, format_field
    from virthotplug.host.policysource import effective_policy

    effective = effective_policy(conn, dom, config)
    if as_json:
        from virthotplug.core.report import JSON_SCHEMA_VERSION, json_document

        doc: dict[str, Any] = {"version": JSON_SCHEMA_VERSION}
        doc.update(domain=dom.name, uuid=dom.uuid, policy=effective.to_dict())
        doc["changed"] = changed  # None: nothing was asked to change
        print(json_document(doc))
        return
    if not quiet:  # -q: the field rows only, like virsh's quiet mode
        if changed is not None:
            names = {"live": "running", "config": "persistent"}
            where = " and ".join(names[w] for w, on in changed.items() if on)
            print(f"Changed: the {where} definition{'s' if all(changed.values()) else ''}")
        print(f"Domain: {dom.name}")
    rows = [
        (name, format_field(name, getattr(effective.policy, name)) or "-", effective.sources[name])
        for name in FIELDS
    ]
    width = max(len(row[1]) for row in rows)
    for name, value, source in rows:
        print(f"  {name:<8} {value:<{width}}  {source}")
