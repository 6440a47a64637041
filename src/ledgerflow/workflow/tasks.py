"""Steps on task queues: what a task carries, and the runner that serves queues.

``ctx.step(fn, ..., queue="erp")`` records ``StepScheduled`` and, in the same append,
a row in the ``tasks`` table (``store.runtime.PutTask``); the workflow then waits
without holding a worker. A worker serving ``erp`` (``TaskRunner``, part of an
``Engine`` given ``queues`` and ``steps``) claims the row with a lease, looks the
function up by the step's name, runs one attempt, and records what happened in the
workflow's stream, fenced by its lease on the task (``TaskFence``):

- success: ``StepDone``, the task dropped and the workflow nudged, in one append;
- a retryable failure: ``StepAttemptFailed`` and the task due again after the
  policy's backoff (a durable timer: no thread or lease is held meanwhile);
- the last failure: ``StepFailed``, dropped and nudged.

A worker that dies mid-attempt loses its lease; the task is claimed again, at the
next attempt (an attempt lost with its worker counts, so a step that kills its
workers runs out of attempts; the next runner records it, ``AttemptLost``, before
its own). The runner whose lease was taken over records
nothing: its append fails its fence. Compensations sent to a queue go the same way
with ``Compensation*`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import msgspec

from .. import metrics, personal, tracing
from .._waiting import cancel_and_wait
from ..errors import (
    BulkheadFullError,
    CircuitOpenError,
    LeaseLostError,
    PolicyNotFoundError,
    StepTimeoutError,
    StoreClosedError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ..events import NewEvent, StreamState
from ..resilience.book import PolicyBook, PolicyVersion
from ..resilience.guards import Admission, Guards, TokenWait, guarded
from ..resilience.policy import Retry, Timeouts
from ..resilience.retrying import is_retryable, jitter_source
from ..retry import RetryPolicy
from ..store import WorkflowStore
from ..store.runtime import (
    DropTask,
    Nudge,
    PutInstance,
    RetryTask,
    RuntimeWrite,
    TaskFence,
    TaskLease,
    TaskRow,
)
from .codec import CodecError, check_fits, from_builtins, json_schema, to_builtins
from .definition import return_type, step_options
from .history import (
    CompensationAttemptFailed,
    CompensationDone,
    CompensationFailed,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    StepParked,
    StepRetried,
    WorkflowStatus,
    error_message,
)
from .rules import StepRules, attempt_limits, next_attempt_at, retry_document
from .step_threads import StepThreads
from .steps import (
    DEFAULT_STEP_RETRY,
    NO_LIMITS,
    Attempts,
    Limits,
    _current_workflow,
    keep_async,
    nothing,
)

__all__ = ["RemoteRetry", "StepRegistry", "TaskPayload", "TaskRunner", "task_payload"]

log = logging.getLogger("ledgerflow.tasks")

_IDS = uuid.UUID("6c1f0a52-3b6e-4d8a-9a57-0c5b1e7f2d11")
"""Namespace of the ids of the events a task's runner records."""


class RemoteRetry(msgspec.Struct, frozen=True):
    """A ``RetryPolicy`` as data, for the worker that runs the step: exception types
    travel by qualified name, and an error is not retried if its type or any base
    is named."""

    max_attempts: int
    initial_interval: float
    backoff: float
    max_interval: float
    jitter: float
    non_retryable: list[str] = []

    @classmethod
    def of(cls, policy: RetryPolicy) -> RemoteRetry:
        return cls(
            policy.max_attempts,
            policy.initial_interval,
            policy.backoff,
            policy.max_interval,
            policy.jitter,
            [_type_name(t) for t in policy.non_retryable],
        )

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            self.max_attempts, self.initial_interval, self.backoff, self.max_interval, self.jitter
        )

    def retries(self, error: BaseException, attempt: int) -> bool:
        return attempt < self.max_attempts and is_retryable(error, self.non_retryable)


