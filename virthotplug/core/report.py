"""Render views for people (a table like ``virsh list``), programs (JSON) and monitoring
systems (one Nagios/Icinga plugin line with an exit status). Pure: no libvirt.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from virthotplug.core.errors import printable as printable  # its home is core.errors
from virthotplug.core.view import (
    CRITICAL,
    INFO,
    SEVERITY_RANK,
    WARNING,
    CountLayer,
    VcpuView,
    to_dict,
)

JSON_SCHEMA_VERSION = 1

# Monitoring-plugin exit statuses.
CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3
_CHECK_NAMES = {CHECK_OK: "OK", CHECK_WARNING: "WARNING", CHECK_CRITICAL: "CRITICAL"}
_CHECK_NAMES[CHECK_UNKNOWN] = "UNKNOWN"
_SEVERITY_STATUS = {INFO: CHECK_OK, WARNING: CHECK_WARNING, CRITICAL: CHECK_CRITICAL}

_COLUMNS = ("Domain", "State", "Config", "Live", "Guest", "Agent", "Findings")


def status_document(
    views: Iterable[VcpuView], errors: Iterable[Any], not_read: Sequence[str] = ()
) -> dict[str, Any]:
    """The ``status --json`` document. ``not_read``: what could not be read though every
    domain got its verdict (the configuration file, the guest layer on a read-only
    connection)."""
    return {
        "version": JSON_SCHEMA_VERSION,
        "domains": [to_dict(v) for v in views],
        "errors": [{"host": e.host, "domain": e.name or None, "error": e.error} for e in errors],
        "not_read": list(not_read),
    }


def status_json(
    views: Iterable[VcpuView], errors: Iterable[Any], not_read: Sequence[str] = ()
) -> str:
    """The ``status --json`` document, laid out as every ``--json`` document is."""
    return json_document(status_document(views, errors, not_read))


def json_document(document: Mapping[str, Any]) -> str:
    """The one layout of every command's ``--json`` document: one top-level key per line,
    and each item of a top-level list on a line of its own. Easy to read and to grep, and
    fast: ``indent`` would force json's pure-Python encoder, several times slower than the
    C one at thousands of domains."""
    lines = []
    for key, value in document.items():
        if isinstance(value, list) and value:
            items = ",\n    ".join(json.dumps(item) for item in value)
            text = f"[\n    {items}\n  ]"
        else:
            text = json.dumps(value)
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}"


def status_table(
    views: Sequence[VcpuView], *, show_host: bool = False, headers: bool = True
) -> str:
    """A fixed-width table; counts are cur/max, guest is online/present. Like ``virsh
    list``: the header even without rows, and no header with ``headers`` False (-q)."""
    header = (("Host",) if show_host else ()) + _COLUMNS
    rows = [tuple(map(printable, ((v.host,) if show_host else ()) + _row(v))) for v in views]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [_format_row(header, widths), "-" * (sum(widths) + 2 * len(widths))]
    lines = lines if headers else []
    lines.extend(_format_row(row, widths) for row in rows)
    return "\n".join(lines)


def _format_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return " " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()


def _row(view: VcpuView) -> tuple[str, ...]:
    guest = "-"
    if view.guest is not None:
        guest = f"{len(view.guest.online)}/{len(view.guest.present)}"
    codes = ",".join(f.code for f in view.findings if f.severity != INFO) or "-"
    return (
        view.name,
        view.state,
        _counts(view.config),
        _counts(view.live),
        guest,
        view.agent.state,
        codes,
    )


def _counts(layer: Optional[CountLayer]) -> str:
    return "-" if layer is None else f"{layer.current}/{layer.maximum}"


def check_status(views: Sequence[VcpuView], failures: int) -> int:
    """OK/WARNING/CRITICAL from the worst finding; UNKNOWN when something could not be read."""
    worst = max((SEVERITY_RANK[v.worst_severity or INFO] for v in views), default=0)
    status = _SEVERITY_STATUS[[INFO, WARNING, CRITICAL][worst]]
    if failures and status != CHECK_CRITICAL:
        return CHECK_UNKNOWN
    return status


def check_line(
    views: Sequence[VcpuView],
    failures: Sequence[str],
    status: int,
    *,
    not_read: Sequence[str] = (),
) -> str:
    """One plugin output line: ``VIRTHOTPLUG STATUS - summary | perfdata``. ``not_read``
    (what could not be read, though every domain got a verdict) ends the summary."""
    bad = [v for v in views if v.worst_severity in (WARNING, CRITICAL)]
    parts = [_problem_summary(v) for v in bad[:5]]
    if len(bad) > 5:
        parts.append(f"and {len(bad) - 5} more")
    parts.extend(failures[:3])
    noun = "domain" if len(views) == 1 else "domains"
    summary = "; ".join(parts) if parts else f"{len(views)} {noun}, vCPUs consistent"
    if not_read:
        summary += "; not read: " + ", ".join(not_read)
    # '|' starts the perfdata: text the guest influences (agent replies) must not add one.
    summary = summary.replace("|", "/")
    counts = {sev: sum(1 for v in views if v.worst_severity == sev) for sev in (WARNING, CRITICAL)}
    perf = (
        f"domains={len(views)} warning={counts[WARNING]} "
        f"critical={counts[CRITICAL]} unknown={len(failures)}"
    )
    return f"VIRTHOTPLUG {_CHECK_NAMES[status]} - {printable(summary)} | {perf}"


def _problem_summary(view: VcpuView) -> str:
    notable = [f for f in view.findings if f.severity != INFO]
    return f"{view.name}: " + ", ".join(f"{f.code} ({f.message})" for f in notable)
