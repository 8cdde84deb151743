"""Command line: ``virthotplug [global options] COMMAND [options]``.

``main`` is the only place that turns exceptions into exit statuses and messages; commands
raise the project's exceptions and return an exit status when they succeed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn, Optional, Sequence

from virthotplug import __version__
from virthotplug.cli.commands import COMMANDS, check
from virthotplug.cli.commands.common import log_level
from virthotplug.core import errors
from virthotplug.core.settings import parse_integer

log = logging.getLogger("virthotplug")

# Global options that take a value: the word after them is not the command.
_GLOBAL_OPTIONS_WITH_VALUE = ("-c", "--connect", "--config-file")
_DEBUG_OPTIONS = ("-d", "--debug")
# Commands whose --json prints one document (watch prints a stream of records).
JSON_DOCUMENT_COMMANDS = frozenset({"status", "policy", "apply", "setvcpus"})
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
        help="host configuration file (default: $VIRTHOTPLUG_CONFIG, else "
        "/etc/virthotplug/virthotplug.conf, ignored when absent)",
    )
    parser.add_argument(
        "-d",
        "--debug",
        nargs="?",
        const=0,
        type=debug_level,
        action=DebugAction,
        metavar="LEVEL",
        help="log level like virsh's: 0 debug (the default of -d alone, with tracebacks of "
        "internal errors), 1 info, 2 notice, 3 warning, 4 error",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="quiet, like virsh: no table headers or informational lines, only errors logged",
    )
    parser.set_defaults(debug=False, debug_level=None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(subparsers)
    _register_help(parser, subparsers)
    return parser


def _register_help(top: argparse.ArgumentParser, subparsers: Any) -> None:
    """``help [COMMAND]``, as virsh has it: the help of the program or of one command."""
    commands = dict(subparsers.choices)
    parser = subparsers.add_parser(
        "help",
        help="show the help of the program, or of one command",
        description="Print the help of COMMAND (the same as 'virthotplug COMMAND --help'), or "
        "of the program without one.",
    )
    parser.add_argument("topic", nargs="?", metavar="COMMAND", choices=sorted(commands))

    def run(args: argparse.Namespace) -> int:
        (commands[args.topic] if args.topic else top).print_help()
        return errors.EXIT_OK

    parser.set_defaults(run=run)


def debug_level(text: str) -> int:
    """An argparse type: a -d level, 0 to 4."""
    try:
        return parse_integer(text.strip(), 0, 4)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a level from 0 to 4: {errors.quote(text)}"
        ) from None


class DebugAction(argparse.Action):
    """``-d [LEVEL]``: ``debug_level`` is the level, ``debug`` whether it is 0 (tracebacks)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: Optional[str] = None,
    ) -> None:
        namespace.debug_level = values
        namespace.debug = values == 0


def connection_uri(text: str) -> str:
    """An argparse type: a URI as given; an empty one would silently mean libvirt's default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty URI; leave -c out to connect to libvirt's default URI"
        )
    return text


def setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("virthotplug: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(raise_usage_errors=True)
    words = with_debug_levels(sys.argv[1:] if argv is None else list(argv))
    try:
        args = parser.parse_args(words)
    except CommandLineError as exc:
        return _usage_error(exc, words)
    setup_logging(log_level(args, default=logging.WARNING))
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


def with_debug_levels(argv: list[str]) -> list[str]:
    """``-d`` takes an optional level; so that ``-d status`` does not take the command for
    one, a -d not followed by a level is given its default (0) explicitly."""
    words = list(argv)
    for i, word in enumerate(words):
        if word == "--":
            break
        if word in _DEBUG_OPTIONS and (i + 1 == len(words) or not _is_level(words[i + 1])):
            words[i] = "--debug=0"
    return words


def _is_level(word: str) -> bool:
    """Whether a word after -d is meant as its level (digits; 0 to 4 are valid): a command
    never is one."""
    return word.isascii() and word.isdigit()


def command_word(argv: Sequence[str]) -> Optional[str]:
    """The command named in ``argv``, found without parsing it (parsing just failed): the
    first word that is neither an option nor a global option's value."""
    words = iter(argv)
    for word in words:
        if word in _GLOBAL_OPTIONS_WITH_VALUE:
            next(words, None)
        elif _is_level(word):
            continue  # -d's level
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
        from virthotplug.core.report import json_document

        print(json_document(failure_document(message, status)))
    print(f"virthotplug: error: {message}", file=sys.stderr)
    return status


def failure_document(message: str, status: int) -> dict[str, Any]:
    """The ``--json`` document of a command that failed as a whole (its schema: every
    command's ``failure`` branch)."""
    from virthotplug.core.report import JSON_SCHEMA_VERSION

    return {"version": JSON_SCHEMA_VERSION, "error": message, "exit_status": status}


if __name__ == "__main__":
    sys.exit(main())
