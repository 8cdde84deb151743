"""Tests for virthotplug.core.policy: raw value validation, layer merging and decide()."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virthotplug.core.errors import ConfigError
from virthotplug.core.policy import (
    DEFAULT_SOURCE,
    FIELDS,
    MODE_IGNORE,
    MODE_MATCH,
    MODE_ONLINE,
    MODE_REPORT,
    MODES,
    Plan,
    Policy,
    decide,
    format_field,
    merge_policy,
    parse_policy_fields,
)
from virthotplug.core.view import (
    AGENT_CONNECTED,
    AGENT_NOT_CONFIGURED,
    AGENT_NOT_CONNECTED,
    AgentStatus,
    CountLayer,
    GuestLayer,
    VcpuView,
)


def view(
    present: str = "0-3",
    online: str = "0",
    offlinable: Optional[str] = None,
    *,
    live: int = 4,
    maximum: int = 8,
    guest: bool = True,
    agent: str = AGENT_CONNECTED,
    state: str = "running",
) -> VcpuView:
    """A running domain's view; offlinable defaults to every present CPU but cpu0."""
    ids = _ids(present)
    layer = GuestLayer(
        present=ids,
        online=_ids(online),
        offlinable=ids - {0} if offlinable is None else _ids(offlinable),
    )
    active = state == "running"
    return VcpuView(
        host="test:///default",
        name="dom",
        uuid="00000000-0000-0000-0000-000000000001",
        state=state,
        persistent=True,
        agent=AgentStatus(configured=True, state=agent),
        config=CountLayer(current=live, maximum=maximum),
        live=CountLayer(current=live, maximum=maximum) if active else None,
        guest=layer if guest and active else None,
    )


def _ids(text: str) -> frozenset[int]:
    result: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        result.update(range(int(first), int(last or first) + 1))
    return frozenset(result)


def policy(mode: str, **kwargs: object) -> Policy:
    return Policy(mode=mode, **kwargs)  # type: ignore[arg-type]


# --- validation -------------------------------------------------------------------------


def test_defaults_change_nothing() -> None:
    assert Policy().mode == MODE_REPORT
    assert not Policy().acts
    assert Policy(mode=MODE_ONLINE).acts and Policy(mode=MODE_MATCH).acts


def test_policy_refuses_unknown_mode() -> None:
    with pytest.raises(ValueError):
        Policy(mode="sometimes")


def test_parse_valid_fields() -> None:
    raw = {"mode": "match", "count": "2", "grace": "1.5", "exclude": "3,5-6", "retries": "0"}
    values = parse_policy_fields(raw, source="metadata (live)", domain="web1")
    assert values == {
        "mode": "match",
        "count": 2,
        "grace": 1.5,
        "exclude": frozenset({3, 5, 6}),
        "retries": 0,
    }