class TaskPayload(msgspec.Struct, frozen=True):
    """What a task row's ``payload`` holds."""

    command: str
    """The command's name in the workflow's history (the events' ``name``)."""
    args: list[Any]
    kwargs: dict[str, Any]
    retry: RemoteRetry
    timeout: float | None = None
    step_seq: int | None = None
    """For a compensation: the seq of the step it undoes."""
    policy: str | None = None
    """The named policy the step runs under, resolved by the worker at each attempt."""
    code_retry: bool = True
    """Whether ``retry`` was given in code (it then wins over the policy's)."""
    traceparent: str | None = None
    """The trace of the pass that sent it: the worker's attempts join it, so a step
    run by another service is part of its workflow's trace."""
    correlation_id: str | None = None
    """The instance's correlation id, for the worker's log lines."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(TaskPayload).decode


def task_payload(
    args: list[Any],
    kwargs: dict[str, Any],
    retry: RetryPolicy,
    timeout: float | None,
    command: str,
    step_seq: int | None = None,
    *,
    policy: str | None = None,
    code_retry: bool = True,
) -> str:
    sending = _current_workflow.get()  # the pass sending it: its instance
    payload = TaskPayload(
        command,
        args,
        kwargs,
        RemoteRetry.of(retry),
        timeout,
        step_seq,
        policy,
        code_retry,
        tracing.current_traceparent(),
        None if sending is None else sending[1],
    )
    return _encode(payload).decode()


def remote_rules(found: PolicyVersion, payload: TaskPayload) -> StepRules:
    """The rules a worker runs a queued step's next attempt under: its named policy's
    version in force, with the retry and timeout given in code winning."""
    policy = found.policy
    if payload.code_retry:
        r = payload.retry
        retry = Retry(
            max_attempts=r.max_attempts,
            initial_interval=r.initial_interval,
            multiplier=r.backoff,
            max_interval=r.max_interval,
            jitter=r.jitter,
            non_retryable=list(r.non_retryable),
        )
    else:
        retry = policy.retry or retry_document(DEFAULT_STEP_RETRY)
    limits = policy.timeout or Timeouts()
    return StepRules(
        retry,
        start_to_close=payload.timeout if payload.timeout is not None else limits.start_to_close,
        schedule_to_close=limits.schedule_to_close,
        heartbeat=limits.heartbeat,
        on_exhausted=policy.on_exhausted,
        policy=found.name,
        policy_version=found.version,
    )


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


class StepRegistry:
    """The step functions a worker can run, by the name tasks carry: a function's
    ``@ledgerflow.step`` name (else its qualified name); for a step object (with
    ``execute`` and ``compensate``), its class's qualified name runs ``execute``
    and ``<name>.compensate`` runs ``compensate``."""

    def __init__(self, steps: Sequence[Any] = ()) -> None:
        self._by_name: dict[str, Callable[..., Any]] = {}
        for step in steps:
            self.add(step)

    def add(self, step: Any) -> None:
        if hasattr(step, "execute") and hasattr(step, "compensate"):
            # As ctx.step names it (unless the call gives name=...).
            self._put(type(step).__qualname__, step.execute)
            self._put(step_options(step.compensate).name, step.compensate)
            return
        if not callable(step):
            raise TypeError(f"a step must be callable, not {type(step).__name__}")
        self._put(step_options(step).name, step)

    def _put(self, name: str, fn: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"a step name must be a non-empty str without NUL, not {name!r}")
        try:
            name.encode()
        except UnicodeEncodeError:
            raise ValueError(f"step name {name!r} is not valid Unicode") from None
        known = self._by_name.get(name)
        if known is not None and known is not fn:
            raise ValueError(f"two steps are named {name!r}: {known!r} and {fn!r}")
        self._by_name[name] = fn

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._by_name))

    def get(self, name: str) -> Callable[..., Any] | None:
        return self._by_name.get(name)

    def __bool__(self) -> bool:
        return bool(self._by_name)


def _arguments(
    fn: Callable[..., Any], args: list[Any], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded arguments converted to ``fn``'s annotations (a dataclass back
    from its JSON form, and so on); CodecError if one does not fit."""
    try:
        hints = typing.get_type_hints(fn)
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (NameError, TypeError, ValueError):
        return tuple(args), dict(kwargs)
    converted = [
        from_builtins(value, hints.get(params[i].name, Any)) if i < len(params) else value
        for i, value in enumerate(args)
    ]
    named = {k: from_builtins(v, hints.get(k, Any)) for k, v in kwargs.items()}
    return tuple(converted), named


