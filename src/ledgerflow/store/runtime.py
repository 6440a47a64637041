"""Runtime rows that ride along with appends: workflow instances and their wake-ups;
and the registry of workers, which does not.

A workflow instance's history is its stream; these two small tables are indexes over
it that the runtime needs to find work without scanning the ledger:

- ``workflows``: one row per instance (name, version, status, parent), for listing
  and for the status checks of signals and child workflows.
- ``wakeups``: one row per unfinished instance, saying when it next needs to run
  (``due_at``; None while it waits only for a signal or a child) and which worker
  holds it (``lease_owner`` until ``lease_until``). Workers claim due rows with a
  lease, so many can share one database.

They are written only through ``append(..., runtime=[...])``, in the transaction that
records the events they summarize, and only if that append succeeds: an index can
never disagree with the history it indexes.

- ``tasks``: one row per step sent to a task queue (``ctx.step(fn, queue="erp")``)
  and not yet finished: workers of that queue claim due rows with a lease, run the
  step and record its outcome in the workflow's stream, fenced by the task's lease
  (``TaskFence``). Written with the events they summarize, like the two above.
- ``queues``: optional limits per task queue (``max_concurrent`` across all
  workers), read by every claim.

- ``resources``: one row per external resource guarded by a named policy (its name):
  the circuit breaker's state and counts, and the rate limit's token bucket, shared
  by every worker. Call outcomes are tallied (``Tally``) and the breaker moved
  (``MoveBreaker``) with the events that record them; tokens and half-open probes are
  taken directly (``take_tokens``, ``take_probe``), one small row update each.
- ``permits``: the bulkhead's calls in progress per resource (``acquire_permit``),
  each held by a worker until its outcome is recorded (``DropPermit``), or until it
  expires with a worker that stopped renewing it.

- ``workers``: one row per running engine (``WorkerRow``), kept fresh by its
  heartbeat. It indexes no history: engines write it directly (``register_worker``,
  ``heartbeat_worker``, ``deregister_worker``), and a worker whose heartbeat is older
  than its lease is judged dead by the others (``reap_workers``), whatever host or
  process it ran in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

__all__ = [
    "BREAKER_STATES",
    "RUNTIME_WRITES",
    "DropPermit",
    "DropTask",
    "DropTasks",
    "Fence",
    "InstanceRow",
    "Lease",
    "MoveBreaker",
    "Nudge",
    "PutInstance",
    "PutTask",
    "QueueRow",
    "ResourceRow",
    "RetryTask",
    "RuntimeWrite",
    "Schedule",
    "Tally",
    "TaskFence",
    "TaskLease",
    "TaskRow",
    "Unschedule",
    "WakeupRow",
    "WorkerRow",
    "as_row",
    "makes_work",
]


@dataclass(frozen=True, slots=True)
class InstanceRow:
    workflow_id: str
    name: str
    version: int
    status: str
    parent_id: str | None
    created_at_us: int
    updated_at_us: int


@dataclass(frozen=True, slots=True)
class InstanceQuery:
    """Which instances to list; every field set narrows the list (all: AND)."""

    status: str | None = None
    name: str | None = None
    id_prefix: str | None = None
    """Ids that start with it (a tenant's ``<tenant>/``): a range of the primary key."""
    text: str | None = None
    """A substring of the id (after ``id_prefix``: a tenant's ids are searched as it
    sees them) or of the name, ASCII letters in either case."""
    created_from_us: int | None = None
    """Created at or after (µs since the epoch)."""
    created_before_us: int | None = None
    """Created before (µs since the epoch)."""
    newest_first: bool = False
    """By creation time, newest first (ties by id, descending); else by id."""


@dataclass(frozen=True, slots=True)
class WakeupRow:
    workflow_id: str
    due_at_us: int | None
    lease_owner: str | None
    lease_until_us: int | None
    lease_epoch: int = 0
    """Counts the leases ever given on the instance: each claim (or start with a
    lease) takes the next one. A runner's appends are fenced with it."""


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A running engine, as the ``workers`` table records it. Times are µs since the
    epoch on the database's clock (the engine's ``DatabaseClock``)."""

    worker_id: str
    """The engine's ``owner``: the name its leases carry."""
    host: str
    pid: int
    """For people reading the registry; never used to judge liveness (a pid means
    nothing outside its PID namespace)."""
    queues: tuple[str, ...]
    """Task queues it serves."""
    workflows: tuple[str, ...]
    """The ``name@version`` of each workflow it can run."""
    version: str
    """The ledgerflow version it runs."""
    started_at_us: int
    heartbeat_at_us: int
    lease_us: int
    """Its lease length: with no heartbeat for longer than this, it is dead."""
    in_flight: int
    """Instances running a pass in it at its last heartbeat."""
    stopping: bool = False
    """It is shutting down gracefully: it claims nothing more."""


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A step waiting in (or running from) a task queue, as the ``tasks`` table
    records it. Times are µs on the database's clock."""

    task_id: str
    """``<workflow id>/<seq>``: the command's idempotency key, unique per step."""
    workflow_id: str
    seq: int
    kind: str
    """``step`` or ``compensation``."""
    name: str
    """The step's name: what a worker of the queue looks its function up by."""
    queue: str
    payload: str
    """JSON the runtime reads (arguments, retry policy, timeout); the store keeps
    it as text, byte for byte."""
    due_at_us: int
    attempt: int = 0
    """Attempts started: each claim takes the next one, so an attempt lost with its
    worker counts too (a step that kills its workers runs out of attempts)."""
    lease_owner: str | None = None
    lease_until_us: int | None = None
    lease_epoch: int = 0
    created_at_us: int = 0
    recorded_attempt: int = 0
    """The last attempt whose failure is recorded (or that did not count): those
    after it and before ``attempt`` were lost with their workers, unrecorded."""
    handed_back: bool = False
    """A graceful stop gave an attempt back unfinished since the last recorded
    outcome: it does not count, but its body may have acted (an async body
    cancelled mid-call), so a cancelled workflow waits for the task rather than
    withdraw it."""


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A task queue as a worker or an operator sees it."""

    queue: str
    max_concurrent: int | None
    """Tasks of the queue running at once across all workers; None: no limit."""
    ready: int
    """Due and not running."""
    scheduled: int
    """Due later (a retry's backoff)."""
    running: int
    """Leased and the lease not expired."""


BREAKER_STATES = ("closed", "open", "half_open")


@dataclass(frozen=True, slots=True)
class ResourceRow:
    """A guarded resource's shared state, as the ``resources`` and ``permits`` tables
    hold it. Times are µs on the database's clock."""

    resource: str
    state: str
    """The circuit breaker: ``closed``, ``open`` or ``half_open``."""
    changed_at_us: int
    """When the breaker last moved (0: never)."""
    transitions: int
    """How often it moved: the version of its ledger stream ``breaker-<resource>``."""
    consecutive: int
    """Failures in a row since the last success (or move)."""
    window_start_us: int
    window_calls: int
    window_failures: int
    """Calls and failures counted since ``window_start_us`` (a tumbling window)."""
    probes: int
    """Half-open probes given out since it half-opened."""
    tokens: float | None
    tokens_at_us: int | None
    """The rate limit's bucket: tokens left at ``tokens_at_us`` (None: never used)."""
    permits: int = 0
    """Bulkhead permits held and not expired, as of the read."""


@dataclass(frozen=True, slots=True)
class TaskLease:
    """A claimed task: its id and the epoch of this runner's lease on it."""

    task_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class TaskFence:
    """An append's precondition: ``owner`` still holds the task's lease at ``epoch``
    (the task's runner recording its outcome). As ``Fence`` for an instance: if the
    task was claimed again or dropped (its workflow ended), the append fails with
    ``LeaseLostError`` and writes nothing."""

    task_id: str
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed instance: its id and the epoch of this runner's lease on it."""

    workflow_id: str
    epoch: int
    due_at_us: int | None = field(default=None, compare=False)
    """When it was due, as claimed (how late the claim was); not part of its identity."""


@dataclass(frozen=True, slots=True)
class Fence:
    """An append's precondition: ``owner`` still holds the instance's lease at
    ``epoch``. Checked in the append's transaction; if the lease moved on (another
    runner claimed it, or it was given back), the append fails alone with
    ``LeaseLostError`` and writes nothing. A lease that merely ran out, with nobody
    claiming it since, still passes: no one else has acted on the instance."""

    workflow_id: str
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class PutInstance:
    """Insert or update the instance row (``created_at_us`` is kept on update)."""

    row: InstanceRow


@dataclass(frozen=True, slots=True)
class Schedule:
    """Set the instance's wake-up and lease as given (None owner releases the lease;
    an owner takes the next lease epoch)."""

    workflow_id: str
    due_at_us: int | None
    lease_owner: str | None = None
    lease_until_us: int | None = None

    def __post_init__(self) -> None:
        if (self.lease_owner is None) != (self.lease_until_us is None):
            raise ValueError("a lease needs both an owner and an end, or neither")


@dataclass(frozen=True, slots=True)
class Nudge:
    """Make the instance due no later than ``due_at_us``; the lease is left alone.

    Used by writers other than the instance's runner (signals, cancellation, a child
    finishing): if a worker is running the instance, its next append fails on the
    expected version, it reloads, and sees what caused the nudge.
    """

    workflow_id: str
    due_at_us: int


@dataclass(frozen=True, slots=True)
class Unschedule:
    """The instance finished: it needs no further wake-up."""

    workflow_id: str


@dataclass(frozen=True, slots=True)
class PutTask:
    """Send a step to its queue (kept as it is if the task exists already)."""

    row: TaskRow


@dataclass(frozen=True, slots=True)
class RetryTask:
    """An attempt failed and another follows at ``due_at_us``: the lease is given
    back (its epoch kept) and the backoff holds no worker. ``refund``: the attempt
    never called the step (its resource's breaker or bulkhead refused it), so it
    does not count."""

    task_id: str
    due_at_us: int
    refund: bool = False


@dataclass(frozen=True, slots=True)
class DropTask:
    """The task is done: its outcome is in the workflow's stream."""

    task_id: str


@dataclass(frozen=True, slots=True)
class DropTasks:
    """The workflow ended: the tasks it still had queued are moot."""

    workflow_id: str


@dataclass(frozen=True, slots=True)
class Tally:
    """Count one call's outcome against ``resource``'s breaker: failures in a row,
    and calls and failures in the window of ``window_us`` that holds ``at_us`` (a new
    window starts when the last one is that old)."""

    resource: str
    failed: bool
    at_us: int
    window_us: int


@dataclass(frozen=True, slots=True)
class MoveBreaker:
    """Move ``resource``'s breaker to ``state`` at ``at_us``, its ``transitions``-th
    move: written with the ``breaker-<resource>`` event that records the move, at that
    stream version, so two workers can never both make the same move. Closing or
    opening starts the counts afresh; half-opening keeps them and zeroes the probes."""

    resource: str
    state: str
    at_us: int
    transitions: int


@dataclass(frozen=True, slots=True)
class DropPermit:
    """A bulkhead call is over (its outcome recorded with this): free its permit."""

    resource: str
    holder: str


RuntimeWrite: TypeAlias = (
    PutInstance
    | Schedule
    | Nudge
    | Unschedule
    | PutTask
    | RetryTask
    | DropTask
    | DropTasks
    | Tally
    | MoveBreaker
    | DropPermit
)
RUNTIME_WRITES = (
    PutInstance,
    Schedule,
    Nudge,
    Unschedule,
    PutTask,
    RetryTask,
    DropTask,
    DropTasks,
    Tally,
    MoveBreaker,
    DropPermit,
)


WAKE_AHEAD_US = 1_000_000
"""How far ahead a wake-up still counts as due now, for ``makes_work``: it covers
clocks that differ a little and timers due before a worker's next poll."""


def makes_work(writes: Sequence[RuntimeWrite], now_us: int) -> bool:
    """Whether ``writes`` make an instance or a task claimable by any worker about
    now: a nudge (a signal, a cancellation, a child's end, a task's outcome), an
    unleased wake-up due within ``WAKE_AHEAD_US``, or a task queued or retried that
    soon. A wake-up leased to its writer is that writer's to run."""
    for write in writes:
        if isinstance(write, Nudge):
            return True
        if isinstance(write, PutTask | RetryTask):
            due = write.row.due_at_us if isinstance(write, PutTask) else write.due_at_us
            if due <= now_us + WAKE_AHEAD_US:
                return True
        if (
            isinstance(write, Schedule)
            and write.lease_owner is None
            and write.due_at_us is not None
            and write.due_at_us <= now_us + WAKE_AHEAD_US
        ):
            return True
    return False


def nudged(current: int | None, due_at_us: int) -> int:
    return due_at_us if current is None else min(current, due_at_us)


TASK_COLUMNS = (
    "task_id, workflow_id, seq, kind, name, queue, payload, due_at, attempt, "
    "lease_owner, lease_until, lease_epoch, created_at, recorded_attempt, handed_back"
)
"""The ``tasks`` table's columns in ``TaskRow``'s field order."""


def task_values(r: TaskRow) -> tuple[Any, ...]:
    return (
        r.task_id,
        r.workflow_id,
        r.seq,
        r.kind,
        r.name,
        r.queue,
        r.payload,
        r.due_at_us,
        r.attempt,
        r.lease_owner,
        r.lease_until_us,
        r.lease_epoch,
        r.created_at_us,
        r.recorded_attempt,
        r.handed_back,
    )


RowKind: TypeAlias = Literal[
    "put",
    "schedule",
    "nudge",
    "unschedule",
    "put_task",
    "retry_task",
    "drop_task",
    "drop_tasks",
    "tally",
    "move_breaker",
    "drop_permit",
]


def as_row(write: RuntimeWrite) -> tuple[RowKind, tuple[Any, ...]]:
    """Which statement a SQL backend runs for ``write``, and its parameters in the
    column order of the ``workflows`` / ``wakeups`` / ``tasks`` tables."""
    match write:
        case PutInstance(r):
            return "put", (
                r.workflow_id,
                r.name,
                r.version,
                r.status,
                r.parent_id,
                r.created_at_us,
                r.updated_at_us,
            )
        case Schedule(wid, due, owner, until):
            return "schedule", (wid, due, owner, until)
        case Nudge(wid, due):
            return "nudge", (wid, due)
        case Unschedule(wid):
            return "unschedule", (wid,)
        case PutTask(row):
            return "put_task", task_values(row)
        case RetryTask(tid, due, refund):
            return "retry_task", (due, int(refund), int(refund), tid)
        case DropTask(tid):
            return "drop_task", (tid,)
        case DropTasks(wid):
            return "drop_tasks", (wid,)
        case Tally(resource, failed, at, window):
            return "tally", (resource, int(failed), at, window)
        case MoveBreaker(resource, state, at, transitions):
            return "move_breaker", (resource, state, at, transitions)
        case DropPermit(resource, holder):
            return "drop_permit", (resource, holder)
