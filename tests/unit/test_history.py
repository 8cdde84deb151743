"""The domain's vCPU history: what QEMU's events say (recorded sequences from the lab's
stacks), the metadata element's round trip and hostile contents, and the daemon recording
the events it saw with the next job of the domain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from virthotplug.core import errors, judge
from virthotplug.core.config import HostConfig, WatchSettings
from virthotplug.core.drift import gone_text
from virthotplug.core.events import DeviceDeletedMonitorEvent, DomainRef, OstMonitorEvent
from virthotplug.core.observed import EventReader, deleted_vcpu
from virthotplug.core.ost import DeviceDeleted, parse_ost_details
from virthotplug.core.view import (
    HISTORY_EJECTED,
    HISTORY_PLUGGED,
    HISTORY_REJECTED,
    HISTORY_UNPLUG_TIMEOUT,
    History,
    HistoryEntry,
)
from virthotplug.daemon import jobs
from virthotplug.daemon.lock import HostLocks
from virthotplug.host import history
from virthotplug.host.domxml import (
    HISTORY_NAMESPACE,
    NAMESPACE,
    RawHistory,
    history_element,
    parse_domain_xml,
    parse_history_element,
)
from virthotplug.host.watchlock import RUN_DIR_ENV, new_token

REF = DomainRef("qemu:///system", "6b0e4c1a-0000-4000-8000-000000000002", "d")


def entries(events: list[Any]) -> list[HistoryEntry]:
    return list(judge.recorded_entries(EventReader().read_all(events), "watch"))


def ost(source: int, status: int, device: Optional[str] = "vcpu1", at: float = 100.0) -> Any:
    info: dict[str, Any] = {"source": source, "status": status, "slot": "1", "slot-type": "CPU"}
    if device is not None:
        info["device"] = device
    return OstMonitorEvent(REF, ost=parse_ost_details(json.dumps({"info": info})), at=at)


def deleted(path: str, device: Optional[str] = None, at: float = 100.0) -> Any:
    return DeviceDeletedMonitorEvent(REF, deleted=DeviceDeleted(device, path), at=at)


def test_an_unplug_on_libvirt_9_qemu_7_2_is_one_eject() -> None:
    # Recorded: eject in progress for vcpu1, the final report without a device field, then
    # DEVICE_DELETED for the vCPU's lapic child only (never for vcpu1 itself).
    events = [
        ost(3, 0x84, at=10.0),
        ost(3, 0, device=None, at=10.1),
        deleted("/machine/peripheral/vcpu1/lapic", at=10.2),
    ]
    assert entries(events) == [HistoryEntry(HISTORY_EJECTED, 1, 10.1, judge.SOURCE_OST)]


def test_device_deleted_counts_only_for_the_vcpu_itself() -> None:
    assert deleted_vcpu("/machine/peripheral/vcpu2") == 2
    for path in (
        "/machine/peripheral/vcpu2/lapic",
        "/machine/peripheral/vcpu02",
        "/machine/peripheral/vcpu",
        "/machine/peripheral/dimm1",
        "/machine/unattached/device[3]",
        "/machine/peripheral/vcpu99999999",
    ):
        assert deleted_vcpu(path) is None, path
    events = [deleted("/machine/peripheral/vcpu2", "vcpu2", at=5.0)]
    assert entries(events) == [HistoryEntry(HISTORY_EJECTED, 2, 5.0, judge.SOURCE_DEVICE_DELETED)]


def test_a_hot_add_is_a_plug_and_failed_ejects_are_nothing() -> None:
    events = [ost(1, 0, "vcpu3", at=1.0), ost(3, 0x84, "vcpu2"), ost(3, 0x82, device=None)]
    assert entries(events) == [HistoryEntry(HISTORY_PLUGGED, 3, 1.0, judge.SOURCE_OST)]


def test_the_element_round_trips_through_domain_xml() -> None:
    recorded = History().with_initial(1)
    recorded = recorded.add(HistoryEntry(HISTORY_PLUGGED, 1, 10.0, "ost"))
    recorded = recorded.add(HistoryEntry(HISTORY_UNPLUG_TIMEOUT, 1, 20.5, "setvcpus"))
    element = history_element(history.to_raw(recorded))
    assert parse_history_element(element, domain="d") == history.to_raw(recorded)
    # As libvirt stores it: our prefix on the element, entries in its namespace.
    qualified = element.replace("<history", f"<h:history xmlns:h='{HISTORY_NAMESPACE}'")
    qualified = qualified.replace("</history>", "</h:history>").replace("<entry", "<h:entry")
    policy = f"<p:policy xmlns:p='{NAMESPACE}' mode='online'/>"
    xml = (
        "<domain type='qemu' id='3'><name>d</name><uuid>u</uuid>"
        f"<metadata>{policy}{qualified}</metadata></domain>"
    )
    parsed = parse_domain_xml(xml)
    assert parsed.policy == {"mode": "online"}
    assert history.from_raw(parsed.history, uri=REF.host) == recorded


@pytest.mark.parametrize(
    "attrs",
    [
        {"kind": "teleported", "vcpu": "1", "time": "1"},
        {"kind": "ejected", "vcpu": "-1", "time": "1"},
        {"kind": "ejected", "vcpu": "1", "time": "nan"},
        {"kind": "ejected", "vcpu": "1", "time": "inf"},
        {"kind": "ejected", "vcpu": "99999999", "time": "1"},
        {"kind": "ejected", "vcpu": "1"},
    ],
)
def test_entries_anyone_could_write_are_dropped(attrs: dict[str, str]) -> None:
    raw = RawHistory({"plugged": "x" * 50, "initial": "2"}, (attrs,))
    assert history.from_raw(raw, uri=REF.host) == History(initial=2)


class FakeDom:
    name, uuid, context, uri = "d", REF.uuid, "domain 'd'", REF.host

    def __init__(self) -> None:
        self.written: list[str] = []
        self.text: Optional[str] = None

    def metadata(self, namespace: str, *, live: bool) -> Optional[str]:
        assert namespace == HISTORY_NAMESPACE and live
        return self.text

    def set_metadata(self, xml: Optional[str], key: str, namespace: str, **flags: bool) -> None:
        # Live only, never the persistent definition: the record ends with the domain run.
        assert namespace == HISTORY_NAMESPACE != NAMESPACE and flags == {
            "live": True,
            "config": False,
        }
        assert xml is not None
        self.written.append(xml)
        self.text = xml


def test_record_writes_only_news_and_starts_the_count() -> None:
    dom = FakeDom()
    plug = HistoryEntry(HISTORY_PLUGGED, 1, 10.0, "ost")
    first = history.record(dom, [plug], live_count=2)  # type: ignore[arg-type]
    assert (first.initial, first.plugged, first.created) == (1, 1, 2)
    again = history.record(dom, [HistoryEntry(HISTORY_PLUGGED, 1, 10.3, "setvcpus")], live_count=2)  # type: ignore[arg-type]
    assert again == first and len(dom.written) == 1


def test_a_refused_repeat_is_kept_with_the_record_and_read_back() -> None:
    dom = FakeDom()
    timeout = HistoryEntry(HISTORY_UNPLUG_TIMEOUT, 1, 10.0, "setvcpus")
    first = history.record(dom, [timeout], live_count=2, repeat_refused=15.25)  # type: ignore[arg-type]
    assert first is not None and first.repeat_refused == 15.25
    assert history.to_raw(first).attributes["repeat-refused"] == "15.250"
    element = history_element(history.to_raw(first))
    back = history.from_raw(parse_history_element(element, domain="d"), uri=REF.host)
    assert back == first
    # An earlier refusal does not replace a later one; nothing new writes nothing.
    again = history.record(dom, [], live_count=2, repeat_refused=12.0)  # type: ignore[arg-type]
    assert again == first and len(dom.written) == 1


@pytest.mark.parametrize("text", ["nan", "-1", "soon", "1" * 40])
def test_a_refusal_anyone_could_write_is_dropped(text: str) -> None:
    raw = RawHistory({"plugged": "0", "repeat-refused": text}, ())
    assert history.from_raw(raw, uri=REF.host).repeat_refused is None


def test_the_daemon_records_what_it_saw_with_the_next_job(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = jobs.JobRunner(HostConfig(), WatchSettings())
    for ev in (ost(3, 0x84, at=10.0), ost(3, 0, device=None, at=10.1)):
        runner.observe(ev)
    runner.observe(deleted("/machine/peripheral/vcpu1/lapic"))
    observations = runner._domain(REF.key).observations
    expected = [HistoryEntry(HISTORY_EJECTED, 1, 10.1, "ost")]
    # The next job's judgement takes them to write.
    assert list(judge.recorded_entries(observations.events, "watch")) == expected


def test_a_plug_of_a_vcpu_not_seen_going_since_its_plug_is_no_new_vcpu() -> None:
    """QEMU plugs a vCPU only into an empty slot: a second plug report of vcpu1 with no
    eject between (a guest's own _OST report; found by the soak as an 'invented' plug
    during an OST flood) creates no vCPU; after an eject or an unplug libvirt gave up on,
    a plug is a new vCPU again."""
    h = History().add(HistoryEntry(HISTORY_PLUGGED, 1, 10.0, "ost"))
    for kind, at in ((HISTORY_PLUGGED, 50.0), (HISTORY_REJECTED, 20.0)):
        again = h.add(HistoryEntry(kind, 1, at, "ost"))
        if kind == HISTORY_REJECTED:
            assert again.plugged == 1 and len(again.entries) == 2
            assert again.add(HistoryEntry(HISTORY_PLUGGED, 1, 60.0, "ost")) == again
        else:
            assert again == h
    for emptied in (HISTORY_EJECTED, HISTORY_UNPLUG_TIMEOUT):
        h2 = h.add(HistoryEntry(emptied, 1, 30.0, "ost"))
        replugged = h2.add(HistoryEntry(HISTORY_PLUGGED, 1, 40.0, "ost"))
        assert replugged.plugged == 2
    assert h.add(HistoryEntry(HISTORY_PLUGGED, 2, 50.0, "ost")).plugged == 2  # another vCPU


def test_a_rejected_entry_is_stable_until_the_vcpu_is_plugged_again() -> None:
    h = History().add(HistoryEntry(HISTORY_REJECTED, 1, 5.0, "watch"))
    assert h.vcpus(HISTORY_REJECTED) == {1}
    h = h.add(HistoryEntry(HISTORY_EJECTED, 1, 9.0, "ost"))
    assert h.vcpus(HISTORY_REJECTED) == frozenset() and h.gone == {1}


class FailingRead(FakeDom):
    """libvirt fails the metadata read (a lost connection, a timed-out call)."""

    def metadata(self, namespace: str, *, live: bool) -> Optional[str]:
        raise errors.TransientError("domain 'd': virDomainGetMetadata() failed")


def test_a_failed_read_never_wipes_the_history() -> None:
    dom = FailingRead()
    dom.text = "stored"
    plug = HistoryEntry(HISTORY_PLUGGED, 1, 10.0, "ost")
    assert history.record(dom, [plug], live_count=2) is None  # type: ignore[arg-type]
    assert dom.written == [] and dom.text == "stored"


class SecondWriter(FakeDom):
    """Another writer (``setvcpus`` beside ``watch``) read before our write and writes its
    own entry right after it, over ours."""

    def __init__(self, theirs: HistoryEntry) -> None:
        super().__init__()
        self.theirs = theirs

    def set_metadata(self, xml: Optional[str], key: str, ns: str, **flags: bool) -> None:
        super().set_metadata(xml, key, ns, **flags)
        if len(self.written) == 1:
            other = History().with_initial(1).add(self.theirs)
            super().set_metadata(history_element(history.to_raw(other)), key, ns, **flags)


def stored(dom: FakeDom) -> History:
    assert dom.text is not None
    return history.from_raw(parse_history_element(dom.text, domain="d"), uri=dom.uri)


def test_two_writers_lose_no_entry() -> None:
    theirs = HistoryEntry(HISTORY_UNPLUG_TIMEOUT, 2, 20.0, "setvcpus")
    ours = HistoryEntry(HISTORY_PLUGGED, 1, 10.0, "ost")
    dom = SecondWriter(theirs)
    recorded = history.record(dom, [ours], live_count=2)  # type: ignore[arg-type]
    assert recorded is not None and set(recorded.entries) == {ours, theirs}
    assert set(stored(dom).entries) == {ours, theirs}


def test_metadata_text_is_bounded_and_escaped() -> None:
    hostile = "\x1b[2J\u202e" + "x" * 99
    attrs = {"kind": "ejected", "vcpu": "1", "time": "5", "source": hostile}
    parsed = history.from_raw(RawHistory({}, (attrs,)), uri=REF.host)
    source = parsed.entries[0].source
    assert source.startswith("\\x1b[2J\\u202e") and source.isprintable()
    assert len(source) < len(hostile)
    text = gone_text(parsed, 1)
    assert "\x1b" not in text and "\\x1b[2J" in text


@pytest.fixture
def watching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostLocks]:
    """A watch of REF's host runs in this process: it holds the host's lock, in a run
    directory of the test's own."""
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    with HostLocks() as locks:
        locks.acquire([REF.host])
        yield locks


