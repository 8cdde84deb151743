"""Tests for virthotplug.core.view: validating untrusted guest-agent replies, and the JSON form."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virthotplug.core.cpulist import MAX_CPU_ID, MAX_CPULIST_CHARS
from virthotplug.core.errors import EXIT_AGENT, AgentError, GuestDataError
from virthotplug.core.view import (
    AGENT_CONNECTED,
    CRITICAL,
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_UNPLUG_TIMEOUT,
    INFO,
    MAX_GUEST_REPLY_KEYS,
    MAX_HISTORY_ENTRIES,
    WARNING,
    AgentStatus,
    CountLayer,
    Finding,
    GuestLayer,
    History,
    HistoryEntry,
    HypervisorLayer,
    VcpuEntry,
    VcpuView,
    parse_guest_reply,
    to_dict,
)

# --- parse_guest_reply: good replies ----------------------------------------------------


def test_typical_reply() -> None:
    # What libvirt returns after a hot-add the guest did not online (plugged, not online).
    reply = {"vcpus": "0-3", "online": "0-1", "offlinable": "1-3"}
    guest = parse_guest_reply(reply, maximum=4, domain="d1")
    assert guest == GuestLayer(
        present=frozenset({0, 1, 2, 3}),
        online=frozenset({0, 1}),
        offlinable=frozenset({1, 2, 3}),
    )
    assert guest.offline == frozenset({2, 3})


def test_offlinable_may_be_missing() -> None:
    # Older Windows qemu-ga has no 'can-offline': libvirt then leaves the key out.
    guest = parse_guest_reply({"vcpus": "0-1", "online": "0-1"}, maximum=2, domain="d1")
    assert guest.offlinable == frozenset()
    assert guest.offline == frozenset()


def test_empty_offlinable_and_sparse_ids() -> None:
    reply = {"vcpus": "0,2,5", "online": "0,5", "offlinable": ""}
    guest = parse_guest_reply(reply, maximum=8, domain="d1")
    assert guest.present == frozenset({0, 2, 5})
    assert guest.offline == frozenset({2})


def test_highest_id_is_maximum_minus_one() -> None:
    guest = parse_guest_reply({"vcpus": "0-7", "online": "7"}, maximum=8, domain="d1")
    assert max(guest.present) == 7


def test_extra_keys_are_tolerated() -> None:
    reply = {"vcpus": "0", "online": "0", "future-key": 42}
    assert parse_guest_reply(reply, maximum=1, domain="d1").present == frozenset({0})


def test_any_mapping_is_accepted() -> None:
    reply = OrderedDict([("online", "0"), ("vcpus", "0-1")])
    assert parse_guest_reply(reply, maximum=2, domain="d1").online == frozenset({0})


# --- parse_guest_reply: garbage ---------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "0-3",
        b"0-3",
        ["0-3", "0-1"],
        ("vcpus", "online"),
        42,
        {"vcpus", "online"},
    ],
)
def test_non_mapping_reply(reply: Any) -> None:
    with pytest.raises(GuestDataError, match=r"^domain 'evil': .*not a small mapping"):
        parse_guest_reply(reply, maximum=4, domain="evil")


def test_too_many_keys() -> None:
    reply: dict[str, Any] = {"vcpus": "0", "online": "0"}
    reply.update({f"k{i}": "" for i in range(MAX_GUEST_REPLY_KEYS)})
    with pytest.raises(GuestDataError, match="not a small mapping"):
        parse_guest_reply(reply, maximum=4, domain="evil")


@pytest.mark.parametrize(
    ("reply", "key"),
    [
        ({}, "vcpus"),
        ({"online": "0"}, "vcpus"),
        ({"vcpus": "0"}, "online"),
        ({"vcpus": None, "online": "0"}, "vcpus"),
        ({"vcpus": 3, "online": "0"}, "vcpus"),
        ({"vcpus": b"0-3", "online": "0"}, "vcpus"),
        ({"vcpus": ["0", "1"], "online": "0"}, "vcpus"),
        ({"vcpus": "0-1", "online": 1}, "online"),
        ({"vcpus": "0-1", "online": "0", "offlinable": 1}, "offlinable"),
        ({"vcpus": "0-1", "online": "0", "offlinable": ["1"]}, "offlinable"),
        ({b"vcpus": "0-1", "online": "0"}, "vcpus"),
    ],
)
def test_missing_or_non_string_values(reply: dict[Any, Any], key: str) -> None:
    with pytest.raises(GuestDataError, match=f"^domain 'evil': .*'{key}'"):
        parse_guest_reply(reply, maximum=4, domain="evil")


@pytest.mark.parametrize(
    ("reply", "key"),
    [
        ({"vcpus": "0-4", "online": "0"}, "vcpus"),
        ({"vcpus": "4", "online": ""}, "vcpus"),
        ({"vcpus": "0-3", "online": "0,4"}, "online"),
        ({"vcpus": "0-3", "online": "0", "offlinable": "1-4"}, "offlinable"),
        ({"vcpus": "0-99999999999999999999", "online": "0"}, "vcpus"),
    ],
)
def test_ids_at_or_above_maximum(reply: dict[str, Any], key: str) -> None:
    with pytest.raises(GuestDataError, match=f"^domain 'evil': guest agent '{key}': .*exceeds"):
        parse_guest_reply(reply, maximum=4, domain="evil")


@pytest.mark.parametrize(
    "value",
    ["0-", "-1", "0,,1", "a", "0 1", "3-1", "01", "0-3\n1", "\u0661", "0x1", "1.0"],
)
def test_malformed_cpulists(value: str) -> None:
    with pytest.raises(GuestDataError, match=r"^domain 'evil': guest agent 'vcpus': "):
        parse_guest_reply({"vcpus": value, "online": "0"}, maximum=8, domain="evil")


@pytest.mark.parametrize(
    ("reply", "stray"),
    [
        ({"vcpus": "0-1", "online": "0-2"}, "2"),
        ({"vcpus": "0,2", "online": "0-2"}, "1"),
        ({"vcpus": "0", "online": "0", "offlinable": "1-3"}, "1-3"),
        ({"vcpus": "", "online": "0"}, "0"),
    ],
)
def test_online_and_offlinable_must_be_present(reply: dict[str, Any], stray: str) -> None:
    with pytest.raises(GuestDataError, match=f"CPUs {stray} as online or offlinable"):
        parse_guest_reply(reply, maximum=8, domain="evil")


def test_huge_strings_are_refused_quickly_with_a_short_message() -> None:
    huge = "0," * 5_000_000 + "0"
    started = time.monotonic()
    with pytest.raises(GuestDataError) as info:
        parse_guest_reply({"vcpus": huge, "online": "0"}, maximum=4, domain="evil")
    assert time.monotonic() - started < 1.0
    assert len(str(info.value)) < 300
    assert "\n" not in str(info.value)


def test_longest_cpulist_is_still_parsed() -> None:
    text = "0," * (MAX_CPULIST_CHARS // 2 - 1) + "0\n"  # surrounding whitespace is stripped
    assert len(text) == MAX_CPULIST_CHARS
    guest = parse_guest_reply({"vcpus": text, "online": "0"}, maximum=1, domain="d1")
    assert guest.present == frozenset({0})


def test_huge_maximum_does_not_let_the_guest_allocate_a_huge_set() -> None:
    # Even if the host reported an absurd maximum, ids stay under the parser's own bound.
    started = time.monotonic()
    with pytest.raises(GuestDataError, match="exceeds"):
        parse_guest_reply({"vcpus": "0-99999999", "online": "0"}, maximum=10**9, domain="evil")
    assert time.monotonic() - started < 1.0
    guest = parse_guest_reply(
        {"vcpus": f"0-{MAX_CPU_ID}", "online": "0"}, maximum=10**9, domain="d1"
    )
    assert len(guest.present) == MAX_CPU_ID + 1


def test_control_characters_in_reply_are_quoted() -> None:
    with pytest.raises(GuestDataError) as info:
        parse_guest_reply({"vcpus": "0\n\x1b[31mX", "online": "0"}, maximum=4, domain="evil")
    assert "\n" not in str(info.value)
    assert "\x1b" not in str(info.value)


def test_guest_data_error_is_an_agent_error() -> None:
    assert issubclass(GuestDataError, AgentError)
    assert GuestDataError("x").exit_status == EXIT_AGENT


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
cpulist_like = st.text(alphabet="0123456789,-^ \n", max_size=16)
replies = st.one_of(
    json_values,
    st.dictionaries(
        st.sampled_from(["vcpus", "online", "offlinable", "other"]),
        cpulist_like | json_values,
        max_size=4,
    ),
)


@settings(max_examples=300, deadline=None)
@given(reply=replies, maximum=st.integers(min_value=1, max_value=64))
def test_any_reply_is_either_valid_or_guest_data_error(reply: Any, maximum: int) -> None:
    try:
        guest = parse_guest_reply(reply, maximum=maximum, domain="fuzz")
    except GuestDataError as exc:
        assert str(exc).startswith("domain 'fuzz': ")
        assert "\n" not in str(exc)
        return
    assert all(0 <= cpu < maximum for cpu in guest.present)
    assert guest.online <= guest.present
    assert guest.offlinable <= guest.present


# --- to_dict ----------------------------------------------------------------------------

VIEW_KEYS = [
    "host",
    "name",
    "uuid",
    "id",
    "state",
    "persistent",
    "agent",
    "config",
    "live",
    "hypervisor",
    "guest",
    "history",
    "findings",
]


def running_view() -> VcpuView:
    return VcpuView(
        host="qemu:///system",
        name="web1",
        uuid="3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01",
        state="running",
        persistent=True,
        agent=AgentStatus(configured=True, state=AGENT_CONNECTED),
        domain_id=7,
        config=CountLayer(
            current=2,
            maximum=4,
            vcpus=(
                VcpuEntry(id=0, enabled=True, hotpluggable=False, order=1),
                VcpuEntry(id=1, enabled=True, hotpluggable=True, order=2),
            ),
        ),
        live=CountLayer(current=3, maximum=4),
        hypervisor=HypervisorLayer(vcpus={2: "running", 0: "running", 1: "blocked"}),
        guest=GuestLayer(
            present=frozenset({0, 1, 2}),
            online=frozenset({0, 1}),
            offlinable=frozenset({1, 2}),
        ),
        findings=(Finding("guest-cpu-offline", WARNING, "CPU 2 offline", (2,)),),
    )


def test_to_dict_keys_are_stable() -> None:
    data = to_dict(running_view())
    assert list(data) == VIEW_KEYS
    assert list(data["agent"]) == ["configured", "state", "error"]
    assert list(data["config"]) == ["current", "maximum", "vcpus"]
    assert list(data["config"]["vcpus"][0]) == ["id", "enabled", "hotpluggable", "order"]
    assert list(data["live"]) == ["current", "maximum", "vcpus"]
    assert list(data["hypervisor"]) == ["source", "count", "vcpus", "ejected"]
    assert list(data["history"]) == [
        "initial",
        "plugged",
        "since_start",
        "repeat_refused",
        "entries",
    ]
    assert list(data["guest"]) == ["present", "online", "offline", "offlinable"]
    assert list(data["findings"][0]) == ["code", "severity", "message", "cpus"]


def test_to_dict_values() -> None:
    data = to_dict(running_view())
    assert data["id"] == 7
    assert data["agent"] == {"configured": True, "state": "connected", "error": None}
    assert data["config"]["vcpus"][1] == {
        "id": 1,
        "enabled": True,
        "hotpluggable": True,
        "order": 2,
    }
    assert data["live"] == {"current": 3, "maximum": 4, "vcpus": []}
    assert data["hypervisor"] == {
        "source": "libvirt",
        "count": 3,
        "vcpus": [
            {"id": 0, "state": "running"},
            {"id": 1, "state": "blocked"},
            {"id": 2, "state": "running"},
        ],
        "ejected": [],
    }
    assert data["history"] == {
        "initial": None,
        "plugged": 0,
        "since_start": False,
        "repeat_refused": None,
        "entries": [],
    }
    assert data["guest"] == {
        "present": [0, 1, 2],
        "online": [0, 1],
        "offline": [2],
        "offlinable": [1, 2],
    }
    assert data["findings"] == [
        {
            "code": "guest-cpu-offline",
            "severity": "warning",
            "message": "CPU 2 offline",
            "cpus": [2],
        }
    ]


def test_to_dict_of_a_shut_off_domain_keeps_every_key() -> None:
    view = VcpuView(
        host="h",
        name="off",
        uuid="u",
        state="shut off",
        persistent=True,
        agent=AgentStatus(configured=False, state="not-configured"),
        config=CountLayer(current=1, maximum=2),
    )
    data = to_dict(view)
    assert list(data) == VIEW_KEYS
    assert data["id"] is None
    assert data["live"] is None
    assert data["hypervisor"] is None
    assert data["guest"] is None
    assert data["findings"] == []


def test_to_dict_is_json_serialisable() -> None:
    text = json.dumps(to_dict(running_view()))
    assert json.loads(text)["guest"]["offline"] == [2]


def test_view_properties() -> None:
    view = running_view()
    assert view.active
    assert view.worst_severity == WARNING
    findings = (Finding("a", INFO, "."), Finding("b", CRITICAL, "."), Finding("c", WARNING, "."))
    assert dataclasses.replace(view, findings=findings).worst_severity == CRITICAL
    assert dataclasses.replace(view, findings=()).worst_severity is None
    assert not dataclasses.replace(view, live=None).active


# --- history ----------------------------------------------------------------------------


def test_history_latest_entry_per_vcpu_decides() -> None:
    history = History()
    history = history.add(HistoryEntry(HISTORY_UNPLUG_TIMEOUT, 2, 100.0, "setvcpus"))
    history = history.add(HistoryEntry(HISTORY_EJECTED, 2, 100.5, "ost"))
    assert history.gone == {2}
    assert history.vcpus(HISTORY_EJECTED) == {2}
    history = history.add(HistoryEntry(HISTORY_PLUGGED, 2, 200.0, "ost"))
    assert history.gone == frozenset()
    assert history.plugged == 1


def test_history_drops_a_repeat_seen_by_two_observers() -> None:
    entry = HistoryEntry(HISTORY_PLUGGED, 1, 100.0, "ost")
    history = History().add(entry).add(HistoryEntry(HISTORY_PLUGGED, 1, 100.2, "setvcpus"))
    assert history.plugged == 1 and len(history.entries) == 1


def test_history_is_bounded_and_keeps_counting() -> None:
    history = History().with_initial(1)
    for i in range(100):  # plugged and ejected again, a hundred times
        history = history.add(HistoryEntry(HISTORY_PLUGGED, 1, float(i * 10), "ost"))
        history = history.add(HistoryEntry(HISTORY_EJECTED, 1, float(i * 10 + 5), "ost"))
    assert len(history.entries) == MAX_HISTORY_ENTRIES
    assert history.plugged == 100 and history.created == 101
    assert history.with_initial(5).initial == 1


def test_to_dict_reports_ejects_in_the_hypervisor_layer() -> None:
    history = History().add(HistoryEntry(HISTORY_EJECTED, 2, 5.0, "device-deleted"))
    data = to_dict(dataclasses.replace(running_view(), history=history))
    assert data["hypervisor"]["ejected"] == [2]
    assert data["history"]["entries"] == [
        {"kind": "ejected", "vcpu": 2, "time": 5.0, "source": "device-deleted"}
    ]
