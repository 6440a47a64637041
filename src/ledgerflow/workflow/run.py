"""One pass of a workflow instance: replay its history through the code, then act.

The workflow function runs from the top on every pass. Each command it issues gets
the next ``seq``; if the history holds that command's outcome, the outcome is
returned (and the command checked against the record: a different kind or name
parks the instance with a ``NonDeterminismError``). At the first command without an
outcome the pass acts for real: it runs the step, records the timer, takes the
signal... and makes the outcome durable before the code sees it. A command that must
wait (a timer not yet due, a signal not yet sent, a running child) ends the pass with
``Suspend``: the coroutine is dropped and the instance costs nothing but rows until it
is due again.

How a pass can end, and who decides:

- the code returns or raises: the workflow's own outcome (compensations on failure);
- ``Suspend``: it waits; ``Restart``: another runner recorded under us, replay again;
- ``Abandon``: the store could not be reached (or closed). Infrastructure never
  decides a workflow's outcome: the engine drops the pass and retries it, with
  backoff, from the last recorded event;
- ``Park``: the code cannot go on with this history (non-determinism, a value that
  cannot be recorded or no longer fits its type): the instance is parked as
  ``stuck`` until fitting code is deployed.

The last three are ``BaseException``s so that ``except Exception`` in workflow code
cannot swallow them, and a pass ends only once every command it started has settled
(``asyncio.gather`` branches included), so no step result is dropped and no step
runs twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import logging
import random
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, TypeVarTuple, overload

from ..errors import (
    ChildWorkflowError,
    ConcurrencyError,
    EventError,
    LedgerflowError,
    NonDeterminismError,
    RecordedValueError,
    ResultTooLargeError,
    StepCancelledError,
    StepFailedError,
    StoreClosedError,
    StoreUnavailableError,
    UnrecordableValueError,
    WorkflowCancelled,
    WorkflowError,
)
from ..events import AppendResult, RecordedEvent
from ..hashing import from_micros, to_micros
from ..retry import RetryPolicy, as_seconds
from .codec import CodecError, from_builtins, json_schema, to_builtins
from .definition import WorkflowDefinition, return_type, step_options
from .history import (
    CancelRequested,
    ChildDone,
    ChildFinished,
    ChildStarted,
    Clock,
    CompensationAttemptFailed,
    CompensationDone,
    CompensationFailed,
    Finished,
    History,
    SignalRejected,
    SignalSent,
    SignalTaken,
    SignalTimedOut,
    SignalWaiting,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    TimerFired,
    TimerStarted,
)

if TYPE_CHECKING:
    from ..store.runtime import RuntimeWrite

__all__ = [
    "DEFAULT_COMPENSATION_RETRY",
    "DEFAULT_STEP_RETRY",
    "Abandon",
    "Park",
    "Restart",
    "RunHost",
    "StepInfo",
    "Suspend",
    "WorkflowContext",
    "current_step",
]

log = logging.getLogger("ledgerflow.engine")

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a workflow's input type
Ts = TypeVarTuple("Ts")

DEFAULT_STEP_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.1)
"""A step without a policy of its own: 3 attempts, 0.1 s then 0.2 s apart (+10 %)."""
DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=5, initial_interval=0.2)
"""A compensation: 5 attempts, 0.2 s doubling (+10 %)."""
HUNG_WARNING_EVERY = 30.0
"""Seconds between warnings about a timed-out sync attempt that is still running."""
RESULT_HOLD_LIMIT = 300.0
"""Longest a step thread waits for its result to be recorded (a safety net only)."""


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


class Abandon(BaseException):
    """The store failed under the pass (unreachable, locked, closed): drop the pass
    and retry it from the last recorded event; never the workflow's outcome."""

    def __init__(self, cause: LedgerflowError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Park(BaseException):
    """The code cannot go on with this history: park the instance as ``stuck``."""

    def __init__(self, error: WorkflowError) -> None:
        super().__init__(str(error))
        self.error = error


class _Closed(BaseException):
    """A command issued after the body ended (a ``gather`` branch still running):
    it is not started; the next pass replays the branch."""


class RunHost(Protocol):
    """What a pass needs from the engine that hosts it."""

    @property
    def step_pool(self) -> Executor | None: ...

    @property
    def max_event_bytes(self) -> int | None:
        """Largest encoded event the store takes; None if the host records nothing."""
        ...

    def now_us(self) -> int: ...

    def encoded_size(self, event: Any) -> int: ...

    async def append(
        self, history: History, events: list[Any], runtime: tuple[RuntimeWrite, ...]
    ) -> AppendResult:
        """Append at ``history.version``; ConcurrencyError if the stream moved."""
        ...

    async def read_after(self, history: History) -> list[RecordedEvent]: ...

    async def appended(self, history: History, before: int) -> None:
        """Called after each append made by the pass (snapshots hook in here)."""
        ...

    async def start_child(
        self, workflow: WorkflowDefinition[Any, Any], given: Any, child_id: str, parent_id: str
    ) -> None: ...

    async def cancel_child(self, child_id: str, reason: str) -> None: ...


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
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

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


def _jitter(workflow_id: str, seq: int, attempt: int) -> random.Random:
    """A source for retry jitter of its own, derived from (instance, command,
    attempt): the workflow's replayed random stream is never touched by the engine."""
    return random.Random(f"{workflow_id}/{seq}/{attempt}")


def _settle_future(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _nothing() -> None:
    return None


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
    ) -> R: ...

    async def step(  # type: ignore[misc]  # mypy cannot match *Ts overloads to *Any
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
        called. A step that fails after its retries (default: ``DEFAULT_STEP_RETRY``,
        3 attempts) raises ``StepFailedError``; each failed attempt is recorded, so a
        restart does not give a step more attempts. ``timeout`` bounds one attempt.
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
        ``type_``; None if ``timeout`` passes first.

        A signal whose payload does not fit ``type_`` is recorded as rejected
        (``wf.signal_rejected``) and the wait goes on; senders are told at once when
        the instance is already waiting (the wait records the type's JSON Schema).
        """
        return await self._run.signal(name, type_, as_seconds(timeout))

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

    def random(self) -> random.Random:
        """A random generator seeded by the workflow id: the same draws on replay."""
        return self._run.rng

    def uuid(self) -> uuid.UUID:
        """A UUID derived from the workflow's seeded generator."""
        return uuid.UUID(int=self._run.rng.getrandbits(128), version=4)

    def expose(self, state: Any) -> None:
        """Make ``state`` what ``Engine.query`` returns for this instance."""
        self._run.exposed = state


_RETURNED_NOTHING: Any = object()


class _Run:
    """The mechanics behind one pass; see the module docstring."""

    def __init__(
        self,
        host: RunHost,
        definition: WorkflowDefinition[Any, Any],
        history: History,
        *,
        query: bool = False,
    ) -> None:
        self.host = host
        self.definition = definition
        self.history = history
        self.query = query
        self.seq = 0
        self.buffer: list[Any] = []
        """Clock readings: recorded with the next append, before anything acts on them."""
        self.exposed: Any = None
        self.compensations: list[_Compensation] = []
        self.compensating = False
        self.shield = 0
        self.appending = asyncio.Lock()
        self.inflight: set[asyncio.Future[None]] = set()
        self.ended = False
        self.fault: BaseException | None = None
        self.hung: dict[int, tuple[StepInfo, asyncio.Future[None], float | None]] = {}
        """Timed-out sync attempts still running, by step seq."""
        seed = hashlib.sha256(history.workflow_id.encode()).digest()
        self.rng = random.Random(int.from_bytes(seed[:8], "big"))

    # -- the pass -------------------------------------------------------------------

    async def execute(self) -> PassResult:
        ctx = WorkflowContext(self)
        failure: tuple[str, str] | None = None
        cancelled = False
        returned: Any = _RETURNED_NOTHING
        try:
            given = self._decode(self.history.started.input, self.definition.input_type, "input")
            returned = await self.definition.fn(ctx, given)
        except Suspend as suspend:
            await self._settle()
            return PassResult(suspend=suspend, exposed=self.exposed, buffered=self._take_buffer())
        except (Park, Abandon, Restart, _Closed) as stop:
            await self._settle()
            raise self.fault or stop from None
        except WorkflowCancelled as exc:
            failure, cancelled = ("WorkflowCancelled", exc.reason or "cancelled"), True
        except Exception as exc:  # noqa: BLE001 - the workflow failed: that is its outcome
            failure = (type(exc).__name__, str(exc))
        await self._settle()
        if failure is None:
            self._check_finished_path()
            encoded = self._encode(returned, "the workflow's return value")
            finished = Finished(status="completed", result=encoded)
            oversize = self._oversize(finished, "the workflow's return value")
            if oversize is None:
                return self._finish(finished)
            failure = (type(oversize).__name__, str(oversize))
        return await self._fail(failure, cancelled)

    async def _settle(self) -> None:
        """Let every command the body started settle; the body takes no new ones."""
        self.ended = True
        while self.inflight:
            await asyncio.wait(list(self.inflight))
        if self.fault is not None:
            raise self.fault

    @contextlib.asynccontextmanager
    async def _acting(self) -> AsyncIterator[None]:
        """Marks a command acting for real, so the pass waits for it to settle."""
        marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inflight.add(marker)
        try:
            yield
        finally:
            self.inflight.discard(marker)
            marker.set_result(None)

    def _finish(self, finished: Finished) -> PassResult:
        return PassResult(finished=finished, exposed=self.exposed, buffered=self._take_buffer())

    def _take_buffer(self) -> list[Any]:
        taken, self.buffer = self.buffer, []
        return taken

    def _raise(self, stop: BaseException) -> BaseException:
        """Remember the first fault of the pass: every later command re-raises it,
        even in code that caught it (``gather(..., return_exceptions=True)``)."""
        if self.fault is None:
            self.fault = stop
        return self.fault

    async def _fail(self, failure: tuple[str, str], cancelled: bool) -> PassResult:
        error_type, message = failure
        self.compensating = True
        if cancelled and not self.query:
            await self._cancel_children(message)
        gave_up = False
        ran = False
        for comp in reversed(self.compensations):
            seq, recorded = self._command("compensation", comp.name, own=True)
            ran = True
            final = _final(recorded, CompensationDone | CompensationFailed)
            if final is not None:
                gave_up = gave_up or isinstance(final, CompensationFailed)
                continue
            if self.query:
                raise Suspend()  # replay checked what is recorded; acting is not its part
            async with self._acting():
                if not await self._compensate(seq, comp, recorded or []):
                    gave_up = True
        self._check_finished_path()
        if gave_up:
            status = "compensation_failed"
        elif ran:
            status = "compensated"
        else:
            status = "cancelled" if cancelled else "failed"
        return self._finish(Finished(status=status, error_type=error_type, message=message))

    async def _compensate(self, seq: int, comp: _Compensation, recorded: list[Any]) -> bool:
        call: Callable[..., Any] = comp.fn
        if _accepts_result(comp.fn):

            def call(*a: Any, _fn: Callable[..., Any] = comp.fn, _r: Any = comp.result) -> Any:
                return _fn(*a, result=_r)

            call = _keep_async(comp.fn, call)
        await self.record([])
        policy = DEFAULT_COMPENSATION_RETRY
        attempt = 1 + sum(isinstance(e, CompensationAttemptFailed) for e in recorded)
        name = f"compensate {comp.name}"
        while True:
            await self._outlive(seq)
            ok, value, release = await self._attempt(seq, name, call, comp.args, attempt, None)
            release()
            if ok:
                await self.record(
                    [CompensationDone(seq=seq, name=comp.name, step_seq=comp.step_seq)]
                )
                return True
            error_type, message = type(value).__name__, str(value)
            if not policy.retries(value, attempt):
                await self.record(
                    [
                        CompensationFailed(
                            seq=seq,
                            name=comp.name,
                            step_seq=comp.step_seq,
                            error_type=error_type,
                            message=message,
                        )
                    ]
                )
                return False
            await self.record(
                [
                    CompensationAttemptFailed(
                        seq=seq,
                        name=comp.name,
                        step_seq=comp.step_seq,
                        attempt=attempt,
                        error_type=error_type,
                        message=message,
                    )
                ]
            )
            await asyncio.sleep(
                policy.delay(attempt, _jitter(self.history.workflow_id, seq, attempt))
            )
            attempt += 1

    async def _cancel_children(self, reason: str) -> None:
        for events in list(self.history.commands.values()):
            started = _first(events, ChildStarted)
            if started is None or _first(events, ChildDone) is not None:
                continue
            if started.child_id in self.history.children:
                continue
            await self._host(self.host.cancel_child(started.child_id, reason))

    def _check_finished_path(self) -> None:
        later = self.history.recorded(self.seq + 1)
        if later:
            raise self._raise(
                Park(
                    NonDeterminismError(
                        self.history.workflow_id,
                        self.seq + 1,
                        f"{later[0].kind} {later[0].name!r}",
                        "no further command (the workflow ended)",
                    )
                )
            )

    # -- values in and out of history ------------------------------------------------

    def _encode(self, value: Any, what: str) -> Any:
        try:
            return to_builtins(value)
        except CodecError as exc:
            error = UnrecordableValueError(self.history.workflow_id, what, value, str(exc))
            raise self._raise(Park(error)) from None

    def _decode(self, value: Any, type_: Any, what: str) -> Any:
        try:
            return from_builtins(value, type_)
        except CodecError as exc:
            error = RecordedValueError(self.history.workflow_id, what, type_, str(exc))
            raise self._raise(Park(error)) from None

    def _oversize(self, event: Any, what: str) -> ResultTooLargeError | None:
        limit = self.host.max_event_bytes
        if limit is None:
            return None
        size = self.host.encoded_size(event)
        return ResultTooLargeError(what, size, limit) if size > limit else None

    # -- commands -------------------------------------------------------------------

    def _command(self, kind: str, name: str, *, own: bool = False) -> tuple[int, list[Any] | None]:
        if self.fault is not None:
            raise self.fault
        if self.ended and not own:
            raise _Closed()
        self.seq += 1
        recorded = self.history.recorded(self.seq)
        if recorded is not None and (recorded[0].kind != kind or recorded[0].name != name):
            raise self._raise(
                Park(
                    NonDeterminismError(
                        self.history.workflow_id,
                        self.seq,
                        f"{recorded[0].kind} {recorded[0].name!r}",
                        f"{kind} {name!r}",
                    )
                )
            )
        return self.seq, recorded

    def _live(self) -> None:
        """About to act on a command without a recorded outcome."""
        if self.query:
            raise Suspend()
        if self.history.cancel is not None and not self.compensating and not self.shield:
            raise WorkflowCancelled(self.history.cancel.reason)

    async def _host(self, call: Awaitable[T]) -> T:
        """Await a host call; a store fault abandons the pass."""
        try:
            return await call
        except (StoreUnavailableError, StoreClosedError) as exc:
            raise self._raise(Abandon(exc)) from exc

    async def record(self, events: list[Any], runtime: tuple[RuntimeWrite, ...] = ()) -> None:
        """Append ``events`` (after anything buffered) at the history's version.

        Signals, cancellations and children's ends appended meanwhile are folded in
        and the append retried; commands recorded by someone else mean another
        runner: Restart. Store faults abandon the pass.
        """
        async with self.appending:  # concurrent commands of one run append in turn
            await self._record(events, runtime)

    async def _record(self, events: list[Any], runtime: tuple[RuntimeWrite, ...]) -> None:
        batch = [*self.buffer, *events]
        self.buffer = []
        if not batch:
            return
        while True:
            try:
                result = await self._host(self.host.append(self.history, batch, runtime))
            except ConcurrencyError:
                newer = await self._host(self.host.read_after(self.history))
                # Nothing new to see (yet), or commands of another runner: replay
                # from the record rather than append on top of it.
                if not newer or any(not _external(e.data) for e in newer):
                    raise self._raise(Restart()) from None
                self.history.extend(newer)
                continue
            except EventError as exc:  # an event the engine built does not fit the store
                error = UnrecordableValueError(
                    self.history.workflow_id, "an event of this pass", batch[-1], str(exc)
                )
                raise self._raise(Park(error)) from exc
            before = self.history.version
            first = result.version - len(batch) + 1
            for offset, event in enumerate(batch):
                self.history.add(first + offset, event)
            await self._host(self.host.appended(self.history, before))
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
        outcome = _final(recorded, StepDone | StepFailed)
        if isinstance(outcome, StepFailed):
            raise StepFailedError(name, outcome.error_type, outcome.message)
        if isinstance(outcome, StepDone):
            value = self._decode(outcome.result, wanted, f"result of step {name!r} (command {seq})")
        else:
            self._live()
            async with self._acting():
                value = await self._run_step(seq, name, fn, args, retry, timeout, recorded)
                value = self._decode(value, wanted, f"result of step {name!r} (command {seq})")
                # Registered before the command settles: a pass that fails meanwhile
                # waits for it, so a completed step's compensation is never lost.
                if compensate is not None:
                    self.compensations.append(_Compensation(seq, name, compensate, args, value))
            return value
        if compensate is not None:
            self.compensations.append(_Compensation(seq, name, compensate, args, value))
        return value

    async def _run_step(
        self,
        seq: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        retry: RetryPolicy,
        timeout: timedelta | float | None,
        recorded: list[Any] | None,
    ) -> Any:
        """Attempts until one succeeds or the policy gives up; the encoded result,
        recorded before it is returned."""
        # Clock readings the arguments may depend on are durable before the step acts.
        await self.record([])
        attempt = 1 + sum(isinstance(e, StepAttemptFailed) for e in recorded or ())
        seconds = as_seconds(timeout)
        while True:
            await self._outlive(seq)
            ok, value, release = await self._attempt(seq, name, fn, args, attempt, seconds)
            try:
                if ok:
                    return await self._record_result(seq, name, value)
                error_type, message = type(value).__name__, str(value)
                if not retry.retries(value, attempt):
                    failed = StepFailed(seq=seq, name=name, error_type=error_type, message=message)
                    await self.record([failed])
                    raise StepFailedError(name, error_type, message) from value
                await self.record(
                    [
                        StepAttemptFailed(
                            seq=seq,
                            name=name,
                            attempt=attempt,
                            error_type=error_type,
                            message=message,
                        )
                    ]
                )
            finally:
                release()
            await asyncio.sleep(
                retry.delay(attempt, _jitter(self.history.workflow_id, seq, attempt))
            )
            attempt += 1

    async def _record_result(self, seq: int, name: str, value: Any) -> Any:
        encoded = self._encode(value, f"the result of step {name!r} (command {seq})")
        done = StepDone(seq=seq, name=name, result=encoded)
        oversize = self._oversize(done, f"the result of step {name!r}")
        if oversize is not None:
            error_type = type(oversize).__name__
            await self.record(
                [StepFailed(seq=seq, name=name, error_type=error_type, message=str(oversize))]
            )
            raise StepFailedError(name, error_type, str(oversize)) from oversize
        await self.record([done])
        return encoded

    async def _attempt(
        self,
        seq: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        attempt: int,
        timeout: float | None,
    ) -> tuple[bool, Any, Callable[[], None]]:
        """One attempt: (succeeded, value or error, release). A sync attempt keeps
        its thread until ``release`` is called, after its result is recorded: so the
        bodies that finished but whose results are not yet durable never outnumber
        the step threads, and a crash re-runs at most that many."""
        info = StepInfo(self.history.workflow_id, seq, name, attempt)
        token = _current_step.set(info)
        try:
            if not _is_async(fn):
                return await self._attempt_in_thread(info, fn, args, timeout)
            try:
                value = await asyncio.wait_for(fn(*args), timeout)
            except TimeoutError:
                return False, _timed_out(name, attempt, timeout), _nothing
            except Exception as exc:  # noqa: BLE001 - a step failure is data for its retry policy
                return False, exc, _nothing
            return True, value, _nothing
        finally:
            _current_step.reset(token)

    async def _attempt_in_thread(
        self, info: StepInfo, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None
    ) -> tuple[bool, Any, Callable[[], None]]:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        recorded = threading.Event()
        context = contextvars.copy_context()

        def job() -> None:
            outcome: tuple[bool, Any]
            try:
                outcome = (True, context.run(fn, *args))
            except Exception as exc:  # noqa: BLE001 - handed to the retry policy
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(_settle_future, got, outcome)
            except RuntimeError:  # the loop is gone: nobody will record it
                return
            if outcome[0]:
                recorded.wait(RESULT_HOLD_LIMIT)

        work = loop.run_in_executor(self.host.step_pool, job)
        try:
            ok, value = await asyncio.wait_for(asyncio.shield(got), timeout)
        except TimeoutError:
            info._cancel.set()
            recorded.set()
            # Recorded as failed now (visible at once); the next attempt waits for it.
            self.hung[info.seq] = (info, work, timeout)
            return False, _timed_out(info.name, info.attempt, timeout), _nothing
        except BaseException:
            recorded.set()
            raise
        return ok, value, recorded.set

    async def _outlive(self, seq: int) -> None:
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

    async def timer(self, fire_at: Callable[[int], int]) -> None:
        seq, recorded = self._command("timer", "sleep")
        if recorded and any(isinstance(e, TimerFired) for e in recorded):
            return
        self._live()
        now = self.host.now_us()
        if recorded:
            due = recorded[0].fire_at_us
            started: list[Any] = []
        else:
            due = fire_at(now)
            started = [TimerStarted(seq=seq, name="sleep", fire_at_us=due)]
        if now >= due:
            async with self._acting():
                await self.record([*started, TimerFired(seq=seq, name="sleep")])
            return
        raise Suspend(started, due)

    async def signal(self, name: str, type_: Any, timeout: float | None) -> Any:
        seq, recorded = self._command("signal", name)
        for event in recorded or ():
            if isinstance(event, SignalTaken):
                payload = self.history.signal_at(event.signal_version).payload
                return self._decode(payload, type_, f"payload of signal {name!r}")
            if isinstance(event, SignalTimedOut):
                return None
        self._live()
        async with self._acting():
            while (found := self.history.next_signal(name)) is not None:
                version, sent = found
                try:
                    value = from_builtins(sent.payload, type_)
                except CodecError as exc:
                    # Bad input that reached the instance anyway: set aside, visibly;
                    # it never ends the instance, and the wait goes on.
                    reason = f"does not fit {getattr(type_, '__qualname__', type_)}: {exc}"
                    log.warning(
                        "workflow %s: signal %r rejected: %s",
                        self.history.workflow_id,
                        name,
                        reason,
                    )
                    rejected = SignalRejected(
                        seq=seq, name=name, signal_version=version, reason=reason
                    )
                    await self.record([rejected])
                    continue
                await self.record([SignalTaken(seq=seq, name=name, signal_version=version)])
                return value
            now = self.host.now_us()
            waiting = _first(recorded, SignalWaiting)
            new: list[Any] = []
            if waiting is not None:
                deadline = waiting.deadline_us
            else:
                deadline = None if timeout is None else now + int(timeout * 1_000_000)
                new = [
                    SignalWaiting(
                        seq=seq, name=name, deadline_us=deadline, schema=json_schema(type_)
                    )
                ]
            if deadline is not None and now >= deadline:
                await self.record([*new, SignalTimedOut(seq=seq, name=name)])
                return None
        raise Suspend(new, deadline)

    async def child(
        self, workflow: WorkflowDefinition[Any, Any], given: Any, child_id: str | None
    ) -> Any:
        seq, recorded = self._command("child", workflow.name)
        done = _first(recorded, ChildDone)
        if done is not None:
            return self._child_outcome(workflow, done)
        started = _first(recorded, ChildStarted)
        cid = (
            started.child_id
            if started is not None
            else child_id or f"{self.history.workflow_id}.{seq}"
        )
        ended = self.history.children.get(cid)
        if started is not None and ended is not None:
            return self._child_outcome(workflow, ended)
        self._live()
        if started is None:
            async with self._acting():
                # What the child's input depends on is durable before it starts.
                await self.record([])
                await self._host(
                    self.host.start_child(workflow, given, cid, self.history.workflow_id)
                )
                await self.record(
                    [
                        ChildStarted(
                            seq=seq, name=workflow.name, child_id=cid, version=workflow.version
                        )
                    ]
                )
            ended = self.history.children.get(cid)
            if ended is not None:
                return self._child_outcome(workflow, ended)
        # The child tells us when it ends (wf.child_finished, with a nudge): a version
        # check on our wait makes sure that news is never missed.
        raise Suspend([], None, child_id=cid)

    def _child_outcome(
        self, workflow: WorkflowDefinition[Any, Any], done: ChildDone | ChildFinished
    ) -> Any:
        if done.status != "completed":
            raise ChildWorkflowError(
                done.child_id, done.status, done.error_type or "", done.message or ""
            )
        return self._decode(done.result, workflow.output_type, f"result of child {done.child_id!r}")

    def now(self) -> datetime:
        seq, recorded = self._command("now", "now")
        if recorded:
            return from_micros(recorded[0].at_us)
        at = self.host.now_us()
        if not self.query:
            self.buffer.append(Clock(seq=seq, name="now", at_us=at))
        return from_micros(at)


def _first(recorded: list[Any] | None, kind: type[T]) -> T | None:
    for event in recorded or ():
        if isinstance(event, kind):
            return event
    return None


def _final(recorded: list[Any] | None, kinds: Any) -> Any:
    """The event that ended a command (a result, a failure), if recorded."""
    for event in recorded or ():
        if isinstance(event, kinds):
            return event
    return None


def _timed_out(name: str, attempt: int, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"attempt {attempt} of step {name!r} took longer than {timeout}s")


def _external(data: Any) -> bool:
    return isinstance(data, SignalSent | CancelRequested | ChildFinished)


def _keep_async(original: Callable[..., Any], wrapper: Callable[..., Any]) -> Callable[..., Any]:
    if not _is_async(original):
        return wrapper

    async def call(*args: Any) -> Any:
        return await wrapper(*args)

    return call