def test_a_record_since_qemus_start_keeps_its_mark_until_it_is_taken_off(
    watching: HostLocks,
) -> None:
    dom = FakeDom()
    token = watching.token
    begun = history.started(dom, 2, 5.0, token)  # type: ignore[arg-type]
    assert begun == History(initial=2, since_start=True, voucher=token) == stored(dom)
    assert begun.proven_created == 2
    plug = HistoryEntry(HISTORY_PLUGGED, 2, 10.0, "ost")
    recorded = history.record(dom, [plug], live_count=3)  # type: ignore[arg-type]
    assert recorded is not None and recorded.since_start and recorded.proven_created == 3
    assert stored(dom) == recorded
    gap = history.not_since_start(dom)  # type: ignore[arg-type]
    assert gap is not None and not gap.since_start and gap.proven_created is None
    assert gap.created == 3 and stored(dom) == gap
    # Anyone can write metadata: only the exact mark counts.
    raw = RawHistory({"initial": "1", "since-start": "YES", "vouched-by": token}, ())
    assert not history.from_raw(raw, uri=REF.host).since_start


def test_a_record_begun_at_the_start_keeps_what_was_seen_since(watching: HostLocks) -> None:
    # The job that begins the record at QEMU's start (100.0) has just recorded a hot-add
    # of vcpu2 (live count 3 now); a restored record's entry from before the start goes.
    dom = FakeDom()
    old = HistoryEntry(HISTORY_PLUGGED, 1, 50.0, "ost")
    plug = HistoryEntry(HISTORY_PLUGGED, 2, 101.0, "ost")
    assert history.write(dom, History((old, plug), plugged=2, initial=1))  # type: ignore[arg-type]
    begun = history.started(dom, 3, 100.0, watching.token)  # type: ignore[arg-type]
    expected = History((plug,), plugged=1, initial=2, since_start=True, voucher=watching.token)
    assert begun == expected == stored(dom)
    assert begun.proven_created == 3


