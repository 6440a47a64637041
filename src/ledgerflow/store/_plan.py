"""Pure planning of a batch of appends: the logic every backend shares.

A backend opens a write transaction, reads the heads of the streams touched and any
stored events whose ids reappear, hands them to :func:`plan_batch`, writes the rows it
returns and commits. Deciding here, in plain values, keeps the rules (expected
version, idempotency, hash chain, gapless positions) identical on every backend and
lets one bad request fail alone instead of aborting the whole group commit.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

from ..errors import (
    ConcurrencyError,
    DuplicateEventError,
    LeaseLostError,
    StoreError,
    TaskLeaseLostError,
)
from ..events import AlreadyAppended, Appended, AppendResult, ExpectedVersion, StreamState
from ..hashing import GENESIS_HASH, chain_hash
from .runtime import (
    DropTask,
    DropTasks,
    Fence,
    PutTask,
    RetryTask,
    RuntimeWrite,
    Schedule,
    TaskFence,
    Unschedule,
)

__all__ = [
    "BatchPlan",
    "EventRow",
    "LeaseState",
    "PreparedEvent",
    "StreamHead",
    "check_expected",
    "fenced_ids",
    "fenced_tasks",
    "plan_batch",
    "reused_ids",
]


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """An event encoded and checked, ready to be given a place in the ledger."""

    id: UUID
    type: str
    schema_version: int
    data: bytes
    metadata: bytes
    caller_id: bool = True
    """The id came from the caller. Fresh UUIDv7 ids cannot be stored already, so
    only caller ids need the idempotency lookup."""


@dataclass(frozen=True, slots=True)
class StreamHead:
    version: int
    last_hash: bytes
    last_position: int


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of the events table, exactly as stored."""

    position: int
    id: UUID
    stream_id: str
    version: int
    type: str
    schema_version: int
    data: bytes
    metadata: bytes
    recorded_at_us: int
    prev_hash: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class AppendRequest:
    stream_id: str
    events: tuple[PreparedEvent, ...]
    expected: ExpectedVersion
    runtime: tuple[RuntimeWrite, ...] = ()
    fence: Fence | TaskFence | None = None


@dataclass(frozen=True, slots=True)
class LeaseState:
    """An instance's lease as stored: who holds it (None: nobody) at which epoch."""

    owner: str | None
    epoch: int


@dataclass(frozen=True, slots=True)
class BatchPlan:
    outcomes: list[AppendResult | StoreError]
    rows: list[EventRow]
    heads: dict[str, StreamHead]
    """Stream heads changed by the batch, to upsert."""
    last_position: int
    runtime: list[RuntimeWrite]
    """Runtime rows of the requests that were appended, in order."""
    fences: list[Fence]
    """The instance fences of the requests that were appended: what a backend that
    planned without reading the leases must check in the transaction (a batch with
    task fences is planned from the leases read)."""


def check_expected(stream_id: str, expected: ExpectedVersion, actual: int) -> None:
    if expected is StreamState.ANY:
        return
    if expected is StreamState.NO_STREAM:
        ok = actual == 0
    elif expected is StreamState.STREAM_EXISTS:
        ok = actual > 0
    else:
        ok = actual == expected
    if not ok:
        raise ConcurrencyError(stream_id, expected, actual)


def _same_content(row: EventRow, stream_id: str, event: PreparedEvent) -> bool:
    return (
        row.stream_id == stream_id
        and row.type == event.type
        and row.schema_version == event.schema_version
        and row.data == event.data
        and (row.metadata == event.metadata or _same_but_trace(row.metadata, event.metadata))
    )


def _same_but_trace(stored: bytes, given: bytes) -> bool:
    """Whether two metadata differ only in their trace context: a retried append
    (an HTTP client's retry, a pass run again) is made in another span, and is
    still the same append."""
    try:
        a, b = json.loads(stored or b"{}"), json.loads(given or b"{}")
    except ValueError:
        return False
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    a.pop("traceparent", None)
    b.pop("traceparent", None)
    return bool(a == b)


def _replayed(request: AppendRequest, existing: Mapping[UUID, EventRow]) -> AppendResult | None:
    """AlreadyAppended if the request repeats a stored append; None if all ids are new.

    Raises DuplicateEventError when ids are reused for other content, or only some of
    the request's ids are stored (a retry must repeat the original call exactly).
    """
    found = [existing.get(event.id) for event in request.events]
    if not found or all(row is None for row in found):
        return None
    for event, row in zip(request.events, found, strict=True):
        if row is None:
            raise DuplicateEventError(
                event.id,
                request.stream_id,
                "some events of this append are stored and some are not; "
                "a retried append must repeat the original events exactly",
            )
        if not _same_content(row, request.stream_id, event):
            raise DuplicateEventError(
                event.id, row.stream_id, "the id was stored with different content"
            )
    rows = [row for row in found if row is not None]
    contiguous = all(b.version == a.version + 1 for a, b in itertools.pairwise(rows))
    if not contiguous:
        raise DuplicateEventError(
            rows[0].id, request.stream_id, "the ids were stored by different appends"
        )
    return AlreadyAppended(request.stream_id, rows[-1].version, tuple(r.position for r in rows))


def fenced_ids(requests: Sequence[AppendRequest]) -> list[str]:
    """The instances whose leases a batch must read (locked) before planning."""
    return sorted({r.fence.workflow_id for r in requests if isinstance(r.fence, Fence)})


def fenced_tasks(requests: Sequence[AppendRequest]) -> list[str]:
    """The tasks whose leases a batch must read (locked) before planning."""
    return sorted({r.fence.task_id for r in requests if isinstance(r.fence, TaskFence)})


