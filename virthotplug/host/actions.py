"""Carry out a Plan through the guest agent and name every outcome with a stable code.

Writes go through ``setGuestVcpus`` only (a first-class libvirt API: it never taints the
domain, unlike ``qemuAgentCommand``). Each agent call is bounded by our own timeout: libvirt's
agent timeout is per domain and shared with every other client.

Retries: only transient errors (a state-change lock timeout, an agent that is not connected
or did not answer) are retried, with bounded exponential backoff and jitter. A write that
failed, and above all one that timed out, may have changed the guest partly or wholly, so
every retry starts by re-reading the guest and writes only what is still missing.
Permanent errors (unsupported, invalid request, not running, no domain, no agent channel)
are never retried.

Outcome codes (stable: JSON output, logs, metrics):

    onlined            brought online by virthotplug
    onlined-by-guest   came online without a write from us (e.g. the guest's udev rule)
    offlined           taken offline by virthotplug (policy match)
    skipped            nothing acted on: policy report/ignore, or no guest layer
    excluded           left alone because the policy excludes it
    failed             a planned change did not happen; the reason is decoded
    unchanged          the policy acts, and the guest already matches it
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import tenacity

from virthotplug.core import errors
from virthotplug.core.cpulist import format_cpulist
from virthotplug.core.policy import Plan, Policy
from virthotplug.core.view import GuestLayer, VcpuView, parse_guest_reply
from virthotplug.core.workpool import CallTimeout, call_with_timeout
from virthotplug.host.domain import Domain

log = logging.getLogger(__name__)

ONLINED = "onlined"
ONLINED_BY_GUEST = "onlined-by-guest"
OFFLINED = "offlined"
SKIPPED = "skipped"
EXCLUDED = "excluded"
FAILED = "failed"
UNCHANGED = "unchanged"
OUTCOME_CODES = (ONLINED, ONLINED_BY_GUEST, OFFLINED, SKIPPED, EXCLUDED, FAILED, UNCHANGED)

RETRYABLE = (errors.TransientError, errors.AgentUnavailableError)
# Errors that are about the host, not this domain: the caller must see them.
_HOST_ERRORS = (errors.ConnectError, errors.PermissionDeniedError)
MAX_RETRY_SECONDS = 30.0
# Backoff between retries: a random wait up to an exponentially growing bound (from
# RETRY_INITIAL to RETRY_MAX seconds), so many domains do not retry in lockstep.
RETRY_INITIAL, RETRY_MAX = 0.2, 5.0


@dataclass(frozen=True)
class CpuOutcome:
    """What became of some guest CPUs in one reconcile: an outcome code (above) and why."""

    code: str
    cpus: tuple[int, ...] = ()
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "cpus": list(self.cpus), "reason": self.reason}


@dataclass(frozen=True)
class WriteResult:
    """One direction of a plan (all CPUs to online, or all to offline) after its retries."""

    online: bool
    cpus: frozenset[int]
    attempts: int
    error: Optional[str] = None  # the last failure, decoded; None when the write succeeded


def execute(
    dom: Domain,
    plan: Plan,
    *,
    policy: Policy,
    agent_timeout: float,
    maximum: int,
) -> tuple[WriteResult, ...]:
    """Write the plan (online first, then offline). The caller re-reads the guest afterwards."""
    results = []
    for online, cpus in ((True, plan.online), (False, plan.offline)):
        if cpus:
            writer = _Writer(dom, cpus, online, agent_timeout, maximum)
            results.append(writer.run(policy.retries))
    return tuple(results)


class _Writer:
    """One ``setGuestVcpus`` request with its retries. Used by one thread only."""

    def __init__(
        self,
        dom: Domain,
        cpus: frozenset[int],
        online: bool,
        timeout: float,
        maximum: int,
    ) -> None:
        self.dom, self.cpus, self.online = dom, cpus, online
        self.timeout, self.maximum = timeout, maximum
        self.attempts = 0

    def run(self, retries: int) -> WriteResult:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(retries + 1)
            | tenacity.stop_after_delay(MAX_RETRY_SECONDS),
            wait=tenacity.wait_random_exponential(multiplier=RETRY_INITIAL, max=RETRY_MAX),
            retry=tenacity.retry_if_exception_type(RETRYABLE),
            reraise=True,
            before_sleep=tenacity.before_sleep_log(log, logging.WARNING),
        )
        try:
            retrying(self._attempt)
        except _HOST_ERRORS:
            raise
        except errors.VirtHotplugError as exc:
            return self._result(str(exc))
        return self._result(None)

    def _result(self, error: Optional[str]) -> WriteResult:
        return WriteResult(self.online, self.cpus, self.attempts, error)

    def _attempt(self) -> None:
        self.attempts += 1
        pending = self.cpus
        if self.attempts > 1:
            # The failed attempt may have changed the guest: re-read before anything else.
            pending = self._pending(self._read_guest())
            if not pending:
                return
        cpulist = format_cpulist(pending)
        verb = "online" if self.online else "offline"
        log.info("domain '%s': %s guest CPU %s", self.dom.name, verb, cpulist)
        self._bounded(lambda: self.dom.set_guest_vcpus(cpulist, self.online))

    def _pending(self, guest: GuestLayer) -> frozenset[int]:
        if self.online:
            return (self.cpus & guest.present) - guest.online
        return self.cpus & guest.online

    def _read_guest(self) -> GuestLayer:
        reply = self._bounded(self.dom.guest_vcpus)
        return parse_guest_reply(reply, maximum=self.maximum, domain=self.dom.name)

    def _bounded(self, fn: Any) -> Any:
        try:
            return call_with_timeout(fn, self.timeout)
        except CallTimeout:
            raise errors.AgentTimeoutError(
                f"domain '{self.dom.name}': guest agent gave no answer within "
                f"{self.timeout:g} s (outcome unknown until re-read)"
            ) from None


# --- outcomes ------------------------------------------------------------------------------


def outcomes(
    policy: Policy,
    plan: Plan,
    before: VcpuView,
    after: Optional[VcpuView],
    writes: tuple[WriteResult, ...],
    hotadded: frozenset[int] = frozenset(),
) -> tuple[CpuOutcome, ...]:
    """Name what happened, from the views before and after (pure).

    ``after`` is None for a dry run: only observations are reported then (the plan says what
    would be written).
    """
    found: list[CpuOutcome] = []
    by_guest = _onlined_by_guest(plan, before, after, hotadded)
    if by_guest:
        found.append(CpuOutcome(ONLINED_BY_GUEST, by_guest, "online without a write from us"))
    if not policy.acts or before.guest is None:
        offline = tuple(sorted(before.guest.offline)) if before.guest is not None else ()
        return (*found, CpuOutcome(SKIPPED, offline, plan.note))
    if plan.excluded:
        found.append(CpuOutcome(EXCLUDED, tuple(sorted(plan.excluded)), "excluded by policy"))
    if plan.is_noop:
        found.append(CpuOutcome(UNCHANGED, (), plan.note))
    elif after is not None:
        for write in writes:
            found.extend(_write_outcomes(write, after))
    return tuple(found)


def _onlined_by_guest(
    plan: Plan, before: VcpuView, after: Optional[VcpuView], hotadded: frozenset[int]
) -> tuple[int, ...]:
    """Hot-added CPUs that are online although we never wrote them."""
    online: frozenset[int] = frozenset()
    for view in (before, after):
        if view is not None and view.guest is not None:
            online |= view.guest.online
    return tuple(sorted((hotadded & online) - plan.online))


def _write_outcomes(write: WriteResult, after: VcpuView) -> list[CpuOutcome]:
    guest = after.guest
    if guest is None:
        why = after.agent.error or f"guest agent {after.agent.state}"
        reason = f"{write.error}; " if write.error else ""
        return [CpuOutcome(FAILED, tuple(sorted(write.cpus)), f"{reason}cannot verify: {why}")]
    done = write.cpus & guest.online if write.online else write.cpus - guest.online
    missing = write.cpus - done
    found = []
    if done:
        found.append(CpuOutcome(ONLINED if write.online else OFFLINED, tuple(sorted(done)), ""))
    if missing:
        state = "offline" if write.online else "online"
        reason = write.error or f"still {state} after the write"
        found.append(CpuOutcome(FAILED, tuple(sorted(missing)), reason))
    return found
