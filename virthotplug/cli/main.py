"""Command line: ``virthotplug [global options] COMMAND [options]``.

``main`` is the only place that turns exceptions into exit statuses and messages; commands
raise the project's exceptions and return an exit status when they succeed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from virthotplug import __version__
from virthotplug.cli.commands import COMMANDS
from virthotplug.core import errors

log = logging.getLogger("virthotplug")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virthotplug",
        description="Watch vCPU hotplug on libvirt/QEMU hosts and bring hot-added vCPUs "
        "online in the guest according to a per-domain policy.",
    )
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        action="append",
        dest="uris",
        help="libvirt connection URI; repeat for several hosts "
        "(default: $LIBVIRT_DEFAULT_URI, else qemu:///system)",
    )
    parser.add_argument("-r", "--readonly", action="store_true", help="open a read-only connection")
    parser.add_argument(
        "--config-file",
        metavar="PATH",
        help="host configuration file (default: /etc/virthotplug/virthotplug.conf, "
        "ignored when absent)",
    )
    parser.add_argument("-d", "--debug", action="store_true", help="debug output, tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("virthotplug: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug, args.quiet)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return errors.EXIT_INTERRUPTED
    except errors.VirtHotplugError as exc:
        log.debug("failed", exc_info=True)
        return _report_failure(args, str(exc), exc.exit_status)
    except BrokenPipeError:
        sys.stderr.close()  # output closed early (e.g. piped into head): not an error
        return errors.EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        return _report_failure(args, f"internal error: {exc} (run with --debug)", 1)


def _report_failure(args: argparse.Namespace, message: str, status: int) -> int:
    plugin_status = getattr(args, "plugin_unknown_status", None)
    if plugin_status is not None:
        # Monitoring plugins report every failure as UNKNOWN, on stdout.
        print(f"VIRTHOTPLUG UNKNOWN - {message.replace('|', '/')}")  # '|' starts perfdata
        return int(plugin_status)
    print(f"virthotplug: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
