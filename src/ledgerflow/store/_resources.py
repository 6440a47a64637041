"""The guarded-resource part of a workflow store: the shared state behind circuit
breakers, rate limits and bulkheads. Adapters supply the ``_`` hooks.

Breaker counts and moves are written like the other runtime rows, with the events
that record them (``Tally``, ``MoveBreaker``, ``DropPermit`` in an append); what is
here reads that state and takes what must be taken before a call: a half-open
probe, a token, a permit. Each is one small row update in its own transaction,
never a lock on the ledger.
"""

from __future__ import annotations

import abc
import math
from dataclasses import replace

from ._checks import _MAX_INT32, _MAX_INT64, _check_int, _check_text, _check_worker_now, _invalid
from .runtime import ResourceRow

__all__ = ["ResourceGuards"]


def _check_rate(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _invalid(f"{what} must be a finite number > 0, not {value!r:.40}")
    return float(value)


def _check_resource(resource: object) -> None:
    _check_text(resource, "resource")
    if not resource:
        raise _invalid("resource must be a non-empty name")


class ResourceGuards(abc.ABC):
    """Mixed into ``BaseEventStore``; see ``ports.WorkflowStore`` for the contract."""

    @abc.abstractmethod
    def _check_open(self) -> None: ...

    async def resource_state(self, resource: str, *, now_us: int) -> ResourceRow | None:
        """The shared state of ``resource`` (its permits counted as of ``now_us``);
        None if nothing was ever recorded for it."""
        self._check_open()
        _check_resource(resource)
        _check_worker_now(now_us)
        return await self._resource_state(resource, now_us)

    async def list_resources(self, *, now_us: int) -> list[ResourceRow]:
        """Every resource with state, in name order."""
        self._check_open()
        _check_worker_now(now_us)
        return await self._list_resources(now_us)

    async def take_probe(self, resource: str, *, transitions: int, max_probes: int) -> bool:
        """Let one half-open probe through: only while the breaker is half-open at
        move ``transitions`` and fewer than ``max_probes`` were given out since,
        however many workers ask at once."""
        self._check_open()
        _check_resource(resource)
        _check_int(transitions, "transitions", 0, _MAX_INT64)
        _check_int(max_probes, "max_probes", 1, _MAX_INT32)
        return await self._take_probe(resource, transitions, max_probes)

    async def take_token(self, resource: str, *, rate: float, burst: int, now_us: int) -> int:
        """Take a token from ``resource``'s bucket (``rate`` tokens a second, holding
        at most ``burst``; full when first used): 0 if one was taken, else how many
        µs until one will be there (nothing taken)."""
        self._check_open()
        _check_resource(resource)
        checked = _check_rate(rate, "rate")
        _check_int(burst, "burst", 1, _MAX_INT32)
        _check_worker_now(now_us)
        return await self._take_token(resource, checked, burst, now_us)

    async def acquire_permit(
        self,
        resource: str,
        holder: str,
        *,
        owner: str,
        max_concurrent: int,
        now_us: int,
        until_us: int,
    ) -> bool:
        """Hold one of ``resource``'s ``max_concurrent`` permits for ``holder`` (a
        call) of ``owner`` (its worker) until ``until_us`` unless renewed; False if
        all are held (expired ones do not count). A holder that has one keeps it, and
        ``owner`` takes it over (a call rerun by the worker that took over a dead one's:
        that worker's heartbeat renews it from then on)."""
        self._check_open()
        _check_resource(resource)
        _check_text(holder, "holder")
        _check_text(owner, "owner")
        _check_int(max_concurrent, "max_concurrent", 1, _MAX_INT32)
        _check_worker_now(now_us)
        _check_worker_now(until_us)
        return await self._acquire_permit(resource, holder, owner, max_concurrent, now_us, until_us)

    async def renew_permits(self, owner: str, *, until_us: int) -> int:
        """Extend every permit ``owner`` holds; how many it holds."""
        self._check_open()
        _check_text(owner, "owner")
        _check_worker_now(until_us)
        return await self._renew_permits(owner, until_us)

    async def release_permits(self, owner: str) -> int:
        """Give back every permit ``owner`` holds (a worker stopping); how many."""
        self._check_open()
        _check_text(owner, "owner")
        return await self._release_permits(owner)

    # -- adapter hooks --------------------------------------------------------------

    @abc.abstractmethod
    async def _resource_state(self, resource: str, now_us: int) -> ResourceRow | None: ...

    @abc.abstractmethod
    async def _list_resources(self, now_us: int) -> list[ResourceRow]: ...

    @abc.abstractmethod
    async def _take_probe(self, resource: str, transitions: int, max_probes: int) -> bool: ...

    @abc.abstractmethod
    async def _take_token(self, resource: str, rate: float, burst: int, now_us: int) -> int: ...

    @abc.abstractmethod
    async def _acquire_permit(
        self,
        resource: str,
        holder: str,
        owner: str,
        max_concurrent: int,
        now_us: int,
        until_us: int,
    ) -> bool: ...

    @abc.abstractmethod
    async def _renew_permits(self, owner: str, until_us: int) -> int: ...

    @abc.abstractmethod
    async def _release_permits(self, owner: str) -> int: ...


def refill(
    tokens: float | None, tokens_at_us: int | None, rate: float, burst: int, now_us: int
) -> float:
    """Tokens in a bucket at ``now_us``: what it held, plus what ``rate`` added since
    (a clock that went back adds nothing), at most ``burst``; full if never used."""
    if tokens is None or tokens_at_us is None:
        return float(burst)
    elapsed = max(0, now_us - tokens_at_us)
    return min(float(burst), tokens + elapsed * rate / 1_000_000)


def token_wait_us(level: float, rate: float) -> int:
    """µs until a bucket at ``level`` (< 1) holds a whole token again."""
    return max(1, math.ceil((1.0 - level) / rate * 1_000_000))


def tallied(
    row: ResourceRow | None, resource: str, failed: bool, at_us: int, window_us: int
) -> ResourceRow:
    """The state after counting one outcome (what the stores' ``Tally`` does): a
    failure in a row or a success ending the run, and the call in the tumbling window
    that holds ``at_us`` (a new one starts when the last is ``window_us`` old)."""
    if row is None:
        return ResourceRow(
            resource, "closed", 0, 0, int(failed), at_us, 1, int(failed), 0, None, None
        )
    fresh = at_us - row.window_start_us >= window_us
    return replace(
        row,
        consecutive=row.consecutive + 1 if failed else 0,
        window_start_us=at_us if fresh else row.window_start_us,
        window_calls=1 if fresh else row.window_calls + 1,
        window_failures=int(failed) + (0 if fresh else row.window_failures),
    )


def moved(
    row: ResourceRow | None, resource: str, state: str, at_us: int, transitions: int
) -> ResourceRow:
    """The state after a move (what the stores' ``MoveBreaker`` does): half-opening
    keeps the counts and zeroes the probes; opening and closing start them afresh."""
    if row is None:
        row = ResourceRow(resource, "closed", 0, 0, 0, at_us, 0, 0, 0, None, None)
    if state == "half_open":
        return replace(row, state=state, changed_at_us=at_us, transitions=transitions, probes=0)
    return replace(
        row,
        state=state,
        changed_at_us=at_us,
        transitions=transitions,
        probes=0,
        consecutive=0,
        window_start_us=at_us,
        window_calls=0,
        window_failures=0,
    )
