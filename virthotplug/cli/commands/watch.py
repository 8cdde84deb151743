"""``virthotplug watch``: the daemon (see ``virthotplug.daemon``)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, TextIO, cast

from virthotplug.cli.commands.common import add_setting, log_level, uris
from virthotplug.core.errors import EXIT_OK, VirtHotplugError
from virthotplug.core.settings import AGENT_TIMEOUT, HOTADD_SETTLE, RESYNC_INTERVAL, WORKERS

if TYPE_CHECKING:
    from virthotplug.daemon.watch import Watch


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="daemon: follow vCPU events on every domain and apply policies",
        description="Listen to libvirt and QEMU-monitor events for every domain, re-read the "
        "vCPU layers of a domain on each event and periodically, and apply its onlining "
        "policy. Log lines go to stderr; --json writes one JSON object per line to stdout. "
        "SIGTERM/SIGINT stop it, SIGHUP reloads the configuration file.",
    )
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    for setting in (RESYNC_INTERVAL, AGENT_TIMEOUT, WORKERS, HOTADD_SETTLE):
        add_setting(parser, setting)  # no default here: the configuration file's applies
    parser.add_argument(
        "--domain",
        action="append",
        dest="domains",
        type=domain_glob,
        metavar="GLOB",
        help="act only on domains whose name matches GLOB, or with this UUID; repeat for "
        "several (default: [watch] domains, else every domain)",
    )
    parser.add_argument(
        "--no-hook-socket",
        action="store_true",
        help="do not listen for libvirt hook messages on the hook socket "
        "(default: listen on [watch] hook_socket, /run/virthotplug/hook.sock)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="[ADDR:]PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics, on that address only "
        "(default address 127.0.0.1; [ADDR]:PORT for IPv6); needs prometheus-client: "
        "pip install 'virthotplug[metrics]'",
    )
    parser.set_defaults(run=run)


def domain_glob(text: str) -> str:
    """An argparse type: a glob or UUID; an empty one would match no domain at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty GLOB matches no domain")
    return text


class JsonLines(io.TextIOBase):
    """stdout for ``--json``. When its reader goes away (EPIPE) the daemon stops and
    exits with an error: records nobody reads must not pass for a working watch."""

    def __init__(self, out: TextIO, on_closed: Callable[[], None]) -> None:
        super().__init__()
        self._out = out
        self._on_closed = on_closed
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                self._out.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._out.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self) -> None:
        self.reader_gone = True
        # What is still buffered must not fail again when the interpreter exits.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._out.fileno())
        os.close(devnull)
        self._on_closed()


def run(args: argparse.Namespace) -> int:
    from virthotplug.core.config import load_config
    from virthotplug.daemon.domains import DomainRegistry
    from virthotplug.daemon.eventlog import EventLog, setup_daemon_logging
    from virthotplug.daemon.hookserver import HookServer, local_qemu_uri
    from virthotplug.daemon.jobs import JobRunner
    from virthotplug.daemon.lock import HostLocks
    from virthotplug.daemon.resync import BulkResync
    from virthotplug.daemon.watch import Watch

    setup_daemon_logging(args.debug, args.quiet)
    logging.getLogger().setLevel(log_level(args, default=logging.INFO))  # -d LEVEL, like virsh
    config_path = getattr(args, "config_file", None)

    def load() -> Any:
        config = load_config(config_path)
        config.check_policies()
        overrides = {
            name: getattr(args, name)
            for name in (s.name for s in (RESYNC_INTERVAL, AGENT_TIMEOUT, WORKERS, HOTADD_SETTLE))
            if getattr(args, name) is not None
        }
        if args.domains:
            overrides["domains"] = tuple(args.domains)
        return dataclasses.replace(config.watch, **overrides), config

    settings, config = load()
    domains = DomainRegistry()  # what the daemon keeps per domain, shared by its parts
    # One watch per host: held until this process ends, however it ends. Their token marks
    # the histories this run vouches for.
    locks = HostLocks()
    runner = JobRunner(config, settings, domains, voucher=locks.token)

    def reload() -> Any:
        new_settings, new_config = load()
        runner.update(new_config, new_settings)
        return new_settings

    # The hook socket is read at start only; a new hook_socket needs a restart.
    hosts = _host_uris(args)
    locks.acquire(hosts)
    sources = []
    if not args.no_hook_socket:
        sources.append(HookServer(settings.hook_socket, local_qemu_uri(hosts)))
    server = None
    if args.metrics_listen:
        from virthotplug.daemon.metricsserver import start as start_metrics

        server = start_metrics(args.metrics_listen, domains)
    metrics = server.metrics if server is not None else None
    # Periodic and reconnect resyncs read every running domain in bulk and reconcile only
    # the domains that need it; the metrics get every view it read.
    resync = BulkResync(runner, on_views=metrics.resynced if metrics is not None else None)
    watch: Optional[Watch] = None
    json_out = JsonLines(sys.stdout, lambda: watch.request_stop() if watch else None)
    watch = Watch(
        hosts,
        settings,
        runner.run,
        EventLog(cast(TextIO, json_out) if args.json else None),
        reload=reload,
        sources=sources,
        observer=metrics,
        observe=runner.observe,
        resync=resync,
        domains=domains,
        on_stop=runner.withdraw,
    )
    if metrics is not None:
        metrics.track_queue(watch.queue_depth)
    watch.install_signal_handlers()
    try:
        watch.run()
    finally:
        if server is not None:
            server.close()
    if json_out.reader_gone:
        raise VirtHotplugError("stdout was closed (broken pipe): the JSON records have no reader")
    return EXIT_OK


def _host_uris(args: argparse.Namespace) -> list[str]:
    """The hosts' URIs. Without -c, the URI libvirt's default resolves to, asked at start:
    the one-per-host lock, the hook socket's host and every log line need its name."""
    from virthotplug.host.connection import default_uri

    return [uri if uri is not None else default_uri() for uri in uris(args)]