# --- who vouches for the since-start mark -------------------------------------------------


def trusted(attributes: dict[str, str], uri: Optional[str]) -> bool:
    return history.from_raw(RawHistory(attributes, ()), uri=uri).since_start


def test_a_mark_counts_only_while_the_watch_it_names_holds_the_hosts_lock(
    watching: HostLocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = {"initial": "1", "since-start": "yes", "vouched-by": watching.token}
    assert trusted(mark, REF.host)
    assert not trusted({**mark, "vouched-by": new_token()}, REF.host)  # another run's
    assert not trusted({"initial": "1", "since-start": "yes"}, REF.host)  # nobody's
    assert not trusted(mark, "qemu+ssh://elsewhere/system")  # a lock out of sight
    assert not trusted(mark, None)
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "missing"))  # no run directory
    assert not trusted(mark, REF.host)


def test_the_mark_outlives_its_watch_but_counts_no_more(watching: HostLocks) -> None:
    dom = FakeDom()
    begun = history.started(dom, 2, 5.0, watching.token)  # type: ignore[arg-type]
    assert begun is not None and begun.proven_created == 2
    written = list(dom.written)
    watching.release()  # the watch stopped: killed, crashed, or before its last write
    assert f'vouched-by="{watching.token}"' in (dom.text or "")  # still stored
    found = history.read(dom)  # type: ignore[arg-type]
    assert found is not None and not found.since_start and found.proven_created is None
    assert dom.written == written  # a reader never writes
    # A later watch of the host vouches for its own records only.
    with HostLocks() as later:
        later.acquire([REF.host])
        assert not stored(dom).since_start


def test_a_write_keeps_the_mark_of_a_running_watch_and_drops_a_dead_ones(
    watching: HostLocks,
) -> None:
    dom = FakeDom()
    history.started(dom, 1, 5.0, watching.token)  # type: ignore[arg-type]
    plug = HistoryEntry(HISTORY_PLUGGED, 1, 10.0, "setvcpus")
    recorded = history.record(dom, [plug], live_count=2)  # type: ignore[arg-type]
    assert recorded is not None and recorded.voucher == watching.token
    assert stored(dom).proven_created == 2
    watching.release()
    eject = HistoryEntry(HISTORY_EJECTED, 1, 20.0, "setvcpus")
    recorded = history.record(dom, [eject], live_count=1)  # type: ignore[arg-type]
    assert recorded is not None and not recorded.since_start
    assert "since-start" not in (dom.text or "") and "vouched-by" not in (dom.text or "")
