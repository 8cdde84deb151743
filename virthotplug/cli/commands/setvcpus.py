"""``virthotplug setvcpus``: a safe, verified ``virsh setvcpus``."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

from virthotplug.cli.commands.common import timeout_seconds, uris
from virthotplug.core.errors import (
    EXIT_GUEST_REJECTED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    UsageError,
    quote,
)

if TYPE_CHECKING:  # the real imports stay inside run(): start-up stays light
    from virthotplug.core.events import Event
    from virthotplug.core.resizeplan import LayerCheck, Request
    from virthotplug.daemon.monitorlog import MonitorLog
    from virthotplug.host.connection import Connection
    from virthotplug.host.domain import Domain
    from virthotplug.ops.resize import ResizeResult


MAX_VCPUS = 16384  # QEMU's own limit on vCPUs, for any machine type


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "setvcpus",
        help="hot-add or unplug vCPUs, bring them online, verify every layer",
        description="Change a domain's vCPU count like 'virsh setvcpus', then wait for the "
        "guest to see the change, bring new CPUs online (per the domain's policy, or "
        "--online/--no-online) and verify every layer. When libvirt gives up on an unplug the "
        "guest completed, the request is repeated. A hot-add is refused only where it is "
        "known to crash QEMU (a stale vCPU this host will not repair; under TCG, more plugs "
        "than the maximum in the domain's life) unless --force. Exit status 0 only when every "
        "layer reached the target, 12 when the guest rejected a hot-added vCPU, 13 when QEMU "
        "stopped (crashed) during the hot-add, 11 otherwise.",
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")
    parser.add_argument("count", metavar="COUNT", type=_count, help="the new vCPU count")
    parser.add_argument("--live", action="store_true", help="change the running domain")
    parser.add_argument("--config", action="store_true", help="change the persistent definition")
    parser.add_argument(
        "--current",
        action="store_true",
        help="change the running domain if it runs, else the persistent definition (the "
        "default, like virsh)",
    )
    parser.add_argument(
        "--maximum",
        action="store_true",
        help="change the maximum vCPU count of the persistent definition (needs --config, "
        "like virsh; takes effect at the next start)",
    )
    parser.add_argument(
        "--guest",
        action="store_true",
        help="set how many CPUs are online inside the guest, through its agent (running "
        "domain; never cpu0 nor a CPU the policy excludes; refused under the policies report "
        "and ignore unless --override-policy)",
    )
    parser.add_argument(
        "--override-policy",
        action="store_true",
        help="with --guest: change the guest although the domain's policy is report or ignore",
    )
    parser.add_argument(
        "--hotpluggable",
        action="store_true",
        help="mark the vCPUs enabled in the persistent definition hotpluggable, so that they "
        "can be unplugged live",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=10.0,
        metavar="SECONDS",
        help="longest wait for the guest to see the change (default: %(default)s)",
    )
    online = parser.add_mutually_exclusive_group()
    online.add_argument(
        "--online",
        dest="online",
        action="store_const",
        const=True,
        help="bring the new CPUs online now, whatever the policy",
    )
    online.add_argument(
        "--no-online",
        dest="online",
        action="store_const",
        const=False,
        help="leave the new CPUs as the guest has them",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="skip the checks for hot-adds known to crash QEMU (it may then crash)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def _count(text: str) -> int:
    from virthotplug.core.settings import parse_integer

    try:
        return parse_integer(text, 1, MAX_VCPUS)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a vCPU count from 1 to {MAX_VCPUS}: {quote(text)}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from virthotplug.core.config import load_config
    from virthotplug.host.connection import Connection
    from virthotplug.host.libvirt_module import ensure_event_loop
    from virthotplug.ops import guestcount, resize

    hosts = uris(args)
    if len(hosts) > 1:
        raise UsageError("setvcpus works on one host: give -c once")
    check_options(args)
    config = load_config(args.config_file)
    ensure_event_loop()  # before open(): monitor events need it
    with Connection(hosts[0], readonly=args.readonly) as conn:
        dom = conn.lookup(args.domain)
        live, persistent = _affect(dom, args)
        request = _request(args, live, persistent)
        log: Optional[MonitorLog] = None
        if args.guest:
            started = time.monotonic()
            result = guestcount.set_guest_count(conn, dom, config, request)
        else:
            log = _monitor(conn, dom)
            if not args.maximum:
                _refuse_over_maximum(conn, dom, args.count, live=live, config=persistent)
            started = time.monotonic()
            events = (lambda: log.events(since=started)) if log is not None else None
            result = resize.resize(conn, dom, config, request, events)
        if log is not None:
            log.wait_quiet(0.3, 1.0)  # the final eject report trails the unplug
        _print(result, log, started, args.json, quiet=args.quiet)
    if result.complete:
        return EXIT_OK
    return EXIT_GUEST_REJECTED if result.rejected else EXIT_INCOMPLETE


def check_options(args: argparse.Namespace) -> None:
    """virsh's rules on the options (``--current`` alone; ``--maximum`` needs ``--config``;
    ``--guest`` is not ``--config``), plus what can never work: a live maximum (libvirt
    refuses it), and options that have no meaning with ``--guest``."""
    if args.current and (args.live or args.config):
        raise UsageError("--current is exclusive with --live and --config")
    if args.maximum and not args.config:
        raise UsageError(
            "--maximum needs --config, as in virsh (it changes the persistent maximum)"
        )
    # Before the --maximum rule: virsh names this one for --maximum --config --guest too.
    if args.guest and args.config:
        raise UsageError("--guest is exclusive with --config (it changes the running guest)")
    if args.maximum and (args.live or args.guest):
        raise UsageError(
            "--maximum changes the persistent definition only: not with --live or --guest"
        )
    if args.guest and (args.online is not None or args.force):
        raise UsageError("--online, --no-online and --force have no meaning with --guest")
    if args.override_policy and not args.guest:
        raise UsageError("--override-policy is for --guest only")


def _request(args: argparse.Namespace, live: bool, persistent: bool) -> Request:
    from virthotplug.core.resizeplan import Request

    mode = {True: "online", False: "report", None: None}[args.online]
    return Request(
        args.count,
        live,
        persistent,
        args.timeout,
        mode,
        args.force,
        maximum=bool(args.maximum),
        hotpluggable=bool(args.hotpluggable),
        guest=bool(args.guest),
        override_policy=bool(args.override_policy),
    )


def _affect(dom: Domain, args: argparse.Namespace) -> tuple[bool, bool]:
    """virsh's rule (``policy.affected``): --live/--config as given; neither (--current):
    live if running, else the persistent definition."""
    from virthotplug.cli.commands.policy import affected

    return affected(bool(args.live), bool(args.config), running=dom.is_active())


def _refuse_over_maximum(
    conn: Connection, dom: Domain, count: int, *, live: bool, config: bool
) -> None:
    """More vCPUs than the definition's maximum: the domain cannot do it (exit status 9),
    refused before anything changes. A live change of a stopped domain is left to the
    resize, which says it must run."""
    from virthotplug.core.errors import UnsupportedError

    affected = [False] if config else []
    if live and dom.is_active():
        affected.append(True)
    for affect_live in affected:
        maximum = dom.vcpu_maximum(live=affect_live)
        if count > maximum:
            raise UnsupportedError(
                f"{dom.context}: {count} vCPUs requested, the maximum is {maximum} "
                "(raise <vcpu> in the persistent definition and restart)"
            )


def _monitor(conn: Connection, dom: Domain) -> Optional[MonitorLog]:
    """Subscribe to the domain's OST/DEVICE_DELETED hints; None where the driver can't."""
    from virthotplug.core.errors import VirtHotplugError
    from virthotplug.daemon.listener import Listener
    from virthotplug.daemon.monitorlog import MonitorLog

    log = MonitorLog(dom.uuid)
    try:
        conn.subscribe(Listener(conn.uri, log.put, lambda: None), monitor=[dom])
    except VirtHotplugError:
        return None  # e.g. the test driver, or a read-only connection: hints are optional
    return log


def _print(
    result: ResizeResult,
    log: Optional[MonitorLog],
    started: float,
    as_json: bool,
    *,
    quiet: bool,
) -> None:
    from virthotplug.cli.commands.apply import describe
    from virthotplug.ops import resize

    events = log.events(since=started) if log is not None else []
    described = _described(result, events, started)
    if as_json:
        from virthotplug.core.report import JSON_SCHEMA_VERSION, json_document

        doc = {"version": JSON_SCHEMA_VERSION, **resize.to_dict(result)}
        doc["events"] = [
            {"t": round(e.mono - started, 3), "event": text} for e, _name, text in described
        ]
        print(json_document(doc))
        return
    before = result.before.live.current if result.before.live is not None else "?"
    print(_headline(result, before))
    for event, name, text in described:
        print(f"  +{event.mono - started:.3f} s  {name + '  ' if name else ''}{text}")
    for key, seconds in result.timings.items():
        print(f"  {key}: {seconds:.3f} s")
    if result.reconcile is not None:
        print("\n".join("  " + line for line in describe(result.reconcile)[1:]))
    _print_checks(result.checks, headers=not quiet)
    for note in result.notes:
        print(f"  note: {note}")


def _headline(result: ResizeResult, before: object) -> str:
    request = result.request
    if request.guest:
        guest = result.before.guest
        online = len(guest.online) if guest is not None else "?"
        return f"{result.name}: {online} -> {request.count} CPUs online in the guest (guest)"
    if request.maximum:
        config = result.before.config
        was = config.maximum if config is not None else "?"
        return f"{result.name}: maximum {was} -> {request.count} vCPUs (config)"
    where = "+".join(w for w, on in (("live", request.live), ("config", request.config)) if on)
    return f"{result.name}: {before} -> {request.count} vCPUs ({where})"


def _described(
    result: ResizeResult, events: Sequence[Event], started: float
) -> list[tuple[Event, str, str]]:
    """Each monitor event with its name and what it says; a removal the judge tells is the
    late event of a slot's previous vCPU (QEMU 11.1 sends it when the slot is plugged again)
    says so, without the name, instead of passing for something this command did."""
    from virthotplug.core.judge import late_removals
    from virthotplug.core.observed import EventReader
    from virthotplug.daemon.monitorlog import event_name

    reader = EventReader()
    read = [(event, reader.read(event)) for event in events]
    observed = [o for _, o in read if o is not None]
    late = set(late_removals(sorted([*observed, *result.requests], key=lambda o: o.at)))
    described = []
    for event, seen in read:
        if seen is not None and seen in late:
            text = (
                f"QEMU's late report that the vcpu{seen.vcpu} unplugged earlier is gone "
                "(sent when its slot is plugged again): not this change"
            )
            described.append((event, "", text))
        else:
            described.append((event, event_name(event), event.describe()))
    return described


def _print_checks(checks: Sequence[LayerCheck], *, headers: bool) -> None:
    rows = [("layer", "now", "target", "")]
    rows += [(c.layer, c.now, c.target, "ok" if c.ok else "NOT REACHED") for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows if headers else rows[1:]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print(f"  {'  '.join(cells)}  {row[3]}".rstrip())