def test_parse_strips_surrounding_whitespace() -> None:
    assert parse_policy_fields({"mode": " online "}, source="s", domain="d") == {"mode": "online"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("mode", "sometimes"),
        ("mode", "ONLINE"),
        ("mode", ""),
        ("count", "0"),
        ("count", "-1"),
        ("count", "2.5"),
        ("count", "01"),
        ("count", "999999"),
        ("count", "٣"),
        ("grace", "-3"),
        ("grace", "nan"),
        ("grace", "inf"),
        ("grace", "1e3"),
        ("grace", "3601"),
        ("grace", ""),
        ("exclude", "0-99999999"),
        ("exclude", "a"),
        ("exclude", "3-1"),
        ("retries", "11"),
        ("retries", "-1"),
        ("retries", "x"),
    ],
)
def test_parse_rejects_bad_values_naming_source_and_domain(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_fields({name: value}, source="metadata (live)", domain="web1")
    message = str(info.value)
    assert "web1" in message and "metadata (live)" in message and name in message


def test_parse_rejects_unknown_field() -> None:
    with pytest.raises(ConfigError, match="unknown field 'exlude'"):
        parse_policy_fields({"exlude": "3"}, source="config x: [defaults]", domain="d")


def test_error_quotes_long_values_briefly() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy_fields({"mode": "x" * 5000}, source="s", domain="d")
    assert len(str(info.value)) < 300


def test_format_field_round_trips() -> None:
    for name, value in (("exclude", frozenset({1, 2, 3, 7})), ("grace", 1.5), ("count", 2)):
        text = format_field(name, value)
        assert parse_policy_fields({name: text}, source="s", domain="d")[name] == value
    assert format_field("count", None) == ""


# --- merging ----------------------------------------------------------------------------


def test_merge_field_by_field_with_sources() -> None:
    effective = merge_policy(
        [
            ("metadata (live)", {"mode": "online", "grace": "1.5"}),
            ("config f: [domain:web-*]", {"mode": "match", "exclude": "3"}),
            ("config f: [defaults]", {"retries": "5", "grace": "9"}),
        ],
        domain="web1",
    )
    assert effective.policy == Policy(
        mode="online", grace=1.5, exclude=frozenset({3}), retries=5, count=None
    )
    assert effective.sources == {
        "mode": "metadata (live)",
        "grace": "metadata (live)",
        "exclude": "config f: [domain:web-*]",
        "retries": "config f: [defaults]",
        "count": DEFAULT_SOURCE,
    }
    as_dict = effective.to_dict()
    assert as_dict["exclude"] == {"value": [3], "source": "config f: [domain:web-*]"}
    assert set(as_dict) == set(FIELDS)


def test_merge_without_layers_is_the_builtin_default() -> None:
    effective = merge_policy([], domain="d")
    assert effective.policy == Policy()
    assert set(effective.sources.values()) == {DEFAULT_SOURCE}


def test_merge_validates_shadowed_layers_too() -> None:
    with pytest.raises(ConfigError, match=r"\[defaults\]"):
        merge_policy(
            [("metadata (live)", {"mode": "online"}), ("config f: [defaults]", {"mode": "x"})],
            domain="d",
        )


# --- decide: no-op cases ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [MODE_REPORT, MODE_IGNORE])
def test_report_and_ignore_never_change_anything(mode: str) -> None:
    plan = decide(view(online="0"), policy(mode))
    assert plan.is_noop and not plan.online and not plan.offline
    assert mode in plan.note


def test_report_note_names_offline_cpus() -> None:
    assert "1-3" in decide(view(online="0"), Policy()).note


@pytest.mark.parametrize("mode", [MODE_ONLINE, MODE_MATCH])
@pytest.mark.parametrize(
    ("agent", "expected"),
    [(AGENT_NOT_CONNECTED, "not-connected"), (AGENT_NOT_CONFIGURED, "not-configured")],
)
def test_no_guest_layer_is_a_noop_with_reason(mode: str, agent: str, expected: str) -> None:
    plan = decide(view(guest=False, agent=agent), policy(mode))
    assert plan.is_noop
    assert "no guest layer" in plan.note and expected in plan.note


def test_domain_not_running_is_a_noop() -> None:
    plan = decide(view(state="shut off"), policy(MODE_ONLINE))
    assert plan.is_noop and "shut off" in plan.note


def test_all_online_is_a_noop() -> None:
    assert decide(view(online="0-3"), policy(MODE_ONLINE)).is_noop
    assert decide(view(online="0-3"), policy(MODE_MATCH)).is_noop


# --- decide: online ---------------------------------------------------------------------


def test_online_brings_every_offline_cpu_online() -> None:
    plan = decide(view(online="0,2"), policy(MODE_ONLINE))
    assert plan.online == {1, 3} and not plan.offline and not plan.excluded
    assert set(plan.reasons) == {1, 3}


def test_online_respects_exclude() -> None:
    plan = decide(view(online="0"), policy(MODE_ONLINE, exclude=frozenset({3})))
    assert plan.online == {1, 2}
    assert plan.excluded == {3}
    assert "excluded" in plan.reasons[3]


def test_online_never_offlines_even_excluded_online_cpus() -> None:
    plan = decide(view(online="0-3"), policy(MODE_ONLINE, exclude=frozenset({2, 3})))
    assert plan.is_noop and not plan.excluded


def test_online_with_only_excluded_offline_cpus_is_a_noop() -> None:
    plan = decide(view(online="0-2"), policy(MODE_ONLINE, exclude=frozenset({3})))
    assert plan.is_noop and plan.excluded == {3}


# --- decide: match ----------------------------------------------------------------------


def test_match_defaults_to_the_live_vcpu_count() -> None:
    plan = decide(view(present="0-3", online="0", live=3), policy(MODE_MATCH))
    assert plan.online == {1, 2}


def test_match_up_picks_lowest_numbered_offline_cpus() -> None:
    plan = decide(view(present="0-5", online="0,4"), policy(MODE_MATCH, count=4))
    assert plan.online == {1, 2} and not plan.offline


def test_match_down_picks_highest_numbered_offlinable_cpus() -> None:
    plan = decide(view(present="0-5", online="0-5"), policy(MODE_MATCH, count=3))
    assert plan.offline == {3, 4, 5} and not plan.online


def test_match_down_never_offlines_cpu0_even_if_reported_offlinable() -> None:
    guest_says_cpu0_offlinable = view(present="0-1", online="0-1", offlinable="0-1")
    plan = decide(guest_says_cpu0_offlinable, policy(MODE_MATCH, count=1))
    assert plan.offline == {1}
    plan = decide(view(present="0-1", online="0", offlinable="0-1"), policy(MODE_MATCH, count=1))
    assert plan.is_noop


def test_match_down_only_offlines_offlinable_cpus() -> None:
    plan = decide(view(present="0-3", online="0-3", offlinable="1,3"), policy(MODE_MATCH, count=1))
    assert plan.offline == {1, 3}
    assert "cannot reach 1" in plan.note


def test_match_target_above_present_onlines_everything_and_says_so() -> None:
    plan = decide(view(present="0-3", online="0"), policy(MODE_MATCH, count=6))
    assert plan.online == {1, 2, 3}
    assert "cannot reach 6" in plan.note and "only 4" in plan.note


def test_match_target_below_one_keeps_cpu0() -> None:
    plan = decide(view(present="0-3", online="0-2"), policy(MODE_MATCH, count=0))
    assert plan.offline == {1, 2}
    assert "raised to 1" in plan.note


def test_match_up_skips_excluded_cpus() -> None:
    plan = decide(
        view(present="0-3", online="0"), policy(MODE_MATCH, count=3, exclude=frozenset({1}))
    )
    assert plan.online == {2, 3}
    assert plan.excluded == {1}


def test_match_up_falls_short_when_the_rest_is_excluded() -> None:
    plan = decide(
        view(present="0-3", online="0"), policy(MODE_MATCH, count=4, exclude=frozenset({2, 3}))
    )
    assert plan.online == {1}
    assert "cannot reach 4" in plan.note and "excluded" in plan.note


def test_match_down_leaves_excluded_online_cpus_alone() -> None:
    plan = decide(
        view(present="0-3", online="0-3"), policy(MODE_MATCH, count=2, exclude=frozenset({3}))
    )
    assert plan.offline == {1, 2}
    plan = decide(
        view(present="0-3", online="0-3"), policy(MODE_MATCH, count=3, exclude=frozenset({3}))
    )
    assert plan.offline == {2}
    assert plan.excluded == {3}


def test_match_counts_excluded_online_cpus() -> None:
    plan = decide(
        view(present="0-3", online="0,3"), policy(MODE_MATCH, count=2, exclude=frozenset({3}))
    )
    assert plan.is_noop


def test_match_without_count_or_live_layer_is_a_noop() -> None:
    base = view(online="0")
    no_live = dataclasses.replace(base, live=None)
    assert decide(no_live, policy(MODE_MATCH)).is_noop


def test_plan_to_dict() -> None:
    plan = decide(view(online="0"), policy(MODE_ONLINE, exclude=frozenset({3})))
    doc = plan.to_dict()
    assert (
        doc["online"] == [1, 2]
        and doc["excluded"] == [3]
        and set(doc["reasons"])
        == {
            "1",
            "2",
            "3",
        }
    )


# --- decide: properties -----------------------------------------------------------------


@st.composite
def guests(draw: st.DrawFn) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    size = draw(st.integers(min_value=1, max_value=12))
    present = frozenset(range(size)) | {0}
    online = frozenset(draw(st.sets(st.sampled_from(sorted(present))))) | {0}
    offlinable = frozenset(draw(st.sets(st.sampled_from(sorted(present)))))
    return present, online, offlinable


@settings(max_examples=400, deadline=None)
@given(
    guest=guests(),
    mode=st.sampled_from(MODES),
    count=st.one_of(st.none(), st.integers(min_value=-2, max_value=16)),
    exclude=st.frozensets(st.integers(min_value=0, max_value=14), max_size=6),
    live=st.integers(min_value=1, max_value=12),
)
def test_decide_invariants(
    guest: tuple[frozenset[int], frozenset[int], frozenset[int]],
    mode: str,
    count: Optional[int],
    exclude: frozenset[int],
    live: int,
) -> None:
    present, online, offlinable = guest
    layer = GuestLayer(present=present, online=online, offlinable=offlinable)
    the_view = dataclasses.replace(view(), guest=layer, live=CountLayer(live, 16))
    plan = decide(the_view, Policy(mode=mode, count=count, exclude=exclude))

    assert isinstance(plan, Plan) and plan.note
    assert 0 not in plan.offline
    assert plan.offline <= online & offlinable
    assert plan.online <= present - online
    assert not (plan.online | plan.offline) & exclude
    assert not plan.online & plan.offline
    if mode in (MODE_REPORT, MODE_IGNORE):
        assert plan.is_noop
    if mode == MODE_ONLINE:
        assert plan.online == (present - online) - exclude and not plan.offline
    if mode == MODE_MATCH:
        target = max(1, count if count is not None else live)
        after = len(online) + len(plan.online) - len(plan.offline)
        reachable_low = len(online) - len(((online & offlinable) - {0}) - exclude)
        reachable_high = len(online) + len((present - online) - exclude)
        assert after == min(max(target, reachable_low), reachable_high)
        # Lowest-numbered up, highest-numbered down.
        if plan.online:
            skipped = (present - online - exclude) - plan.online
            assert not skipped or min(skipped) > max(plan.online)
        if plan.offline:
            kept = ((online & offlinable) - {0} - exclude) - plan.offline
            assert not kept or max(kept) < min(plan.offline)
