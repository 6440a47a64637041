"""Event store adapters behind one port, opened from a URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigurationError
from ..registry import EventRegistry
from ._base import DEFAULT_MAX_EVENT_BYTES, Now
from ._checks import MAX_STREAM_ID_LENGTH
from ._plan import EventRow, StreamHead
from .ports import EventStore, WorkflowStore

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "MAX_STREAM_ID_LENGTH",
    "EventRow",
    "EventStore",
    "StreamHead",
    "WorkflowStore",
    "open_store",
]


def open_store(
    url: str,
    *,
    registry: EventRegistry | None = None,
    max_event_bytes: int | None = None,
    clock: Now | None = None,
    create: bool = True,
) -> WorkflowStore:
    """Create the store a URL names; open it with ``async with`` (or ``await .open()``).

    - ``memory://``: in-process, for tests.
    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: embedded.
    - ``postgresql://user@host:port/db?schema=name``: tables live in ``schema``
      (default ``ledgerflow``); other query parameters go to libpq.

    ``max_event_bytes`` bounds one encoded event (data + metadata), default 1 MiB.

    ``create`` (the default) lets opening create the ledger or migrate an older
    schema, and makes it check that the database can be written: a read-only one
    raises ``StoreReadOnlyError`` then, not at the first append. With
    ``create=False`` opening changes nothing: it raises ``LedgerNotFoundError`` where
    there is no ledger (a missing or empty file, another application's database, a
    mistyped schema) and ``SchemaOutdatedError`` for an older schema, which a
    process that writes migrates. The store can still append once open. Tools that
    inspect a ledger use it, so a typo never leaves an empty ledger behind.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryEventStore

        return MemoryEventStore(
            registry=registry,
            max_event_bytes=max_event_bytes or DEFAULT_MAX_EVENT_BYTES,
            clock=clock,
            create=create,
        )
    if scheme == "sqlite":
        from .sqlite import SQLiteEventStore, path_from_url

        query = parse_qs(urlsplit(url).query)
        unknown = set(query) - {"busy_timeout"}
        if unknown:
            raise ConfigurationError(f"unknown SQLite URL options: {sorted(unknown)}")
        timeout = float(query["busy_timeout"][0]) if "busy_timeout" in query else 30.0
        return SQLiteEventStore(
            path_from_url(url),
            registry=registry,
            max_event_bytes=max_event_bytes,
            clock=clock,
            busy_timeout=timeout,
            create=create,
        )
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresEventStore
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                "PostgreSQL support needs the extra: pip install 'ledgerflow[postgres]'"
            ) from exc
        return PostgresEventStore.from_url(
            url, registry=registry, max_event_bytes=max_event_bytes, clock=clock, create=create
        )
    raise ConfigurationError(
        f"unsupported store URL {url!r}: use memory://, sqlite:///path or postgresql://..."
    )
