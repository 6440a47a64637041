"""What callers hold and read of an instance: its handle, its description, and what
it waits for, in words; and what they read of a worker (``WorkerInfo``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ..hashing import from_micros
from ..store.runtime import WorkerRow
from .history import (
    ChildDone,
    ChildStarted,
    CompensationDone,
    CompensationFailed,
    CompensationScheduled,
    EventReceived,
    EventRefused,
    History,
    MachineCancelling,
    MachineMigrated,
    SignalTaken,
    SignalTimedOut,
    SignalWaiting,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    StepParked,
    StepRetried,
    StepScheduled,
    TimerFired,
    TimerStarted,
    Transitioned,
    TransitionFailed,
    WorkflowStatus,
)

if TYPE_CHECKING:
    from .client import WorkflowClient

__all__ = [
    "QueueInfo",
    "WorkerInfo",
    "WorkflowDescription",
    "WorkflowHandle",
    "open_wait",
    "undo_failed",
    "waiting_for",
]

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
    waiting_signals: tuple[SignalWait, ...] = ()
    """The signals the instance waits for now, each with its payload's JSON Schema."""
    patches: tuple[str, ...] = ()
    """The code changes (``ctx.patched``) whose new path it took."""
    undo_failed: tuple[str, ...] = ()
    """What a ``compensation_failed`` instance left in place: each compensation that
    gave up (its step, and its last error) and each child whose own gave up."""


@dataclass(frozen=True, slots=True)
class SignalWait:
    """A signal an instance waits for: its name, and the JSON Schema a payload must
    fit (None: any payload, or a type without one); a form can be made from it."""

    name: str
    schema: dict[str, Any] | None
    deadline: datetime | None


def signal_waits(history: History) -> tuple[SignalWait, ...]:
    """The open signal waits of an instance, newest first."""
    return tuple(
        SignalWait(
            event.name,
            event.schema,
            None if event.deadline_us is None else _moment(event.deadline_us),
        )
        for events in open_commands(history)
        for event in events
        if isinstance(event, SignalWaiting)
    )


def _moment(us: int) -> datetime | None:
    try:
        return from_micros(us)
    except OverflowError:  # a deadline beyond the year 9999
        return None


WorkerState = Literal["alive", "stopping", "late"]


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A task queue: its limit and its tasks, counted when read."""

    queue: str
    max_concurrent: int | None
    """Most tasks of the queue running at once across all workers; None: no limit."""
    ready: int
    """Due and waiting for a worker of the queue."""
    scheduled: int
    """Due later: failed attempts waiting for their retry."""
    running: int
    """Held by a worker (leased, the lease not expired)."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker (a running ``Engine``, e.g. a ``ledgerflow worker`` process) as the
    store's registry records it, read at ``as_of`` on the database's clock.

    Every engine registers when it starts, heartbeats every third of its lease and
    deregisters when it closes. A worker is ``alive`` while its last heartbeat is
    no older than its lease; past that it is ``late``, and an engine with
    ``takeover`` (the default) soon reaps it: its row goes and its leases are
    released, so its instances resume elsewhere. ``host`` and ``pid`` are for
    people: liveness is judged by the heartbeat alone (a pid means nothing outside
    its PID namespace).
    """

    worker_id: str
    """The engine's ``owner``: the name its leases carry (``host:pid:tag``)."""
    host: str
    pid: int
    queues: tuple[str, ...]
    """The task queues it serves."""
    workflows: tuple[str, ...]
    """The workflows it can run, as ``name@version``."""
    version: str
    """The ledgerflow version it runs."""
    started_at: datetime
    last_heartbeat: datetime
    lease: timedelta
    """Its lease length: how long it may go without a heartbeat."""
    in_flight: int
    """Instances running a pass in it and tasks it is running, at its last heartbeat."""
    stopping: bool
    """It is shutting down gracefully: it claims nothing more."""
    as_of: datetime
    """When the registry was read, on the database's clock."""

    @property
    def heartbeat_age(self) -> timedelta:
        """How long before ``as_of`` it last beat (negative only by clock jitter)."""
        return self.as_of - self.last_heartbeat

    @property
    def alive(self) -> bool:
        """Its last heartbeat is within its lease as of ``as_of``: no one may reap it."""
        return self.heartbeat_age <= self.lease

    @property
    def state(self) -> WorkerState:
        """``late`` if not alive, else ``stopping`` or ``alive``."""
        if not self.alive:
            return "late"
        return "stopping" if self.stopping else "alive"

    @classmethod
    def from_row(cls, row: WorkerRow, as_of_us: int) -> WorkerInfo:
        return cls(
            worker_id=row.worker_id,
            host=row.host,
            pid=row.pid,
            queues=row.queues,
            workflows=row.workflows,
            version=row.version,
            started_at=from_micros(row.started_at_us),
            last_heartbeat=from_micros(row.heartbeat_at_us),
            lease=timedelta(microseconds=row.lease_us),
            in_flight=row.in_flight,
            stopping=row.stopping,
            as_of=from_micros(as_of_us),
        )


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

    async def cancel(self, reason: str | None = None, *, actor: str | None = None) -> None:
        await self.engine.cancel(self.id, reason, actor=actor)

    async def query(self) -> Any:
        return await self.engine.query(self.id)

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"


