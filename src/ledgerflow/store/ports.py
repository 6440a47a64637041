"""The store ports, by capability: ``EventStore`` (the ledger: all that aggregates
and audit need) and ``WorkflowStore`` (the ledger plus the workflow runtime's rows:
instances, wake-ups, leases, task queues and the registry of workers). Every adapter implements
both; code outside ``store/`` depends on these, never on an adapter or the shared
``_base``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

from ..events import ANY, AppendResult, ExpectedVersion, Metadata, RecordedEvent, Snapshot
from ..hashing import from_micros
from ..personal import KeyVault
from ..projections.state import ProjectionFailure, ProjectionLease, ProjectionRow, Rebuild
from ..projections.tables import Table, TableWrite
from ..registry import EventRegistry
from ._plan import EventRow, StreamHead
from .runtime import (
    Fence,
    InstanceQuery,
    InstanceRow,
    Lease,
    QueueRow,
    ResourceRow,
    RuntimeWrite,
    TaskFence,
    TaskLease,
    TaskRow,
    WakeupRow,
    WorkerRow,
)
from .tiles import Checkpoint, LeafRow, MerkleTile

__all__ = ["EventRow", "EventStore", "StreamHead", "WorkflowStore", "row_event"]


def row_event(
    row: EventRow, data: Any, metadata: Metadata, *, sealed: bool = False
) -> RecordedEvent:
    """The recorded event of a stored ``row``, its data and metadata as given
    (decoded, or a stand-in for one that cannot be)."""
    return RecordedEvent(
        id=row.id,
        stream_id=row.stream_id,
        version=row.version,
        position=row.position,
        type=row.type,
        schema_version=row.schema_version,
        data=data,
        metadata=metadata,
        recorded_at=from_micros(row.recorded_at_us),
        hash=row.hash,
        prev_hash=row.prev_hash,
        sealed=sealed,
    )


class EventStore(Protocol):
    """An append-only log of streams of events, with one total global order.

    Contract (every adapter passes the same test suite for it):

    - ``append`` commits all events of one call atomically, or none. Stream versions
      are contiguous from 1; global positions rise from 1 and are totally ordered,
      without gaps where ``dense_positions`` (see there). ``expected_version`` is an
      int (0 = no stream) or a ``StreamState``; a mismatch raises
      ``ConcurrencyError``. Events carry ids: repeating an append
      with the same ids and content returns ``AlreadyAppended`` and writes nothing.
    - Readers never see a committed event appear behind a position they have
      already read (no gaps filled in later), so ``read_all``/``subscribe`` can
      checkpoint by position. A store's reads show every append it acknowledged.
    - Every event is hash-chained to its stream's previous event.
    """

    @property
    def backend(self) -> str:
        """The adapter's name: ``memory``, ``sqlite`` or ``postgres``."""
        ...

    @property
    def location(self) -> str:
        """Where the ledger is, for messages (a URL without its password)."""
        ...

    @property
    def registry(self) -> EventRegistry:
        """The event types this store encodes and decodes."""
        ...

    @property
    def dense_positions(self) -> bool:
        """Whether global positions have no gaps (memory, SQLite). On PostgreSQL a
        write that took positions and did not commit (a crash, a refused batch while
        another process wrote) leaves them unused: positions only rise."""
        ...

    @property
    def max_event_bytes(self) -> int:
        """The largest encoded event (data and metadata) an append takes."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def open(self) -> Self:
        """Connect; ``async with`` calls it for you.

        A store made with ``create=True`` (the default) creates or migrates the
        ledger and checks that it can write; with ``create=False`` the ledger must
        exist at the current schema and nothing is changed (see ``open_store``).
        """
        ...

    async def close(self) -> None:
        """Commit what is queued, end subscriptions and release connections."""
        ...

    async def append(
        self,
        stream_id: str,
        events: Sequence[object],
        expected_version: ExpectedVersion = ANY,
        *,
        metadata: Metadata | None = None,
        runtime: Sequence[RuntimeWrite] = (),
        fence: Fence | TaskFence | None = None,
    ) -> AppendResult:
        """Append registered event objects or ``NewEvent`` values to a stream.

        ``fence``: written only while that lease (of an instance, or of a task) is
        still held (``LeaseLostError``).

        ``metadata`` applies to every event of the call that carries none of its own.
        ``runtime`` rows (see ``store.runtime``) are written in the same transaction,
        only if the events are appended (not for ``AlreadyAppended``).
        """
        ...

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[RecordedEvent]:
        """Events of one stream in version order (descending if ``backwards``).

        ``from_version`` is inclusive; by default the first (or, backwards, the
        last) event. Raises ``StreamNotFoundError`` if the stream has no events.
        """
        ...

    async def load_stream(self, stream_id: str) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """The latest snapshot and the events after it (all events if none), read
        consistently; ``StreamNotFoundError`` if the stream has neither."""
        ...

    async def read_all(
        self, *, from_position: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Events of every stream in global order, from ``from_position`` inclusive."""
        ...

    def subscribe(
        self, *, from_position: int = 1, batch_size: int = 500
    ) -> AsyncIterator[RecordedEvent]:
        """Every event from ``from_position`` on, then each new one as it commits.

        Catches up by reading, then waits for a commit signal (in-process, or
        LISTEN/NOTIFY on PostgreSQL) instead of polling hot. Ends when the store
        closes.
        """
        ...

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version; 0 if it has no events."""
        ...

    async def head_position(self) -> int:
        """The highest global position committed; 0 for an empty ledger."""
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the stream's latest, replacing an older one."""
        ...

    async def load_snapshot(self, stream_id: str) -> Snapshot | None: ...

    async def read_leaves(self, *, from_position: int = 1, limit: int = 1000) -> list[LeafRow]:
        """(position, stream id, version, hash) of the log's events in order, as
        ``read_rows`` reads them (settled): what its Merkle tree is made of."""
        ...

    async def read_stream_rows(
        self, stream_id: str, *, from_version: int = 1, limit: int = 1000
    ) -> list[EventRow]:
        """A stream's stored rows, undecoded, in version order: for audit tools."""
        ...

    async def read_rows(self, *, from_position: int = 1, limit: int = 1000) -> list[EventRow]:
        """Stored rows, undecoded, in global order: for audit and migration tools."""
        ...

    async def stream_heads(
        self, *, after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, StreamHead]]:
        """Recorded stream heads in stream-id order, after ``after``: for audit."""
        ...

    async def integrity_check(self) -> list[str]:
        """What the database's own consistency check finds wrong with its files
        (pages, indexes), one line each; empty if nothing (or if the backend has no
        such check: PostgreSQL's needs the amcheck extension, memory has no files)."""
        ...

    async def read_snapshot(
        self, visit: Callable[[list[EventRow]], None], *, batch_size: int = 2000
    ) -> dict[str, StreamHead]:
        """Every stored row, in global order and in batches, given to ``visit``, then
        every stream head: all of it as of one moment, while writers go on (what
        ``verify_ledger`` needs to tell tampering from appends made meanwhile).
        ``visit`` runs on the event loop's thread or not: it must only compute."""
        ...

    async def save_checkpoint(
        self, tiles: Sequence[MerkleTile], checkpoint: Checkpoint
    ) -> Checkpoint:
        """Keep newly sealed ``tiles`` and a tree head in one transaction. Returns the
        checkpoint of that size as stored: this one, or the one another checkpointer
        stored first (the same head, unless the log changed under one of them). A
        tile already stored is kept as it was."""
        ...

    async def merkle_tiles(
        self, *, first: int = 0, limit: int = 1000, entries: bool = False
    ) -> list[MerkleTile]:
        """Sealed tiles from number ``first`` on, in order; with their entries only if
        asked (a tile's root and range are what proofs over it need)."""
        ...

    async def merkle_tile_of(self, position: int) -> MerkleTile | None:
        """The sealed tile, with its entries, whose range holds ``position``."""
        ...

    async def checkpoints(self, *, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        """Checkpointed tree heads larger than ``after_size``, smallest first."""
        ...

    async def latest_checkpoint(self) -> Checkpoint | None: ...

    key_vault: KeyVault
    """Where the subject keys of personal data live (``ledgerflow.personal``)."""

    async def purge_snapshots(self, *, mentioning: str) -> int:
        """Drop the snapshots of every stream whose events' data contains
        ``mentioning`` (a subject key id, on erasure); how many were dropped."""
        ...


class WorkflowStore(EventStore, Protocol):
    """The ledger plus the workflow runtime's index rows (``store.runtime``): written
    only with appends (``append(..., runtime=[...])``), read and leased here; and the
    registry of workers, written here by the engines themselves."""

    async def claim_wakeups(
        self,
        owner: str,
        *,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: Collection[tuple[str, int]] | None = None,
    ) -> list[Lease]:
        """Lease due, unheld workflow instances (of ``workflows``' (name, version)
        pairs, if given) to ``owner``, each at its next epoch."""
        ...

    async def watch_work(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on this event loop) when an append makes an instance
        claimable about now (``runtime.makes_work``): at once for this store's own
        appends, and for other processes' where the backend can tell (PostgreSQL:
        LISTEN/NOTIFY; elsewhere workers poll). Returns the function that stops it."""
        ...

    async def database_now_us(self) -> int:
        """The database's clock (µs since the epoch), for workers to agree on time."""
        ...

    async def check_ready(self) -> None:
        """Return if the store answers and takes writes now; else raise what a write
        would meet (``StoreUnavailableError``, ``StoreReadOnlyError`` for a server
        that became a standby or read-only, ``StoreCorruptError``): a readiness
        probe's question, a read and no write."""
        ...

    async def renew_leases(
        self, owner: str, leases: Sequence[Lease], *, lease_until_us: int
    ) -> list[Lease]:
        """Extend those of ``owner``'s leases it still holds at their epoch; those."""
        ...

    async def next_wakeup(
        self, *, workflows: Collection[tuple[str, int]] | None = None
    ) -> int | None:
        """The earliest moment (µs since the epoch) an instance may become claimable."""
        ...

    async def release_wakeups(self, owner: str | None = None) -> int:
        """Drop ``owner``'s leases (all leases if None); how many there were."""
        ...

    async def lease_owners(self) -> list[str]:
        """Every owner that holds a lease now, expired or not."""
        ...

    async def get_wakeup(self, workflow_id: str) -> WakeupRow | None: ...

    async def get_instance(self, workflow_id: str) -> InstanceRow | None: ...

    async def get_instances(self, workflow_ids: Sequence[str]) -> list[InstanceRow]:
        """The rows of those of ``workflow_ids`` that exist, in no set order: one
        read for many instances (a client waiting for thousands of results)."""
        ...

    async def list_instances(
        self,
        *,
        status: str | None = None,
        after: str | None = None,
        limit: int = 100,
        query: InstanceQuery | None = None,
    ) -> list[InstanceRow]:
        """Instances in id order, or newest first (``query.newest_first``), after the
        instance ``after`` (the last of the page before), filtered by ``query``."""
        ...

    async def count_instances(self, statuses: Sequence[str]) -> dict[str, int]:
        """How many instances have each of ``statuses`` (0 for none): for the few
        not ended, as metrics report them."""
        ...

    async def register_worker(self, info: WorkerRow) -> None:
        """Record a running worker, or replace its row (a worker judged dead that
        comes back registers again)."""
        ...

    async def heartbeat_worker(
        self, worker_id: str, *, now_us: int, in_flight: int, stopping: bool = False
    ) -> bool:
        """Mark the worker alive at ``now_us``; False if it has no row any more (it
        was judged dead and reaped: it must register again)."""
        ...

    async def deregister_worker(self, worker_id: str) -> None:
        """Remove the worker's row (it stopped); nothing if there is none."""
        ...

    async def list_workers(self) -> list[WorkerRow]:
        """Every registered worker, alive or late, in id order."""
        ...

    async def reap_workers(self, now_us: int) -> list[str]:
        """In one transaction: release the leases of the workers whose heartbeat is
        older than their lease at ``now_us`` and remove their rows; release too the
        expired leases of owners that have no row (engines from before the registry).
        The ids of the workers removed, in order."""
        ...

    # -- task queues ------------------------------------------------------------------

    async def claim_tasks(
        self,
        owner: str,
        *,
        queues: Collection[str],
        now_us: int,
        lease_until_us: int,
        limit: int,
        names: Collection[str] | None = None,
    ) -> list[TaskRow]:
        """Lease due, unheld tasks of ``queues`` (of the steps ``names``, if given)
        to ``owner``, each at its next epoch and attempt, within each queue's
        ``max_concurrent``; the rows as leased."""
        ...

    async def renew_task_leases(
        self, owner: str, leases: Sequence[TaskLease], *, lease_until_us: int
    ) -> list[TaskLease]:
        """Extend those of ``owner``'s task leases it still holds; those."""
        ...

    async def release_tasks(self, owner: str | None = None) -> int:
        """Give back ``owner``'s task leases (all if None), due at once and the
        attempt in flight not counted; how many there were."""
        ...

    async def next_task_due(
        self, *, queues: Collection[str], names: Collection[str] | None = None
    ) -> int | None:
        """The earliest moment (µs) a task of ``queues`` may become claimable."""
        ...

    async def list_tasks(
        self,
        *,
        queue: str | None = None,
        workflow_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[TaskRow]: ...

    async def withdraw_task(self, task_id: str) -> bool:
        """Delete the task if no worker ever claimed it; whether it will not run
        (withdrawn now, or no such task), atomically with any claim."""
        ...

    async def set_queue_limit(self, queue: str, max_concurrent: int | None) -> None:
        """Bound the tasks of ``queue`` running at once across all workers."""
        ...

    async def list_queues(self, now_us: int) -> list[QueueRow]:
        """Queues with tasks or a limit, with their counts at ``now_us``."""
        ...

    async def resource_state(self, resource: str, *, now_us: int) -> ResourceRow | None:
        """A guarded resource's shared breaker, rate-limit and bulkhead state."""
        ...

    async def list_resources(self, *, now_us: int) -> list[ResourceRow]: ...

    async def take_probe(self, resource: str, *, transitions: int, max_probes: int) -> bool:
        """One half-open probe, if the breaker is half-open at that move and fewer
        than ``max_probes`` were given out, across all workers."""
        ...

    async def take_token(self, resource: str, *, rate: float, burst: int, now_us: int) -> int:
        """0 if a token was taken from the resource's bucket; else µs until one is."""
        ...

    async def acquire_permit(
        self,
        resource: str,
        holder: str,
        *,
        owner: str,
        max_concurrent: int,
        now_us: int,
        until_us: int,
    ) -> bool:
        """One of the resource's bulkhead permits for ``holder``, if one is free."""
        ...

    async def renew_permits(self, owner: str, *, until_us: int) -> int: ...

    async def release_permits(self, owner: str) -> int: ...

    # -- projections (see store._projections and docs/adr/015-projections.md) --------

    async def commits(self) -> Callable[[], asyncio.Event]:
        """A function giving the event the next commit sets (take it before a read)."""
        ...

    async def ensure_tables(
        self,
        projection: str,
        tables: Sequence[Table],
        *,
        generation: int = 0,
        version: int = 1,
        listed: bool = True,
    ) -> None: ...

    async def consume(
        self,
        consumer: str,
        message_id: str,
        tables: Mapping[str, Table],
        writes: Sequence[TableWrite],
        *,
        now_us: int,
        seen: Sequence[tuple[str, Any, dict[str, Any] | None]] = (),
    ) -> bool:
        """A message's writes and its record as processed, in one transaction, if
        the rows in ``seen`` (table, key, row as read) are still as read
        (``StaleReadError`` otherwise)."""
        ...

    async def consumed(self, consumer: str, message_id: str) -> bool: ...

    async def begin_rebuild(self, name: str, *, version: int) -> Rebuild: ...

    async def finish_rebuild(
        self, lease: ProjectionLease, tables: Sequence[Table], *, now_us: int
    ) -> None: ...

    async def claim_projection(
        self, name: str, owner: str, *, now_us: int, until_us: int
    ) -> ProjectionLease | None: ...

    async def renew_projection(self, lease: ProjectionLease, *, until_us: int) -> bool: ...

    async def release_projection(self, lease: ProjectionLease) -> None: ...

    async def project(
        self,
        lease: ProjectionLease,
        tables: Mapping[str, Table],
        *,
        from_position: int,
        to_position: int,
        event_at_us: int | None,
        writes: Sequence[TableWrite],
        now_us: int,
        generation: int = 0,
        rebuild: bool = False,
    ) -> None:
        """A batch's writes and its checkpoint, in one transaction fenced by the lease."""
        ...

    async def fail_projection(
        self, lease: ProjectionLease, failure: ProjectionFailure, *, now_us: int
    ) -> None: ...

    async def retry_projection(self, name: str) -> bool: ...

    async def skip_projection(self, name: str, position: int) -> bool: ...

    async def projection_row(self, name: str) -> ProjectionRow | None: ...

    async def list_projections(self) -> list[ProjectionRow]: ...

    async def read_model_get(
        self, projection: str, table: Table, key: Any, *, generation: int | None = None
    ) -> dict[str, Any] | None: ...

    async def read_model_select(
        self,
        projection: str,
        table: Table,
        *,
        where: Mapping[str, Any] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
        generation: int | None = None,
    ) -> list[dict[str, Any]]: ...
