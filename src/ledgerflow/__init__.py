"""ledgerflow: durable workflows and sagas on an append-only, hash-chained ledger."""

from __future__ import annotations

from .aggregate import Aggregate, Loaded, Repository
from .audit import Finding, FindingKind, VerifyReport, verify_ledger
from .errors import (
    ConcurrencyError,
    ConfigurationError,
    DuplicateEventError,
    EventError,
    EventSerializationError,
    EventTooLargeError,
    InvalidEventDataError,
    LedgerflowError,
    SchemaVersionError,
    StoreClosedError,
    StoreError,
    StoreUnavailableError,
    StreamNotFoundError,
    UnknownEventTypeError,
)
from .events import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AlreadyAppended,
    Appended,
    AppendResult,
    ExpectedVersion,
    Metadata,
    NewEvent,
    RecordedEvent,
    Snapshot,
    StreamState,
)
from .registry import EventRegistry
from .store import EventStore, open_store

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AlreadyAppended",
    "AppendResult",
    "Appended",
    "ConcurrencyError",
    "ConfigurationError",
    "DuplicateEventError",
    "EventError",
    "EventRegistry",
    "EventSerializationError",
    "EventStore",
    "EventTooLargeError",
    "ExpectedVersion",
    "Finding",
    "FindingKind",
    "InvalidEventDataError",
    "LedgerflowError",
    "Loaded",
    "Metadata",
    "NewEvent",
    "RecordedEvent",
    "Repository",
    "SchemaVersionError",
    "Snapshot",
    "StoreClosedError",
    "StoreError",
    "StoreUnavailableError",
    "StreamNotFoundError",
    "StreamState",
    "UnknownEventTypeError",
    "VerifyReport",
    "__version__",
    "open_store",
    "verify_ledger",
]
