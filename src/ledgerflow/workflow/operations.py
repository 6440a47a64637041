"""What an operator does to an instance whose step needs a person: retry the step
now, skip it with a given result, or give it up so the workflow compensates
(cancelling is ``WorkflowClient.cancel``). Mixed into ``WorkflowClient``.

Each action is an event in the instance's stream, recorded with who did it and why
(in the event and its metadata), with the instance listed as running again and
nudged, in one append at the stream's version: an action never lands on a history
that moved on since the operator looked.
"""

from __future__ import annotations

import abc
from typing import Any

from ..errors import (
    ConcurrencyError,
    StepNotParkedError,
    StreamNotFoundError,
    WorkflowFinishedError,
    WorkflowInputError,
    WorkflowNotFoundError,
    WorkflowNotStuckError,
)
from ..events import Metadata, RecordedEvent
from ..resilience.book import default_actor
from ..store import WorkflowStore
from ..store.runtime import InstanceRow, Nudge, PutInstance, Schedule
from .codec import CodecError, schema_problems, to_builtins
from .history import (
    TERMINAL,
    Resumed,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    StepParked,
    StepRetried,
    WorkflowStatus,
)
from .rules import INLINE_BACKOFF_S

__all__ = ["Operations", "waiting_steps"]


def waiting_steps(events: list[RecordedEvent]) -> dict[int, Any]:
    """The steps an operator may act on, by seq: parked ones (their ``StepParked``)
    and ones waiting out a backoff (their last ``StepAttemptFailed``)."""
    last: dict[int, Any] = {}
    for event in events:
        data = event.data
        if isinstance(data, StepDone | StepFailed | StepParked | StepRetried | StepAttemptFailed):
            last[data.seq] = data
    return {
        seq: data for seq, data in last.items() if isinstance(data, StepParked | StepAttemptFailed)
    }


def _timed_backoff(data: Any, now_us: int) -> bool:
    """A step waiting out a backoff on a durable timer (no pass runs it meanwhile:
    an in-pass wait is left alone, its attempt is about to start)."""
    return (
        isinstance(data, StepAttemptFailed)
        and data.retry_at_us is not None
        and data.retry_at_us - now_us >= INLINE_BACKOFF_S * 1_000_000
    )


