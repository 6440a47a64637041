"""Sagas: a failed or cancelled workflow's compensations, run in reverse order of
the steps they undo, here or on a task queue.

``Saga`` is the part of a pass (``run._Pass``) that runs them; it shares the pass's
state and commands, and is a module of its own only to keep each one readable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .. import metrics
from ..resilience.retrying import jitter_source
from ..retry import RetryPolicy
from ..store.runtime import PutTask, RuntimeWrite, TaskRow
from .codec import to_builtins
from .definition import step_options
from .history import (
    ChildDone,
    ChildrenCancelled,
    ChildStarted,
    CompensationAttemptFailed,
    CompensationDone,
    CompensationFailed,
    CompensationScheduled,
    Finished,
    History,
    StepDone,
    StepFailed,
    StepParked,
    StepScheduled,
    WorkflowStatus,
    error_message,
)
from .host import PassResult, RunHost, Suspend
from .steps import DEFAULT_COMPENSATION_RETRY, Attempts, accepts_result, keep_async
from .tasks import task_payload

if TYPE_CHECKING:
    from .run import _Acting

__all__ = ["Compensation", "Saga"]

T = TypeVar("T")


@dataclass
class Compensation:
    step_seq: int
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    result: Any
    queue: str | None = None
    """The task queue it runs on (its own, else its step's); None: here."""


class Saga:
    """Compensations of one pass; mixed into ``run._Pass``, whose state it uses."""

    host: RunHost
    history: History
    query: bool
    compensations: list[Compensation]
    compensating: bool
    acting: _Acting
    attempts: Attempts

    if TYPE_CHECKING:

        def _command(
            self, kind: str, name: str, *, own: bool = False
        ) -> tuple[int, list[Any] | None]: ...

        async def record(
            self, events: list[Any], runtime: tuple[RuntimeWrite, ...] = ()
        ) -> None: ...

        def _encode(self, value: Any, what: str) -> Any: ...

        def _task_row(
            self, seq: int, kind: str, name: str, queue: str, payload: str
        ) -> TaskRow: ...

        def _check_finished_path(self, failure: tuple[str, str] | None = None) -> None: ...

        unreadable: bool

        def _finish(self, finished: Finished) -> PassResult: ...

        async def _host(self, call: Awaitable[T]) -> T: ...

    async def _fail(self, failure: tuple[str, str], cancelled: bool) -> PassResult:
        error_type, message = failure
        self.compensating = True
        if not self.query:
            why = f"parent cancelled: {message}" if cancelled else f"parent failed: {message}"
            await self._end_children(why, cancelled)
            await self._end_tasks()
        ran, gave_up = await self._undo(self.compensations)
        if not self.unreadable:
            self._check_finished_path(None if cancelled else failure)
        # The parent's end reports the whole saga: a child whose own compensations
        # gave up left effects in place, however the parent's went.
        undone = self.history.children.values()
        if any(child.status == WorkflowStatus.COMPENSATION_FAILED for child in undone):
            gave_up = True
        if gave_up:
            status = WorkflowStatus.COMPENSATION_FAILED
        elif ran:
            status = WorkflowStatus.COMPENSATED
        else:
            status = WorkflowStatus.CANCELLED if cancelled else WorkflowStatus.FAILED
        return self._finish(Finished(status=status, error_type=error_type, message=message))

    async def _undo(self, compensations: list[Compensation]) -> tuple[bool, bool]:
        """Run ``compensations`` newest first, each a command of its own (what is
        recorded is replayed, not run again); whether any ran, and whether any gave
        up. A compensation on a task queue ends the pass until it is done."""
        gave_up = False
        ran = False
        for comp in reversed(compensations):
            seq, recorded = self._command("compensation", comp.name, own=True)
            ran = True
            final = _final(recorded, CompensationDone | CompensationFailed)
            if final is not None:
                gave_up = gave_up or isinstance(final, CompensationFailed)
                continue
            if self.query:
                raise Suspend()  # replay checked what is recorded; acting is not its part
            if comp.queue is not None or (
                recorded and isinstance(recorded[0], CompensationScheduled)
            ):
                await self._remote_compensation(seq, comp, recorded)
            with self.acting:
                if not await self._compensate(seq, comp, recorded or []):
                    gave_up = True
        return ran, gave_up

    async def _remote_compensation(
        self, seq: int, comp: Compensation, recorded: list[Any] | None
    ) -> None:
        """Send the compensation to its queue, if not yet sent, and wait for its
        outcome (the caller then finds it recorded, on a later pass)."""
        if not recorded:
            assert comp.queue is not None
            kwargs = {"result": to_builtins(comp.result)} if accepts_result(comp.fn) else {}
            with self.acting:
                arguments = self._encode(list(comp.args), f"the arguments of {comp.name!r}")
                payload = task_payload(
                    arguments, kwargs, _retry_of(comp), None, comp.name, comp.step_seq
                )
                target = step_options(comp.fn).name
                row = self._task_row(seq, "compensation", target, comp.queue, payload)
                scheduled = CompensationScheduled(
                    seq=seq, name=comp.name, step_seq=comp.step_seq, queue=comp.queue
                )
                await self.record([scheduled], (PutTask(row),))
        raise Suspend()

    async def _compensate(self, seq: int, comp: Compensation, recorded: list[Any]) -> bool:
        call: Callable[..., Any] = comp.fn
        if accepts_result(comp.fn):

            def call(*a: Any, _fn: Callable[..., Any] = comp.fn, _r: Any = comp.result) -> Any:
                return _fn(*a, result=_r)

            call = keep_async(comp.fn, call)
        await self.record([])
        policy = _retry_of(comp)
        attempt = 1 + sum(isinstance(e, CompensationAttemptFailed) for e in recorded)
        while True:
            await self.attempts.outlive(seq)
            ok, value, release = await self.attempts.run(
                seq, comp.name, call, comp.args, attempt, kind="compensation"
            )
            release()
            if ok:
                await self.record(
                    [CompensationDone(seq=seq, name=comp.name, step_seq=comp.step_seq)]
                )
                return True
            error_type, message = type(value).__name__, error_message(value)
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
            metrics.step_retry(f"compensate {comp.name}")
            await asyncio.sleep(
                policy.delay(attempt, jitter_source(self.history.workflow_id, seq, attempt))
            )
            attempt += 1

    async def _end_tasks(self) -> None:
        """Withdraw the steps sent to task queues that no worker has claimed (they
        never run), and wait for the outcome of those one has: they run now, or ran
        in an attempt lost with its worker and run again, and a step that completes
        is compensated with the others."""
        claimed = False
        for seq, events in list(self.history.commands.items()):
            if not events or not isinstance(events[0], StepScheduled):
                continue
            if isinstance(events[-1], StepDone | StepFailed | StepParked):
                continue  # ended, or parked (its task dropped)
            task_id = f"{self.history.workflow_id}/{seq}"
            if not await self._host(self.host.withdraw_task(task_id)):
                claimed = True
        if claimed:
            raise Suspend()

    async def _end_children(self, reason: str, cancelled: bool) -> None:
        """Cancel the children still running and wait until each has ended, its own
        compensations done, before this instance's run: they undo what the parent
        did before starting them, and the parent's end must mean the whole saga is
        undone. Each child's end wakes the parent (``wf.child_finished``); the wait
        is no command, so replay, which never acts, does not take it."""
        running = [
            started.child_id
            for events in list(self.history.commands.values())
            if (started := _first(events, ChildStarted)) is not None
            and _first(events, ChildDone) is None
            and started.child_id not in self.history.children
        ]
        if running and not cancelled and self.history.ending_version is None:
            # Recorded before any child is asked: their ends come after it, and every
            # later pass fails with this failure, not with a sibling's cancellation
            # (a cancel is its own such mark).
            await self.record([ChildrenCancelled(reason=reason)])
        for child_id in running:
            await self._host(self.host.cancel_child(child_id, reason))
        if running:
            raise Suspend([], None, child_id=running[0])


def _first(recorded: list[Any] | None, kind: type[T]) -> T | None:
    for event in recorded or ():
        if isinstance(event, kind):
            return event
    return None


def _retry_of(comp: Compensation) -> RetryPolicy:
    """A compensation's own ``@ledgerflow.step(retry=...)``, else the default."""
    return step_options(comp.fn).retry or DEFAULT_COMPENSATION_RETRY


def _last(recorded: list[Any] | None, kind: type[T]) -> T | None:
    for event in reversed(recorded or ()):
        if isinstance(event, kind):
            return event
    return None


def _final(recorded: list[Any] | None, kinds: Any) -> Any:
    """The event that ended a command (a result, a failure), if recorded."""
    for event in recorded or ():
        if isinstance(event, kinds):
            return event
    return None
