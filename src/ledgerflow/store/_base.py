"""Shared machinery of the store adapters: preparing events, group commit, decoding,
and subscriptions. Adapters supply the storage primitives (the ``_`` hooks)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import ClassVar, Self
from uuid import UUID

import msgspec
from uuid_utils.compat import uuid7

from .. import metrics, personal, tracing
from .._waiting import wait_at_most
from ..errors import (
    DuplicateEventError,
    EventSerializationError,
    EventTooLargeError,
    InvalidEventDataError,
    LedgerflowError,
    StoreClosedError,
    StoreError,
    StoreInternalError,
    StoreUnavailableError,
    StreamNotFoundError,
)
from ..events import (
    ANY,
    AppendResult,
    ExpectedVersion,
    Metadata,
    NewEvent,
    RecordedEvent,
    Snapshot,
    StreamState,
)
from ..hashing import to_micros
from ..personal import KeyVault, SubjectKey
from ..registry import EventRegistry
from ._checks import (
    _MAX_INT32,
    _check_fence,
    _check_from,
    _check_limit,
    _check_target,
    _checked_runtime,
    _invalid,
    _is_int,
    _text_problem,
)
from ._plan import AppendRequest, EventRow, PreparedEvent, StreamHead
from ._projections import ProjectionStore
from ._resources import ResourceGuards
from ._runtime_rows import RuntimeRows
from ._tasks import TaskQueues
from .ports import row_event
from .runtime import (
    Fence,
    RuntimeWrite,
    TaskFence,
    makes_work,
)
from .tiles import Checkpoint, LeafRow, MerkleTile

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "BaseEventStore", "Now", "Pending"]

log = logging.getLogger("ledgerflow.store")

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
Now = Callable[[], datetime]
"""Where a store reads the time it records with events (a clock's ``now``)."""

_encode_metadata = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(Metadata).decode
_EMPTY_METADATA = _encode_metadata(Metadata())


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Pending:
    __slots__ = ("future", "request")

    def __init__(self, request: AppendRequest, future: asyncio.Future[AppendResult]) -> None:
        self.request = request
        self.future = future


class BaseEventStore(RuntimeRows, TaskQueues, ResourceGuards, ProjectionStore):
    """Template for adapters; see ``ports.EventStore`` for the contract."""

    backend: ClassVar[str]
    max_batch_events: ClassVar[int] = 5000
    poll_interval: float = 1.0
    dense_positions: bool = True
    """Fallback wake-up of idle subscribers, seconds; commits wake them sooner."""

    def __init__(
        self,
        *,
        registry: EventRegistry | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock: Now | None = None,
        create: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else EventRegistry()
        self.max_event_bytes = max_event_bytes
        self.create = create
        """Whether ``open`` may create and migrate the ledger (and checks that it can
        write); without, it only opens a ledger that exists at the current schema."""
        self._clock = clock or _utcnow
        self._queue: asyncio.Queue[Pending | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._new_events = asyncio.Event()
        self._work_watchers: list[Callable[[], None]] = []
        self._opened = False
        self._closed = False
        self.key_vault: KeyVault = _TableVault(self)
        """Where personal data's subject keys live (``personal``): this store's
        table unless replaced (a KMS adapter) before the store is used."""

    # -- lifecycle ------------------------------------------------------------------

    @property
    def location(self) -> str:
        """Where the ledger lives, fit to show: the URL without any password."""
        return f"{self.backend}://"

    async def open(self) -> Self:
        if self._closed:
            raise StoreClosedError()
        if not self._opened:
            try:
                await self._open()
            except BaseException:
                # Whatever _open took (threads, connections) must not outlive the failure.
                with contextlib.suppress(Exception):
                    await self._close()
                raise
            self._start_writer()
            self._opened = True
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._new_events.set()
        if self._opened:
            await self._stop_writer()
            await self._close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError()
        if not self._opened:
            raise StoreError(f"the {self.backend} store is not open: use 'async with'")

    # -- appending ------------------------------------------------------------------

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
        self._check_open()
        writes = _checked_runtime(runtime)
        if fence is not None:
            _check_fence(fence)
        if not events and writes:
            # No events, only runtime rows: written if the stream is at the expected
            # version, so a runner never overwrites rows decided on stale history.
            _check_target(stream_id, expected_version)
            if isinstance(expected_version, StreamState):
                raise InvalidEventDataError(
                    "", 0, "runtime rows without events need an int expected version"
                )
            request = AppendRequest(stream_id, (), expected_version, writes, fence)
        else:
            sealer = await self._sealer(events) if personal.declared() else None
            if metadata is None or (
                isinstance(metadata, Metadata) and metadata.traceparent is None
            ):
                # Recorded in the trace it was made in (a workflow's pass, an HTTP
                # request): the relay carries it on to the messages it publishes.
                traceparent = tracing.current_traceparent()
                if traceparent is not None:
                    metadata = (
                        Metadata(traceparent=traceparent)
                        if metadata is None
                        else msgspec.structs.replace(metadata, traceparent=traceparent)
                    )
            request = self._prepare(stream_id, events, expected_version, metadata, sealer)
            if writes or fence is not None:
                request = AppendRequest(
                    request.stream_id, request.events, request.expected, writes, fence
                )
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        began = time.perf_counter()
        self._submit(Pending(request, future))
        try:
            return await future
        finally:
            metrics.append_seconds(self.backend, time.perf_counter() - began)

    async def _sealer(self, events: Sequence[object]) -> personal.Sealer | None:
        """What encrypts the personal values in ``events``, holding their subjects'
        keys (created for subjects seen for the first time); None if they hold none."""
        if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
            return None  # refused by _prepare
        subjects: set[str] = set()
        for event in events:
            subjects |= personal.subjects_in(event)
        if not subjects:
            return None
        return personal.Sealer(await self.key_vault.keys_for(subjects))

    async def _decode_rows(self, rows: Sequence[EventRow]) -> list[RecordedEvent]:
        """Rows as events, the personal values in them opened with the keys that
        still exist (one vault read for all the rows that hold any)."""
        sealed = [row for row in rows if personal.holds_personal(row.data)]
        if not sealed:
            return [self._decode(row) for row in rows]
        ids: set[str] = set()
        for row in sealed:
            try:
                ids |= personal.key_ids_in(msgspec.json.decode(row.data))
            except msgspec.DecodeError:
                continue  # decoding it reports that
        keys = await self.key_vault.keys_by_id(ids) if ids else {}
        return [
            self._decode(row, keys if personal.holds_personal(row.data) else None) for row in rows
        ]

    async def purge_snapshots(self, *, mentioning: str) -> int:
        self._check_open()
        return await self._purge_snapshots(mentioning)

    def _submit(self, pending: Pending) -> None:
        """Queue an append for the writer; adapters with a writer thread override."""
        assert self._queue is not None
        self._queue.put_nowait(pending)

    def _prepare(
        self,
        stream_id: str,
        events: Sequence[object],
        expected: ExpectedVersion,
        metadata: Metadata | None,
        sealer: personal.Sealer | None = None,
    ) -> AppendRequest:
        _check_target(stream_id, expected)
        if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
            raise InvalidEventDataError("", 0, "events must be a sequence of events")
        if not events:
            raise InvalidEventDataError("", 0, "an append needs at least one event")
        if metadata is not None and not isinstance(metadata, Metadata):
            raise InvalidEventDataError("", 0, "metadata must be a ledgerflow.Metadata")
        shared = _EMPTY_METADATA if metadata is None else self._encode_metadata(metadata)
        prepared = tuple(self._prepare_event(event, shared, sealer) for event in events)
        ids = {event.id for event in prepared}
        if len(ids) != len(prepared):
            duplicate = next(e.id for e in prepared if sum(p.id == e.id for p in prepared) > 1)
            raise DuplicateEventError(duplicate, stream_id, "the id appears twice in one append")
        return AppendRequest(stream_id, prepared, expected)

    def _encode_metadata(self, metadata: Metadata) -> bytes:
        try:
            encoded = _encode_metadata(metadata)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EventSerializationError("metadata", str(exc)) from exc
        try:
            # Metadata is a plain Struct: nothing checked its field types when it was
            # built, and a value that does not decode would break every later read.
            back = _decode_metadata(encoded)
        except msgspec.ValidationError as exc:
            raise _invalid(f"metadata does not match ledgerflow.Metadata: {exc}") from exc
        if back.extra != metadata.extra:
            # NaN written as null, a tuple as a list, an int key as a string: stored, the
            # metadata would differ from what was given (and a retry with the original
            # values would be taken for the same append).
            raise EventSerializationError(
                "metadata",
                "its extra does not read back equal to what was given (NaN or infinity, "
                "a tuple, a set, a non-string key, bytes...): give JSON values",
            )
        return encoded

    def _check_new_event(self, event: NewEvent) -> None:
        """The fields of a NewEvent the registry does not look at, or not first."""
        problem = _text_problem(event.type, "NewEvent.type")
        if problem is not None:
            raise _invalid(problem)
        if event.schema_version is not None and not _is_int(event.schema_version, 1, _MAX_INT32):
            raise _invalid(
                f"NewEvent.schema_version must be an int from 1 to {_MAX_INT32} or None, "
                f"not {event.schema_version!r:.60}",
                event.type,
            )
        if event.id is not None and not isinstance(event.id, UUID):
            raise _invalid(
                f"NewEvent.id must be a uuid.UUID or None, not {type(event.id).__name__} "
                f"{event.id!r:.60}",
                event.type,
            )
        if event.metadata is not None and not isinstance(event.metadata, Metadata):
            raise _invalid(
                "NewEvent.metadata must be a ledgerflow.Metadata or None, not "
                f"{type(event.metadata).__name__}",
                event.type,
            )

    def _prepare_event(
        self, event: object, shared_metadata: bytes, sealer: personal.Sealer | None = None
    ) -> PreparedEvent:
        if isinstance(event, NewEvent):
            self._check_new_event(event)
        encoded = self.registry.encode(event, sealer=sealer)
        problem = _text_problem(encoded.type, "event type")
        if problem is not None:
            raise _invalid(problem, schema_version=encoded.schema_version)
        if not _is_int(encoded.schema_version, 1, _MAX_INT32):
            raise _invalid(
                f"schema version must be an int from 1 to {_MAX_INT32}",
                encoded.type,
                encoded.schema_version,
            )
        caller_id = isinstance(event, NewEvent) and event.id is not None
        if isinstance(event, NewEvent):
            event_id = event.id or uuid7()
            metadata = (
                shared_metadata if event.metadata is None else self._encode_metadata(event.metadata)
            )
        else:
            event_id = uuid7()
            metadata = shared_metadata
        size = len(encoded.data) + len(metadata)
        if size > self.max_event_bytes:
            raise EventTooLargeError(encoded.type, size, self.max_event_bytes)
        return PreparedEvent(
            event_id, encoded.type, encoded.schema_version, encoded.data, metadata, caller_id
        )

    def _start_writer(self) -> None:
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self.backend}-writer")

    async def _stop_writer(self) -> None:
        """Commit what is queued, then stop the writer."""
        if self._writer is not None and self._queue is not None:
            self._queue.put_nowait(None)
            await self._writer

    async def _write_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        stopping = False
        try:
            while not stopping:
                first = await queue.get()
                if first is None:
                    break
                batch = [first]
                size = len(first.request.events)
                while size < self.max_batch_events and not queue.empty():
                    item = queue.get_nowait()
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
                    size += len(item.request.events)
                await self._commit(batch)
                # Let the callers just told their outcomes run before the next batch
                # is taken: each appends again at once, and so joins it. Taken at once
                # instead, the next batch held only what was queued during this
                # commit, and writers fell out of step for good: two tasks appending
                # in a loop committed one append each, by turns, never together.
                await asyncio.sleep(0)
        finally:
            # Cancelled (event loop shutting down) or stopped: nobody may wait forever.
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None and not item.future.done():
                    item.future.set_exception(StoreClosedError())

    async def _commit(self, batch: list[Pending]) -> None:
        requests = [p.request for p in batch]
        outcomes: list[AppendResult | LedgerflowError]
        began = time.perf_counter()
        try:
            outcomes = list(await self._write_batch(requests, to_micros(self._clock())))
            metrics.commit(self.backend, len(requests), time.perf_counter() - began)
        except LedgerflowError as error:
            outcomes = [error] * len(batch)
        except Exception as error:  # an adapter bug must not strand the callers
            log.exception("%s store: append batch failed", self.backend)
            outcomes = [StoreInternalError(self.backend, error)] * len(batch)
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(
                        StoreUnavailableError(
                            self.backend,
                            "shut down during the commit: the append may or may not be "
                            "stored; retry it with the same event ids to find out",
                        )
                    )
            raise
        self._resolve(batch, outcomes)

    def _resolve(
        self, batch: list[Pending], outcomes: Sequence[AppendResult | LedgerflowError]
    ) -> None:
        """Tell each caller its outcome (on the event loop), then wake subscribers."""
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
        self._wake_subscribers()
        if self._work_watchers:
            appended = [
                w
                for pending, outcome in zip(batch, outcomes, strict=True)
                if not isinstance(outcome, Exception)
                for w in pending.request.runtime
            ]
            if makes_work(appended, to_micros(self._clock())):
                self._work_appeared()

    def _wake_subscribers(self) -> None:
        event, self._new_events = self._new_events, asyncio.Event()
        event.set()

    async def watch_work(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._check_open()
        self._work_watchers.append(callback)
        await self._ensure_listener()

        def unwatch() -> None:
            with contextlib.suppress(ValueError):
                self._work_watchers.remove(callback)

        return unwatch

    def _work_appeared(self) -> None:
        for callback in list(self._work_watchers):
            try:
                callback()
            except Exception:
                # Called from the writer and the listener: a watcher's bug must not
                # stop appends or notifications for everyone else.
                log.exception("%s store: a work watcher failed", self.backend)

    # -- reading --------------------------------------------------------------------

    def _decode(self, row: EventRow, keys: Mapping[str, bytes] | None = None) -> RecordedEvent:
        data = self.registry.decode(row.type, row.schema_version, row.data, keys=keys)
        try:
            metadata = _decode_metadata(row.metadata)
        except (msgspec.DecodeError, TypeError) as exc:
            # Only an edit made outside ledgerflow stores metadata it cannot read.
            raise InvalidEventDataError(
                row.type, row.schema_version, f"its metadata cannot be read: {exc}"
            ) from None
        return row_event(row, data, metadata, sealed=keys is not None)

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        limit: int | None = None,
        backwards: bool = False,
    ) -> list[RecordedEvent]:
        self._check_open()
        _check_limit(limit)
        _check_from("from_version", from_version)
        rows = await self._read_stream_rows(stream_id, from_version, limit, backwards)
        if not rows and await self._stream_head(stream_id) is None:
            raise StreamNotFoundError(stream_id)
        return await self._decode_rows(rows)

    async def load_stream(self, stream_id: str) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """The stream's latest snapshot and the events after it (every event if it
        has none), consistently. Raises ``StreamNotFoundError`` for a stream with
        neither."""
        self._check_open()
        snapshot, rows = await self._load_stream_rows(stream_id)
        if not rows and snapshot is None and await self._stream_head(stream_id) is None:
            raise StreamNotFoundError(stream_id)
        return snapshot, await self._decode_rows(rows)

    async def _load_stream_rows(self, stream_id: str) -> tuple[Snapshot | None, list[EventRow]]:
        """The snapshot, then the rows after it: consistent, since a snapshot saved
        between the two reads is newer than the one read (the rows after the older
        one are all there). On PostgreSQL one statement for both (a UNION, or a
        pipeline of the two) saved a round trip but cost more CPU than it saved: a
        3-step workflow benchmark ran ~20 % slower with either."""
        snapshot = await self._load_snapshot(stream_id)
        first = 1 if snapshot is None else snapshot.version + 1
        return snapshot, await self._read_stream_rows(stream_id, first, None, False)

    async def read_all(
        self, *, from_position: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        self._check_open()
        _check_limit(limit)
        _check_from("from_position", from_position)
        rows = await self._read_all_rows(from_position, limit)
        return await self._decode_rows(rows)

    async def read_leaves(self, *, from_position: int = 1, limit: int = 1000) -> list[LeafRow]:
        self._check_open()
        _check_limit(limit)
        _check_from("from_position", from_position)
        return await self._read_leaves(from_position, limit)

    async def read_stream_rows(
        self, stream_id: str, *, from_version: int = 1, limit: int = 1000
    ) -> list[EventRow]:
        self._check_open()
        _check_limit(limit)
        _check_from("from_version", from_version)
        return await self._read_stream_rows(stream_id, from_version, limit, False)

    async def read_rows(self, *, from_position: int = 1, limit: int = 1000) -> list[EventRow]:
        self._check_open()
        _check_limit(limit)
        _check_from("from_position", from_position)
        return await self._read_all_rows(from_position, limit)

    async def subscribe(
        self, *, from_position: int = 1, batch_size: int = 500
    ) -> AsyncIterator[RecordedEvent]:
        self._check_open()
        _check_from("from_position", from_position)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidEventDataError(
                "", 0, f"batch_size must be an int >= 1, not {batch_size!r}"
            )
        _check_limit(batch_size)
        await self._ensure_listener()
        position = max(from_position, 1)
        outage = 0.0
        while not self._closed:
            # Take the wake-up handle before reading, so a commit that lands between
            # the read and the wait still wakes us.
            wake = self._new_events
            try:
                batch = await self.read_all(from_position=position, limit=batch_size)
            except StoreClosedError:
                return  # closed while reading: the subscription ends, as at its loop
            except StoreUnavailableError as error:
                # An outage pauses a subscription; it does not end it.
                log.warning(
                    "%s store: subscription read failed (%s); retrying", self.backend, error
                )
                outage = min(outage * 2, 5.0) if outage else 0.1
                await asyncio.sleep(outage)
                continue
            outage = 0.0
            for event in batch:
                yield event
            if batch:
                position = batch[-1].position + 1
                if len(batch) == batch_size:
                    continue
            await wait_at_most(wake.wait(), self.poll_interval)

    async def commits(self) -> Callable[[], asyncio.Event]:
        """A function giving the event that the next commit sets (take it before a
        read, wait on it after): how followers of the log (projections, relays) wait
        for new events without polling hot. In-process, or LISTEN/NOTIFY on
        PostgreSQL; ``poll_interval`` bounds the wait either way."""
        self._check_open()
        await self._ensure_listener()
        return lambda: self._new_events

    async def stream_version(self, stream_id: str) -> int:
        self._check_open()
        head = await self._stream_head(stream_id)
        return 0 if head is None else head.version

    async def head_position(self) -> int:
        self._check_open()
        return await self._head_position()

    async def stream_heads(
        self, *, after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, StreamHead]]:
        self._check_open()
        _check_limit(limit)
        return await self._stream_heads(after, limit)

    async def integrity_check(self) -> list[str]:
        self._check_open()
        return await self._integrity_check()

    async def _integrity_check(self) -> list[str]:
        return []  # no check of its own (memory; PostgreSQL without amcheck)

    async def read_snapshot(
        self, visit: Callable[[list[EventRow]], None], *, batch_size: int = 2000
    ) -> dict[str, StreamHead]:
        self._check_open()
        _check_limit(batch_size)
        return await self._read_snapshot(visit, max(batch_size, 1))

    async def save_checkpoint(
        self, tiles: Sequence[MerkleTile], checkpoint: Checkpoint
    ) -> Checkpoint:
        self._check_open()
        return await self._save_checkpoint(tiles, checkpoint)

    async def merkle_tiles(
        self, *, first: int = 0, limit: int = 1000, entries: bool = False
    ) -> list[MerkleTile]:
        self._check_open()
        _check_limit(limit)
        return await self._merkle_tiles(first, limit, entries)

    async def merkle_tile_of(self, position: int) -> MerkleTile | None:
        self._check_open()
        return await self._merkle_tile_of(position)

    async def checkpoints(self, *, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        self._check_open()
        _check_limit(limit)
        return await self._checkpoints(after_size, limit)

    async def latest_checkpoint(self) -> Checkpoint | None:
        self._check_open()
        return await self._latest_checkpoint()

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        await self._save_snapshot(snapshot, to_micros(snapshot.recorded_at or self._clock()))

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        self._check_open()
        return await self._load_snapshot(stream_id)

    # -- adapter hooks --------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    @abc.abstractmethod
    async def _write_batch(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        """In one transaction: plan the batch with ``plan_batch``, write, commit."""

    @abc.abstractmethod
    async def _read_stream_rows(
        self, stream_id: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> list[EventRow]: ...

    @abc.abstractmethod
    async def _read_all_rows(self, from_position: int, limit: int | None) -> list[EventRow]: ...

    @abc.abstractmethod
    async def _read_leaves(self, from_position: int, limit: int) -> list[LeafRow]: ...

    @abc.abstractmethod
    async def _stream_head(self, stream_id: str) -> StreamHead | None: ...

    @abc.abstractmethod
    async def _stream_heads(
        self, after: str | None, limit: int
    ) -> list[tuple[str, StreamHead]]: ...

    @abc.abstractmethod
    async def _read_snapshot(
        self, visit: Callable[[list[EventRow]], None], batch_size: int
    ) -> dict[str, StreamHead]: ...

    @abc.abstractmethod
    async def _head_position(self) -> int: ...

    @abc.abstractmethod
    async def _save_snapshot(self, snapshot: Snapshot, recorded_at_us: int) -> None: ...

    @abc.abstractmethod
    async def _load_snapshot(self, stream_id: str) -> Snapshot | None: ...

    @abc.abstractmethod
    async def _save_checkpoint(
        self, tiles: Sequence[MerkleTile], checkpoint: Checkpoint
    ) -> Checkpoint: ...

    @abc.abstractmethod
    async def _merkle_tiles(self, first: int, limit: int, entries: bool) -> list[MerkleTile]: ...

    @abc.abstractmethod
    async def _merkle_tile_of(self, position: int) -> MerkleTile | None: ...

    @abc.abstractmethod
    async def _checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]: ...

    @abc.abstractmethod
    async def _latest_checkpoint(self) -> Checkpoint | None: ...

    @abc.abstractmethod
    async def _vault_keys(self, subjects: Collection[str]) -> dict[str, SubjectKey]: ...

    @abc.abstractmethod
    async def _vault_keys_by_id(self, key_ids: Collection[str]) -> dict[str, bytes]: ...

    @abc.abstractmethod
    async def _vault_key_id(self, subject: str) -> str | None: ...

    @abc.abstractmethod
    async def _vault_destroy(self, subject: str) -> str | None: ...

    @abc.abstractmethod
    async def _purge_snapshots(self, mentioning: str) -> int: ...

    async def _ensure_listener(self) -> None:
        """Start listening for other processes' commits, where the backend can."""


class _TableVault:
    """``personal.KeyVault`` on the store's own ``subject_keys`` table."""

    def __init__(self, store: BaseEventStore) -> None:
        self._store = store

    async def keys_for(self, subjects: Collection[str]) -> dict[str, SubjectKey]:
        self._store._check_open()
        return await self._store._vault_keys(subjects)

    async def keys_by_id(self, key_ids: Collection[str]) -> dict[str, bytes]:
        self._store._check_open()
        return await self._store._vault_keys_by_id(key_ids)

    async def key_id_of(self, subject: str) -> str | None:
        self._store._check_open()
        return await self._store._vault_key_id(subject)

    async def destroy(self, subject: str) -> str | None:
        self._store._check_open()
        return await self._store._vault_destroy(subject)