class Operations(abc.ABC):
    """Operator actions on steps; see the module docstring."""

    store: WorkflowStore

    @staticmethod
    @abc.abstractmethod
    def stream_id(workflow_id: str) -> str: ...

    @abc.abstractmethod
    async def _instance(self, workflow_id: str) -> InstanceRow: ...

    @abc.abstractmethod
    def _now_us(self) -> int: ...

    @abc.abstractmethod
    def _poke(self) -> None: ...

    async def retry_step(
        self, workflow_id: str, *, reason: str, actor: str | None = None, seq: int | None = None
    ) -> int:
        """Try the instance's parked step again now, with a fresh set of attempts (a
        step waiting out a backoff is tried at once too). The step's seq."""

        def act(target: Any, who: str) -> Any:
            return StepRetried(seq=target.seq, name=target.name, by=who, reason=reason)

        return await self._operate(workflow_id, "retry", reason, actor, seq, act, parked_only=False)

    async def skip_step(
        self,
        workflow_id: str,
        result: Any = None,
        *,
        reason: str,
        actor: str | None = None,
        seq: int | None = None,
    ) -> int:
        """Record ``result`` as the parked step's result, as if it had returned it
        (the workflow goes on with it; it must fit the step's return type). The
        step's seq."""
        try:
            encoded = to_builtins(result)
        except CodecError as exc:
            raise WorkflowInputError("the skipped step's result", str(exc)) from exc

        def act(target: StepParked, who: str) -> Any:
            if target.result_schema is not None:
                problems = schema_problems(target.result_schema, encoded)
                if problems is not None:
                    raise WorkflowInputError(
                        "the skipped step's result",
                        f"does not fit step {target.name!r}'s return type: {problems}",
                    )
            return StepDone(seq=target.seq, name=target.name, result=encoded)

        return await self._operate(workflow_id, "skip", reason, actor, seq, act, parked_only=True)

    async def compensate(
        self, workflow_id: str, *, reason: str, actor: str | None = None, seq: int | None = None
    ) -> int:
        """Give the parked step up: it fails, with its last error, where the workflow
        awaits it; unless the code catches that, the workflow fails and its
        compensations run. The step's seq."""

        def act(target: StepParked, who: str) -> Any:
            return StepFailed(
                seq=target.seq,
                name=target.name,
                error_type=target.error_type,
                message=f"{target.message} (given up by {who}: {reason})",
                policy=target.policy,
                policy_version=target.policy_version,
            )

        return await self._operate(
            workflow_id, "compensate", reason, actor, seq, act, parked_only=True
        )

    async def resume(self, workflow_id: str, *, reason: str, actor: str | None = None) -> None:
        """Take a stuck instance up again now (its code was missing or broke replay:
        deploy the fix first), rather than when the next engine starts. A worker that
        knows its workflow runs it; if it still cannot, it is parked again."""
        if not isinstance(reason, str) or not reason.strip():
            raise WorkflowInputError(f"resume of workflow {workflow_id!r}", "a reason is required")
        who = actor or default_actor()
        stream = self.stream_id(workflow_id)
        while True:
            # The version first, then the row: a row read after it that says stuck
            # proves no pass moved the instance on since (that would fail the append).
            try:
                version = await self.store.stream_version(stream)
            except StreamNotFoundError:
                raise WorkflowNotFoundError(workflow_id) from None
            row = await self._instance(workflow_id)
            if row.status in TERMINAL:
                raise WorkflowFinishedError(workflow_id, row.status, "resume")
            if row.status != WorkflowStatus.STUCK:
                raise WorkflowNotStuckError(workflow_id, row.status)
            now = self._now_us()
            running = InstanceRow(
                workflow_id, row.name, row.version, WorkflowStatus.RUNNING, row.parent_id, now, now
            )
            try:
                await self.store.append(
                    stream,
                    [Resumed(by=who)],
                    version,
                    metadata=Metadata(actor=who, reason=f"resume: {reason}"),
                    runtime=[PutInstance(running), Schedule(workflow_id, now)],
                )
            except ConcurrencyError:
                continue
            self._poke()
            return

    async def _operate(
        self,
        workflow_id: str,
        action: str,
        reason: str,
        actor: str | None,
        seq: int | None,
        act: Any,
        *,
        parked_only: bool,
    ) -> int:
        if not isinstance(reason, str) or not reason.strip():
            raise WorkflowInputError(
                f"{action} of workflow {workflow_id!r}", "a reason is required"
            )
        who = actor or default_actor()
        stream = self.stream_id(workflow_id)
        while True:
            try:
                events = await self.store.read_stream(stream)
            except StreamNotFoundError:
                raise WorkflowNotFoundError(workflow_id) from None
            row = await self._instance(workflow_id)
            if row.status in TERMINAL:
                raise WorkflowFinishedError(workflow_id, row.status, action)
            now = self._now_us()
            candidates = {
                s: d
                for s, d in waiting_steps(events).items()
                if isinstance(d, StepParked) or (not parked_only and _timed_backoff(d, now))
            }
            if seq is not None:
                candidates = {s: d for s, d in candidates.items() if s == seq}
            if len(candidates) != 1:
                raise StepNotParkedError(workflow_id, action, row.status, sorted(candidates))
            target = next(iter(candidates.values()))
            running = InstanceRow(
                workflow_id, row.name, row.version, WorkflowStatus.RUNNING, row.parent_id, now, now
            )
            try:
                await self.store.append(
                    stream,
                    [act(target, who)],
                    events[-1].version,
                    metadata=Metadata(actor=who, reason=f"{action}: {reason}"),
                    runtime=[PutInstance(running), Nudge(workflow_id, now)],
                )
            except ConcurrencyError:
                continue  # it moved on meanwhile: look again
            self._poke()
            return int(target.seq)