class TaskRunner:
    """Claims the tasks of ``queues`` whose steps are in ``steps`` and runs them,
    at most ``concurrency`` at once; ``renew`` (the engine's heartbeat) extends the
    leases of those running."""

    def __init__(
        self,
        store: WorkflowStore,
        *,
        owner: str,
        queues: Sequence[str],
        steps: StepRegistry,
        threads: StepThreads,
        lease_us: int,
        now_us: Callable[[], int],
        stream_id: Callable[[str], str],
        concurrency: int,
        poll_interval: float,
        policies: PolicyBook | None = None,
        guards: Guards | None = None,
    ) -> None:
        self.store = store
        self.policies = policies
        self.guards = guards
        self.owner = owner
        self.queues = tuple(queues)
        self.steps = steps
        self._names = steps.names()
        self.threads = threads
        self.lease_us = lease_us
        self._now_us = now_us
        self._stream_id = stream_id
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self._running: dict[str, tuple[asyncio.Task[None], TaskLease]] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._loop: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def poke(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._serve(), name="ledgerflow-tasks")

    async def stop(self, grace: float) -> None:
        """Claim nothing more; let running attempts finish for ``grace`` seconds and
        cancel the rest (``release`` gives their leases back).

        A sync step's body cannot be stopped: while one still runs after ``grace``,
        the attempts are waited for up to a lease more (the heartbeat renews their
        leases meanwhile), so that a body that returns has its outcome recorded here.
        Cancelled, it ran to its end all the same, and its task, handed back, ran the
        step again elsewhere: a second effect on every deploy. (Half a lease was
        waited for before, then the engine waited for the bodies another half with
        the outcomes of those returning then dropped.)"""
        self._closing = True
        self._wake.set()
        if self._loop is not None:
            await self._loop
        running = [task for task, _ in self._running.values()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            if pending and self.threads.running:
                _, pending = await asyncio.wait(pending, timeout=self.lease_us / 1_000_000)
            await cancel_and_wait(pending)

    async def release(self) -> None:
        """Give back every task lease still held: the tasks are due at once for
        another worker, the unfinished attempts not counted."""
        await self.store.release_tasks(self.owner)

    async def renew(self) -> None:
        held = [lease for _, lease in self._running.values()]
        if not held:
            return
        try:
            kept = await self.store.renew_task_leases(
                self.owner, held, lease_until_us=self._now_us() + self.lease_us
            )
        except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
            log.warning("ledgerflow tasks: cannot renew task leases (%s)", exc)
            return
        for lost in set(held) - set(kept):
            running = self._running.get(lost.task_id)
            if running is None or running[1] != lost:
                continue  # its attempt ended (and gave the task up) during the renewal
            log.warning(
                "task %s: lease %d was taken over; its outcome will not be recorded here",
                lost.task_id,
                lost.epoch,
            )

    async def _serve(self) -> None:
        failures = 0
        while not self._stopping():
            free = self.concurrency - len(self._running)
            claimed: list[TaskRow] = []
            if free > 0:
                now = self._now_us()
                try:
                    claimed = await self.store.claim_tasks(
                        self.owner,
                        queues=self.queues,
                        names=self._names,
                        now_us=now,
                        lease_until_us=now + self.lease_us,
                        limit=free,
                    )
                    failures = 0
                    if claimed:
                        metrics.claimed("task", [now - row.due_at_us for row in claimed])
                except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
                    if self._stopping():
                        return
                    failures += 1
                    log.warning("ledgerflow tasks: cannot claim tasks (%s)", exc)
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                    continue
                except Exception:
                    # A bug, or a refusal no retry cures: say so loudly and keep
                    # serving (a dead loop would leave the queue silently unserved).
                    failures += 1
                    log.exception("ledgerflow tasks: claiming tasks failed")
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                    continue
            for row in claimed:
                lease = TaskLease(row.task_id, row.lease_epoch)
                task = asyncio.create_task(self._run(row), name=f"task:{row.task_id}")
                self._running[row.task_id] = (task, lease)
            if claimed and len(claimed) == free:
                continue  # there may be more: look again at once
            self._wake.clear()
            if self._stopping():
                return
            await self._sleep(full=free <= len(claimed))

    def _stopping(self) -> bool:
        # A method, not the attribute: stop() flips it while the loop awaits.
        return self._closing

    async def _sleep(self, *, full: bool) -> None:
        """Until work may be due: a wake-up (a task queued here or, on PostgreSQL, by
        another process; an attempt ending), the next due task, or a poll."""
        timeout = self.poll_interval
        if not full:
            with contextlib.suppress(StoreUnavailableError, StoreClosedError):
                due = await self.store.next_task_due(queues=self.queues, names=self._names)
                # A task due already but not claimed is held back by its queue's limit
                # (or went to another worker): a task ending pokes us, or we poll.
                if due is not None and due > self._now_us():
                    timeout = min(timeout, (due - self._now_us()) / 1_000_000)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _run(self, row: TaskRow) -> None:
        try:
            await self._attempt(row)
        except Exception:
            # A bug or an unexpected failure: the lease runs out and the task is
            # claimed again then (at its next attempt); nothing recorded is lost.
            log.exception("task %s: attempt failed unexpectedly", row.task_id)
        finally:
            self._running.pop(row.task_id, None)
            self._wake.set()  # a slot is free

    async def _attempt(self, row: TaskRow) -> None:
        fence = TaskFence(row.task_id, self.owner, row.lease_epoch)
        try:
            payload = _decode(row.payload)
        except msgspec.DecodeError as exc:
            await self._finish(row, fence, None, False, f"its payload is unreadable: {exc}")
            return
        # In the trace of the pass that sent it, the attempt and what it records
        # (the outcome's events carry that trace on to the relay); its log lines
        # carry the instance's correlation id, as in the sending worker.
        token = _current_workflow.set((row.workflow_id, payload.correlation_id))
        try:
            with tracing.joined(payload.traceparent):
                await self._attempt_in_trace(row, fence, payload)
        finally:
            _current_workflow.reset(token)

    async def _attempt_in_trace(self, row: TaskRow, fence: TaskFence, payload: TaskPayload) -> None:
        fn = self.steps.get(row.name)
        if fn is None:  # claims ask for known names only
            log.error("task %s: no step named %r here", row.task_id, row.name)
            return
        if not await self._record_lost(row, fence, payload):
            return
        found, rules, failure = await self._rules(row, payload)
        most = rules.retry.max_attempts if rules is not None else payload.retry.max_attempts
        if row.attempt > most:
            await self._finish(
                row,
                fence,
                payload,
                False,
                f"attempt {row.attempt - 1} was lost with its worker and no attempts are left",
                "TaskLostError",
                rules=rules,
            )
            return
        try:
            args, kwargs = _arguments(fn, payload.args, payload.kwargs)
        except CodecError as exc:
            await self._finish(
                row,
                fence,
                payload,
                False,
                f"the recorded arguments do not fit: {exc}",
                "RecordedValueError",
                rules=rules,
            )
            return
        call: Callable[..., Any] = fn
        if kwargs:  # a compensation's result=: as the saga calls it in process

            def call(*a: Any, _fn: Callable[..., Any] = fn, _kw: dict[str, Any] = kwargs) -> Any:
                return _fn(*a, **_kw)

            call = keep_async(fn, call)

        limits = NO_LIMITS if payload.timeout is None else Limits(payload.timeout)
        if rules is not None:
            # The step's deadlines count from when it was first sent (the task's row).
            limits = attempt_limits(rules, row.created_at_us, self._now_us())
            if failure is None and limits.timeout is not None and limits.timeout <= 0:
                failure = StepTimeoutError(
                    payload.command, row.attempt, limits.kind, limits.shown or 0.0
                )
        admission: Admission | None = None
        refusal: BaseException | None = None
        if failure is None and found is not None and guarded(found.policy):
            admission, refusal = await self._admit(found, row)
        value: Any
        if failure is not None:
            ok, value, release = False, failure, nothing
        elif refusal is not None:
            ok, value, release = False, refusal, nothing
        else:
            attempts = Attempts(row.workflow_id, self.threads)
            ok, value, release = await attempts.run(
                row.seq,
                payload.command,
                call,
                args,
                row.attempt,
                limits,
                kind="compensation" if row.kind == "compensation" else "step",
                remote=True,
            )
            if not ok and row.seq in attempts.hung:
                # A sync body past its timeout cannot be stopped and still runs (its
                # cancelled flag is set). Its outcome waits for it: until then its
                # permit, its queue slot and the task's lease stay taken, so bulkheads
                # and queue limits hold, and the next attempt, here or on another
                # worker, never runs beside it.
                await attempts.outlive(row.seq)
        writes: tuple[RuntimeWrite, ...] = ()
        if admission is not None and self.guards is not None:
            writes = self.guards.outcome_writes(admission, None if ok else value)
        try:
            if ok:
                try:
                    encoded = to_builtins(value)
                    if row.kind == "step":
                        # What the workflow could not read back is not recorded as
                        # its result (its every replay would stop there).
                        check_fits(encoded, return_type(fn), "step's")
                except CodecError as exc:
                    await self._finish(
                        row,
                        fence,
                        payload,
                        False,
                        f"its result cannot be recorded: {exc}",
                        "UnrecordableValueError",
                        rules=rules,
                        extra=writes,
                    )
                    return
                await self._finish(row, fence, payload, True, encoded, rules=rules, extra=writes)
                await self._settle(found, admission, None, row)
                return
            error_type, message = type(value).__name__, error_message(value)
            if rules is not None:
                await self._after_failure(
                    row, fence, payload, rules, value, refused=refusal is not None, writes=writes
                )
                await self._settle(found, admission, value, row)
                return
            if payload.retry.retries(value, row.attempt):
                delay = payload.retry.policy().delay(
                    row.attempt, jitter_source(row.workflow_id, row.seq, row.attempt)
                )
                failed = self._attempt_failed(row, payload, error_type, message)
                metrics.step_retry(payload.command)
                due = self._now_us() + int(delay * 1_000_000)
                await self._record(row, fence, [failed], [RetryTask(row.task_id, due)])
                return
            await self._finish(row, fence, payload, False, message, error_type)
        finally:
            release()

    async def _rules(
        self, row: TaskRow, payload: TaskPayload
    ) -> tuple[PolicyVersion | None, StepRules | None, BaseException | None]:
        """The named policy of a queued step (its version in force now), the rules it
        makes, and why the attempt may not run (no such policy: a retryable failure
        under the default retry, so a policy set meanwhile is picked up)."""
        if payload.policy is None or row.kind != "step" or self.policies is None:
            return None, None, None
        try:
            found = await self.policies.current(payload.policy)
        except PolicyNotFoundError as exc:
            return None, None, exc
        return found, remote_rules(found, payload), None

    async def _admit(
        self, found: PolicyVersion, row: TaskRow
    ) -> tuple[Admission | None, BaseException | None]:
        """Pass the resource's guards; a wait for a token is made here (the task's
        lease is renewed meanwhile)."""
        assert self.guards is not None
        call = f"{row.task_id}/{row.attempt}"
        while True:
            try:
                return await self.guards.admit(found, call), None
            except (CircuitOpenError, BulkheadFullError) as refused:
                return None, refused
            except TokenWait as wait:
                left = (wait.until_us - self._now_us()) / 1_000_000
                await asyncio.sleep(min(1.0, max(0.001, left)))

    async def _settle(
        self,
        found: PolicyVersion | None,
        admission: Admission | None,
        error: BaseException | None,
        row: TaskRow,
    ) -> None:
        if found is None or admission is None or self.guards is None:
            return
        if self.guards.needs_settling(admission, error):
            try:
                await self.guards.settle(found, admission, error, row.workflow_id)
            except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
                log.warning(
                    "task %s: the breaker's move is left to the next call (%s)", row.task_id, exc
                )

    async def _after_failure(
        self,
        row: TaskRow,
        fence: TaskFence,
        payload: TaskPayload,
        rules: StepRules,
        error: BaseException,
        *,
        refused: bool,
        writes: tuple[RuntimeWrite, ...],
    ) -> None:
        """A failed (or refused) attempt of a step under a named policy: the next
        one is due (a refused one not counted), or the step is parked for an
        operator, or it fails."""
        error_type, message = type(error).__name__, error_message(error)
        at, why_not = next_attempt_at(
            rules,
            error,
            now_us=self._now_us(),
            workflow_id=row.workflow_id,
            seq=row.seq,
            attempt=row.attempt,
            first_at_us=row.created_at_us,
            refused=refused,
        )
        if at is not None:
            failed = StepAttemptFailed(
                seq=row.seq,
                name=payload.command,
                attempt=row.attempt,
                error_type=error_type,
                message=message,
                retry_at_us=at,
                first_at_us=row.created_at_us,
                policy=rules.policy,
                policy_version=rules.policy_version,
                refused=refused,
            )
            metrics.step_retry(payload.command)
            await self._record(
                row, fence, [failed], [RetryTask(row.task_id, at, refund=refused), *writes]
            )
            return
        if rules.on_exhausted == "park" and rules.retryable(error):
            instance = await self.store.get_instance(row.workflow_id)
            fn = self.steps.get(row.name)
            parked = StepParked(
                seq=row.seq,
                name=payload.command,
                attempts=row.attempt,
                error_type=error_type,
                message=message,
                policy=rules.policy,
                policy_version=rules.policy_version,
                result_schema=None if fn is None else json_schema(return_type(fn)),
            )
            runtime: list[RuntimeWrite] = [DropTask(row.task_id), *writes]
            if instance is not None:
                now = self._now_us()
                runtime.append(
                    PutInstance(
                        replace(
                            instance,
                            status=WorkflowStatus.NEEDS_ATTENTION,
                            updated_at_us=now,
                        )
                    )
                )
            log.warning(
                "task %s: step %r used up its attempts (%s: %s); parked for an operator",
                row.task_id,
                payload.command,
                error_type,
                message,
            )
            await self._record(row, fence, [parked], runtime)
            return
        shown = f"{message} ({why_not})" if why_not else message
        await self._finish(row, fence, payload, False, shown, error_type, rules=rules, extra=writes)

    async def _record_lost(self, row: TaskRow, fence: TaskFence, payload: TaskPayload) -> bool:
        """Record the attempts lost with their workers since the last one recorded,
        before this one runs: the history then says the step may have run more
        often than its outcomes show. False if the lease is gone meanwhile.

        The row suspects them (``recorded_attempt``); the history decides, so that a
        failure recorded by a worker of an older release, which did not keep that
        column, is not taken for a loss. Each is an append of its own, under an id
        of its attempt: a later claim that finds it unrecorded in the row too (this
        attempt lost as well) stores it once."""
        suspected = range(row.recorded_attempt + 1, row.attempt)
        if not suspected:
            return True
        recorded: set[int] = set()
        kinds = (StepAttemptFailed, CompensationAttemptFailed)
        for event in await self.store.read_stream(self._stream_id(row.workflow_id)):
            data = event.data
            if isinstance(data, StepRetried) and data.seq == row.seq:
                recorded.clear()  # an operator's retry: its attempts count afresh
            elif isinstance(data, kinds) and data.seq == row.seq:
                recorded.add(data.attempt)
        for attempt in suspected:
            if attempt in recorded:
                continue
            message = (
                f"attempt {attempt} was lost with its worker: its lease ran out before an "
                "outcome was recorded (the step may have run)"
            )
            lost = self._attempt_failed(
                replace(row, attempt=attempt), payload, "AttemptLost", message
            )
            log.warning("task %s: %s", row.task_id, message)
            if not await self._record(row, fence, [lost], [], key=f"lost/{attempt}"):
                return False
        return True

    def _attempt_failed(
        self, row: TaskRow, payload: TaskPayload, error_type: str, message: str
    ) -> Any:
        if row.kind == "compensation":
            return CompensationAttemptFailed(
                seq=row.seq,
                name=payload.command,
                step_seq=payload.step_seq or 0,
                attempt=row.attempt,
                error_type=error_type,
                message=message,
            )
        return StepAttemptFailed(
            seq=row.seq,
            name=payload.command,
            attempt=row.attempt,
            error_type=error_type,
            message=message,
        )

    async def _finish(
        self,
        row: TaskRow,
        fence: TaskFence,
        payload: TaskPayload | None,
        ok: bool,
        value: Any,
        error_type: str = "TaskError",
        *,
        rules: StepRules | None = None,
        extra: Sequence[RuntimeWrite] = (),
    ) -> None:
        """Record the task's outcome, drop it and nudge its workflow, in one append
        (with ``extra`` writes: a guarded call's tally and permit)."""
        policy = rules.policy if rules is not None else None
        version = rules.policy_version if rules is not None else None
        name = payload.command if payload is not None else row.name
        step_seq = (payload.step_seq if payload is not None else None) or 0
        event: Any
        if row.kind == "compensation":
            if ok:
                event = CompensationDone(seq=row.seq, name=name, step_seq=step_seq)
            else:
                event = CompensationFailed(
                    seq=row.seq, name=name, step_seq=step_seq, error_type=error_type, message=value
                )
        elif ok:
            event = StepDone(
                seq=row.seq, name=name, result=value, policy=policy, policy_version=version
            )
            limit = self.store.max_event_bytes
            size = len(self.store.registry.encode(event, sealer=personal.SIZING).data)
            if size > limit:
                message = (
                    f"the result of step {name!r} is {size} bytes encoded; the store takes "
                    f"at most {limit}"
                )
                event = StepFailed(
                    seq=row.seq, name=name, error_type="ResultTooLargeError", message=message
                )
        else:
            event = StepFailed(
                seq=row.seq,
                name=name,
                error_type=error_type,
                message=value,
                policy=policy,
                policy_version=version,
            )
        runtime: list[RuntimeWrite] = [
            Nudge(row.workflow_id, self._now_us()),
            DropTask(row.task_id),
            *extra,
        ]
        await self._record(row, fence, [event], runtime)

    async def _record(
        self,
        row: TaskRow,
        fence: TaskFence,
        events: list[Any],
        runtime: list[RuntimeWrite],
        *,
        key: str | None = None,
    ) -> bool:
        """Append to the workflow's stream while the lease holds; a store fault is
        retried (the lease is renewed meanwhile), a lost lease ends it quietly.
        Whether it was stored (or had been: a repeat of ``key``'s append)."""
        stream = self._stream_id(row.workflow_id)
        registry = self.store.registry
        ids = row.lease_epoch if key is None else key
        # Ids of our own, one set per lease of this row (a step an operator retries is
        # sent again as a new row, with leases counted afresh): an append retried
        # after a fault that left it unknown whether it was stored is stored once.
        with_ids = [
            NewEvent(
                registry.name_of(type(event)),
                msgspec.to_builtins(event),
                id=uuid.uuid5(_IDS, f"{row.task_id}/{row.created_at_us}/{ids}/{i}"),
            )
            for i, event in enumerate(events)
        ]
        failures = 0
        while True:
            try:
                await self.store.append(
                    stream, with_ids, StreamState.STREAM_EXISTS, runtime=runtime, fence=fence
                )
                return True
            except LeaseLostError as exc:
                metrics.lease_lost("task")
                log.warning("task %s: not recorded: %s", row.task_id, exc)
                return False
            except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
                failures += 1
                if self._closing and isinstance(exc, StoreClosedError):
                    return False
                if failures > 8:
                    log.error(
                        "task %s: cannot record its outcome (%s); it runs again once its "
                        "lease expires",
                        row.task_id,
                        exc,
                    )
                    return False
                await asyncio.sleep(min(5.0, 0.05 * 2**failures))
