"""Tests for virthotplug.core.ost: _OST decoding and untrusted QEMU event details."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virthotplug.core.ost import (
    MAX_EVENT_JSON,
    DeviceDeleted,
    EventDataError,
    OstEvent,
    parse_device_deleted,
    parse_ost_details,
    source_name,
    status_name,
)

# What the lab host's libvirt handed the monitor-event callback on a hot-add (lab notes).
LAB_HOT_ADD = (
    '{"info": {"device": "vcpu1", "source": 1, "status": 0, "slot": "1", "slot-type": "CPU"}}'
)


def ost(source: int, status: int, device: str | None = "vcpu2", slot: str | None = "2") -> OstEvent:
    return OstEvent(source=source, status=status, device=device, slot=slot, slot_type="CPU")


def info_json(**fields: Any) -> str:
    base: dict[str, Any] = {"device": "vcpu1", "source": 1, "status": 0, "slot": "1"}
    base["slot-type"] = "CPU"
    base.update(fields)
    return json.dumps({"info": {key: value for key, value in base.items() if value is not ...}})


# --- source codes (ACPI 6.x §6.3.5) -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (0x00, "bus check"),
        (0x01, "device check"),
        (0x02, "device wake"),
        (0x03, "eject request"),
        (0x04, "device check light"),
        (0x05, "frequency mismatch"),
        (0x06, "bus mode mismatch"),
        (0x07, "power fault"),
        (0x08, "capabilities check"),
        (0x09, "device PLD check"),
        (0x0A, "reserved (0x0a)"),
        (0x0B, "system locality update"),
        (0x0C, "graceful shutdown request"),
        (0x0D, "system resource affinity update"),
        (0x0E, "heterogeneous memory attributes update"),
        (0x0F, "error disconnect recover"),
        (0x10, "reserved (0x10)"),
        (0x7F, "reserved (0x7f)"),
        (0x80, "device-specific (0x80)"),
        (0x85, "device-specific (0x85)"),
        (0xFF, "device-specific (0xff)"),
        (0x100, "OSPM shutdown processing"),
        (0x101, "reserved (0x101)"),
        (0x102, "reserved (0x102)"),
        (0x103, "OSPM ejection processing"),
        (0x104, "reserved (0x104)"),
        (0x1FF, "reserved (0x1ff)"),
        (0x200, "OSPM insertion processing"),
        (0x201, "reserved (0x201)"),
        (0xFFFFFFFF, "reserved (0xffffffff)"),
    ],
)
def test_source_names(source: int, name: str) -> None:
    assert source_name(source) == name
    assert ost(source, 0).source_name == name


# --- status codes, decoded in the context of the source ---------------------------------

ALL_SOURCES = [0x00, 0x01, 0x03, 0x0C, 0x80, 0x100, 0x103, 0x200, 0x300]


@pytest.mark.parametrize("source", ALL_SOURCES)
@pytest.mark.parametrize(
    ("status", "name"),
    [
        (0x00, "success"),
        (0x01, "non-specific failure"),
        (0x02, "unrecognized notify code"),
        (0x03, "reserved (0x03)"),
        (0x40, "reserved (0x40)"),
        (0x7F, "reserved (0x7f)"),
    ],
)
def test_general_status_codes_for_every_source(source: int, status: int, name: str) -> None:
    assert status_name(source, status) == name


EJECT_ROWS = [
    (0x80, "ejection not supported by OSPM"),
    (0x81, "device in use by an application"),
    (0x82, "device busy"),
    (0x83, "ejection dependency busy or not supported"),
    (0x84, "ejection in progress"),
    (0x85, "reserved (0x85)"),
    (0x90, "reserved (0x90)"),
    (0xFFFFFFFF, "reserved (0xffffffff)"),
]


@pytest.mark.parametrize("source", [0x03, 0x103])
@pytest.mark.parametrize(("status", "name"), EJECT_ROWS)
def test_eject_status_codes(source: int, status: int, name: str) -> None:
    assert status_name(source, status) == name


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (0x80, "insertion in progress"),
        (0x81, "device driver load failure"),
        (0x82, "insertion not supported by OSPM"),
        (0x83, "reserved (0x83)"),
        (0x84, "reserved (0x84)"),
        (0x8F, "reserved (0x8f)"),
        (0x90, "insertion failed, resources unavailable (unspecified)"),
        (0x91, "insertion failed, resources unavailable (memory)"),
        (0x92, "insertion failed, resources unavailable (I/O)"),
        (0x94, "insertion failed, resources unavailable (interrupts)"),
        (0x98, "insertion failed, resources unavailable (bus numbers)"),
        (0x9A, "insertion failed, resources unavailable (bus numbers, I/O)"),
        (0x95, "insertion failed, resources unavailable (interrupts, memory)"),
        (
            0x9F,
            "insertion failed, resources unavailable (bus numbers, interrupts, I/O, memory)",
        ),
        (0xA0, "reserved (0xa0)"),
        (0xFF, "reserved (0xff)"),
        (0x190, "reserved (0x190)"),
    ],
)
def test_insertion_status_codes(status: int, name: str) -> None:
    assert status_name(0x200, status) == name


@pytest.mark.parametrize("status", range(0x90, 0xA0))
def test_every_insertion_resource_status_names_its_bits(status: int) -> None:
    name = status_name(0x200, status)
    expected = {
        "bus numbers": bool(status & 8),
        "interrupts": bool(status & 4),
        "I/O": bool(status & 2),
        "memory": bool(status & 1),
    }
    assert {resource: resource in name for resource in expected} == expected


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (0x80, "shutdown request denied"),
        (0x81, "shutdown in progress"),
        (0x82, "shutdown completed"),
        (0x83, "graceful shutdown not supported"),
        (0x84, "reserved (0x84)"),
    ],
)
def test_shutdown_status_codes(status: int, name: str) -> None:
    assert status_name(0x100, status) == name


@pytest.mark.parametrize("source", [0x00, 0x01, 0x02, 0x0C, 0x80, 0xFF, 0x101, 0x300])
def test_sources_without_a_table_have_notify_specific_high_statuses(source: int) -> None:
    # ACPI: 0x80+ are "notification value specific"; only eject/insertion/shutdown define any.
    assert status_name(source, 0x84) == "notify-specific (0x84)"
    assert status_name(source, 0xFFFFFFFF) == "notify-specific (0xffffffff)"


def test_eject_code_is_not_decoded_for_device_check() -> None:
    assert ost(1, 0x84).status_name != "ejection in progress"


# --- OstEvent ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (
            ost(1, 0),
            "device check: success — the guest's ACPI accepted vcpu2; not yet listed by the guest",
        ),
        (ost(3, 0x84, device="vcpu3"), "eject request: ejection in progress (vcpu3)"),
        (ost(3, 0, device=None, slot=None), "eject request: success — guest ejected the CPU"),
        (
            ost(3, 0, device=None, slot="1"),
            "eject request: success — guest ejected the CPU in slot 1",
        ),
        (ost(3, 0, device="vcpu3"), "eject request: success — guest ejected vcpu3"),
        (ost(0x103, 0, device="vcpu3"), "OSPM ejection processing: success — guest ejected vcpu3"),
        (ost(3, 0x82, device="vcpu3"), "eject request: device busy (vcpu3)"),
        (
            ost(3, 0x01, device=None, slot="4"),
            "eject request: non-specific failure (the CPU in slot 4)",
        ),
        (ost(1, 0x01), "device check: non-specific failure (vcpu2)"),
        (
            OstEvent(source=1, status=0, device="dimm1", slot="0", slot_type="DIMM"),
            "device check: success — the guest's ACPI accepted dimm1",
        ),
        (
            OstEvent(source=0x0A, status=0x05, device=None, slot=None, slot_type=None),
            "reserved (0x0a): reserved (0x05)",
        ),
        (
            OstEvent(source=1, status=0, device=None, slot=None, slot_type=None),
            "device check: success — the guest's ACPI accepted the device",
        ),
    ],
)
def test_describe(event: OstEvent, line: str) -> None:
    assert event.describe() == line


@pytest.mark.parametrize(
    ("device", "vcpu_id"),
    [
        ("vcpu0", 0),
        ("vcpu1", 1),
        ("vcpu2", 2),
        ("vcpu16383", 16383),
        ("vcpu16384", None),
        ("vcpu99999", None),
        ("vcpu123456", None),
        ("vcpu01", None),
        ("vcpu", None),
        ("vcpu-1", None),
        ("vcpu+1", None),
        ("vcpu1 ", None),
        ("vcpu\u0661", None),  # ARABIC-INDIC DIGIT ONE
        ("VCPU1", None),
        ("core1", None),
        ("xvcpu1", None),
        (None, None),
    ],
)
def test_vcpu_id(device: str | None, vcpu_id: int | None) -> None:
    assert ost(1, 0, device=device).vcpu_id == vcpu_id


def test_is_cpu_and_is_success() -> None:
    assert ost(1, 0).is_cpu
    assert ost(1, 0).is_success
    assert not ost(3, 0x84).is_success
    assert not OstEvent(source=1, status=0, device=None, slot="0", slot_type="DIMM").is_cpu
    assert not OstEvent(source=1, status=0, device=None, slot=None, slot_type=None).is_cpu


def test_ost_event_is_frozen() -> None:
    event = ost(1, 0)
    with pytest.raises(AttributeError):
        event.status = 1  # type: ignore[misc]


# --- parse_ost_details: accepted --------------------------------------------------------


def test_parse_lab_hot_add_event() -> None:
    event = parse_ost_details(LAB_HOT_ADD)
    assert event == OstEvent(source=1, status=0, device="vcpu1", slot="1", slot_type="CPU")
    assert event.vcpu_id == 1
    assert event.is_cpu
    assert (
        event.describe()
        == "device check: success — the guest's ACPI accepted vcpu1; not yet listed by the guest"
    )


def test_parse_accepts_bytes_bytearray_and_dict() -> None:
    expected = parse_ost_details(LAB_HOT_ADD)
    assert parse_ost_details(LAB_HOT_ADD.encode()) == expected
    assert parse_ost_details(bytearray(LAB_HOT_ADD.encode())) == expected
    assert parse_ost_details(json.loads(LAB_HOT_ADD)) == expected


def test_parse_final_eject_event_without_device() -> None:
    event = parse_ost_details(info_json(device=..., source=3, status=0))
    assert event == OstEvent(source=3, status=0, device=None, slot="1", slot_type="CPU")
    assert event.vcpu_id is None
    assert event.describe() == "eject request: success — guest ejected the CPU in slot 1"


def test_parse_eject_in_progress() -> None:
    event = parse_ost_details(info_json(source=3, status=0x84))
    assert (event.source, event.status, event.vcpu_id) == (3, 0x84, 1)
    assert event.describe() == "eject request: ejection in progress (vcpu1)"


def test_parse_seed_event_with_qemu_device_id() -> None:
    event = parse_ost_details(info_json(device="core1", slot="2"))
    assert event.device == "core1"
    assert event.vcpu_id is None


def test_parse_optional_fields_absent_or_null() -> None:
    event = parse_ost_details('{"info": {"source": 1, "status": 0, "device": null}}')
    assert event == OstEvent(source=1, status=0, device=None, slot=None, slot_type=None)


def test_parse_ignores_unknown_keys() -> None:
    details = {"info": {"source": 1, "status": 0, "future": [1, 2]}, "extra": {"x": 1}}
    assert parse_ost_details(details).source == 1


def test_parse_bounds_are_inclusive() -> None:
    event = parse_ost_details(info_json(source=0xFFFFFFFF, status=0, device="d" * 128))
    assert event.source == 0xFFFFFFFF
    padded = LAB_HOT_ADD + " " * (MAX_EVENT_JSON - len(LAB_HOT_ADD))
    assert len(padded) == MAX_EVENT_JSON
    assert parse_ost_details(padded).vcpu_id == 1


# --- parse_ost_details: rejected --------------------------------------------------------


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        (None, "no details"),
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("{'info': {}}", "not valid JSON"),
        ('{"info": {"source": 1, "status": 0}} trailing', "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        ("null", "must be a JSON object"),
        ("[]", "must be a JSON object"),
        ("1", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        (42, "must be a JSON object"),
        ([("info", {})], "must be a JSON object"),
        ("{}", "'info' must be a JSON object"),
        ('{"info": null}', "'info' must be a JSON object"),
        ('{"info": [1, 0]}', "'info' must be a JSON object"),
        ('{"info": "x"}', "'info' must be a JSON object"),
        ('{"info": {"status": 0}}', "'source' must be an integer"),
        ('{"info": {"source": 1}}', "'status' must be an integer"),
        (info_json(source="1"), "'source' must be an integer"),
        (info_json(source=1.0), "'source' must be an integer"),
        (info_json(source=True), "'source' must be an integer"),
        (info_json(status=False), "'status' must be an integer"),
        (info_json(status=[0]), "'status' must be an integer"),
        (info_json(source=-1), "'source' out of range"),
        (info_json(status=0x100000000), "'status' out of range"),
        ('{"info": {"source": NaN, "status": 0}}', "non-finite number NaN"),
        ('{"info": {"source": 1, "status": -Infinity}}', "non-finite number -Infinity"),
        ('{"info": {"source": 1' + "0" * 30 + ', "status": 0}}', "number with 31 digits"),
        ('{"info": {"source": 1, "status": 0, "source": 3}}', "duplicate key 'source'"),
        ('{"info": {}, "info": {"source": 1, "status": 0}}', "duplicate key 'info'"),
        (info_json(device=7), "'device' must be a string"),
        (info_json(device=""), "'device' must be 1..128 chars"),
        (info_json(device="d" * 129), "'device' must be 1..128 chars"),
        (info_json(device="vcpu1\n"), "'device' has unprintable characters"),
        (info_json(device="vcpu1\x1b[2J"), "'device' has unprintable characters"),
        (info_json(device="vcpu1\u2028"), "'device' has unprintable characters"),
        (info_json(device="\ud800"), "'device' has unprintable characters"),
        (info_json(slot=1), "'slot' must be a string"),
        (info_json(slot="9" * 33), "'slot' must be 1..32 chars"),
        (info_json(**{"slot-type": ["CPU"]}), "'slot-type' must be a string"),
        (info_json(**{"slot-type": "C\tPU"}), "'slot-type' has unprintable characters"),
    ],
)
def test_parse_ost_rejects(details: Any, reason: str) -> None:
    with pytest.raises(EventDataError, match=re.escape(reason)):
        parse_ost_details(details)


def test_parse_rejects_oversized_details_before_parsing() -> None:
    too_long = LAB_HOT_ADD + " " * (MAX_EVENT_JSON + 1 - len(LAB_HOT_ADD))
    with pytest.raises(EventDataError, match="too long: 8193 chars"):
        parse_ost_details(too_long)
    with pytest.raises(EventDataError, match="too long: 8193 bytes"):
        parse_ost_details(too_long.encode())
    with pytest.raises(EventDataError, match="too long: 10000000 chars"):
        parse_ost_details("[" * 10_000_000)


@pytest.mark.parametrize(
    "details",
    [
        "[" * (MAX_EVENT_JSON - 1),
        "[" * 300 + "]" * 300,
        '{"a":' * 1300 + "1" + "}" * 1300,
        '{"info": ' * 800 + "{}" + "}" * 800,
        '{"info": {"source": 1, "status": 0, "x": ' + "[" * 15 + "]" * 15 + "}}",
    ],
)
def test_parse_rejects_deep_nesting_on_every_python(details: str) -> None:
    assert len(details) <= MAX_EVENT_JSON
    with pytest.raises(EventDataError, match="nested deeper than 16 levels"):
        parse_ost_details(details)


def test_nesting_limit_is_inclusive_and_ignores_brackets_in_strings() -> None:
    at_limit = '{"info": {"source": 1, "status": 0, "x": ' + "[" * 14 + "]" * 14 + "}}"
    assert parse_ost_details(at_limit).source == 1
    brackets_in_text = json.dumps({"info": {"source": 1, "status": 0, "x": "[{" * 100 + '\\"['}})
    assert parse_ost_details(brackets_in_text).source == 1


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (10**5000, "a 16610-bit integer"),  # repr() of it fails on Python 3.11+
        (-(10**30), "a 100-bit integer"),
        (nested_list(100_000), "a list"),  # repr() of it would recurse 100 000 deep
        ("1" * 10_000_000, "'1111111111111111111111111111111111111111'..."),
        ({"n": 1}, "a dict"),
    ],
    ids=["huge-int", "negative-int", "deep-list", "huge-str", "dict"],
)
def test_hostile_dict_values_are_summarised_not_repr(value: Any, shown: str) -> None:
    with pytest.raises(EventDataError) as excinfo:
        parse_ost_details({"info": {"source": value, "status": 0}})
    assert str(excinfo.value).endswith(shown)


def test_error_messages_are_one_line_and_short() -> None:
    hostile = "\n" * 50 + "x" * 100
    with pytest.raises(EventDataError) as excinfo:
        parse_ost_details(info_json(device=hostile))
    assert "\n" not in str(excinfo.value)
    with pytest.raises(EventDataError) as excinfo:
        parse_ost_details(info_json(source=hostile))
    assert "\n" not in str(excinfo.value)
    assert len(str(excinfo.value)) < 120
    with pytest.raises(EventDataError) as excinfo:
        parse_ost_details('{"info":\n\n{')
    assert "\n" not in str(excinfo.value)


def test_event_data_error_is_a_value_error() -> None:
    assert issubclass(EventDataError, ValueError)


# --- properties -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
info_like = st.fixed_dictionaries(
    {},
    optional={
        "source": json_values,
        "status": json_values,
        "device": json_values,
        "slot": json_values,
        "slot-type": json_values,
    },
)


@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps)))
def test_arbitrary_input_only_raises_event_data_error(details: str | bytes) -> None:
    for parse in (parse_ost_details, parse_device_deleted):
        try:
            parse(details)
        except EventDataError as error:
            assert "\n" not in str(error)


@given(info_like)
def test_arbitrary_info_is_parsed_or_rejected(info: dict[str, Any]) -> None:
    try:
        event = parse_ost_details({"info": info})
    except EventDataError as error:
        assert "\n" not in str(error)
        return
    assert type(event.source) is int and 0 <= event.source <= 0xFFFFFFFF
    assert type(event.status) is int and 0 <= event.status <= 0xFFFFFFFF
    for text in (event.device, event.slot, event.slot_type):
        assert text is None or (isinstance(text, str) and text.isprintable() and text)
    assert "\n" not in event.describe()


printable_ids = st.text(
    st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=20
)


@given(
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.none() | printable_ids,
    st.none() | printable_ids,
    st.none() | st.sampled_from(["CPU", "DIMM"]),
)
def test_valid_details_round_trip(
    source: int, status: int, device: str | None, slot: str | None, slot_type: str | None
) -> None:
    info: dict[str, Any] = {"source": source, "status": status}
    for key, value in (("device", device), ("slot", slot), ("slot-type", slot_type)):
        if value is not None:
            info[key] = value
    event = parse_ost_details(json.dumps({"info": info}))
    assert event == OstEvent(source, status, device, slot, slot_type)
    line = event.describe()
    assert "\n" not in line
    assert line.startswith(f"{source_name(source)}: {status_name(source, status)}")


@given(
    st.integers(min_value=0, max_value=0xFFFFFFFF), st.integers(min_value=0, max_value=0xFFFFFFFF)
)
def test_names_are_total(source: int, status: int) -> None:
    assert source_name(source)
    assert status_name(source, status)


# --- DEVICE_DELETED ---------------------------------------------------------------------


def test_device_deleted_for_the_vcpu_itself() -> None:
    event = parse_device_deleted('{"device": "vcpu1", "path": "/machine/peripheral/vcpu1"}')
    assert event == DeviceDeleted(device="vcpu1", path="/machine/peripheral/vcpu1")
    assert event.is_device_itself
    assert event.vcpu_id == 1
    assert not event.is_vcpu_child
    assert event.parent_vcpu_id is None


def test_device_deleted_for_lapic_child_on_qemu_7_2() -> None:
    # QEMU 7.2 sends only this for an unplugged vcpu1 (lab notes): no "device" field.
    event = parse_device_deleted(b'{"path": "/machine/peripheral/vcpu1/lapic"}')
    assert event.device is None
    assert not event.is_device_itself
    assert event.vcpu_id is None
    assert event.is_vcpu_child
    assert event.parent_vcpu_id == 1


def test_device_field_does_not_make_a_child_the_vcpu() -> None:
    event = parse_device_deleted({"device": "vcpu1", "path": "/machine/peripheral/vcpu1/lapic"})
    assert event.vcpu_id is None
    assert event.parent_vcpu_id == 1


@pytest.mark.parametrize(
    ("device", "path", "vcpu_id", "parent_vcpu_id"),
    [
        ("net0", "/machine/peripheral/net0", None, None),
        ("net0", "/machine/peripheral/net0/virtio-backend", None, None),
        (None, "/machine/peripheral-anon/device[3]", None, None),
        ("vcpu2", "/machine/peripheral-anon/vcpu2", None, None),  # path is not the device's
        ("vcpu2", "/machine/peripheral/vcpu3", None, None),
        (None, "/machine/peripheral/vcpu4/", None, None),
        (None, "/machine/peripheral/vcpu01/lapic", None, None),
        ("vcpu16383", "/machine/peripheral/vcpu16383", 16383, None),
    ],
)
def test_device_deleted_other_shapes(
    device: str | None, path: str, vcpu_id: int | None, parent_vcpu_id: int | None
) -> None:
    event = parse_device_deleted({"device": device, "path": path})
    assert event.vcpu_id == vcpu_id
    assert event.parent_vcpu_id == parent_vcpu_id


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        (None, "no details"),
        ("[]", "must be a JSON object"),
        ("{}", "'path' is missing"),
        ('{"device": "vcpu1"}', "'path' is missing"),
        ('{"path": null}', "'path' is missing"),
        ('{"path": 1}', "'path' must be a string"),
        ('{"path": ""}', "'path' must be 1..512 chars"),
        (json.dumps({"path": "/" + "a" * 512}), "'path' must be 1..512 chars"),
        ('{"path": "machine/peripheral/vcpu1"}', "absolute QOM path"),
        ('{"path": "/machine/peripheral/vcpu1\\n"}', "'path' has unprintable characters"),
        ('{"path": "/machine/peripheral/vcpu1", "device": 1}', "'device' must be a string"),
        ('{"path": "/a", "path": "/b"}', "duplicate key 'path'"),
        ("x" * (MAX_EVENT_JSON + 1), "too long"),
    ],
)
def test_parse_device_deleted_rejects(details: Any, reason: str) -> None:
    with pytest.raises(EventDataError, match=re.escape(reason)):
        parse_device_deleted(details)
