"""Shared machinery of the store adapters: preparing events, group commit, decoding,
and subscriptions. Adapters supply the storage primitives (the ``_`` hooks)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import ClassVar, Self

import msgspec
from uuid_utils.compat import uuid7

from ..errors import (
    DuplicateEventError,
    EventSerializationError,
    EventTooLargeError,
    InvalidEventDataError,
    LedgerflowError,
    StoreClosedError,
    StoreError,
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
from ..hashing import from_micros, to_micros
from ..registry import EventRegistry
from ._plan import AppendRequest, EventRow, PreparedEvent, StreamHead
from .runtime import RUNTIME_WRITES, InstanceRow, PutInstance, RuntimeWrite, WakeupRow

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "BaseEventStore", "Clock", "Pending"]

log = logging.getLogger("ledgerflow.store")

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
MAX_STREAM_ID_LENGTH = 255
Clock = Callable[[], datetime]

_encode_metadata = msgspec.json.Encoder().encode
_decode_metadata = msgspec.json.Decoder(Metadata).decode
_EMPTY_METADATA = _encode_metadata(Metadata())


def _check_target(stream_id: str, expected: ExpectedVersion) -> None:
    if not isinstance(stream_id, str) or not stream_id:
        raise InvalidEventDataError("", 0, "stream id must be a non-empty string")
    if "\x00" in stream_id:
        raise InvalidEventDataError("", 0, "stream id must not contain NUL characters")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidEventDataError(
            "", 0, f"stream id is longer than {MAX_STREAM_ID_LENGTH} characters"
        )
    if not isinstance(expected, StreamState) and (
        not isinstance(expected, int) or isinstance(expected, bool) or expected < 0
    ):
        raise InvalidEventDataError(
            "", 0, f"expected version must be an int >= 0 or a StreamState, not {expected!r}"
        )


def _checked_runtime(runtime: Sequence[RuntimeWrite]) -> tuple[RuntimeWrite, ...]:
    writes = tuple(runtime)
    for write in writes:
        if not isinstance(write, RUNTIME_WRITES):
            raise InvalidEventDataError("", 0, f"not a runtime write: {write!r}")
        row = write.row if isinstance(write, PutInstance) else write
        texts = (
            (row.workflow_id, row.name, row.status, row.parent_id)
            if isinstance(row, InstanceRow)
            else (row.workflow_id, getattr(row, "lease_owner", None))
        )
        if any(t is not None and "\x00" in t for t in texts):
            raise InvalidEventDataError("", 0, "runtime rows must not contain NUL characters")
    return writes


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise InvalidEventDataError("", 0, f"limit must be an int >= 0, not {limit!r}")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Pending:
    __slots__ = ("future", "request")

    def __init__(self, request: AppendRequest, future: asyncio.Future[AppendResult]) -> None:
        self.request = request
        self.future = future


class BaseEventStore(abc.ABC):
    """Template for adapters; see ``ports.EventStore`` for the contract."""

    backend: ClassVar[str]
    max_batch_events: ClassVar[int] = 5000
    poll_interval: float = 1.0
    """Fallback wake-up of idle subscribers, seconds; commits wake them sooner."""

    def __init__(
        self,
        *,
        registry: EventRegistry | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock: Clock | None = None,
    ) -> None:
        self.registry = registry if registry is not None else EventRegistry()
        self.max_event_bytes = max_event_bytes
        self._clock = clock or _utcnow
        self._queue: asyncio.Queue[Pending | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._new_events = asyncio.Event()
        self._opened = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------

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
    ) -> AppendResult:
        self._check_open()
        writes = _checked_runtime(runtime)
        if not events and writes:
            # No events, only runtime rows: written if the stream is at the expected
            # version, so a runner never overwrites rows decided on stale history.
            _check_target(stream_id, expected_version)
            if isinstance(expected_version, StreamState):
                raise InvalidEventDataError(
                    "", 0, "runtime rows without events need an int expected version"
                )
            request = AppendRequest(stream_id, (), expected_version, writes)
        else:
            request = self._prepare(stream_id, events, expected_version, metadata)
            if runtime:
                request = AppendRequest(
                    request.stream_id, request.events, request.expected, tuple(runtime)
                )
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._submit(Pending(request, future))
        return await future

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
    ) -> AppendRequest:
        _check_target(stream_id, expected)
        if isinstance(events, (str, bytes)) or not isinstance(events, Sequence):
            raise InvalidEventDataError("", 0, "events must be a sequence of events")
        if not events:
            raise InvalidEventDataError("", 0, "an append needs at least one event")
        if metadata is not None and not isinstance(metadata, Metadata):
            raise InvalidEventDataError("", 0, "metadata must be a ledgerflow.Metadata")
        shared = _EMPTY_METADATA if metadata is None else self._encode_metadata(metadata)
        prepared = tuple(self._prepare_event(event, shared) for event in events)
        ids = {event.id for event in prepared}
        if len(ids) != len(prepared):
            duplicate = next(e.id for e in prepared if sum(p.id == e.id for p in prepared) > 1)
            raise DuplicateEventError(duplicate, stream_id, "the id appears twice in one append")
        return AppendRequest(stream_id, prepared, expected)

    def _encode_metadata(self, metadata: Metadata) -> bytes:
        try:
            return _encode_metadata(metadata)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EventSerializationError("metadata", str(exc)) from exc

    def _prepare_event(self, event: object, shared_metadata: bytes) -> PreparedEvent:
        encoded = self.registry.encode(event)
        if "\x00" in encoded.type:
            # PostgreSQL text cannot hold NUL; refuse it everywhere alike.
            raise InvalidEventDataError(
                encoded.type, encoded.schema_version, "event type must not contain NUL"
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
        finally:
            # Cancelled (event loop shutting down) or stopped: nobody may wait forever.
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None and not item.future.done():
                    item.future.set_exception(StoreClosedError())

    async def _commit(self, batch: list[Pending]) -> None:
        requests = [p.request for p in batch]
        outcomes: list[AppendResult | LedgerflowError]
        try:
            outcomes = list(await self._write_batch(requests, to_micros(self._clock())))
        except LedgerflowError as error:
            outcomes = [error] * len(batch)
        except Exception as error:  # an adapter bug must not strand the callers
            log.exception("%s store: append batch failed", self.backend)
            outcomes = [StoreUnavailableError(self.backend, repr(error))] * len(batch)
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

    def _wake_subscribers(self) -> None:
        event, self._new_events = self._new_events, asyncio.Event()
        event.set()

    # -- reading --------------------------------------------------------------------

    def _decode(self, row: EventRow) -> RecordedEvent:
        return RecordedEvent(
            id=row.id,
            stream_id=row.stream_id,
            version=row.version,
            position=row.position,
            type=row.type,
            schema_version=row.schema_version,
            data=self.registry.decode(row.type, row.schema_version, row.data),
            metadata=_decode_metadata(row.metadata),
            recorded_at=from_micros(row.recorded_at_us),
            hash=row.hash,
            prev_hash=row.prev_hash,
        )

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
        rows = await self._read_stream_rows(stream_id, from_version, limit, backwards)
        if not rows and await self._stream_head(stream_id) is None:
            raise StreamNotFoundError(stream_id)
        return [self._decode(row) for row in rows]

    async def read_all(
        self, *, from_position: int = 1, limit: int | None = None
    ) -> list[RecordedEvent]:
        self._check_open()
        _check_limit(limit)
        rows = await self._read_all_rows(from_position, limit)
        return [self._decode(row) for row in rows]

    async def read_rows(self, *, from_position: int = 1, limit: int = 1000) -> list[EventRow]:
        self._check_open()
        _check_limit(limit)
        return await self._read_all_rows(from_position, limit)

    async def subscribe(
        self, *, from_position: int = 1, batch_size: int = 500
    ) -> AsyncIterator[RecordedEvent]:
        self._check_open()
        if batch_size < 1:
            raise InvalidEventDataError("", 0, "batch_size must be >= 1")
        await self._ensure_listener()
        position = max(from_position, 1)
        outage = 0.0
        while not self._closed:
            # Take the wake-up handle before reading, so a commit that lands between
            # the read and the wait still wakes us.
            wake = self._new_events
            try:
                batch = await self.read_all(from_position=position, limit=batch_size)
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.poll_interval)

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

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        await self._save_snapshot(snapshot, to_micros(snapshot.recorded_at or self._clock()))

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        self._check_open()
        return await self._load_snapshot(stream_id)

    # -- runtime rows ---------------------------------------------------------------

    async def claim_wakeups(
        self, owner: str, *, now_us: int, lease_until_us: int, limit: int
    ) -> list[str]:
        """Lease up to ``limit`` instances due by ``now_us`` that nobody holds (or
        whose lease expired) to ``owner``; their ids, earliest due first."""
        self._check_open()
        if limit < 1:
            return []
        return await self._claim_wakeups(owner, now_us, lease_until_us, limit)

    async def next_wakeup(self) -> int | None:
        """The earliest moment (µs) some instance may become claimable; None if none."""
        self._check_open()
        return await self._next_wakeup()

    async def release_wakeups(self, owner: str | None = None) -> int:
        """Drop the leases of ``owner`` (every lease if None); how many were held."""
        self._check_open()
        return await self._release_wakeups(owner)

    async def lease_owners(self) -> list[str]:
        """Every owner that holds a lease now, expired or not, in order."""
        self._check_open()
        return await self._lease_owners()

    async def get_wakeup(self, workflow_id: str) -> WakeupRow | None:
        self._check_open()
        return await self._get_wakeup(workflow_id)

    async def get_instance(self, workflow_id: str) -> InstanceRow | None:
        self._check_open()
        return await self._get_instance(workflow_id)

    async def list_instances(
        self, *, status: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[InstanceRow]:
        """Instances in id order after ``after``, optionally of one status."""
        self._check_open()
        _check_limit(limit)
        return await self._list_instances(status, after, limit)

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
    async def _stream_head(self, stream_id: str) -> StreamHead | None: ...

    @abc.abstractmethod
    async def _stream_heads(
        self, after: str | None, limit: int
    ) -> list[tuple[str, StreamHead]]: ...

    @abc.abstractmethod
    async def _head_position(self) -> int: ...

    @abc.abstractmethod
    async def _save_snapshot(self, snapshot: Snapshot, recorded_at_us: int) -> None: ...

    @abc.abstractmethod
    async def _load_snapshot(self, stream_id: str) -> Snapshot | None: ...

    @abc.abstractmethod
    async def _claim_wakeups(
        self, owner: str, now_us: int, lease_until_us: int, limit: int
    ) -> list[str]: ...

    @abc.abstractmethod
    async def _next_wakeup(self) -> int | None: ...

    @abc.abstractmethod
    async def _release_wakeups(self, owner: str | None) -> int: ...

    @abc.abstractmethod
    async def _lease_owners(self) -> list[str]: ...

    @abc.abstractmethod
    async def _get_wakeup(self, workflow_id: str) -> WakeupRow | None: ...

    @abc.abstractmethod
    async def _get_instance(self, workflow_id: str) -> InstanceRow | None: ...

    @abc.abstractmethod
    async def _list_instances(
        self, status: str | None, after: str | None, limit: int
    ) -> list[InstanceRow]: ...

    async def _ensure_listener(self) -> None:  # noqa: B027 - optional hook, no-op default
        """Start listening for other processes' commits, where the backend can."""
