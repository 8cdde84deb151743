"""Bounded waits and a bounded fan-out for calls that may hang (guest-agent calls).

libvirt agent calls can block for a long time on a hung guest, and a per-domain agent
timeout set through libvirt affects every client of that domain. So virthotplug bounds its
own waits: each call runs in a daemon thread, and the caller stops waiting at the deadline.
A call that never returns only costs an idle daemon thread; it never delays other domains
or process exit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class CallTimeout(Exception):
    """The bounded wait expired; the call may still complete in the background."""


@dataclass
class CallResult(Generic[R]):
    """Result of one call in ``bounded_map``: a value, an exception, or a timeout."""

    value: Optional[R] = None
    error: Optional[BaseException] = None
    timed_out: bool = False


class _Call(Generic[R]):
    """One call in a daemon thread; ``done`` is set (and ``wakeup`` notified) when it ends."""

    def __init__(self, fn: Callable[[], R], wakeup: Optional[threading.Condition] = None) -> None:
        self.result: CallResult[R] = CallResult()
        self.done = threading.Event()
        self._wakeup = wakeup
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)

    def _run(self, fn: Callable[[], R]) -> None:
        try:
            self.result.value = fn()
        except BaseException as exc:  # handed to the waiting caller
            self.result.error = exc
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._wakeup is None:
            self.done.set()
            return
        with self._wakeup:
            self.done.set()
            self._wakeup.notify()


def call_with_timeout(fn: Callable[[], R], timeout: float) -> R:
    """Run ``fn`` and return its result, or raise ``CallTimeout`` after ``timeout`` seconds."""
    call = _Call(fn)
    call.thread.start()
    if not call.done.wait(timeout):
        raise CallTimeout(f"no answer within {timeout:g} s")
    if call.result.error is not None:
        raise call.result.error
    return call.result.value  # type: ignore[return-value]


def bounded_map(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, timeout: float
) -> list[CallResult[R]]:
    """Apply ``fn`` to every item, at most ``workers`` at a time, each bounded by ``timeout``.

    Results come back in the order of ``items``. A call that exceeds its timeout frees its
    slot (its thread is abandoned), so one hung item never holds up the rest.
    """
    results: list[CallResult[R]] = [CallResult() for _ in items]
    wakeup = threading.Condition()
    inflight: dict[int, tuple[_Call[R], float]] = {}
    next_index = 0
    with wakeup:
        while next_index < len(items) or inflight:
            _reap(inflight, results)
            while next_index < len(items) and len(inflight) < max(1, workers):
                call = _Call(_bind(fn, items[next_index]), wakeup)
                call.thread.start()
                inflight[next_index] = (call, time.monotonic() + timeout)
                next_index += 1
            if inflight:
                nearest = min(deadline for _, deadline in inflight.values())
                wakeup.wait(max(0.0, nearest - time.monotonic()))
    return results


def _reap(inflight: dict[int, tuple[_Call[R], float]], results: list[CallResult[R]]) -> None:
    now = time.monotonic()
    for index, (call, deadline) in list(inflight.items()):
        if call.done.is_set():
            results[index] = call.result
        elif now >= deadline:
            results[index] = CallResult(timed_out=True)
        else:
            continue
        del inflight[index]


def _bind(fn: Callable[[T], R], item: T) -> Callable[[], R]:
    return lambda: fn(item)
