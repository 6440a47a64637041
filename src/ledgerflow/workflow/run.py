"""One pass of a workflow instance: replay its history through the code, then act.

The workflow function runs from the top on every pass. Each command it issues gets
the next ``seq``; if the history holds that command's outcome, the outcome is
returned (and the command checked against the record: a different kind or name is a
``NonDeterminismError``). At the first command without an outcome the pass acts for
real: it runs the step, records the timer, takes the signal... and records the
result before going on. A command that must wait (a timer not yet due, a signal not
yet sent, a running child) ends the pass with ``Suspend``: the coroutine is dropped
and the instance costs nothing but rows until it is due again.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import inspect
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from ..errors import (
    ChildWorkflowError,
    ConcurrencyError,
    NonDeterminismError,
    StepFailedError,
    WorkflowCancelled,
    WorkflowInputError,
)
from ..hashing import from_micros, to_micros
from ..retry import RetryPolicy, as_seconds
from .codec import CodecError, from_builtins, to_builtins
from .definition import WorkflowDefinition, return_type, step_options
from .history import (
    ChildDone,
    ChildStarted,
    Clock,
    CompensationDone,
    CompensationFailed,
    Finished,
    History,
    SignalTaken,
    SignalTimedOut,
    SignalWaiting,
    StepDone,
    StepFailed,
    TimerFired,
    TimerStarted,
)

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Restart", "StepInfo", "Suspend", "WorkflowContext", "current_step"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")

DEFAULT_STEP_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.1)
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.2)


class Suspend(BaseException):
    """The instance must wait: end this pass, record ``events``, wake at ``due_at_us``."""

    def __init__(
        self,
        events: list[Any] | None = None,
        due_at_us: int | None = None,
        child_id: str | None = None,
    ) -> None:
        super().__init__("suspended")
        self.events = events or []
        self.due_at_us = due_at_us
        self.child_id = child_id


class Restart(BaseException):
    """Another runner recorded commands under us: start the pass again from history."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What a running step may know about itself.

    ``idempotency_key`` is the same on every attempt and every replay of this step of
    this instance: hand it to external systems so they apply the effect once.
    """

    workflow_id: str
    seq: int
    name: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        return f"{self.workflow_id}/{self.seq}"


_current_step: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "ledgerflow_current_step", default=None
)


def current_step() -> StepInfo:
    """The step being executed by the calling code; raises outside of a step."""
    info = _current_step.get()
    if info is None:
        raise RuntimeError("ledgerflow.current_step() called outside of a running step")
    return info


class StepClass(Protocol[R_co]):
    """A step as an object: ``execute`` does it, ``compensate`` undoes it."""

    def execute(self, *args: Any) -> Awaitable[R_co] | R_co: ...

    def compensate(self, *args: Any) -> Any: ...


@dataclass
class _Compensation:
    step_seq: int
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    result: Any


@dataclass
class PassResult:
    """How a pass ended: suspended (``suspend``) or finished (``finished``)."""

    suspend: Suspend | None = None
    finished: Finished | None = None
    exposed: Any = None
    buffered: list[Any] = field(default_factory=list)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects count too
    )


def _accepts_result(fn: Callable[..., Any]) -> bool:
    try:
        return "result" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


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
        fn: Callable[..., Awaitable[R]],
        *args: Any,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
    ) -> R: ...

    @overload
    async def step(
        self,
        fn: StepClass[R],
        *args: Any,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
    ) -> R: ...

    @overload
    async def step(
        self,
        fn: Callable[..., R],
        *args: Any,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
    ) -> R: ...

    async def step(
        self,
        fn: Any,
        *args: Any,
        compensate: Callable[..., Any] | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        name: str | None = None,
    ) -> Any:
        """Run ``fn(*args)`` once for this instance and record its result.

        Sync functions run in the engine's thread pool. On replay the recorded result
        is returned (converted to ``fn``'s return annotation) and ``fn`` is not
        called. A step that fails after its retries raises ``StepFailedError``.
        ``compensate`` (called with the same arguments, plus ``result=`` if it takes
        that keyword) is run if the workflow later fails or is cancelled. ``fn`` may
        also be an object with ``execute`` and ``compensate`` methods.
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
        return await self._run.step(
            step_name,
            target,
            args,
            compensate,
            retry or options.retry or DEFAULT_STEP_RETRY,
            timeout if timeout is not None else options.timeout,
        )

    async def sleep(self, duration: timedelta | float) -> None:
        """A durable timer: fires on time even across restarts."""
        seconds = as_seconds(duration) or 0.0
        await self._run.timer(lambda now_us: now_us + int(seconds * 1_000_000))

    async def sleep_until(self, moment: datetime) -> None:
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
        ``type_``; None if ``timeout`` passes first."""
        return await self._run.signal(name, type_, as_seconds(timeout))

    async def child(
        self, workflow: WorkflowDefinition[Any, R], input: Any, *, id: str | None = None
    ) -> R:
        """Start ``workflow`` as a child with its own history and await its result.

        The child's id defaults to ``<parent id>.<seq>``. A child that does not
        complete raises ``ChildWorkflowError``.
        """
        result: R = await self._run.child(workflow, input, id)
        return result

    def now(self) -> datetime:
        """The current time, recorded on first use so that replay sees the same."""
        return self._run.now()

    def random(self) -> random.Random:
        """A random generator seeded by the workflow id: the same draws on replay."""
        return self._run.rng

    def uuid(self) -> uuid.UUID:
        """A UUID derived from the workflow's seeded generator."""
        return uuid.UUID(int=self._run.rng.getrandbits(128), version=4)

    def expose(self, state: Any) -> None:
        """Make ``state`` what ``Engine.query`` returns for this instance."""
        self._run.exposed = state


class _Run:
    """The mechanics behind one pass; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        definition: WorkflowDefinition[Any, Any],
        history: History,
        *,
        query: bool = False,
    ) -> None:
        self.engine = engine
        self.definition = definition
        self.history = history
        self.query = query
        self.seq = 0
        self.buffer: list[Any] = []
        self.exposed: Any = None
        self.compensations: list[_Compensation] = []
        self.compensating = False
        self.appending = asyncio.Lock()
        seed = hashlib.sha256(history.workflow_id.encode()).digest()
        self.rng = random.Random(int.from_bytes(seed[:8], "big"))

    # -- the pass -------------------------------------------------------------------

    async def execute(self) -> PassResult:
        ctx = WorkflowContext(self)
        failure: tuple[str, str] | None = None
        cancelled = False
        try:
            try:
                given = from_builtins(self.history.started.input, self.definition.input_type)
            except CodecError as exc:
                raise WorkflowInputError(self.definition.name, str(exc)) from exc
            result = await self.definition.fn(ctx, given)
            self._check_finished_path()
            encoded = to_builtins(result)
            return self._finish(Finished(status="completed", result=encoded))
        except Suspend as suspend:
            return PassResult(suspend=suspend, exposed=self.exposed, buffered=self.buffer)
        except (NonDeterminismError, Restart):
            raise
        except WorkflowCancelled as exc:
            failure, cancelled = ("WorkflowCancelled", exc.reason or "cancelled"), True
        except CodecError as exc:
            failure = ("ResultNotSerializable", str(exc))
        except Exception as exc:  # noqa: BLE001 - the workflow failed: that is its outcome
            failure = (type(exc).__name__, str(exc))
        return await self._fail(failure, cancelled)

    def _finish(self, finished: Finished) -> PassResult:
        return PassResult(finished=finished, exposed=self.exposed, buffered=self.buffer)

    async def _fail(self, failure: tuple[str, str], cancelled: bool) -> PassResult:
        error_type, message = failure
        self.compensating = True
        gave_up = False
        ran = False
        for comp in reversed(self.compensations):
            seq, recorded = self._command("compensation", comp.name)
            ran = True
            if recorded:
                gave_up = gave_up or any(isinstance(e, CompensationFailed) for e in recorded)
                continue
            if self.query:
                raise Suspend()  # replay checked what is recorded; acting is not its part
            args = comp.args
            call: Callable[..., Any] = comp.fn
            if _accepts_result(comp.fn):
                result = comp.result

                def call(*a: Any, _fn: Callable[..., Any] = comp.fn, _r: Any = result) -> Any:
                    return _fn(*a, result=_r)

                call = _keep_async(comp.fn, call)
            await self.record([])
            ok, value = await self._attempts(seq, f"compensate {comp.name}", call, args, None)
            if ok:
                await self.record(
                    [CompensationDone(seq=seq, name=comp.name, step_seq=comp.step_seq)]
                )
            else:
                gave_up = True
                await self.record(
                    [
                        CompensationFailed(
                            seq=seq,
                            name=comp.name,
                            step_seq=comp.step_seq,
                            error_type=type(value).__name__,
                            message=str(value),
                        )
                    ]
                )
        self._check_finished_path()
        if gave_up:
            status = "compensation_failed"
        elif ran:
            status = "compensated"
        else:
            status = "cancelled" if cancelled else "failed"
        return self._finish(Finished(status=status, error_type=error_type, message=message))

    def _check_finished_path(self) -> None:
        later = self.history.recorded(self.seq + 1)
        if later:
            raise NonDeterminismError(
                self.history.workflow_id,
                self.seq + 1,
                f"{later[0].kind} {later[0].name!r}",
                "no further command (the workflow ended)",
            )

    # -- commands -------------------------------------------------------------------

    def _command(self, kind: str, name: str) -> tuple[int, list[Any] | None]:
        self.seq += 1
        recorded = self.history.recorded(self.seq)
        if recorded is not None and (recorded[0].kind != kind or recorded[0].name != name):
            raise NonDeterminismError(
                self.history.workflow_id,
                self.seq,
                f"{recorded[0].kind} {recorded[0].name!r}",
                f"{kind} {name!r}",
            )
        return self.seq, recorded

    def _live(self) -> None:
        """About to act on a command without a recorded outcome."""
        if self.query:
            raise Suspend()
        if self.history.cancel is not None and not self.compensating:
            raise WorkflowCancelled(self.history.cancel.reason)

    async def record(self, events: list[Any], runtime: tuple[Any, ...] = ()) -> None:
        """Append ``events`` (after anything buffered) at the history's version.

        Signals or a cancellation appended meanwhile are folded in and the append
        retried; commands recorded by someone else mean another runner: Restart.
        """
        async with self.appending:  # concurrent commands of one run append in turn
            await self._record(events, runtime)

    async def _record(self, events: list[Any], runtime: tuple[Any, ...]) -> None:
        batch = [*self.buffer, *events]
        self.buffer = []
        if not batch:
            return
        store = self.engine.store
        stream = self.engine.stream_id(self.history.workflow_id)
        while True:
            try:
                result = await store.append(stream, batch, self.history.version, runtime=runtime)
            except ConcurrencyError:
                newer = await store.read_stream(stream, from_version=self.history.version + 1)
                if any(not _external(e.data) for e in newer):
                    raise Restart() from None
                self.history.extend(newer)
                continue
            before = self.history.version
            first = result.version - len(batch) + 1
            for offset, event in enumerate(batch):
                self.history.add(first + offset, event)
            await self.engine.snapshot_if_due(self.history, before)
            return

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        compensate: Callable[..., Any] | None,
        retry: RetryPolicy,
        timeout: timedelta | float | None,
    ) -> Any:
        seq, recorded = self._command("step", name)
        wanted = return_type(fn)
        if recorded:
            outcome = recorded[-1]
            if isinstance(outcome, StepFailed):
                raise StepFailedError(name, outcome.error_type, outcome.message)
            value = from_builtins(outcome.result, wanted)
        else:
            self._live()
            # What is still buffered (the previous step's result) becomes durable
            # before this step acts, so a crash re-runs at most the step in flight.
            await self.record([])
            ok, result = await self._attempts(seq, name, fn, args, retry, as_seconds(timeout))
            if not ok:
                await self.record(
                    [
                        StepFailed(
                            seq=seq,
                            name=name,
                            error_type=type(result).__name__,
                            message=str(result),
                        )
                    ]
                )
                raise StepFailedError(name, type(result).__name__, str(result)) from result
            encoded = to_builtins(result)
            # Recorded with the next append (the next step's, a wait, or the end):
            # the last step and the end of a workflow then share one commit.
            self.buffer.append(StepDone(seq=seq, name=name, result=encoded))
            value = from_builtins(encoded, wanted)
        if compensate is not None:
            self.compensations.append(_Compensation(seq, name, compensate, args, value))
        return value

    async def _attempts(
        self,
        seq: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        retry: RetryPolicy | None,
        timeout: float | None = None,
    ) -> tuple[bool, Any]:
        policy = retry or DEFAULT_COMPENSATION_RETRY
        attempt = 1
        while True:
            token = _current_step.set(StepInfo(self.history.workflow_id, seq, name, attempt))
            try:
                if _is_async(fn):
                    result = await asyncio.wait_for(fn(*args), timeout)
                else:
                    context = contextvars.copy_context()
                    loop = asyncio.get_running_loop()
                    work = loop.run_in_executor(self.engine.step_pool, context.run, fn, *args)
                    result = await asyncio.wait_for(work, timeout)
                return True, result
            except Exception as exc:  # noqa: BLE001 - a step failure is data for its retry policy
                if not policy.retries(exc, attempt):
                    return False, exc
            finally:
                _current_step.reset(token)
            await asyncio.sleep(policy.delay(attempt, self.rng))
            attempt += 1

    async def timer(self, fire_at: Callable[[int], int]) -> None:
        seq, recorded = self._command("timer", "sleep")
        if recorded and any(isinstance(e, TimerFired) for e in recorded):
            return
        self._live()
        now = self.engine.now_us()
        if recorded:
            due = recorded[0].fire_at_us
            started: list[Any] = []
        else:
            due = fire_at(now)
            started = [TimerStarted(seq=seq, name="sleep", fire_at_us=due)]
        if now >= due:
            await self.record([*started, TimerFired(seq=seq, name="sleep")])
            return
        raise Suspend(started, due)

    async def signal(self, name: str, type_: Any, timeout: float | None) -> Any:
        seq, recorded = self._command("signal", name)
        for event in recorded or ():
            if isinstance(event, SignalTaken):
                return self._payload(name, event.signal_version, type_)
            if isinstance(event, SignalTimedOut):
                return None
        self._live()
        found = self.history.next_signal(name)
        if found is not None:
            version, _ = found
            await self.record([SignalTaken(seq=seq, name=name, signal_version=version)])
            return self._payload(name, version, type_)
        now = self.engine.now_us()
        if recorded:
            deadline = recorded[0].deadline_us
            waiting: list[Any] = []
        else:
            deadline = None if timeout is None else now + int(timeout * 1_000_000)
            waiting = [SignalWaiting(seq=seq, name=name, deadline_us=deadline)]
        if deadline is not None and now >= deadline:
            await self.record([*waiting, SignalTimedOut(seq=seq, name=name)])
            return None
        raise Suspend(waiting, deadline)

    def _payload(self, name: str, version: int, type_: Any) -> Any:
        try:
            return from_builtins(self.history.signal_at(version).payload, type_)
        except CodecError as exc:
            raise WorkflowInputError(f"signal {name!r}", str(exc)) from exc

    async def child(
        self, workflow: WorkflowDefinition[Any, Any], given: Any, child_id: str | None
    ) -> Any:
        seq, recorded = self._command("child", workflow.name)
        for event in recorded or ():
            if isinstance(event, ChildDone):
                return self._child_outcome(workflow, event)
        self._live()
        cid = child_id or f"{self.history.workflow_id}.{seq}"
        if not recorded:
            await self.engine.start_child(workflow, given, cid, self.history.workflow_id)
            await self.record(
                [ChildStarted(seq=seq, name=workflow.name, child_id=cid, version=workflow.version)]
            )
        else:
            started = recorded[0]
            cid = started.child_id
            await self.engine.start_child(workflow, given, cid, self.history.workflow_id)
        finished = await self.engine.child_finished(cid)
        if finished is None:
            raise Suspend([], None, child_id=cid)
        done = ChildDone(
            seq=seq,
            name=workflow.name,
            child_id=cid,
            status=finished.status,
            result=finished.result,
            error_type=finished.error_type,
            message=finished.message,
        )
        await self.record([done])
        return self._child_outcome(workflow, done)

    def _child_outcome(self, workflow: WorkflowDefinition[Any, Any], done: ChildDone) -> Any:
        if done.status != "completed":
            raise ChildWorkflowError(
                done.child_id, done.status, done.error_type or "", done.message or ""
            )
        return from_builtins(done.result, workflow.output_type)

    def now(self) -> datetime:
        seq, recorded = self._command("now", "now")
        if recorded:
            return from_micros(recorded[0].at_us)
        at = self.engine.now_us()
        if not self.query:
            self.buffer.append(Clock(seq=seq, name="now", at_us=at))
        return from_micros(at)


def _external(data: Any) -> bool:
    from .history import CancelRequested, SignalSent

    return isinstance(data, SignalSent | CancelRequested)


def _keep_async(original: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    if not _is_async(original):
        return wrapper

    async def call(*args: Any) -> Any:
        return await wrapper(*args)

    return call
