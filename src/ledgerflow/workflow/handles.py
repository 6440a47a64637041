"""What callers hold and read of an instance: its handle, its description, and what
it waits for, in words."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..hashing import from_micros
from .history import (
    ChildDone,
    ChildStarted,
    History,
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
    from .client import WorkflowClient

__all__ = ["WorkflowDescription", "WorkflowHandle", "open_wait", "waiting_for"]

O = TypeVar("O")  # noqa: E741


@dataclass(frozen=True, slots=True)
class WorkflowDescription:
    """An instance at a glance, for people and tools."""

    workflow_id: str
    name: str
    version: int
    status: str
    parent_id: str | None
    created_at: datetime
    updated_at: datetime
    events: int
    waiting_for: str | None
    result: Any = None
    error: str | None = None
    unconsumed_signals: tuple[str, ...] = ()
    """Signals sent that no wait has taken (yet, or ever: sent after the last wait)."""


class WorkflowHandle(Generic[O]):
    """A started instance, by id; cheap to create, holds no state of its own."""

    def __init__(self, engine: WorkflowClient, workflow_id: str, output_type: Any = Any) -> None:
        self.engine = engine
        self.id = workflow_id
        self._output_type = output_type

    async def result(self, *, timeout: timedelta | float | None = None) -> O:
        """Wait for the instance to end: its result, or ``WorkflowFailedError``."""
        value: O = await self.engine.result(self.id, timeout=timeout, output_type=self._output_type)
        return value

    async def describe(self) -> WorkflowDescription:
        return await self.engine.describe(self.id)

    async def signal(self, name: str, payload: Any = None) -> None:
        await self.engine.signal(self.id, name, payload)

    async def cancel(self, reason: str | None = None) -> None:
        await self.engine.cancel(self.id, reason)

    async def query(self) -> Any:
        return await self.engine.query(self.id)

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"


def open_commands(history: History) -> list[list[Any]]:
    """The recorded commands still without an outcome, newest first (several when
    the code waits on a ``gather``)."""
    done = (TimerFired, SignalTaken, SignalTimedOut, ChildDone, StepDone, StepFailed)
    found = []
    for seq in sorted(history.commands, reverse=True):
        events = history.commands[seq]
        if any(isinstance(e, done) for e in events):
            continue
        started = next((e for e in events if isinstance(e, ChildStarted)), None)
        if started is not None and started.child_id in history.children:
            continue
        found.append(events)
    return found


def waiting_for(history: History) -> str | None:
    """What the instance waits for now, in words; None if it is not waiting."""
    for events in open_commands(history):
        for event in events:
            if isinstance(event, TimerStarted):
                try:
                    return f"timer until {from_micros(event.fire_at_us).isoformat()}"
                except OverflowError:  # a sleep longer than datetime can say
                    return "timer until beyond the year 9999"
            if isinstance(event, SignalWaiting):
                return f"signal {event.name!r}"
            if isinstance(event, ChildStarted):
                return f"child {event.child_id}"
        failures = [e for e in events if isinstance(e, StepAttemptFailed)]
        if failures:
            last = failures[-1]
            return (
                f"retry of step {last.name!r} after attempt {last.attempt} failed: "
                f"{last.error_type}: {last.message}"
            )
    return None


def open_wait(newest_first: list[Any], name: str) -> SignalWaiting | None:
    """The signal wait for ``name`` that is still open among the latest events (an
    open wait is recent: a wait's outcome is recorded after it)."""
    closed = {e.seq for e in newest_first if isinstance(e, SignalTaken | SignalTimedOut)}
    for event in newest_first:
        if isinstance(event, SignalWaiting) and event.name == name and event.seq not in closed:
            return event
    return None
