"""Every error ledgerflow raises, in one hierarchy.

Callers catch the most specific class they can handle; anything from a driver
(sqlite3, psycopg) is translated at the adapter boundary into one of these, so no
driver type ever crosses the port::

    LedgerflowError
    ├── ConfigurationError          bad store URL, unsupported option
    ├── EventError                  bad input: nothing was written
    │   ├── UnknownEventTypeError   object of an unregistered class, unknown name on read
    │   ├── EventSerializationError payload cannot be encoded as JSON
    │   ├── InvalidEventDataError   payload does not match its registered type
    │   └── EventTooLargeError      encoded event over the store's size limit
    └── StoreError                  the store refused or could not do the operation
        ├── ConcurrencyError        expected version did not match (retry after reload)
        ├── DuplicateEventError     an event id was reused with different content
        ├── StreamNotFoundError     read of a stream that has no events
        ├── SchemaVersionError      database schema is newer than this code
        ├── StoreClosedError        the store was used after it was closed
        └── StoreUnavailableError   connection or I/O failure (retryable)

Retryability is data: ``error.retryable`` says whether the same call may succeed
if simply tried again (after reloading state, for a ``ConcurrencyError``).
"""

from __future__ import annotations

from uuid import UUID

__all__ = [
    "ConcurrencyError",
    "ConfigurationError",
    "DuplicateEventError",
    "EventError",
    "EventSerializationError",
    "EventTooLargeError",
    "InvalidEventDataError",
    "LedgerflowError",
    "SchemaVersionError",
    "StoreClosedError",
    "StoreError",
    "StoreUnavailableError",
    "StreamNotFoundError",
    "UnknownEventTypeError",
]


class LedgerflowError(Exception):
    """Root of every error ledgerflow raises on purpose."""

    retryable: bool = False


class ConfigurationError(LedgerflowError):
    """The store or engine was configured with something it cannot use."""


class EventError(LedgerflowError):
    """An event given to the store is not acceptable; nothing was written."""


class UnknownEventTypeError(EventError):
    def __init__(self, what: str) -> None:
        super().__init__(f"unknown event type: {what} (register it with EventRegistry.event)")
        self.what = what


class EventSerializationError(EventError):
    def __init__(self, event_type: str, reason: str) -> None:
        super().__init__(f"event {event_type!r} cannot be serialized: {reason}")
        self.event_type = event_type
        self.reason = reason


class InvalidEventDataError(EventError):
    def __init__(self, event_type: str, schema_version: int, reason: str) -> None:
        super().__init__(f"event {event_type!r} v{schema_version} has invalid data: {reason}")
        self.event_type = event_type
        self.schema_version = schema_version
        self.reason = reason


class EventTooLargeError(EventError):
    def __init__(self, event_type: str, size: int, limit: int) -> None:
        super().__init__(f"event {event_type!r} is {size} bytes encoded; the limit is {limit}")
        self.event_type = event_type
        self.size = size
        self.limit = limit


class StoreError(LedgerflowError):
    """The store could not carry out the operation."""


class ConcurrencyError(StoreError):
    """The stream's version was not the one the writer expected.

    ``expected`` is what the caller passed (an int or a StreamState name),
    ``actual`` the stream's version at the time (0 when the stream does not exist).
    Reload and decide again; that is why it is retryable.
    """

    retryable = True

    def __init__(self, stream_id: str, expected: object, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, actual version {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventError(StoreError):
    """An event id that is already stored came back with different content."""

    def __init__(self, event_id: UUID, stream_id: str, reason: str) -> None:
        super().__init__(f"event {event_id} (stream {stream_id!r}) already stored: {reason}")
        self.event_id = event_id
        self.stream_id = stream_id
        self.reason = reason


class StreamNotFoundError(StoreError):
    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} does not exist")
        self.stream_id = stream_id


class SchemaVersionError(StoreError):
    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"the database schema is at version {found} but this ledgerflow knows "
            f"versions up to {known}: upgrade ledgerflow before opening this database"
        )
        self.found = found
        self.known = known


class StoreClosedError(StoreError):
    def __init__(self) -> None:
        super().__init__("the event store is closed")


class StoreUnavailableError(StoreError):
    """The database could not be reached or failed mid-operation."""

    retryable = True

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend} store unavailable: {reason}")
        self.backend = backend
        self.reason = reason
