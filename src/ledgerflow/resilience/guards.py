"""Guards in front of an external resource: its circuit breaker, rate limit and
bulkhead, shared by every worker on the store.

A step under a named policy calls the resource of the same name. Before each
attempt the engine asks ``Guards.admit``: a breaker that is open refuses the call
(``CircuitOpenError``) without touching the resource; a half-open one lets a bounded
number of probes through across all workers; the rate limit takes a token (waiting
for one if need be); the bulkhead takes a permit (waiting up to ``max_wait``, then
``BulkheadFullError``). The attempt's outcome is counted against the breaker in the
same append that records it (``outcome_writes``), which also frees the permit; then
``settle`` moves the breaker if that outcome calls for it.

Each move of a breaker is an event in the ledger (stream ``breaker-<resource>``,
``BreakerMoved``: from which state to which, why, the counts, who), appended with
the state change in one transaction at the stream's next version, so two workers
never make the same move twice and "why was this call refused at 10:42?" has an
answer. Only transient failures count against a breaker (errors that would be
retried): a business-rule refusal means the resource answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from ..errors import BulkheadFullError, CircuitOpenError, ConcurrencyError, StreamNotFoundError
from ..events import NO_STREAM, Metadata
from ..hashing import from_micros
from ..registry import EventRegistry
from ..store.ports import WorkflowStore
from ..store.runtime import DropPermit, MoveBreaker, ResourceRow, RuntimeWrite, Tally
from .book import PolicyVersion
from .breaker import after_outcome, meets
from .policy import Breaker, Policy
from .retrying import is_retryable

__all__ = [
    "BREAKER_MOVED",
    "BREAKER_STREAM_PREFIX",
    "Admission",
    "BreakerMoved",
    "Guards",
    "TokenWait",
    "breaker_registry",
]

log = logging.getLogger("ledgerflow.resilience")

BREAKER_STREAM_PREFIX = "breaker-"
BREAKER_MOVED = "ledgerflow.breaker_moved"
STATE_FRESH_S = 0.25
"""How old a worker's copy of a closed breaker's state may be: one that opened
elsewhere refuses calls here within this (a moved one is re-read at once)."""
PERMIT_POLL_S = 0.05
"""How often a call waiting for a bulkhead permit asks again."""


class BreakerMoved(msgspec.Struct, frozen=True, kw_only=True):
    """A circuit breaker moved: ``previous`` -> ``state``, and why."""

    resource: str
    state: str
    previous: str
    reason: str
    policy_version: int
    consecutive: int = 0
    window_calls: int = 0
    window_failures: int = 0
    by: str = ""
    workflow_id: str | None = None


def breaker_registry(registry: EventRegistry) -> EventRegistry:
    if registry.class_of(BREAKER_MOVED) is None:
        registry.register(BreakerMoved, BREAKER_MOVED)
    return registry


class TokenWait(Exception):
    """No token for a while: wait until ``until_us`` (longer than a pass should)."""

    def __init__(self, until_us: int) -> None:
        super().__init__(f"rate limited until {until_us}")
        self.until_us = until_us


@dataclass(frozen=True, slots=True)
class Admission:
    """A call let through: what its outcome must count and give back."""

    resource: str
    policy: Policy
    policy_version: int
    probe: bool
    transitions: int
    """The breaker's move at admission (a probe settles that half-opening)."""
    permit: str | None


def guarded(policy: Policy) -> bool:
    """Whether calls under ``policy`` pass any guard."""
    return (
        policy.breaker is not None or policy.bulkhead is not None or policy.rate_limit is not None
    )