def open_commands(history: History) -> list[list[Any]]:
    """The recorded commands still without an outcome, newest first (several when
    the code waits on a ``gather``)."""
    done = (
        TimerFired,
        SignalTaken,
        SignalTimedOut,
        ChildDone,
        StepDone,
        StepFailed,
        CompensationDone,
        CompensationFailed,
        Transitioned,
        TransitionFailed,
        EventRefused,
        MachineMigrated,
        MachineCancelling,
    )
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
    """What the instance waits for now, in words (each open command, in order, ``; ``
    between: a gather waits for several); None if it is not waiting."""
    said = [what for events in open_commands(history) if (what := _waiting_on(events))]
    return "; ".join(dict.fromkeys(said)) if said else None


def _waiting_on(events: list[Any]) -> str | None:
    """What one open command waits for, in words."""
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
    # Parked unless an operator's retry came after it.
    latest = next((e for e in reversed(events) if isinstance(e, StepParked | StepRetried)), None)
    parked = latest if isinstance(latest, StepParked) else None
    if parked is not None:
        return (
            f"operator: step {parked.name!r} failed {parked.attempts} time(s): "
            f"{parked.error_type}: {parked.message} (retry, skip or compensate it)"
        )
    first = events[0]
    if isinstance(first, EventReceived):
        return None  # a state machine's turn: its activities' steps say what it waits for
    where = ""
    if isinstance(first, StepScheduled | CompensationScheduled):
        where = f" on task queue {first.queue!r}"
    retried = [i for i, e in enumerate(events) if isinstance(e, StepRetried)]
    since = events[retried[-1] + 1 :] if retried else events
    failures = [e for e in since if isinstance(e, StepAttemptFailed)]
    if failures:
        last = failures[-1]
        when = ""
        if last.retry_at_us is not None:
            when = f" at {from_micros(last.retry_at_us).isoformat()}"
        return (
            f"retry of step {last.name!r}{where}{when} after attempt {last.attempt} "
            f"failed: {last.error_type}: {last.message}"
        )
    if isinstance(first, StepScheduled):
        return f"step {first.name!r}{where}"
    if isinstance(first, CompensationScheduled):
        return f"compensation of step {first.name!r}{where}"
    return None


def open_wait(newest_first: list[Any], name: str) -> SignalWaiting | None:
    """The signal wait for ``name`` that is still open among the latest events (an
    open wait is recent: a wait's outcome is recorded after it)."""
    closed = {e.seq for e in newest_first if isinstance(e, SignalTaken | SignalTimedOut)}
    for event in newest_first:
        if isinstance(event, SignalWaiting) and event.name == name and event.seq not in closed:
            return event
    return None


def undo_failed(history: History) -> tuple[str, ...]:
    """The compensations that gave up, and the children whose undo gave up."""
    said = [
        f"compensation {event.name!r}: {event.error_type}: {event.message}"
        for events in history.commands.values()
        for event in events
        if isinstance(event, CompensationFailed)
    ]
    said.extend(
        f"child {child.child_id}: compensation_failed"
        for child in history.children.values()
        if child.status == WorkflowStatus.COMPENSATION_FAILED
    )
    return tuple(said)
