"""Tests for virthotplug.core.workpool: bounded waits and bounded fan-out.

Timing assertions use generous margins: a hung call is simulated by an Event that is only
set when the test ends, and "fast" means well under the timeout, never a tight bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from virthotplug.core.workpool import CallTimeout, bounded_map, call_with_timeout


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event hung calls wait on; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


# --- call_with_timeout ------------------------------------------------------------------


def test_call_returns_value() -> None:
    assert call_with_timeout(lambda: 42, 5.0) == 42


def test_call_reraises_the_callee_exception() -> None:
    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        call_with_timeout(fail, 5.0)


def test_call_times_out(release: threading.Event) -> None:
    started = time.monotonic()
    with pytest.raises(CallTimeout, match=r"no answer within 0\.3 s"):
        call_with_timeout(release.wait, 0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3.0


def test_call_runs_in_another_thread() -> None:
    assert call_with_timeout(threading.get_ident, 5.0) != threading.get_ident()


# --- bounded_map ------------------------------------------------------------------------


def test_results_keep_input_order() -> None:
    # Later items finish first: results must still line up with items.
    items = [0.2, 0.15, 0.1, 0.05, 0.0]

    def work(delay: float) -> float:
        time.sleep(delay)
        return delay * 10

    outcomes = bounded_map(work, items, workers=5, timeout=10.0)
    assert [o.value for o in outcomes] == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert not any(o.timed_out or o.error for o in outcomes)


def test_empty_input() -> None:
    assert bounded_map(lambda x: x, [], workers=4, timeout=1.0) == []


def test_errors_are_returned_per_item() -> None:
    def work(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    outcomes = bounded_map(work, [1, 2, 3], workers=2, timeout=10.0)
    assert [o.value for o in outcomes] == [1, None, 3]
    assert isinstance(outcomes[1].error, ValueError)
    assert not outcomes[1].timed_out


@pytest.mark.parametrize("workers", [1, 3])
def test_concurrency_never_exceeds_workers(workers: int) -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    def work(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return x

    outcomes = bounded_map(work, list(range(12)), workers=workers, timeout=10.0)
    assert [o.value for o in outcomes] == list(range(12))
    assert peak == workers  # reached, never exceeded


def test_zero_workers_still_makes_progress() -> None:
    assert [o.value for o in bounded_map(lambda x: x + 1, [1, 2], workers=0, timeout=5.0)] == [2, 3]


def test_a_hung_item_times_out_without_delaying_the_others(release: threading.Event) -> None:
    timeout = 1.0
    started = time.monotonic()
    finished_at: dict[str, float] = {}

    def work(name: str) -> str:
        if name == "hung":
            release.wait()
        finished_at[name] = time.monotonic() - started
        return name.upper()

    items = ["hung", "a", "b", "c", "d"]
    outcomes = bounded_map(work, items, workers=2, timeout=timeout)
    elapsed = time.monotonic() - started

    assert outcomes[0].timed_out
    assert outcomes[0].value is None and outcomes[0].error is None
    assert [o.value for o in outcomes[1:]] == ["A", "B", "C", "D"]
    # The others ran through the free slot long before the hung one's deadline ...
    assert max(finished_at.values()) < timeout / 2
    # ... and the whole map waited about one timeout, not one per item.
    assert timeout * 0.9 <= elapsed < timeout * 3


def test_a_timed_out_slot_is_given_to_the_next_item(release: threading.Event) -> None:
    # One worker: the hung first item must free the slot at its deadline.
    outcomes = bounded_map(
        lambda x: release.wait() if x == 0 else x, [0, 1, 2], workers=1, timeout=0.3
    )
    assert outcomes[0].timed_out
    assert [o.value for o in outcomes[1:]] == [1, 2]


def test_every_item_has_its_own_deadline(release: threading.Event) -> None:
    started = time.monotonic()
    outcomes = bounded_map(lambda _x: release.wait(), [1, 2, 3, 4], workers=4, timeout=0.5)
    assert all(o.timed_out for o in outcomes)
    assert time.monotonic() - started < 3.0  # in parallel: about one timeout in all