def _check_fence(
    fence: Fence | TaskFence | None,
    leases: Mapping[str, LeaseState],
    task_leases: Mapping[str, LeaseState],
) -> None:
    if fence is None:
        return
    if isinstance(fence, TaskFence):
        held = task_leases.get(fence.task_id, _NO_LEASE)
        if held.owner != fence.owner or held.epoch != fence.epoch:
            raise TaskLeaseLostError(
                fence.task_id, fence.owner, fence.epoch, held.owner, held.epoch
            )
        return
    held = leases.get(fence.workflow_id, _NO_LEASE)
    if held.owner != fence.owner or held.epoch != fence.epoch:
        raise LeaseLostError(fence.workflow_id, fence.owner, fence.epoch, held.owner, held.epoch)


def _leases_after(
    leases: dict[str, LeaseState],
    task_leases: dict[str, LeaseState],
    writes: Sequence[RuntimeWrite],
) -> None:
    """What the request's runtime writes do to the leases, so that a later request
    of the batch is fenced against them (as the SQL statements will leave them)."""
    for write in writes:
        # Instance writes first: nearly every append carries one.
        if isinstance(write, Schedule):
            before = leases.get(write.workflow_id, _NO_LEASE)
            if write.lease_owner is None:
                leases[write.workflow_id] = LeaseState(None, before.epoch)
            else:
                leases[write.workflow_id] = LeaseState(write.lease_owner, before.epoch + 1)
        elif isinstance(write, Unschedule):
            leases.pop(write.workflow_id, None)
        elif isinstance(write, RetryTask):
            if write.task_id in task_leases:
                task_leases[write.task_id] = LeaseState(None, task_leases[write.task_id].epoch)
        elif isinstance(write, DropTask):
            task_leases.pop(write.task_id, None)
        elif isinstance(write, DropTasks):
            prefix = f"{write.workflow_id}/"
            for task_id in [t for t in task_leases if t.startswith(prefix)]:
                del task_leases[task_id]
        elif isinstance(write, PutTask):
            # An insert that keeps an existing row: only a new row has a lease (none).
            task_leases.setdefault(write.row.task_id, LeaseState(None, write.row.lease_epoch))


_NO_LEASE = LeaseState(None, 0)


def plan_batch(
    requests: Sequence[AppendRequest],
    heads: Mapping[str, StreamHead],
    existing: Mapping[UUID, EventRow],
    last_position: int,
    recorded_at_us: int,
    leases: Mapping[str, LeaseState] | None = None,
    task_leases: Mapping[str, LeaseState] | None = None,
) -> BatchPlan:
    """Decide each request in order, as if each were its own transaction.

    ``heads`` holds the stored head of every stream the batch touches (absent: no
    stream), ``existing`` every stored event whose id the batch reuses,
    ``last_position`` the highest global position stored, and ``leases`` the
    stored lease of every instance a request is fenced on (``fenced_ids``; absent:
    no wake-up row); ``task_leases`` the same for every task a request is fenced on
    (``fenced_tasks``).
    """
    held = dict(leases or {})
    held_tasks = dict(task_leases or {})
    current = dict(heads)
    known = dict(existing)
    changed: dict[str, StreamHead] = {}
    rows: list[EventRow] = []
    outcomes: list[AppendResult | StoreError] = []
    runtime: list[RuntimeWrite] = []
    fences: list[Fence] = []
    position = last_position
    for request in requests:
        try:
            replayed = _replayed(request, known)
            if replayed is not None:
                outcomes.append(replayed)
                continue
            _check_fence(request.fence, held, held_tasks)
            head = current.get(request.stream_id)
            version = head.version if head else 0
            check_expected(request.stream_id, request.expected, version)
        except StoreError as error:
            outcomes.append(error)
            continue
        runtime.extend(request.runtime)
        if isinstance(request.fence, Fence):
            fences.append(request.fence)
        if request.runtime:
            _leases_after(held, held_tasks, request.runtime)
        if not request.events:
            # A guarded runtime write: the version check passed, nothing to append.
            outcomes.append(Appended(request.stream_id, version, ()))
            continue
        prev_hash = head.last_hash if head else GENESIS_HASH
        new_rows = list(
            _seal(request, version, position, prev_hash, recorded_at_us),
        )
        rows.extend(new_rows)
        for row in new_rows:
            known[row.id] = row
        last = new_rows[-1]
        position = last.position
        head = StreamHead(last.version, last.hash, last.position)
        current[request.stream_id] = changed[request.stream_id] = head
        outcomes.append(
            Appended(request.stream_id, last.version, tuple(r.position for r in new_rows))
        )
    return BatchPlan(outcomes, rows, changed, position, runtime, fences)


def _seal(
    request: AppendRequest,
    version: int,
    position: int,
    prev_hash: bytes,
    recorded_at_us: int,
) -> Iterable[EventRow]:
    for event in request.events:
        version += 1
        position += 1
        digest = chain_hash(
            prev_hash,
            event.id,
            request.stream_id,
            version,
            position,
            event.type,
            event.schema_version,
            event.data,
            event.metadata,
            recorded_at_us,
        )
        yield EventRow(
            position,
            event.id,
            request.stream_id,
            version,
            event.type,
            event.schema_version,
            event.data,
            event.metadata,
            recorded_at_us,
            prev_hash,
            digest,
        )
        prev_hash = digest


def reused_ids(requests: Sequence[AppendRequest]) -> list[UUID]:
    """The ids a batch must look up for idempotency: those the callers chose."""
    return [e.id for r in requests for e in r.events if e.caller_id]
