"""The values that cross the EventStore port: events going in, envelopes coming out."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

import msgspec

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AlreadyAppended",
    "AppendResult",
    "Appended",
    "ExpectedVersion",
    "Metadata",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "StreamState",
]


class StreamState(enum.Enum):
    """Expected-version conditions that are not a specific version number."""

    NO_STREAM = "no_stream"
    """The stream must not exist yet (same as expected version 0)."""
    STREAM_EXISTS = "stream_exists"
    """The stream must have at least one event, at any version."""
    ANY = "any"
    """No check: append at whatever version the stream is at."""

    def __str__(self) -> str:
        return self.name


NO_STREAM = StreamState.NO_STREAM
STREAM_EXISTS = StreamState.STREAM_EXISTS
ANY = StreamState.ANY

ExpectedVersion: TypeAlias = int | StreamState
"""Versions count events: a stream with 3 events is at version 3; 0 means no stream."""


class Metadata(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """Who did what, why, and as part of which larger operation.

    ``extra`` carries any further JSON-safe keys an application wants on its events.
    """

    actor: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    tenant: str | None = None
    reason: str | None = None
    traceparent: str | None = None
    """The W3C trace context of the call that recorded it (``ledgerflow.tracing``):
    a workflow's passes and steps join the trace of the call that started it."""
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event with plain JSON data, for when no registered class is wanted.

    If ``type`` names a registered event class, ``data`` is validated against it.
    ``id`` makes the append idempotent: the same id appended twice is stored once.
    ``schema_version`` defaults to the registered version, or 1.
    """

    type: str
    data: Mapping[str, Any] = field(default_factory=dict)
    metadata: Metadata | None = None
    id: UUID | None = None
    schema_version: int | None = None


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as the ledger holds it: the envelope and its decoded data.

    ``data`` is an instance of the registered class (after upcasting to its current
    schema version) when the type is registered, else the plain decoded JSON.
    ``hash`` chains this event to ``prev_hash``, the hash of the previous event of
    the same stream (32 zero bytes for the first).
    """

    id: UUID
    stream_id: str
    version: int
    position: int
    type: str
    schema_version: int
    data: Any
    metadata: Metadata
    recorded_at: datetime
    hash: bytes
    prev_hash: bytes
    sealed: bool = field(default=False, compare=False, repr=False)
    """Its stored data holds sealed personal values (``ledgerflow.personal``): what
    ``data`` shows of them lasts only until their subject is erased, so caches of
    it (a worker's hot histories) must not outlive the read."""


@dataclass(frozen=True, slots=True)
class Appended:
    """The events of one append call were committed.

    ``version`` is the stream's version after them; ``positions`` their global
    positions, in order.
    """

    stream_id: str
    version: int
    positions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AlreadyAppended:
    """Every event of the call was already stored with the same content; nothing new
    was written. ``version`` and ``positions`` are those of the earlier append."""

    stream_id: str
    version: int
    positions: tuple[int, ...]


AppendResult: TypeAlias = Appended | AlreadyAppended


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A folded state of a stream up to ``version``, encoded by its owner.

    ``type`` and ``schema_version`` say how to decode ``state``; a reader that finds a
    schema version it does not know ignores the snapshot and replays the events.
    """

    stream_id: str
    version: int
    type: str
    schema_version: int
    state: bytes
    recorded_at: datetime | None = None
