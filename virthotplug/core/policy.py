"""The per-domain onlining policy and the pure decision it drives.

Modes:

    online   every CPU present in the guest is brought online (except ``exclude``)
    match    exactly N CPUs online: N is ``count``, else the live vCPU count
    report   change nothing, only report (the built-in default: installing virthotplug never
             changes a guest until an administrator asks for it)
    ignore   leave the domain alone: no finding is acted on

Options: ``grace`` (seconds after a hot-add before acting, so the guest's own udev rule can
win; the daemon schedules it, ``decide`` never waits), ``exclude`` (guest CPU ids the admin
keeps as they are on purpose: never onlined, never offlined by us) and ``retries`` (for
transient agent errors).

All CPU ids here are guest logical ids (what the guest kernel calls cpuN). Nothing here
talks to libvirt: raw strings come in (metadata attributes, config file values), a ``Policy``
and a ``Plan`` come out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from virthotplug.core.cpulist import MAX_CPU_ID, CpulistError, format_cpulist, parse_cpulist
from virthotplug.core.errors import ConfigError, InvalidPolicyError, quote
from virthotplug.core.precedence import merge_fields
from virthotplug.core.settings import parse_integer, parse_seconds
from virthotplug.core.view import GuestLayer, VcpuView

MODE_ONLINE = "online"
MODE_MATCH = "match"
MODE_REPORT = "report"
MODE_IGNORE = "ignore"
MODES = (MODE_ONLINE, MODE_MATCH, MODE_REPORT, MODE_IGNORE)

FIELDS = ("mode", "count", "grace", "exclude", "retries")
DEFAULT_SOURCE = "default"
MAX_GRACE = 3600.0
MAX_RETRIES = 10


@dataclass(frozen=True)
class Policy:
    mode: str = MODE_REPORT
    count: Optional[int] = None  # match only; None: the live vCPU count
    # Act as soon as the CPU is seen. Setting it (e.g. 1.0: a distro udev rule wins within
    # 0.3-0.55 s) lets a guest's own rule go first and be reported as onlined-by-guest.
    grace: float = 0.0
    exclude: frozenset[int] = frozenset()
    retries: int = 3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown policy mode {self.mode!r}")

    @property
    def acts(self) -> bool:
        """Whether this policy may change the guest."""
        return self.mode in (MODE_ONLINE, MODE_MATCH)


@dataclass(frozen=True)
class EffectivePolicy:
    """A policy and, per field, where its value came from ("metadata (live)", ...)."""

    policy: Policy
    sources: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"value": _json_value(getattr(self.policy, name)), "source": self.sources[name]}
            for name in FIELDS
        }


def _json_value(value: Any) -> Any:
    return sorted(value) if isinstance(value, frozenset) else value  # a CPU list: an array


# --- validation of raw values ----------------------------------------------------------


def format_field(name: str, value: Any) -> str:
    """A field's value as it is written in metadata or the config file."""
    if value is None:
        return ""
    if isinstance(value, frozenset):
        return format_cpulist(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_policy_fields(raw: Mapping[str, str], *, source: str, domain: str) -> dict[str, Any]:
    """Validate raw string values (only the fields present) into typed values.

    Raises ``ConfigError`` naming the source and the domain for an unknown field or an
    invalid value: a typo must not silently fall back to a default that changes guests.
    """
    values: dict[str, Any] = {}
    for name, text in raw.items():
        if name not in FIELDS:
            raise _field_error(
                source, domain, f"unknown field {name!r} (known: {', '.join(FIELDS)})"
            )
        try:
            values[name] = _PARSERS[name](text.strip())
        except ValueError as exc:
            raise _field_error(source, domain, f"{name}={_quote(text)}: {exc}") from None
    return values


def parse_field(name: str, text: str) -> Any:
    """One known field's value from its text; ``ValueError`` says what is wrong."""
    return _PARSERS[name](text.strip())


def _field_error(source: str, domain: str, what: str) -> ConfigError:
    return InvalidPolicyError(f"domain {quote(domain)}: invalid policy in {source}: {what}")


def _quote(text: str) -> str:
    return quote(text, 40)


def _parse_mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return text


def _parse_count(text: str) -> int:
    return parse_integer(text, 1, MAX_CPU_ID + 1)


def _parse_grace(text: str) -> float:
    return parse_seconds(text, 0, MAX_GRACE)


def _parse_exclude(text: str) -> frozenset[int]:
    try:
        return parse_cpulist(text)
    except CpulistError as exc:
        raise ValueError(str(exc)) from None


def _parse_retries(text: str) -> int:
    return parse_integer(text, 0, MAX_RETRIES)


_PARSERS = {
    "mode": _parse_mode,
    "count": _parse_count,
    "grace": _parse_grace,
    "exclude": _parse_exclude,
    "retries": _parse_retries,
}


def merge_policy(
    layers: Sequence[tuple[str, Mapping[str, str]]], *, domain: str
) -> EffectivePolicy:
    """Combine raw layers, highest precedence first, field by field, over the defaults.

    Each layer is ``(source label, raw fields)``. Every layer is validated, also those whose
    values are shadowed: a broken layer is a broken configuration wherever it sits.
    """
    parsed = [
        (source, parse_policy_fields(raw, source=source, domain=domain)) for source, raw in layers
    ]
    merged = merge_fields(parsed)  # the precedence the hook applies too
    values = {name: value for name, (_source, value) in merged.items()}
    sources = {name: source for name, (source, _value) in merged.items()}
    for name in FIELDS:
        sources.setdefault(name, DEFAULT_SOURCE)
    return EffectivePolicy(policy=Policy(**values), sources=sources)


# --- the decision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to change in the guest, and why. Empty ``online``/``offline``: nothing to do."""

    online: frozenset[int] = frozenset()
    offline: frozenset[int] = frozenset()
    excluded: frozenset[int] = frozenset()  # CPUs the policy would act on but ``exclude`` keeps
    reasons: Mapping[int, str] = field(default_factory=dict)
    note: str = ""  # why, for the plan as a whole

    @property
    def is_noop(self) -> bool:
        return not self.online and not self.offline

    def to_dict(self) -> dict[str, Any]:
        return {
            "online": sorted(self.online),
            "offline": sorted(self.offline),
            "excluded": sorted(self.excluded),
            "reasons": {str(cpu): text for cpu, text in sorted(self.reasons.items())},
            "note": self.note,
        }


def decide(view: VcpuView, policy: Policy) -> Plan:
    """The guest changes ``policy`` asks for, given ``view``. Pure; never fails.

    Invariants: cpu0 is never offlined; only CPUs the guest reports offlinable are offlined;
    excluded CPUs are never touched; without a guest layer, or under report/ignore, the plan
    is a no-op with a note saying why.
    """
    if policy.mode == MODE_IGNORE:
        return Plan(note="policy 'ignore': the domain is left alone")
    if view.guest is None:
        return Plan(note=_no_guest_note(view))
    if policy.mode == MODE_REPORT:
        return _report(view.guest)
    if policy.mode == MODE_ONLINE:
        return _online_all(view.guest, policy.exclude)
    target = policy.count if policy.count is not None else _live_count(view)
    if target is None:
        return Plan(note="policy 'match' without count and no live vCPU count known")
    return _match(view.guest, policy.exclude, target)


def match_target(view: VcpuView, policy: Policy) -> Optional[int]:
    """The online count a 'match' policy aims at (None for other modes, or unknown)."""
    if policy.mode != MODE_MATCH:
        return None
    target = policy.count if policy.count is not None else _live_count(view)
    return None if target is None else max(target, 1)


def unreachable(view: VcpuView, policy: Policy) -> Optional[str]:
    """Why a 'match' policy cannot reach its target in this guest; None when it can (or
    when it is not a 'match' policy, or the guest layer is unknown)."""
    target = match_target(view, policy)
    if target is None or view.guest is None:
        return None
    plan = decide(view, policy)
    after = len(view.guest.online) + len(plan.online) - len(plan.offline)
    if after == target:
        return None
    return f"target {target}, {after} reachable: " + _shortfall(
        view.guest, policy.exclude, target, after
    )


def kept_offline(view: VcpuView, policy: Optional[Policy]) -> frozenset[int]:
    """Offline guest CPUs the policy keeps offline on purpose: excluded ones, every one
    under 'ignore', and under 'match' those beyond the target count."""
    if view.guest is None:
        return frozenset()
    offline = view.guest.offline
    if policy is None:
        return frozenset()
    if policy.mode == MODE_IGNORE:
        return offline
    if policy.mode == MODE_MATCH:
        return offline - decide(view, policy).online
    return offline & policy.exclude


def _no_guest_note(view: VcpuView) -> str:
    if view.state != "running":
        return f"no guest layer: domain is {view.state}"
    detail = f" ({view.agent.error})" if view.agent.error else ""
    return f"no guest layer: guest agent {view.agent.state}{detail}"


def _live_count(view: VcpuView) -> Optional[int]:
    return view.live.current if view.live is not None else None


def _report(guest: GuestLayer) -> Plan:
    offline = guest.offline
    if not offline:
        return Plan(note="policy 'report': every guest CPU is online")
    return Plan(note=f"policy 'report': CPU {format_cpulist(offline)} offline, left unchanged")


def _online_all(guest: GuestLayer, exclude: frozenset[int]) -> Plan:
    candidates = guest.offline
    excluded = candidates & exclude
    online = candidates - exclude
    reasons = {cpu: "present in the guest but offline" for cpu in online}
    reasons.update({cpu: "offline and excluded by policy: left offline" for cpu in excluded})
    note = "policy 'online': " + ("nothing to do" if not online else f"online {_ids(online)}")
    return Plan(online=online, excluded=excluded, reasons=reasons, note=note)


def _match(guest: GuestLayer, exclude: frozenset[int], target: int) -> Plan:
    notes = []
    if target < 1:
        notes.append(f"count {target} raised to 1: cpu0 always stays online")
        target = 1
    have = len(guest.online)
    if have < target:
        plan = _match_up(guest, exclude, target - have)
    elif have > target:
        plan = _match_down(guest, exclude, have - target)
    else:
        plan = Plan()
    after = have + len(plan.online) - len(plan.offline)
    notes.insert(0, f"policy 'match' {target}: {have} online now, {after} after")
    if after != target:
        notes.append(f"cannot reach {target}: " + _shortfall(guest, exclude, target, after))
    return Plan(plan.online, plan.offline, plan.excluded, plan.reasons, "; ".join(notes))


def _match_up(guest: GuestLayer, exclude: frozenset[int], need: int) -> Plan:
    """Online the lowest-numbered offline CPUs that are not excluded."""
    online = frozenset(sorted(guest.offline - exclude)[:need])
    excluded = guest.offline & exclude
    reasons = {cpu: "needed to reach the target count" for cpu in online}
    reasons.update({cpu: "excluded by policy: left offline" for cpu in excluded})
    return Plan(online=online, excluded=excluded, reasons=reasons)


def _match_down(guest: GuestLayer, exclude: frozenset[int], surplus: int) -> Plan:
    """Offline the highest-numbered offlinable CPUs that are not excluded (never cpu0)."""
    offlinable = (guest.online & guest.offlinable) - {0}
    offline = frozenset(sorted(offlinable - exclude, reverse=True)[:surplus])
    excluded = offlinable & exclude
    reasons = {cpu: "above the target count" for cpu in offline}
    reasons.update({cpu: "excluded by policy: left online" for cpu in excluded})
    return Plan(offline=offline, excluded=excluded, reasons=reasons)


def _shortfall(guest: GuestLayer, exclude: frozenset[int], target: int, after: int) -> str:
    if after < target:
        if target > len(guest.present):
            return f"the guest has only {len(guest.present)} CPUs present"
        return f"the other offline CPUs are excluded ({_ids(guest.offline & exclude)})"
    return "the remaining online CPUs are cpu0, excluded or not offlinable"


def _ids(cpus: frozenset[int]) -> str:
    return format_cpulist(cpus) or "none"
