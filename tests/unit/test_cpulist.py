"""Tests for virthotplug.core.cpulist: strict, bounded parsing of untrusted cpulist strings."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virthotplug.core.cpulist import (
    MAX_CPU_ID,
    MAX_CPULIST_CHARS,
    CpulistError,
    format_cpulist,
    parse_cpulist,
)

CANONICAL = re.compile(
    r"(?:(?:0|[1-9][0-9]*)(?:-(?:0|[1-9][0-9]*))?)(?:,(?:0|[1-9][0-9]*)(?:-(?:0|[1-9][0-9]*))?)*"
)


def naive_parse(items: list[tuple[bool, int, int]]) -> set[int]:
    """Reference model: apply items in order on a plain set (only for small ids)."""
    ids: set[int] = set()
    for exclude, first, last in items:
        span = set(range(first, last + 1))
        ids = ids - span if exclude else ids | span
    return ids


# --- accepted input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", set()),
        ("   ", set()),
        ("\n", set()),
        ("0", {0}),
        ("7", {7}),
        ("0-3", {0, 1, 2, 3}),
        ("0-3,7", {0, 1, 2, 3, 7}),
        ("0-3,^2,7", {0, 1, 3, 7}),
        ("2-2", {2}),
        ("0,0,0", {0}),
        ("3,1,2", {1, 2, 3}),
        ("0-3\n", {0, 1, 2, 3}),  # sysfs files end with a newline
        (" \t0-1 \r\n", {0, 1}),
        ("10-12,100", {10, 11, 12, 100}),
        (f"{MAX_CPU_ID}", {MAX_CPU_ID}),
        (f"{MAX_CPU_ID - 1}-{MAX_CPU_ID}", {MAX_CPU_ID - 1, MAX_CPU_ID}),
    ],
)
def test_parse_accepts(text: str, expected: set[int]) -> None:
    result = parse_cpulist(text)
    assert result == frozenset(expected)
    assert isinstance(result, frozenset)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-3,^2", {0, 1, 3}),
        ("0-3,^1-2", {0, 3}),
        ("0-3,^0-3", set()),
        ("^2", set()),  # nothing was added before the exclusion
        ("^2,0-3", {0, 1, 2, 3}),  # exclusions only affect earlier items
        ("0-3,^2,2", {0, 1, 2, 3}),  # a later item adds back
        ("0-7,^2-5,3", {0, 1, 3, 6, 7}),
        ("0-3,^9", {0, 1, 2, 3}),  # excluding an absent id is harmless
        ("0-3,^2,^2", {0, 1, 3}),
        (f"0-{MAX_CPU_ID},^1-{MAX_CPU_ID}", {0}),
    ],
)
def test_exclusions_apply_in_order(text: str, expected: set[int]) -> None:
    assert parse_cpulist(text) == frozenset(expected)


def test_max_id_bound_is_inclusive() -> None:
    assert parse_cpulist("0-3", max_id=3) == frozenset({0, 1, 2, 3})
    assert parse_cpulist("0", max_id=0) == frozenset({0})


def test_longest_accepted_input() -> None:
    text = "10" + ",1" * ((MAX_CPULIST_CHARS - 2) // 2)
    assert len(text) == MAX_CPULIST_CHARS
    assert parse_cpulist(text) == frozenset({1, 10})


# --- rejected input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1,,2", "empty item"),
        ("1,", "empty item"),
        (",1", "empty item"),
        (",", "empty item"),
        ("3-1", "reversed range"),
        ("^3-1", "reversed range"),
        ("07", "leading zero"),
        ("00", "leading zero"),
        ("1-02", "leading zero"),
        ("^01", "leading zero"),
        ("-1", "malformed item"),
        ("+1", "malformed item"),
        ("1-", "malformed item"),
        ("-", "malformed item"),
        ("^", "malformed item"),
        ("^^1", "malformed item"),
        ("1^", "malformed item"),
        ("1-2-3", "malformed item"),
        ("1--3", "malformed item"),
        ("1_000", "malformed item"),  # int() accepts underscores
        ("0x10", "malformed item"),
        ("1.0", "malformed item"),
        ("1e3", "malformed item"),
        ("0-7:2/4", "malformed item"),  # kernel stride syntax
        ("1 ,2", "malformed item"),
        ("1, 2", "malformed item"),
        ("1 - 2", "malformed item"),
        ("1\n2", "malformed item"),
        ("1;2", "malformed item"),
        ("all", "malformed item"),
        ("\x00", "malformed item"),
        ("1\x00", "malformed item"),
        ("\u0663", "malformed item"),  # ARABIC-INDIC DIGIT THREE: int() accepts it
        ("\u0969", "malformed item"),  # DEVANAGARI DIGIT THREE
        ("\uff13", "malformed item"),  # FULLWIDTH DIGIT THREE
        ("\u00b2", "malformed item"),  # SUPERSCRIPT TWO: str.isdigit() accepts it
        ("0-\u0663", "malformed item"),
        ("\u20031", "malformed item"),  # EM SPACE is not surrounding ASCII whitespace
        ("\x1c1", "malformed item"),  # str.strip() would have removed this
        ("1\x85", "malformed item"),
        (f"{MAX_CPU_ID + 1}", "exceeds maximum"),
        (f"0-{MAX_CPU_ID + 1}", "exceeds maximum"),
        (f"^{MAX_CPU_ID + 1}", "exceeds maximum"),
        ("0-99999999999", "exceeds maximum"),
        ("99999999999999999999999", "exceeds maximum"),
    ],
)
def test_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(CpulistError, match=re.escape(reason)):
        parse_cpulist(text)


@pytest.mark.parametrize("value", [None, 3, 3.0, b"0-3", bytearray(b"0"), ["0"], {0}])
def test_parse_rejects_non_str(value: object) -> None:
    with pytest.raises(CpulistError, match="must be a str"):
        parse_cpulist(value)  # type: ignore[arg-type]


def test_parse_rejects_too_long_even_if_only_whitespace() -> None:
    with pytest.raises(CpulistError, match="too long"):
        parse_cpulist(" " * (MAX_CPULIST_CHARS + 1))
    with pytest.raises(CpulistError, match="too long: 4097 chars"):
        parse_cpulist("1" * 4096 + ",")


def test_custom_max_id() -> None:
    with pytest.raises(CpulistError, match="exceeds maximum 3"):
        parse_cpulist("4", max_id=3)
    with pytest.raises(CpulistError, match="exceeds maximum 3"):
        parse_cpulist("0-4", max_id=3)
    with pytest.raises(CpulistError, match="exceeds maximum 0"):
        parse_cpulist("1", max_id=0)
    # The default bound is not applied when a larger one is given.
    assert parse_cpulist("20000", max_id=20000) == frozenset({20000})


@pytest.mark.parametrize(
    ("max_id", "error"), [(-1, ValueError), (True, TypeError), ("3", TypeError)]
)
def test_bad_max_id_is_a_programming_error(max_id: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_id"):
        parse_cpulist("0", max_id=max_id)  # type: ignore[arg-type]


def test_huge_ranges_are_rejected_before_expansion() -> None:
    started = time.perf_counter()
    for text in ["0-99999999999", "0-" + "9" * 4000, "9" * 4096, "^0-18446744073709551616"]:
        with pytest.raises(CpulistError, match="exceeds maximum") as excinfo:
            parse_cpulist(text)
        assert type(excinfo.value) is CpulistError  # not int()'s own digit-limit ValueError
    assert time.perf_counter() - started < 1.0


def test_worst_case_repetition_stays_cheap() -> None:
    # ~500 full-width ranges: a set-based parser would touch 8 million ids.
    text = ",".join([f"0-{MAX_CPU_ID}", f"^0-{MAX_CPU_ID - 1}"] * 240)
    assert len(text) <= MAX_CPULIST_CHARS
    started = time.perf_counter()
    assert parse_cpulist(text) == frozenset({MAX_CPU_ID})
    assert time.perf_counter() - started < 1.0


def test_error_message_is_one_line_and_quotes_little() -> None:
    text = "x\n" * 2000
    with pytest.raises(CpulistError) as excinfo:
        parse_cpulist(text)
    message = str(excinfo.value)
    assert "\n" not in message
    assert len(message) < 200
    assert "'x\\nx\\n" in message  # repr, so control characters are escaped
    assert "(4000 chars)" in message


def test_error_is_a_value_error() -> None:
    assert issubclass(CpulistError, ValueError)


# --- formatting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([], ""),
        ([0], "0"),
        ([0, 1], "0-1"),
        ([0, 1, 2, 3], "0-3"),
        ([7, 0, 1, 2, 3], "0-3,7"),
        ([0, 2, 4], "0,2,4"),
        ([5, 5, 5], "5"),
        ([1, 2, 3, 10, 11, 20], "1-3,10-11,20"),
        ([MAX_CPU_ID + 5], str(MAX_CPU_ID + 5)),  # format has no upper bound
    ],
)
def test_format(ids: list[int], expected: str) -> None:
    assert format_cpulist(ids) == expected


def test_format_accepts_any_iterable() -> None:
    assert format_cpulist(i for i in (3, 2, 1)) == "1-3"
    assert format_cpulist(frozenset({4, 6})) == "4,6"
    assert format_cpulist(range(8)) == "0-7"


@pytest.mark.parametrize("bad", [True, "1", 1.0, None])
def test_format_rejects_non_int(bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        format_cpulist([0, bad])  # type: ignore[list-item]


def test_format_rejects_negative() -> None:
    with pytest.raises(CpulistError, match="-1"):
        format_cpulist([0, -1])


# --- properties -------------------------------------------------------------------------

cpu_id_sets = st.frozensets(st.integers(min_value=0, max_value=MAX_CPU_ID), max_size=300)
dense_sets = st.frozensets(st.integers(min_value=0, max_value=64))


@given(st.one_of(cpu_id_sets, dense_sets))
def test_round_trip(ids: frozenset[int]) -> None:
    text = format_cpulist(ids)
    assert parse_cpulist(text) == ids
    assert format_cpulist(parse_cpulist(text)) == text


@given(st.one_of(cpu_id_sets, dense_sets))
def test_format_is_canonical(ids: frozenset[int]) -> None:
    text = format_cpulist(ids)
    assert text == "" or CANONICAL.fullmatch(text)
    bounds = [tuple(int(part) for part in item.split("-")) for item in text.split(",") if item]
    flat = [value for bound in bounds for value in (bound[0], bound[-1])]
    assert flat == sorted(flat)
    for bound in bounds:
        assert len(bound) == 1 or bound[0] < bound[1]  # "2-2" is never emitted
    for previous, following in zip(bounds, bounds[1:]):
        assert following[0] > previous[-1] + 1  # adjacent runs are merged


def union_of_runs(runs: list[tuple[int, int]]) -> frozenset[int]:
    return frozenset(
        cpu_id
        for start, length in runs
        for cpu_id in range(start, min(start + length, MAX_CPU_ID + 1))
    )


# Large sets described compactly (runs, or a seeded sample) so generation stays cheap.
run_sets = st.lists(st.tuples(st.integers(0, MAX_CPU_ID), st.integers(1, 2000)), max_size=60).map(
    union_of_runs
)
sampled_sets = st.tuples(st.randoms(use_true_random=False), st.integers(0, 6000)).map(
    lambda seeded: frozenset(seeded[0].sample(range(MAX_CPU_ID + 1), seeded[1]))
)


@settings(deadline=None, max_examples=50)
@given(st.one_of(run_sets, sampled_sets))
def test_round_trip_large_sets(ids: frozenset[int]) -> None:
    text = format_cpulist(ids)
    if len(text) <= MAX_CPULIST_CHARS:
        assert parse_cpulist(text) == ids
    else:
        with pytest.raises(CpulistError, match="too long"):
            parse_cpulist(text)


def test_round_trip_full_range() -> None:
    everything = frozenset(range(MAX_CPU_ID + 1))
    assert format_cpulist(everything) == f"0-{MAX_CPU_ID}"
    assert parse_cpulist(format_cpulist(everything)) == everything


cpulist_alphabet = st.sampled_from([*"0123456789,-^ \t\n", "\u0663", "\x00", "+", "_"])


@given(
    st.one_of(st.text(), st.text(alphabet=cpulist_alphabet)),
    st.integers(min_value=0, max_value=MAX_CPU_ID),
)
def test_arbitrary_text_only_raises_cpulist_error(text: str, max_id: int) -> None:
    try:
        result = parse_cpulist(text, max_id=max_id)
    except CpulistError as error:
        assert "\n" not in str(error)
        return
    assert all(0 <= cpu_id <= max_id for cpu_id in result)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decoded_leniently_only_raise_cpulist_error(raw: bytes) -> None:
    text = raw.decode("latin-1")
    try:
        result = parse_cpulist(text, max_id=255)
    except CpulistError:
        return
    assert all(0 <= cpu_id <= 255 for cpu_id in result)


item_strategy = st.tuples(
    st.booleans(), st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=40)
).map(lambda item: (item[0], min(item[1], item[2]), max(item[1], item[2])))


def render(item: tuple[bool, int, int]) -> str:
    exclude, first, last = item
    body = str(first) if first == last else f"{first}-{last}"
    return "^" + body if exclude else body


@given(st.lists(item_strategy, max_size=20), st.sampled_from(["{}", " {}\n", "{}\n"]))
def test_matches_sequential_model(items: list[tuple[bool, int, int]], template: str) -> None:
    text = template.format(",".join(render(item) for item in items))
    assert parse_cpulist(text) == frozenset(naive_parse(items))


@given(st.lists(item_strategy, min_size=1, max_size=20), st.integers(min_value=0, max_value=39))
def test_ids_above_max_id_are_rejected_not_dropped(
    items: list[tuple[bool, int, int]], max_id: int
) -> None:
    text = ",".join(render(item) for item in items)
    too_big = any(last > max_id for _exclude, _first, last in items)
    if too_big:
        with pytest.raises(CpulistError, match="exceeds maximum"):
            parse_cpulist(text, max_id=max_id)
    else:
        assert parse_cpulist(text, max_id=max_id) == frozenset(naive_parse(items))