class Guards:
    """One engine's view of the guarded resources (see the module docstring)."""

    def __init__(
        self,
        store: WorkflowStore,
        *,
        owner: str,
        now_us: Callable[[], int],
        permit_us: Callable[[], int],
    ) -> None:
        breaker_registry(store.registry)
        self.store = store
        self.owner = owner
        self._now_us = now_us
        self._permit_us = permit_us
        self._states: dict[str, tuple[ResourceRow | None, float]] = {}
        self._held: set[tuple[str, str]] = set()
        """The permits this worker's calls hold: renewed while they run."""

    # -- before a call ----------------------------------------------------------------

    async def admit(self, found: PolicyVersion, call: str) -> Admission:
        """Let one call to ``found``'s resource through, or refuse it
        (``CircuitOpenError``, ``BulkheadFullError``; ``TokenWait`` to wait long)."""
        policy, resource = found.policy, found.name
        probe, transitions = False, 0
        if policy.breaker is not None:
            probe, transitions = await self._breaker(found, policy.breaker)
        if policy.rate_limit is not None:
            await self._token(resource, policy.rate_limit.rate, policy.rate_limit.burst)
        permit = None
        if policy.bulkhead is not None:
            permit = call
            await self._permit(
                resource, call, policy.bulkhead.max_concurrent, policy.bulkhead.max_wait
            )
        return Admission(resource, policy, found.version, probe, transitions, permit)

    async def _state(self, resource: str, *, fresh: bool = False) -> ResourceRow | None:
        cached = self._states.get(resource)
        if not fresh and cached is not None and time.monotonic() - cached[1] < STATE_FRESH_S:
            return cached[0]
        row = await self.store.resource_state(resource, now_us=self._now_us())
        self._states[resource] = (row, time.monotonic())
        return row

    async def _breaker(self, found: PolicyVersion, breaker: Breaker) -> tuple[bool, int]:
        resource = found.name
        for _ in range(3):  # another worker may move it under us: look again
            row = await self._state(resource)
            met = meets(row, breaker, self._now_us())
            if met.verdict == "pass":
                return False, 0 if row is None else row.transitions
            assert row is not None
            if met.verdict == "refuse":
                raise await self._refused(resource, row, met.until_us)
            if met.verdict == "half_open":
                await self._move(found, row, "half_open", met.why, None)
                continue
            if await self.store.take_probe(
                resource, transitions=row.transitions, max_probes=breaker.half_open_probes
            ):
                return True, row.transitions
            raise await self._refused(resource, row, met.until_us)
        row = await self._state(resource, fresh=True)
        until = self._now_us() + int(breaker.open_for * 1_000_000)
        raise await self._refused(resource, row, until)

    async def _refused(
        self, resource: str, row: ResourceRow | None, until: int
    ) -> CircuitOpenError:
        state = row.state if row is not None else "open"
        why = ""
        try:
            last = await self.store.read_stream(
                f"{BREAKER_STREAM_PREFIX}{resource}", backwards=True, limit=1
            )
        except StreamNotFoundError:
            last = []
        if last and isinstance(last[0].data, BreakerMoved):
            moved = last[0]
            why = f" since {moved.recorded_at.isoformat()} ({moved.data.reason})"
        return CircuitOpenError(resource, state, until, why)

    async def _token(self, resource: str, rate: float, burst: int | None) -> None:
        size = burst if burst is not None else max(1, int(-(-rate // 1)))
        for round_ in range(2):
            now = self._now_us()
            wait = await self.store.take_token(resource, rate=rate, burst=size, now_us=now)
            if wait == 0:
                return
            if round_ == 1 or wait >= 1_000_000:
                raise TokenWait(now + wait)
            await asyncio.sleep(wait / 1_000_000)

    async def _permit(self, resource: str, holder: str, most: int, max_wait: float) -> None:
        deadline = time.monotonic() + max_wait
        while True:
            now = self._now_us()
            if await self.store.acquire_permit(
                resource,
                holder,
                owner=self.owner,
                max_concurrent=most,
                now_us=now,
                until_us=now + self._permit_us(),
            ):
                self._held.add((resource, holder))
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise BulkheadFullError(resource, most, max_wait)
            await asyncio.sleep(min(PERMIT_POLL_S, left))

    # -- after a call -----------------------------------------------------------------

    def outcome_writes(
        self, admission: Admission, error: BaseException | None
    ) -> tuple[RuntimeWrite, ...]:
        """What the append recording the call's outcome writes with it: the breaker's
        tally (transient failures count; a business refusal is an answer) and the
        permit given back."""
        writes: list[RuntimeWrite] = []
        breaker = admission.policy.breaker
        if breaker is not None and not admission.probe:
            failed = error is not None and _transient(admission, error)
            window = int(breaker.window * 1_000_000)
            writes.append(Tally(admission.resource, failed, self._now_us(), window))
        if admission.permit is not None:
            writes.append(DropPermit(admission.resource, admission.permit))
            self._held.discard((admission.resource, admission.permit))
        return tuple(writes)

    def needs_settling(self, admission: Admission, error: BaseException | None) -> bool:
        """Whether the outcome may move the breaker (``settle`` after recording it)."""
        if admission.policy.breaker is None:
            return False
        return admission.probe or (error is not None and _transient(admission, error))

    async def settle(
        self,
        found: PolicyVersion,
        admission: Admission,
        error: BaseException | None,
        workflow_id: str,
    ) -> None:
        """Move the breaker if the recorded outcome calls for it: a probe closes it
        (success) or opens it again; a failure that crosses a threshold opens it."""
        breaker = admission.policy.breaker
        if breaker is None:
            return
        failed = error is not None and _transient(admission, error)
        row = await self._state(admission.resource, fresh=True)
        if row is None:
            return
        last = f"; last: {type(error).__name__}: {error}" if error is not None else ""
        move = after_outcome(
            row,
            breaker,
            probe=admission.probe,
            probe_move=admission.transitions,
            failed=failed,
            last=last,
        )
        if move is not None:
            await self._move(found, row, move.state, move.why, workflow_id)

    async def _move(
        self,
        found: PolicyVersion,
        row: ResourceRow,
        state: str,
        reason: str,
        workflow_id: str | None,
    ) -> None:
        resource = found.name
        moved = BreakerMoved(
            resource=resource,
            state=state,
            previous=row.state,
            reason=reason[:2000],
            policy_version=found.version,
            consecutive=row.consecutive,
            window_calls=row.window_calls,
            window_failures=row.window_failures,
            by=self.owner,
            workflow_id=workflow_id,
        )
        version = row.transitions + 1
        now = self._now_us()
        try:
            await self.store.append(
                f"{BREAKER_STREAM_PREFIX}{resource}",
                [moved],
                row.transitions if row.transitions else NO_STREAM,
                metadata=Metadata(actor=self.owner, reason=reason[:2000]),
                runtime=[MoveBreaker(resource, state, now, version)],
            )
        except ConcurrencyError:
            pass  # another worker moved it first: what it decided stands
        else:
            log.warning(
                "circuit breaker %s: %s -> %s at %s: %s",
                resource,
                row.state,
                state,
                from_micros(now).isoformat(),
                reason,
            )
        self._states.pop(resource, None)

    # -- the engine's upkeep ----------------------------------------------------------

    async def renew(self) -> None:
        """Extend the permits this worker's calls hold (from its heartbeat), so a
        call longer than a lease keeps its place."""
        if self._held:
            await self.store.renew_permits(self.owner, until_us=self._now_us() + self._permit_us())

    async def release(self) -> None:
        """Give back this worker's permits (it is stopping)."""
        await self.store.release_permits(self.owner)


def _transient(admission: Admission, error: BaseException) -> bool:
    """Whether ``error`` counts against the breaker: one its policy would retry (its
    own ``retry.non_retryable`` names included: they opened the breaker before)."""
    retry = admission.policy.retry
    return is_retryable(error, retry.non_retryable if retry is not None else ())
