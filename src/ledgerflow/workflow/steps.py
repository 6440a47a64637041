"""Running steps: one attempt at a time, what a step may know about itself, and
the default retry policies.

A sync attempt runs in one of the engine's step threads and keeps a slot of them
until its result is recorded: finished bodies whose results are not yet durable
then never outnumber the step threads, so a crash re-runs at most that many
(``step_threads``). A timed-out sync attempt cannot be stopped from outside: it is
flagged, and the next attempt of the same step waits for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, TypeVarTuple

from ..errors import StepCancelledError
from ..retry import RetryPolicy
from .step_threads import Outcome, StepThreads

__all__ = [
    "DEFAULT_COMPENSATION_RETRY",
    "DEFAULT_STEP_RETRY",
    "Attempts",
    "StepClass",
    "StepInfo",
    "current_step",
]

log = logging.getLogger("ledgerflow.engine")

R_co = TypeVar("R_co", covariant=True)
Ts = TypeVarTuple("Ts")

DEFAULT_STEP_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.1)
"""A step without a policy of its own: 3 attempts, 0.1 s then 0.2 s apart (+10 %)."""
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.2)
"""A compensation: 5 attempts, 0.2 s doubling (+10 %)."""
HUNG_WARNING_EVERY = 30.0
"""Seconds between warnings about a timed-out sync attempt that is still running."""


_NEVER = threading.Event()
"""The flag of attempts without a timeout: never set (an Event per attempt costs)."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a running step may know about itself.

    ``idempotency_key`` is the same on every attempt and every replay of this step of
    this instance: hand it to external systems so they apply the effect once.
    ``cancelled`` turns true when the attempt has timed out; long sync steps should
    check it (or call ``raise_if_cancelled()``) between units of work, since a
    thread cannot be stopped from outside. The next attempt waits for this one.
    """

    workflow_id: str
    seq: int
    name: str
    attempt: int
    _cancel: threading.Event = field(default=_NEVER, repr=False, compare=False)

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}/{self.seq}"

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise StepCancelledError(
                f"attempt {self.attempt} of step {self.name!r} of workflow "
                f"{self.workflow_id!r} timed out"
            )


_current_step: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "ledgerflow_current_step", default=None
)


def current_step() -> StepInfo:
    """The step being executed by the calling code; raises outside of a step."""
    info = _current_step.get()
    if info is None:
        raise RuntimeError("ledgerflow.current_step() called outside of a running step")
    return info


class StepClass(Protocol[*Ts, R_co]):
    """A step as an object: ``execute`` does it, ``compensate`` undoes it."""

    def execute(self, *args: *Ts) -> Awaitable[R_co] | R_co: ...

    def compensate(self, *args: *Ts) -> Any: ...


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    )


def accepts_result(fn: Callable[..., Any]) -> bool:
    try:
        return "result" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def jitter_source(workflow_id: str, seq: int, attempt: int) -> random.Random:
    """A source for retry jitter of its own, derived from (instance, command,
    attempt): the workflow's replayed random stream is never touched by the engine."""
    return random.Random(f"{workflow_id}/{seq}/{attempt}")


def nothing() -> None:
    return None


def _timed_out(name: str, attempt: int, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"attempt {attempt} of step {name!r} took longer than {timeout}s")


def keep_async(original: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    if not _is_async(original):
        return wrapper

    async def call(*args: Any) -> Any:
        return await wrapper(*args)

    return call


class Attempts:
    """The attempts of one instance's steps and compensations, one at a time per
    step: a timed-out sync attempt still running is remembered, by step seq, and
    the next attempt of that step waits for it (``outlive``)."""

    def __init__(self, workflow_id: str, threads: StepThreads | None) -> None:
        self.workflow_id = workflow_id
        self.threads = threads
        self.hung: dict[int, tuple[StepInfo, asyncio.Future[Outcome], float | None]] = {}

    async def run(
        self,
        seq: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        attempt: int,
        timeout: float | None,
    ) -> tuple[bool, Any, Callable[[], None]]:
        """One attempt: (succeeded, value or error, release). A sync attempt keeps
        its slot of the step threads until ``release`` is called, after its result
        is recorded: so the bodies that finished but whose results are not yet
        durable never outnumber the step threads, and a crash re-runs at most that
        many."""
        flag = _NEVER if timeout is None else threading.Event()
        info = StepInfo(self.workflow_id, seq, name, attempt, flag)
        token = _current_step.set(info)
        try:
            if not _is_async(fn):
                return await self._in_thread(info, fn, args, timeout)
            try:
                value = await asyncio.wait_for(fn(*args), timeout)
            except TimeoutError:
                return False, _timed_out(name, attempt, timeout), nothing
            except Exception as exc:  # noqa: BLE001 - a step failure is data for its retry policy
                return False, exc, nothing
            return True, value, nothing
        finally:
            _current_step.reset(token)

    async def _in_thread(
        self, info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None
    ) -> tuple[bool, Any, Callable[[], None]]:
        threads = self.threads
        if threads is None:
            raise AssertionError("a replaying pass never runs a step")
        release = await threads.slot()
        try:
            body = threads.run(fn, args)
        except BaseException:
            release()
            raise
        try:
            ok, value = await asyncio.wait_for(asyncio.shield(body), timeout)
        except TimeoutError:
            info._cancel.set()
            # Its slot stays taken while the body still runs. Recorded as failed now
            # (visible at once); the next attempt waits for it.
            body.add_done_callback(lambda _: release())
            self.hung[info.seq] = (info, body, timeout)
            return False, _timed_out(info.name, info.attempt, timeout), nothing
        except BaseException:
            # The pass is cancelled: the body's result is lost with it (it re-runs);
            # its slot is free once it is no longer running.
            body.add_done_callback(lambda _: release())
            raise
        if not ok:
            release()  # a failed attempt has no effect to keep durable first
            return False, value, nothing
        return True, value, release

    async def outlive(self, seq: int) -> None:
        """A new attempt never starts while an earlier one of the same step runs:
        wait for a timed-out thread, saying so now and then."""
        hung = self.hung.pop(seq, None)
        if hung is None:
            return
        info, work, timeout = hung
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({work}, timeout=HUNG_WARNING_EVERY)
            if done:
                return
            waited += HUNG_WARNING_EVERY
            log.warning(
                "workflow %s: attempt %d of step %r timed out after %ss and is still "
                "running %.0fs later; the next attempt waits for it (check "
                "current_step().cancelled in long sync steps)",
                info.workflow_id,
                info.attempt,
                info.name,
                timeout,
                waited,
            )
