"""Command line: ``virthotplug [global options] COMMAND [options]``.

``main`` is the only place that turns exceptions into exit statuses and messages; commands
raise the project's exceptions and return an exit status when they succeed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, NoReturn, Optional, Sequence

from virthotplug import __version__
from virthotplug.cli.commands import COMMANDS, check
from virthotplug.core import errors

log = logging.getLogger("virthotplug")

# Global options that take a value: the word after them is not the command.
_GLOBAL_OPTIONS_WITH_VALUE = ("-c", "--connect", "--config-file")
# Commands whose --json prints one document (watch prints a stream of records).
JSON_DOCUMENT_COMMANDS = frozenset({"status", "policy", "apply", "setvcpus"})
JSON_VERSION = 1  # every --json document's "version"
# Commands that are monitoring plugins: every failure is their UNKNOWN status, on stdout.
PLUGIN_COMMANDS = {check.NAME: check.CHECK_UNKNOWN}


class CommandLineError(Exception):
    """argparse refused the arguments; ``parser`` is the (sub)parser that refused them."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class RaisingParser(argparse.ArgumentParser):
    """argparse, except that a usage error is raised, not printed: ``main`` decides how to
    report it (``check`` reports it as a monitoring plugin does). Subparsers share the class."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(self, message)


def build_parser(*, raise_usage_errors: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``raise_usage_errors`` its usage errors raise ``CommandLineError``
    instead of printing argparse's usage and exiting."""
    parser_class = RaisingParser if raise_usage_errors else argparse.ArgumentParser
    parser = parser_class(
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
        type=connection_uri,
        help="libvirt connection URI; repeat for several hosts (default: libvirt's own: "
        "$LIBVIRT_DEFAULT_URI, else uri_default of libvirt.conf, else the system daemon for "
        "root and the session daemon for other users)",
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


def connection_uri(text: str) -> str:
    """An argparse type: a URI as given; an empty one would silently mean libvirt's default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty URI; leave -c out to connect to libvirt's default URI"
        )
    return text


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("virthotplug: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(raise_usage_errors=True)
    try:
        args = parser.parse_args(argv)
    except CommandLineError as exc:
        return _usage_error(exc, sys.argv[1:] if argv is None else argv)
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


def _usage_error(exc: CommandLineError, argv: Sequence[str]) -> int:
    """argparse's usage and one error line on stderr, exit status 2 (argparse's own way);
    for ``check``, one UNKNOWN line on stdout and the plugin's status instead."""
    message = errors.shown(exc.message, errors.MESSAGE_LIMIT)  # argparse echoes input raw
    plugin_status = PLUGIN_COMMANDS.get(command_word(argv) or "")
    if plugin_status is not None:
        print(plugin_unknown_line(message))
        return plugin_status
    exc.parser.print_usage(sys.stderr)
    exc.parser.exit(errors.EXIT_USAGE, f"{exc.parser.prog}: error: {message}\n")


def command_word(argv: Sequence[str]) -> Optional[str]:
    """The command named in ``argv``, found without parsing it (parsing just failed): the
    first word that is neither an option nor a global option's value."""
    words = iter(argv)
    for word in words:
        if word in _GLOBAL_OPTIONS_WITH_VALUE:
            next(words, None)
        elif word == "--":
            break
        elif not word.startswith("-"):
            return word
    return None


def plugin_unknown_line(message: str) -> str:
    """The monitoring plugin's line for a failure: UNKNOWN, on one line, no perfdata."""
    text = errors.shown(" ".join(message.split()), errors.MESSAGE_LIMIT)
    return f"VIRTHOTPLUG UNKNOWN - {text.replace('|', '/')}"


def _report_failure(args: argparse.Namespace, message: str, status: int) -> int:
    # Messages quote input escaped and bounded where they echo it; this is the last net.
    message = errors.shown(message, errors.MESSAGE_LIMIT)
    plugin_status = getattr(args, "plugin_unknown_status", None)
    if plugin_status is not None:
        # Monitoring plugins report every failure as UNKNOWN, on stdout.
        print(plugin_unknown_line(message))
        return int(plugin_status)
    if (
        getattr(args, "json", False)
        and args.command in JSON_DOCUMENT_COMMANDS
        and status != errors.EXIT_USAGE
    ):
        # A program that asked for JSON gets a document, whatever went wrong once the
        # command line was right (a usage error is the caller's to fix, as argparse's are).
        print(json.dumps(failure_document(message, status), indent=2))
    print(f"virthotplug: error: {message}", file=sys.stderr)
    return status


def failure_document(message: str, status: int) -> dict[str, Any]:
    """The ``--json`` document of a command that failed as a whole (its schema: every
    command's ``failure`` branch)."""
    return {"version": JSON_VERSION, "error": message, "exit_status": status}


if __name__ == "__main__":
    sys.exit(main())
