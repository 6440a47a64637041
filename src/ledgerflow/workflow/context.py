"""What workflow code may use: ``WorkflowContext``, deterministic under replay."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, overload

from ..errors import WorkflowDefinitionError
from ..hashing import to_micros
from ..retry import RetryPolicy, as_seconds
from .definition import WorkflowDefinition, check_step_timeout, step_options
from .steps import StepClass
from .waits import due_after, finite_seconds

if TYPE_CHECKING:
    from .run import _Run

__all__ = ["WorkflowContext"]

R = TypeVar("R")
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a workflow's input type
Ts = TypeVarTuple("Ts")


class WorkflowContext:
    """What workflow code may use: every method is deterministic under replay."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.workflow_id = run.history.workflow_id
        self.name = run.definition.name
        self.version = run.definition.version

    @property
    def is_replaying(self) -> bool:
        """True while the code re-runs commands whose outcome is already recorded."""
        return self._run.seq < self._run.history.last_seq()

    @overload
    async def step(
        self,
        fn: Callable[[*Ts], Awaitable[R]],
        *args: *Ts,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
        queue: str | None = None,
        policy: str | None = None,
    ) -> R: ...

    @overload
    async def step(
        self,
        fn: StepClass[*Ts, R],
        *args: *Ts,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
        queue: str | None = None,
        policy: str | None = None,
    ) -> R: ...

    @overload
    async def step(
        self,
        fn: Callable[[*Ts], R],
        *args: *Ts,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
        queue: str | None = None,
        policy: str | None = None,
    ) -> R: ...

    def step(  # type: ignore[misc]  # mypy cannot match *Ts overloads to *Any
        self,
        fn: Any,
        *args: Any,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
        queue: str | None = None,
        policy: str | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Run ``fn(*args)`` once for this instance and record its result.

        Sync functions run in the engine's thread pool. On replay the recorded result
        is returned (converted to ``fn``'s return annotation) and ``fn`` is not
        called. A step that fails after its retries (default: ``DEFAULT_STEP_RETRY``,
        3 attempts) raises ``StepFailedError``; each failed attempt is recorded, so a
        restart does not give a step more attempts. ``timeout`` bounds one attempt.
        ``policy`` (or the ``policy`` of ``@ledgerflow.step``) runs the step under a
        named resilience policy from the ledger (see ``Engine.policies``), the version
        in force at each attempt; ``retry`` and ``timeout`` given in code win over its
        sections.
        ``compensate`` (called with the same arguments, plus ``result=`` if it takes
        that keyword) is run if the workflow later fails or is cancelled. ``fn`` may
        also be an object with ``execute`` and ``compensate`` methods.

        ``queue`` (or the ``queue`` of ``@ledgerflow.step``) sends the step to a task
        queue: a worker serving it (``Engine(queues=..., steps=...)``, ``ledgerflow
        worker --queue``), perhaps in another service, looks ``fn`` up by the step's
        name, runs it with the recorded arguments and records the outcome here. The
        workflow waits for it without holding a worker; retries are durable timers.
        Its compensation runs on its own queue if declared with one, else on the
        step's queue.
        """
        if hasattr(fn, "execute") and hasattr(fn, "compensate"):
            target: Callable[..., Any] = fn.execute
            compensate = compensate or fn.compensate
            step_name = name or type(fn).__qualname__
            options = step_options(target)
        else:
            target = fn
            options = step_options(fn)
            step_name = name or options.name
            compensate = compensate or options.compensate
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise WorkflowDefinitionError(f"step queue must be a non-empty str, not {queue!r}")
        if policy is not None and (not isinstance(policy, str) or not policy):
            raise WorkflowDefinitionError(f"step policy must be a non-empty str, not {policy!r}")
        if timeout is not None:
            check_step_timeout(timeout)
        # The run's coroutine itself, not one around it: one frame less per step.
        return self._run.step(
            step_name,
            target,
            args,
            compensate,
            retry or options.retry,
            timeout if timeout is not None else options.timeout,
            queue or options.queue,
            policy or options.policy,
        )

    async def sleep(self, duration: timedelta | float) -> None:
        """A durable timer: fires on time even across restarts."""
        seconds = finite_seconds(as_seconds(duration), "ctx.sleep") or 0.0
        await self._run.timer(lambda now_us: due_after(now_us, seconds, "ctx.sleep"))

    async def sleep_until(self, moment: datetime) -> None:
        """A durable timer until ``moment`` (timezone-aware; one in the past fires
        at once)."""
        if not isinstance(moment, datetime) or moment.utcoffset() is None:
            raise ValueError(f"ctx.sleep_until needs a timezone-aware datetime, not {moment!r}")
        await self._run.timer(lambda _now: to_micros(moment))

    @overload
    async def wait_for_signal(
        self, name: str, type_: type[T], *, timeout: timedelta | float | None = None
    ) -> T | None: ...

    @overload
    async def wait_for_signal(
        self, name: str, type_: Any = Any, *, timeout: timedelta | float | None = None
    ) -> Any: ...

    async def wait_for_signal(
        self,
        name: str,
        type_: Any = Any,
        *,
        timeout: timedelta | float | None = None,
    ) -> Any:
        """The next signal called ``name`` (sent before or after this wait), as
        ``type_``; None if ``timeout`` passes first.

        A signal whose payload does not fit ``type_`` is recorded as rejected
        (``wf.signal_rejected``) and the wait goes on; senders are told at once when
        the instance is already waiting (the wait records the type's JSON Schema).
        """
        seconds = finite_seconds(as_seconds(timeout), f"the timeout of the wait for {name!r}")
        return await self._run.signal(name, type_, seconds)

    async def child(
        self, workflow: WorkflowDefinition[I, R], input: I, *, id: str | None = None
    ) -> R:
        """Start ``workflow`` as a child with its own history and await its result.

        The child's id defaults to ``<parent id>.<seq>``. A child that does not
        complete raises ``ChildWorkflowError``. Cancelling the parent cancels the
        children it is still running.
        """
        result: R = await self._run.child(workflow, input, id)
        return result

    @contextlib.contextmanager
    def cancellation_shield(self) -> Iterator[None]:
        """Commands inside run even if the instance was cancelled: for clean-up
        after catching ``WorkflowCancelled``.

        ``with ctx.cancellation_shield(): await ctx.step(release_hold, order)``
        """
        self._run.shield += 1
        try:
            yield
        finally:
            self._run.shield -= 1

    def now(self) -> datetime:
        """The current time, recorded on first use so that replay sees the same."""
        return self._run.now()

    def patched(self, change: str) -> bool:
        """Whether to take the new path of a code change (``change``: a stable id).

        True where the code runs ahead of its history (a new instance, or an old one
        past what it recorded): a marker is recorded, so replays take the new path
        again. False when replaying a history recorded before the change reached
        this point: the old path, as it ran. ``if ctx.patched("ship-first"): ...
        else: ...``; once no instance runs the old path (``ledgerflow
        replay-check`` says so), keep the new one and call ``deprecate_patch``.
        """
        return self._run.patched(change)

    def deprecate_patch(self, change: str) -> None:
        """The old path of ``change`` is gone from the code: histories that recorded
        its marker still replay, new ones do not record it."""
        self._run.deprecate_patch(change)

    def random(self) -> random.Random:
        """A random generator seeded by the workflow id: the same draws on replay."""
        return self._run.rng

    def uuid(self) -> uuid.UUID:
        """A UUID derived from the workflow's seeded generator."""
        return uuid.UUID(int=self._run.rng.getrandbits(128), version=4)

    def expose(self, state: Any) -> None:
        """Make ``state`` what ``Engine.query`` returns for this instance."""
        self._run.exposed = state
