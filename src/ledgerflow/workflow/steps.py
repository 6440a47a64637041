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
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, TypeVarTuple

from .. import metrics, tracing
from ..errors import StepCancelledError, StepTimeoutError
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


class _Beat:
    """When a long attempt last said it is alive (``time.monotonic()``)."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = time.monotonic()


_NO_BEAT = _Beat()
"""The heartbeat of attempts nobody watches."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a running step may know about itself.

    ``idempotency_key`` is the same on every attempt and every replay of this step of
    this instance: hand it to external systems so they apply the effect once.
    ``cancelled`` turns true when the attempt has timed out; long sync steps should
    check it (or call ``raise_if_cancelled()``) between units of work, since a
    thread cannot be stopped from outside. The next attempt waits for this one.
    Under a policy with a heartbeat timeout, a long step calls ``heartbeat()`` at
    least that often, or its attempt counts as timed out.
    """

    workflow_id: str
    seq: int
    name: str
    attempt: int
    _cancel: threading.Event = field(default=_NEVER, repr=False, compare=False)
    _beat: _Beat = field(default=_NO_BEAT, repr=False, compare=False)

    def heartbeat(self) -> None:
        """Say the attempt is alive and making progress (from any thread)."""
        self._beat.at = time.monotonic()

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
_current_workflow: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "ledgerflow_current_workflow", default=None
)
"""The instance a pass runs over and its correlation id: what log records written
during the pass (by the engine or by step code) are tied to."""


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


def nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Limits:
    """How long one attempt may run: ``timeout`` seconds in all (named by ``kind``:
    the attempt's own start-to-close, or what is left of the step's
    schedule-to-close), and ``heartbeat`` seconds between two heartbeats."""

    timeout: float | None = None
    kind: str = "start_to_close"
    heartbeat: float | None = None
    shown: float | None = None
    """The limit as set (``timeout`` may be what is left of it), for messages."""


NO_LIMITS = Limits()


def _timed_out(info: StepInfo, limits: Limits, beat_missed: bool) -> StepTimeoutError:
    if beat_missed:
        assert limits.heartbeat is not None
        return StepTimeoutError(info.name, info.attempt, "its heartbeat timeout", limits.heartbeat)
    limit = limits.shown if limits.shown is not None else limits.timeout
    assert limit is not None
    return StepTimeoutError(info.name, info.attempt, limits.kind, limit)


async def _watch(work: asyncio.Future[Any], limits: Limits, beat: _Beat) -> bool | None:
    """Wait for ``work`` within ``limits``: None if it ended in time, else whether the
    heartbeat (True) or the timeout (False) ran out first."""
    deadline = None if limits.timeout is None else time.monotonic() + limits.timeout
    while True:
        now = time.monotonic()
        waits = []
        if deadline is not None:
            waits.append(deadline - now)
        if limits.heartbeat is not None:
            waits.append(beat.at + limits.heartbeat - now)
        wait = min(waits) if waits else None
        if wait is not None and wait <= 0:
            return deadline is None or time.monotonic() < deadline
        done, _ = await asyncio.wait({work}, timeout=wait)
        if done:
            return None


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
        limits: Limits = NO_LIMITS,
        *,
        kind: Literal["step", "compensation"] = "step",
        remote: bool = False,
    ) -> tuple[bool, Any, Callable[[], None]]:
        """One attempt: (succeeded, value or error, release). A sync attempt keeps
        its slot of the step threads until ``release`` is called, after its result
        is recorded: so the bodies that finished but whose results are not yet
        durable never outnumber the step threads, and a crash re-runs at most that
        many."""
        watched = limits.timeout is not None or limits.heartbeat is not None
        flag = threading.Event() if watched else _NEVER
        beat = _Beat() if limits.heartbeat is not None else _NO_BEAT
        # A compensation is named for what it undoes: "compensate release_stock", in
        # its span, its metrics and the step context its code sees.
        label = name if kind == "step" else f"compensate {name}"
        info = StepInfo(self.workflow_id, seq, label, attempt, flag, beat)
        token = _current_step.set(info)
        began = time.perf_counter()
        outcome: tuple[bool, Any, Callable[[], None]] = (False, None, nothing)
        attributes: dict[str, str | int] = {
            "ledgerflow.workflow_id": self.workflow_id,
            "ledgerflow.seq": seq,
            "ledgerflow.attempt": attempt,
        }
        try:
            with tracing.span(
                f"step {name}" if kind == "step" else label,
                kind=tracing.SpanKind.CONSUMER if remote else tracing.SpanKind.INTERNAL,
                attributes=attributes,
            ) as span:
                outcome = await self._attempt(info, fn, args, limits)
                if not outcome[0]:
                    error = outcome[1]
                    tracing.fail(span, type(error).__name__, str(error))
            return outcome
        finally:
            _current_step.reset(token)
            metrics.step_attempt(label, outcome[0], time.perf_counter() - began)

    async def _attempt(
        self, info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits
    ) -> tuple[bool, Any, Callable[[], None]]:
        if not _is_async(fn):
            return await self._in_thread(info, fn, args, limits)
        if limits.heartbeat is not None:
            return await self._beating(info, fn, args, limits)
        try:
            value = await asyncio.wait_for(fn(*args), limits.timeout)
        except TimeoutError as exc:
            if limits.timeout is None:  # the body's own TimeoutError
                return False, exc, nothing
            return False, _timed_out(info, limits, False), nothing
        except Exception as exc:  # noqa: BLE001 - a step failure is data for its retry policy
            return False, exc, nothing
        return True, value, nothing

    async def _beating(
        self, info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits
    ) -> tuple[bool, Any, Callable[[], None]]:
        """An async attempt watched for its heartbeat: cancelled when it misses one."""
        task = asyncio.ensure_future(fn(*args))
        try:
            missed = await _watch(task, limits, info._beat)
        except BaseException:
            task.cancel()
            raise
        if missed is not None:
            info._cancel.set()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return False, _timed_out(info, limits, missed), nothing
        try:
            return True, task.result(), nothing
        except Exception as exc:  # noqa: BLE001 - a step failure is data for its retry policy
            return False, exc, nothing

    async def _in_thread(
        self, info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...], limits: Limits
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
            if limits.heartbeat is None:
                missed = None
                try:
                    ok, value = await asyncio.wait_for(asyncio.shield(body), limits.timeout)
                except TimeoutError:
                    missed = False
            else:
                missed = await _watch(body, limits, info._beat)
                if missed is None:
                    ok, value = body.result()
            if missed is not None:
                info._cancel.set()
                # Its slot stays taken while the body still runs. Recorded as failed
                # now (visible at once); the next attempt waits for it.
                body.add_done_callback(lambda _: release())
                self.hung[info.seq] = (info, body, limits.timeout)
                return False, _timed_out(info, limits, missed), nothing
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
