"""Equal immutable values held once.

The daemon keeps a view of every running domain, and a host of a thousand domains has a few
dozen distinct vCPU entries, topologies, layers and findings, not tens of thousands: each
distinct one is kept as one object, however many views hold it. ``SharedValues`` is bounded
(cleared when full: a miss only builds the value again) and safe across threads without a
lock (a race stores an equal value).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar, cast

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)

LIMIT = 4096  # values per cache


class SharedValues:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._values: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The value stored for ``key``, built (and stored) on a miss. ``build`` may raise:
        nothing is stored then."""
        known = self._values.get(key)
        if known is None:
            known = build()
            if len(self._values) >= self._limit:
                self._values.clear()
            self._values[key] = known
        return cast(T, known)

    def one(self, value: H) -> H:
        """The first stored value equal to ``value`` (``value`` itself on a miss)."""
        return self.get(value, lambda: value)

    def __len__(self) -> int:
        return len(self._values)
