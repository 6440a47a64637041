"""Checks of what callers hand a store, made before anything is queued: the writer
commits many callers' requests in one transaction, where a value the database
rejects would fail all of them instead of the one caller who sent it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime

from ..errors import InvalidEventDataError
from ..events import ExpectedVersion, StreamState
from ..hashing import to_micros
from .runtime import (
    BREAKER_STATES,
    DropPermit,
    DropTask,
    DropTasks,
    Fence,
    InstanceRow,
    MoveBreaker,
    Nudge,
    PutInstance,
    PutTask,
    RetryTask,
    RuntimeWrite,
    Schedule,
    Tally,
    TaskFence,
    TaskLease,
    TaskRow,
    Unschedule,
    WorkerRow,
)

MAX_STREAM_ID_LENGTH = 255

# Bounds of the columns that hold these numbers (PostgreSQL integer and bigint), so that
# every backend refuses the same values, up front.
_MAX_INT32 = 2**31 - 1
_MAX_INT64 = 2**63 - 1

# Everything a request carries is checked here, before it is queued: the writer
# commits many callers' requests in one transaction, where a value the database
# rejects would fail all of them instead of the one caller who sent it.


def _invalid(reason: str, event_type: str = "", schema_version: int = 0) -> InvalidEventDataError:
    return InvalidEventDataError(event_type, schema_version, reason)


def _text_problem(value: object, what: str) -> str | None:
    """Why ``value`` cannot be stored as text by every backend; None if it can."""
    if type(value) is str and value.isascii() and "\x00" not in value:
        return None  # the common case, without encoding: ASCII holds no surrogate
    if not isinstance(value, str):
        return f"{what} must be a str, not {type(value).__name__} {value!r:.60}"
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it everywhere alike.
        return f"{what} must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} is not valid Unicode (it holds a lone surrogate): {value!r:.60}"
    return None


def _check_text(value: object, what: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    problem = _text_problem(value, what)
    if problem is not None:
        raise _invalid(problem)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_int(value: object, what: str, low: int, high: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value, low, high):
        raise _invalid(f"{what} must be an int from {low} to {high}, not {value!r:.60}")


def _check_target(stream_id: str, expected: ExpectedVersion) -> None:
    if isinstance(stream_id, str) and not stream_id:
        raise _invalid("stream id must be a non-empty string")
    _check_text(stream_id, "stream id")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise _invalid(f"stream id is longer than {MAX_STREAM_ID_LENGTH} characters")
    if not isinstance(expected, StreamState) and not _is_int(expected, 0, _MAX_INT64):
        raise _invalid(f"expected version must be an int >= 0 or a StreamState, not {expected!r}")


def _check_instance(row: object) -> None:
    if not isinstance(row, InstanceRow):
        raise _invalid(f"PutInstance needs an InstanceRow, not {type(row).__name__}")
    _check_text(row.workflow_id, "InstanceRow.workflow_id")
    _check_text(row.name, "InstanceRow.name")
    _check_int(row.version, "InstanceRow.version", 0, _MAX_INT32)
    _check_text(row.status, "InstanceRow.status")
    _check_text(row.parent_id, "InstanceRow.parent_id", optional=True)
    _check_int(row.created_at_us, "InstanceRow.created_at_us", -_MAX_INT64, _MAX_INT64)
    _check_int(row.updated_at_us, "InstanceRow.updated_at_us", -_MAX_INT64, _MAX_INT64)


def _plain_text(value: object) -> bool:
    # isinstance, not type(): a StrEnum member (a status) is text too.
    return isinstance(value, str) and value.isascii() and "\x00" not in value


def _plain_micros(value: object) -> bool:
    return type(value) is int and -_MAX_INT64 <= value <= _MAX_INT64


def _surely_valid(write: object) -> bool:
    """The writes the engine makes, recognized cheaply (every append carries some);
    anything else gets the checks that say what is wrong."""
    if isinstance(write, Nudge):
        return _plain_text(write.workflow_id) and _plain_micros(write.due_at_us)
    if isinstance(write, Unschedule):
        return _plain_text(write.workflow_id)
    if isinstance(write, Schedule):
        return (
            _plain_text(write.workflow_id)
            and (write.due_at_us is None or _plain_micros(write.due_at_us))
            and write.lease_owner is None
            and write.lease_until_us is None
        )
    if isinstance(write, PutInstance):
        row = write.row
        return (
            type(row) is InstanceRow
            and _plain_text(row.workflow_id)
            and _plain_text(row.name)
            and type(row.version) is int
            and 0 <= row.version <= _MAX_INT32
            and _plain_text(row.status)
            and (row.parent_id is None or _plain_text(row.parent_id))
            and _plain_micros(row.created_at_us)
            and _plain_micros(row.updated_at_us)
        )
    return False


def _check_runtime_write(write: object) -> None:
    if _surely_valid(write):
        return
    micros = (-_MAX_INT64, _MAX_INT64)
    match write:
        case PutInstance():
            _check_instance(write.row)
        case Schedule():
            _check_text(write.workflow_id, "Schedule.workflow_id")
            _check_int(write.due_at_us, "Schedule.due_at_us", *micros, optional=True)
            _check_text(write.lease_owner, "Schedule.lease_owner", optional=True)
            _check_int(write.lease_until_us, "Schedule.lease_until_us", *micros, optional=True)
            if (write.lease_owner is None) != (write.lease_until_us is None):
                raise _invalid("Schedule needs both lease_owner and lease_until_us, or neither")
        case Nudge():
            _check_text(write.workflow_id, "Nudge.workflow_id")
            _check_int(write.due_at_us, "Nudge.due_at_us", *micros)
        case Unschedule():
            _check_text(write.workflow_id, "Unschedule.workflow_id")
        case PutTask():
            _check_task_row(write.row)
        case RetryTask():
            _check_text(write.task_id, "RetryTask.task_id")
            _check_int(write.due_at_us, "RetryTask.due_at_us", *micros)
            if not isinstance(write.refund, bool):
                raise _invalid(f"RetryTask.refund must be a bool, not {write.refund!r:.40}")
        case DropTask():
            _check_text(write.task_id, "DropTask.task_id")
        case DropTasks():
            _check_text(write.workflow_id, "DropTasks.workflow_id")
        case Tally():
            _check_text(write.resource, "Tally.resource")
            if not isinstance(write.failed, bool):
                raise _invalid(f"Tally.failed must be a bool, not {write.failed!r:.40}")
            _check_int(write.at_us, "Tally.at_us", *micros)
            _check_int(write.window_us, "Tally.window_us", 1, _MAX_INT64)
        case MoveBreaker():
            _check_text(write.resource, "MoveBreaker.resource")
            if write.state not in BREAKER_STATES:
                raise _invalid(
                    f"MoveBreaker.state must be one of {BREAKER_STATES}, not {write.state!r:.40}"
                )
            _check_int(write.at_us, "MoveBreaker.at_us", *micros)
            _check_int(write.transitions, "MoveBreaker.transitions", 1, _MAX_INT64)
        case DropPermit():
            _check_text(write.resource, "DropPermit.resource")
            _check_text(write.holder, "DropPermit.holder")
        case _:
            raise _invalid(f"not a runtime write: {write!r:.80}")


_TASK_KINDS = frozenset({"step", "compensation"})


def _check_task_row(row: object) -> None:
    if not isinstance(row, TaskRow):
        raise _invalid(f"PutTask.row must be a TaskRow, not {type(row).__name__}")
    micros = (-_MAX_INT64, _MAX_INT64)
    for name in ("task_id", "workflow_id", "name", "queue", "payload"):
        _check_text(getattr(row, name), f"TaskRow.{name}")
    if row.task_id != f"{row.workflow_id}/{row.seq}":
        raise _invalid("TaskRow.task_id must be '<workflow_id>/<seq>'")
    if row.kind not in _TASK_KINDS:
        raise _invalid(f"TaskRow.kind must be one of {sorted(_TASK_KINDS)}, not {row.kind!r:.40}")
    _check_int(row.seq, "TaskRow.seq", 0, _MAX_INT32)
    _check_int(row.attempt, "TaskRow.attempt", 0, _MAX_INT32)
    _check_int(row.due_at_us, "TaskRow.due_at_us", *micros)
    _check_int(row.created_at_us, "TaskRow.created_at_us", *micros)
    _check_int(row.lease_epoch, "TaskRow.lease_epoch", 0, _MAX_INT64)
    if row.lease_owner is not None or row.lease_until_us is not None or row.handed_back:
        raise _invalid("a new TaskRow has no lease: workers claim it")


def _check_queues(queues: object) -> tuple[str, ...]:
    """Queue names, checked, without repeats, in order."""
    if isinstance(queues, str) or not isinstance(queues, Collection):
        raise _invalid(f"queues must be a collection of str, not {type(queues).__name__}")
    for queue in queues:
        _check_text(queue, "queue name")
        if not queue:
            raise _invalid("a queue name must not be empty")
    return tuple(sorted(set(queues)))


def _check_task_names(names: object) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Collection):
        raise _invalid(f"names must be a collection of str, not {type(names).__name__}")
    for name in names:
        _check_text(name, "step name")
    return tuple(sorted(set(names)))


def _check_task_leases(leases: object) -> list[TaskLease]:
    if not isinstance(leases, Sequence):
        raise _invalid(f"leases must be a sequence of TaskLease, not {type(leases).__name__}")
    for lease in leases:
        if not isinstance(lease, TaskLease):
            raise _invalid(f"each lease must be a TaskLease, not {type(lease).__name__}")
        _check_text(lease.task_id, "TaskLease.task_id")
        _check_int(lease.epoch, "TaskLease.epoch", 0, _MAX_INT64)
    return list(leases)


def _checked_kinds(
    workflows: Collection[tuple[str, int]] | None,
) -> tuple[tuple[str, int], ...] | None:
    """(name, version) pairs, checked and sorted; None means any workflow."""
    if workflows is None:
        return None
    kinds = []
    for kind in workflows:
        if not (isinstance(kind, tuple) and len(kind) == 2):
            raise _invalid(f"workflows must hold (name, version) pairs, not {kind!r:.60}")
        _check_text(kind[0], "workflow name")
        _check_int(kind[1], "workflow version", 0, _MAX_INT32)
        kinds.append((kind[0], kind[1]))
    return tuple(sorted(set(kinds)))


def _check_fence(fence: object) -> None:
    if (
        type(fence) is Fence
        and _plain_text(fence.workflow_id)
        and _plain_text(fence.owner)
        and type(fence.epoch) is int
        and 0 <= fence.epoch <= _MAX_INT64
    ):
        return  # the engine's, recognized cheaply: every runner append has one
    if isinstance(fence, TaskFence):
        _check_text(fence.task_id, "TaskFence.task_id")
        _check_text(fence.owner, "TaskFence.owner")
        _check_int(fence.epoch, "TaskFence.epoch", 0, _MAX_INT64)
        return
    if not isinstance(fence, Fence):
        raise _invalid(f"fence must be a Fence or a TaskFence, not {type(fence).__name__}")
    _check_text(fence.workflow_id, "Fence.workflow_id")
    _check_text(fence.owner, "Fence.owner")
    _check_int(fence.epoch, "Fence.epoch", 0, _MAX_INT64)


def _checked_runtime(runtime: Sequence[RuntimeWrite]) -> tuple[RuntimeWrite, ...]:
    writes = tuple(runtime)
    for write in writes:
        _check_runtime_write(write)
    return writes


# Worker times are moments a datetime can hold after the epoch (clients show them as
# datetimes), and lease lengths stay under 2**62 µs, so ``heartbeat_at + lease_us``,
# which every reap computes in SQL, fits a bigint: one row overflowing it would fail
# the reaping of every engine on the database.
_WORKER_TIMES = (0, to_micros(datetime.max.replace(tzinfo=UTC)))
_MAX_LEASE_US = 2**62


def _check_names(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise _invalid(f"{what} must be a tuple (or list) of str, not {type(value).__name__}")
    for name in value:
        _check_text(name, f"each of {what}")
    return tuple(value)


def _check_worker(row: object) -> WorkerRow:
    if not isinstance(row, WorkerRow):
        raise _invalid(f"register_worker needs a WorkerRow, not {type(row).__name__}")
    _check_worker_id(row.worker_id)
    _check_text(row.host, "WorkerRow.host")
    _check_int(row.pid, "WorkerRow.pid", 0, _MAX_INT32)
    queues = _check_names(row.queues, "WorkerRow.queues")
    workflows = _check_names(row.workflows, "WorkerRow.workflows")
    _check_text(row.version, "WorkerRow.version")
    _check_int(row.started_at_us, "WorkerRow.started_at_us", *_WORKER_TIMES)
    _check_int(row.heartbeat_at_us, "WorkerRow.heartbeat_at_us", *_WORKER_TIMES)
    _check_int(row.lease_us, "WorkerRow.lease_us", 1, _MAX_LEASE_US)
    _check_int(row.in_flight, "WorkerRow.in_flight", 0, _MAX_INT32)
    if not isinstance(row.stopping, bool):
        raise _invalid(f"WorkerRow.stopping must be a bool, not {row.stopping!r:.60}")
    if (queues, workflows) == (row.queues, row.workflows):
        return row
    # Lists are taken as given, stored as tuples: the row stays hashable and frozen.
    return WorkerRow(
        row.worker_id,
        row.host,
        row.pid,
        queues,
        workflows,
        row.version,
        row.started_at_us,
        row.heartbeat_at_us,
        row.lease_us,
        row.in_flight,
        row.stopping,
    )


def _check_worker_id(worker_id: object) -> None:
    _check_text(worker_id, "worker id")
    if worker_id == "":
        raise _invalid("worker id must be a non-empty string")


def _check_worker_now(now_us: object) -> None:
    _check_int(now_us, "now_us", *_WORKER_TIMES)


_BIGINT = 2**63 - 1
"""The largest position, version or limit a database column or parameter holds."""


def _check_limit(limit: int | None) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= _BIGINT
    ):
        raise InvalidEventDataError("", 0, f"limit must be an int from 0 to 2**63-1, not {limit!r}")


def _check_from(name: str, value: int | None) -> None:
    """A read's starting position or version: an int a database can compare (a bool,
    a float or 2**64 reached SQL as a type error or an OverflowError)."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not -_BIGINT <= value <= _BIGINT
    ):
        raise InvalidEventDataError(
            "", 0, f"{name} must be an int within +-(2**63-1), not {value!r}"
        )
