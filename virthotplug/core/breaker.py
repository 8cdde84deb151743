"""A circuit breaker per domain for guest agents that do not answer.

Each reconcile of a domain whose agent is unresponsive holds a worker for a bounded wait
(``agent_timeout``, and the write retries after it): a few hung or hostile guests, each
hinting events at will, would keep every worker busy and stall every other domain. So after
``THRESHOLD`` reconciles in a row that found the agent unresponsive, the domain's jobs wait
in the scheduler (holding no worker) for ``FIRST_WAIT`` seconds, doubled at each further
failure up to ``MAX_WAIT``; then one reconcile tries again. A reconcile that finds the agent
answering, or the agent connecting (AGENT_LIFECYCLE connected), closes the breaker.

Pure bookkeeping, driven by the daemon's main loop (one thread).
"""

from __future__ import annotations

from typing import MutableMapping, Optional

Key = tuple[str, str]  # (host URI, domain UUID)


class AgentBreaker:
    THRESHOLD = 3  # unresponsive reconciles in a row before the domain waits
    FIRST_WAIT = 10.0  # seconds
    MAX_WAIT = 600.0

    def __init__(self, counts: Optional[MutableMapping[Key, int]] = None) -> None:
        # Where the counts live: the daemon keeps them in its per-domain records, so that
        # they go with the rest of what it knows of a domain.
        self._failures: MutableMapping[Key, int] = counts if counts is not None else {}

    def record(self, key: Key, *, unresponsive: bool, now: float) -> Optional[float]:
        """One reconcile's verdict; the time until which the domain waits, if it must."""
        if not unresponsive:
            self._failures.pop(key, None)
            return None
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        if failures < self.THRESHOLD:
            return None
        wait: float = min(self.MAX_WAIT, self.FIRST_WAIT * 2.0 ** (failures - self.THRESHOLD))
        return now + wait

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)

    def reset(self, key: Key) -> bool:
        """The agent connected, or the domain is gone; True when the breaker was counting."""
        return self._failures.pop(key, None) is not None
