"""PostgreSQL EventStore: many processes, one ledger.

Writers in every process commit concurrently. Each write transaction starts with
``begin_append``, which locks the streams it touches and then takes its transaction id
and its positions together, under a lock held for microseconds; readers read only rows
of transactions older than their snapshot's xmin. So a reader that has seen position
p never later finds a committed event at or below p, and no writer waits for another
process's commit (see docs/adr/008-postgres-order-by-visibility.md). Group commit
makes a batch of appends cost two round trips whatever its size, or one when this
writer's memory of the ledger is current. Commits are followed by a NOTIFY, which
wakes subscribers in other processes at once; polling is only the fallback.

Payloads are ``bytea``, not ``jsonb``: the hash chain covers the exact bytes, which
``jsonb`` would normalize. Every table is qualified with the store's schema, so
``search_path`` never matters and several ledgers can share a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit
from uuid import UUID

import psycopg
from psycopg.abc import Params
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from ..errors import (
    ConfigurationError,
    LedgerNotFoundError,
    SchemaOutdatedError,
    SchemaVersionError,
    StoreClosedError,
    StoreError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ..events import AppendResult, Snapshot
from ..hashing import from_micros, to_micros
from ..registry import EventRegistry
from ._base import BaseEventStore, Now
from ._migrations import pending
from ._plan import (
    AppendRequest,
    BatchPlan,
    EventRow,
    LeaseState,
    StreamHead,
    fenced_ids,
    plan_batch,
    reused_ids,
)
from ._postgres_sql import Sql, allocator_key, migrations, stream_key
from ._postgres_tasks import PostgresTasks, TaskSql, task_locks
from .runtime import (
    Fence,
    InstanceRow,
    Lease,
    Nudge,
    RuntimeWrite,
    Schedule,
    Unschedule,
    WakeupRow,
    WorkerRow,
    as_row,
    makes_work,
)

__all__ = ["DEFAULT_SCHEMA", "PostgresEventStore"]

_migrations = migrations  # the names tests and tools have used
_allocator_key = allocator_key

log = logging.getLogger("ledgerflow.store.postgres")

DEFAULT_SCHEMA = "ledgerflow"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MAX_IDENTIFIER = 63  # NAMEDATALEN - 1: longer channel names are refused by pg_notify
_CONNECT_TIMEOUT = 10
_CONNECTION_DEFAULTS = {"connect_timeout": str(_CONNECT_TIMEOUT), "application_name": "ledgerflow"}
_LISTEN_BACKOFF = (0.05, 5.0)
_BATCH_ATTEMPTS = 3
_STREAMS_PER_TRANSACTION = 1000
"""Advisory locks (one per stream) one write transaction may hold; see _write_batch."""
_SETTLE_WAIT = 2.0  # seconds a read may wait for committed events to settle
_ROLLBACK_WAIT = 1.0  # seconds a failed writer's rollback may take before we just close
_REDO = (psycopg.errors.TransactionRollback, psycopg.errors.UniqueViolation)
"""Refusals after which a batch is decided again: the server rolled it back whole."""
_PositionsMoved = psycopg.errors.RaiseException
"""begin_append's refusal of positions planned from memory (nothing was taken)."""
_KNOWN_HEADS = 10_000  # stream heads the writer remembers for one-round-trip appends
# A write transaction takes two round trips and milliseconds of planning. One whose
# process froze (SIGSTOP, a VM pause) or was cut off holds its streams' locks and,
# worse, holds every reader of the log back (ADR 008), until TCP keepalive noticed
# (hours by default). The server ends it after this long: idle in the transaction
# (between the round trips), or inside one (a pipeline is one statement to the
# server until its Sync, so statement_timeout also covers a client that froze
# halfway through sending it).
_WRITER_IDLE_LIMIT = "10s"

Connection = psycopg.AsyncConnection[TupleRow]
T = TypeVar("T")
_Session = tuple[int, datetime]
"""A server session: its backend's pid and start time (a pid alone may be reused)."""


def _parts(requests: list[AppendRequest], streams: int) -> list[list[AppendRequest]]:
    """``requests`` cut, in order, into runs that each write at most ``streams``
    streams (each request is decided on its own: cutting changes no outcome)."""
    parts: list[list[AppendRequest]] = [[]]
    seen: set[str] = set()
    for request in requests:
        if request.stream_id not in seen and len(seen) == streams:
            parts.append([])
            seen = set()
        seen.add(request.stream_id)
        parts[-1].append(request)
    return parts if parts[0] else []


def _row(t: Sequence[Any]) -> EventRow:
    return EventRow(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], to_micros(t[8]), t[9], t[10])


def _params(row: EventRow) -> tuple[Any, ...]:
    return (
        row.position,
        row.id,
        row.stream_id,
        row.version,
        row.type,
        row.schema_version,
        row.data,
        row.metadata,
        from_micros(row.recorded_at_us),
        row.prev_hash,
        row.hash,
    )


def _kinds(workflows: tuple[tuple[str, int], ...] | None) -> dict[str, list[Any]]:
    if workflows is None:
        return {}
    return {"names": [n for n, _ in workflows], "versions": [v for _, v in workflows]}


def _writes(requests: Sequence[AppendRequest]) -> list[RuntimeWrite]:
    return [w for r in requests for w in r.runtime]


def _touched(writes: Sequence[RuntimeWrite]) -> set[str]:
    """The wake-up rows ``writes`` change."""
    return {w.workflow_id for w in writes if isinstance(w, Schedule | Nudge | Unschedule)}


def _wakeup_ids(fences: Sequence[Fence], writes: Sequence[RuntimeWrite]) -> list[str]:
    """Every wake-up row a batch may lock, fenced or written (the database orders
    them when it locks)."""
    ids = {f.workflow_id for f in fences}
    ids.update(_touched(writes))
    return sorted(ids)


def _runtime_statement(
    sql: Sql, tasks: TaskSql, write: RuntimeWrite
) -> tuple[str, tuple[Any, ...] | dict[str, Any]]:
    kind, params = as_row(write)
    if kind == "schedule":  # named: the owner is used twice
        return sql.schedule, dict(zip(("wid", "due", "owner", "until"), params, strict=True))
    if kind in tasks.runtime:
        return tasks.runtime[kind], params
    statement = {
        "put": sql.put_instance,
        "schedule": sql.schedule,
        "nudge": sql.nudge,
        "unschedule": sql.unschedule,
    }[kind]
    return statement, params


def check_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"invalid PostgreSQL schema name {schema!r}: use 1 to 63 characters from "
            "a-z, 0-9 and _, not starting with a digit"
        )
    return schema


def channel_for(schema: str) -> str:
    channel = f"ledgerflow_{schema}"
    if len(channel) <= _MAX_IDENTIFIER:
        return channel
    # Keep long names distinct yet within the limit, identically in every process.
    digest = hashlib.sha256(schema.encode()).hexdigest()[:12]
    return f"{channel[: _MAX_IDENTIFIER - 13]}_{digest}"


def split_url(url: str) -> tuple[str, str]:
    """The libpq connection string and the schema of a ``postgresql://`` URL.

    ``schema`` is ours and is removed; every other parameter stays byte for byte as
    written (re-encoding would turn a literal ``+`` into a space).
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL (want postgresql://...): {scheme}")
    # Cut the query out by hand: urlunsplit would turn ``postgresql:///db`` (local
    # socket) into ``postgresql:/db``.
    base, _, query = url.partition("?")
    kept: list[str] = []
    schemas: list[str] = []
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if unquote(key) == "schema":
            schemas.append(unquote(value))
        elif item:
            kept.append(item)
    if len(schemas) > 1:
        raise ConfigurationError("the PostgreSQL URL names more than one schema")
    schema = check_schema(schemas[0] if schemas else DEFAULT_SCHEMA)
    return (f"{base}?{'&'.join(kept)}" if kept else base), schema


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


@contextlib.contextmanager
def _driver_errors(action: str, location: str) -> Iterator[None]:
    """Let no psycopg type cross the port: OperationalError (lost connection, server
    shutdown, timeouts, serialization failures) is the retryable kind."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(
            PostgresEventStore.backend, f"{action}: {_reason(exc)}"
        ) from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        # A standby, or sessions made read-only since the store opened: retrying on
        # this server cannot help.
        raise StoreReadOnlyError(location, f"could not {action}: {_reason(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"postgres store could not {action}: {_reason(exc)}") from exc


@contextlib.asynccontextmanager
async def _pipeline(conn: Connection) -> AsyncIterator[None]:
    """``conn.pipeline()``, raising the block's own first error, and quietly.

    Once a pipelined statement fails, psycopg marks the rest of the pipeline
    aborted. If the failure surfaced inside the block (psycopg reads results
    whenever the socket has some), leaving the pipeline fails as well and psycopg
    logs that second failure as a warning ("error ignored terminating ...: pipeline
    aborted"): an ordinary version conflict, detected as a unique violation, would
    print noise in every application. Holding the error until the pipeline is left
    keeps psycopg silent; the error raised is the statement's own either way.
    """
    failure: psycopg.Error | None = None
    try:
        async with conn.pipeline():
            try:
                yield
            except psycopg.Error as exc:
                failure = exc
    except psycopg.Error:
        if failure is None:
            raise
    if failure is not None:
        raise failure


async def _configure_session(conn: Connection) -> None:
    # An acknowledged append must survive a server crash whatever the server,
    # database or role default says (synchronous_commit = off acknowledges commits
    # before they reach the disk). Claims and releases on the reader pool write too.
    await conn.execute("SELECT set_config('synchronous_commit', 'on', false)")


def _location(conninfo: str, schema: str) -> str:
    """The ledger's address fit for messages: a URL without password."""
    params = conninfo_to_dict(conninfo)
    user, host, port = params.get("user"), params.get("host") or "", params.get("port")
    netloc = (f"{user}@" if user else "") + str(host) + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{params.get('dbname') or ''}?schema={schema}"


class PostgresEventStore(PostgresTasks, BaseEventStore):
    backend = "postgres"
    poll_interval = 2.0  # NOTIFY wakes subscribers; this only bounds a lost notification
    dense_positions = False  # positions a write took and did not commit stay unused

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        registry: EventRegistry | None = None,
        max_event_bytes: int | None = None,
        clock: Now | None = None,
        readers: int = 4,
        create: bool = True,
    ) -> None:
        kwargs: dict[str, Any] = {"registry": registry, "clock": clock, "create": create}
        if max_event_bytes is not None:
            kwargs["max_event_bytes"] = max_event_bytes
        super().__init__(**kwargs)
        self.schema = check_schema(schema)
        self.channel = channel_for(schema)
        self.readers = readers
        try:
            given = conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise ConfigurationError(f"invalid PostgreSQL connection string: {exc}") from exc
        defaults = {k: v for k, v in _CONNECTION_DEFAULTS.items() if k not in given}
        self._conninfo = make_conninfo(conninfo, **defaults)
        self._location = _location(self._conninfo, schema)
        self._sql = Sql(schema)
        self._writer_conn: Connection | None = None
        self._writer_session: _Session | None = None
        self._known_heads: OrderedDict[str, StreamHead | None] = OrderedDict()
        self._known_next: int | None = None
        self._tag = uuid.uuid4().hex[:12]
        """Names this store in its NOTIFY payloads, so its listener skips its own."""
        self._fast_skip = 0
        self._fast_misses = 0
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        registry: EventRegistry | None = None,
        max_event_bytes: int | None = None,
        clock: Now | None = None,
        create: bool = True,
    ) -> PostgresEventStore:
        conninfo, schema = split_url(url)
        return cls(
            conninfo,
            schema=schema,
            registry=registry,
            max_event_bytes=max_event_bytes,
            clock=clock,
            create=create,
        )

    @property
    def location(self) -> str:
        return self._location

    # -- plumbing -------------------------------------------------------------------

    async def _connect(self) -> Connection:
        return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)

    async def _writing_connection(self) -> Connection:
        conn = self._writer_conn
        if conn is None or conn.closed:
            conn = await self._connect()
            try:
                cur = await conn.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
                    "set_config('statement_timeout', %s, false), "
                    "set_config('synchronous_commit', 'on', false), pg_backend_pid(), "
                    "(SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
                    (_WRITER_IDLE_LIMIT, _WRITER_IDLE_LIMIT),
                )
                row = await cur.fetchone()
            except BaseException:
                await conn.close()
                raise
            assert row is not None
            self._writer_conn = conn
            self._writer_session = (row[3], row[4])
        return conn

    async def _discard_writer(self) -> _Session | None:
        """Close the writer connection; the server session it had, if any."""
        conn, self._writer_conn = self._writer_conn, None
        session, self._writer_session = self._writer_session, None
        if conn is not None:
            if not conn.broken:
                # Roll back at the server before closing: a closed socket ends the
                # session only when the server next looks, and until then its open
                # transaction holds every reader of the log back (ADR 008).
                with contextlib.suppress(psycopg.Error, TimeoutError):
                    await asyncio.wait_for(conn.rollback(), _ROLLBACK_WAIT)
            await conn.close()
        return session if conn is not None else None

    async def _fetch(
        self, action: str, sql: str, params: Params, *, flushed: bool = True
    ) -> list[TupleRow]:
        """Run one statement on the reader pool, as a transaction of its own.

        ``flushed=False``: its commit does not wait for the disk (a claim: see
        _claim_wakeups), sent with its BEGIN and COMMIT in one round trip.
        """

        async def run(conn: Connection) -> list[TupleRow]:
            if flushed:
                cur = await conn.execute(sql, params, binary=True)
            else:
                async with _pipeline(conn):
                    await conn.execute("BEGIN")
                    await conn.execute("SET LOCAL synchronous_commit TO off")
                    cur = await conn.execute(sql, params, binary=True)
                    await conn.execute("COMMIT")
            return [] if cur.description is None else await cur.fetchall()

        return await self._pooled(action, run)

    async def _transaction(
        self, action: str, fn: Callable[[Connection], Awaitable[T]], *, flushed: bool = True
    ) -> T:
        """Run ``fn`` on the reader pool, in one READ COMMITTED transaction (each
        statement sees what committed before it began), as ``_fetch`` runs one
        statement. Its statements are pipelined after the BEGIN: each fetch is a
        round trip, and the COMMIT one more."""

        async def run(conn: Connection) -> T:
            try:
                async with _pipeline(conn):
                    await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    if not flushed:
                        await conn.execute("SET LOCAL synchronous_commit TO off")
                    result = await fn(conn)
                    await conn.execute("COMMIT")
            except BaseException:
                # Roll back here, not in the pool (which would warn about it).
                if not conn.broken:
                    with contextlib.suppress(psycopg.Error):
                        await conn.rollback()
                raise
            return result

        return await self._pooled(action, run)

    async def _pooled(self, action: str, run: Callable[[Connection], Awaitable[T]]) -> T:
        """``run`` on a connection of the reader pool; psycopg's errors as ours."""
        pool = self._pool
        if pool is None:  # closed while a read was under way (a subscription, a wait)
            raise StoreClosedError()
        with _driver_errors(action, self.location):
            for attempt in (1, 2):
                async with pool.connection() as conn:
                    try:
                        return await run(conn)
                    except psycopg.OperationalError:
                        if attempt == 2 or not conn.broken:
                            raise
                # Pooled connections died while idle (server restart, idle timeout):
                # replace them all, then repeat. What runs through the pool is a
                # transaction of its own, and repeating one is safe:
                # - reads, the snapshot upsert and lease releases are idempotent (a
                #   repeated release may under-count what the lost one cleared); so
                #   are the registry's statements (a repeated reap may not name the
                #   workers the lost one removed) and renewals;
                # - a claim (of wake-ups or tasks) is not: if the lost attempt
                #   committed before the connection died, its rows stay leased to the
                #   owner, who never learns of them. The repeat does not return them
                #   (they are leased), so no row goes to two workers; they run late
                #   instead, once their lease expires and any worker may claim them
                #   again.
                await pool.check()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lifecycle ------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            with _driver_errors("connect", self.location):
                conn = await self._writing_connection()
            if self.create:
                with _driver_errors("check that the database can be written", self.location):
                    await self._check_writable(conn)
                with _driver_errors("migrate the schema", self.location):
                    await self._migrate(conn)
                with _driver_errors("check the role's privileges", self.location):
                    await self._check_privileges(conn)
            else:
                with _driver_errors("look for the ledger", self.location):
                    await self._check_ledger(conn)
            pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
                self._conninfo,
                kwargs={"autocommit": True},
                min_size=1,
                max_size=max(1, self.readers),
                open=False,
                name=f"ledgerflow-{self.schema}",
                configure=_configure_session,
            )
            with _driver_errors("open the reader pool", self.location):
                await pool.open(wait=True, timeout=_CONNECT_TIMEOUT)
            self._pool = pool
        except BaseException:
            await self._release()
            raise

    async def _check_writable(self, conn: Connection) -> None:
        """Fail at open, not at the first append, where nothing can be written."""
        cur = await conn.execute(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'"
        )
        row = await cur.fetchone()
        assert row is not None
        standby, read_only = row
        if standby:
            raise StoreReadOnlyError(
                self.location, "the server is a standby in recovery; connect to the primary"
            )
        if read_only:
            raise StoreReadOnlyError(
                self.location,
                "sessions are read-only (default_transaction_read_only is on for this "
                "server, database or role)",
            )

    async def _check_privileges(self, conn: Connection) -> None:
        """A role that may read the ledger but not write it fails here, at open."""
        s = self.schema
        # One privilege per pair: has_table_privilege('INSERT, UPDATE') means either.
        writes = {
            "events": ("INSERT",),
            "streams": ("INSERT", "UPDATE"),
            "snapshots": ("INSERT", "UPDATE"),
            "workflows": ("INSERT", "UPDATE"),
            "wakeups": ("INSERT", "UPDATE", "DELETE"),
            "workers": ("INSERT", "UPDATE", "DELETE"),
            "tasks": ("INSERT", "UPDATE", "DELETE"),
            "queues": ("INSERT", "UPDATE"),
        }
        needed = [(f"{s}.{table}", p) for table, privileges in writes.items() for p in privileges]
        cur = await conn.execute(
            "SELECT t, p FROM unnest(%s::text[], %s::text[]) AS n(t, p) "
            "WHERE NOT has_table_privilege(t, p) "
            # setval, which hands out positions, needs UPDATE on the sequence.
            "UNION ALL SELECT %s, 'UPDATE' WHERE NOT has_sequence_privilege(%s, 'UPDATE')",
            ([t for t, _ in needed], [p for _, p in needed], f"{s}.positions", f"{s}.positions"),
        )
        missing = await cur.fetchall()
        if missing:
            raise StoreReadOnlyError(
                self.location,
                "the role lacks " + "; ".join(f"{p} on {t}" for t, p in missing),
            )

    async def _ledger_version(self, conn: Connection) -> int | None:
        """The schema version of the ledger in the store's schema; None if none.

        Raises ``LedgerNotFoundError`` when a ``schema_migrations`` table there is
        another application's (one keyed by text, say): never ours to migrate.
        """
        s = self.schema
        cur = await conn.execute("SELECT to_regclass(%s)", (f"{s}.schema_migrations",))
        found = await cur.fetchone()
        if found is None or found[0] is None:
            return None
        # No coalesce(max, 0): on a text column it would fail instead of telling.
        cur = await conn.execute(f"SELECT max(version) FROM {s}.schema_migrations")
        row = await cur.fetchone()
        applied = 0 if row is None or row[0] is None else row[0]
        if not isinstance(applied, int):
            raise LedgerNotFoundError(
                self.location, f"{s}.schema_migrations belongs to another application"
            )
        return applied

    async def _check_ledger(self, conn: Connection) -> None:
        """Opening without create: the ledger must exist at this code's schema.

        Only reads: nothing is locked, created or migrated.
        """
        applied = await self._ledger_version(conn)
        if not applied:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (self.schema,)
            )
            row = await cur.fetchone()
            exists = row is not None and row[0]
            raise LedgerNotFoundError(
                self.location,
                f"schema {self.schema} holds no ledgerflow tables"
                if exists
                else f"the database has no schema {self.schema}",
            )
        known = migrations(self.schema)[-1].version
        if applied > known:
            raise SchemaVersionError(applied, known)
        if applied < known:
            raise SchemaOutdatedError(self.location, applied, known)

    async def _migrate(self, conn: Connection) -> None:
        s = self.schema
        async with conn.transaction():
            # DDL on a large ledger may take longer than a write transaction may.
            await conn.execute("SET LOCAL statement_timeout = 0")
            # Concurrent openers of one schema queue here instead of racing on DDL.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"ledgerflow:{s}",)
            )
            applied = await self._ledger_version(conn)
            if applied is None:
                # Only when missing: CREATE ... IF NOT EXISTS would still demand the
                # CREATE privilege of a role that merely uses an up-to-date schema.
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE {s}.schema_migrations (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                applied = 0
            for migration in pending(migrations(s), applied):
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    f"INSERT INTO {s}.schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )

    async def _close(self) -> None:
        await self._release()

    async def _release(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        await self._discard_writer()

    # -- notifications --------------------------------------------------------------

    async def _ensure_listener(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.create_task(self._listen(), name="postgres-listener")

    async def _listen(self) -> None:
        delay = _LISTEN_BACKOFF[0]
        while not self._closed:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f'LISTEN "{self.channel}"')
                    delay = _LISTEN_BACKOFF[0]
                    # Commits made while we were not listening sent nobody a NOTIFY:
                    # subscribers re-read and workers look for work now, and every
                    # later commit notifies.
                    self._wake_subscribers()
                    self._work_appeared()
                    own = f"w:{self._tag}"
                    async for note in conn.notifies():
                        self._wake_subscribers()
                        # Our own appends woke our workers already (_resolve).
                        if " w:" in note.payload and not note.payload.endswith(own):
                            self._work_appeared()
                finally:
                    await conn.close()
            except psycopg.Error as exc:
                log.warning(
                    "postgres store: LISTEN connection lost (%s); retrying in %.2fs",
                    _reason(exc),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LISTEN_BACKOFF[1])

    # -- writing --------------------------------------------------------------------

    async def _write_batch(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        """Commit ``requests`` in as few transactions as the server's lock table lets.

        Each transaction holds one advisory lock per stream it writes, and those live
        in PostgreSQL's shared lock table (max_locks_per_transaction × connections
        entries, 6,400 by default), which every session shares. So a transaction
        writes at most ``_STREAMS_PER_TRANSACTION`` streams, and a batch refused with
        "out of shared memory" (others hold many locks just now) is split in halves
        and tried again; a part of one stream that still finds no room fails with
        ``StoreUnavailableError``, as any outage does.
        """
        outcomes: list[AppendResult | StoreError] = []
        for part in _parts(requests, _STREAMS_PER_TRANSACTION):
            outcomes.extend(await self._write_part(part, recorded_at_us))
        return outcomes

    async def _write_part(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        try:
            return await self._write_one(requests, recorded_at_us)
        except StoreUnavailableError as exc:
            streams = len({r.stream_id for r in requests})
            if not isinstance(exc.__cause__, psycopg.errors.OutOfMemory) or streams < 2:
                raise
            log.warning(
                "postgres store: the server's lock table is full; committing %d streams "
                "in two transactions",
                streams,
            )
        outcomes: list[AppendResult | StoreError] = []
        for half in _parts(requests, (streams + 1) // 2):
            outcomes.extend(await self._write_part(half, recorded_at_us))
        return outcomes

    async def _write_one(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        fast = self._fast_plan(requests, recorded_at_us)
        if fast is not None:
            done = await self._commit_fast(fast)
            if done is not None:
                return done
        return await self._commit_planned(requests, recorded_at_us)

    def _stream_keys(self, streams: Iterable[str]) -> list[int]:
        return [stream_key(self.schema, stream) for stream in streams]

    async def _commit_planned(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        """The batch decided from the database: lock its streams, take positions and
        read (one round trip), then write and commit (a second)."""
        streams = list(dict.fromkeys(r.stream_id for r in requests))
        ids = reused_ids(requests)
        wanted = sum(len(r.events) for r in requests)
        with _driver_errors("append", self.location):
            for attempt in range(1, _BATCH_ATTEMPTS + 1):
                conn = await self._writing_connection()
                sent: BatchPlan | None = None
                taken: tuple[int, int] | None = None  # the positions this attempt took
                try:
                    # BEGIN and COMMIT go through the pipeline by hand: psycopg's
                    # transaction() syncs on entry and exit, which costs three
                    # round trips more per batch than the two needed here.
                    async with _pipeline(conn):
                        # Explicit: under REPEATABLE READ a writer that waited for a
                        # stream's lock would read that stream's head as it was
                        # before the previous holder committed.
                        await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                        first, plan, read = await self._plan(
                            conn, requests, streams, ids, wanted, recorded_at_us
                        )
                        taken_to = None if first is None else first + wanted - 1
                        if first is not None:
                            # What a lost commit may hand back, if still the last taken:
                            # up to what the plan used, whether or not the give-back
                            # below ran (if it did not, the sequence is past this).
                            taken = (first, plan.last_position)
                        given: psycopg.AsyncCursor[TupleRow] | None = None
                        if taken_to is not None and plan.last_position < taken_to:
                            # Refused or repeated requests used fewer positions than
                            # were taken: hand the rest back rather than leave a gap.
                            given = await conn.execute(
                                self._sql.give_back, (taken_to, plan.last_position)
                            )
                        # Runtime rows alone (a guarded write without events) commit too.
                        if plan.rows or plan.runtime:
                            sent = plan
                            await self._write_plan(conn, plan)
                            await self._commit_and_notify(conn, plan, recorded_at_us)
                        else:
                            await conn.execute("ROLLBACK")
                    next_position = None if taken_to is None else taken_to + 1
                    if given is not None:
                        row = await given.fetchone()
                        next_position = plan.last_position + 1 if row and row[0] else None
                    self._learn(streams, read, plan, first, next_position)
                    return plan.outcomes
                except BaseException as exc:
                    # Whatever failed, the session's state is unknown: start afresh
                    # (closing it also rolls back an open transaction).
                    self._forget()
                    broken = conn.broken
                    session = await self._discard_writer()
                    if not isinstance(exc, psycopg.Error) or attempt == _BATCH_ATTEMPTS:
                        raise
                    if not broken and isinstance(exc, _REDO):
                        # The server refused the transaction before it committed (a
                        # deadlock, or an id another process was storing at the same
                        # moment): nothing is stored; decide the batch again.
                        continue
                    if not isinstance(exc, psycopg.OperationalError):
                        raise
                    if sent is not None and await self._settled(sent, exc, session, taken):
                        return sent.outcomes
                    # Nothing was stored. A connection found dead (a server restart
                    # since the last batch, or lost mid-batch) is worth one more try.
                    if not broken:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _plan(
        self,
        conn: Connection,
        requests: list[AppendRequest],
        streams: list[str],
        ids: list[UUID],
        wanted: int,
        recorded_at_us: int,
    ) -> tuple[int | None, BatchPlan, dict[str, StreamHead]]:
        """Lock the batch's streams, take its positions and read what the plan needs,
        in one round trip; the first position taken (None if no events) and the plan."""
        sql = self._sql
        # Each statement after begin_append takes its snapshot once the stream locks
        # are granted, so it sees the previous holder's commit.
        begun = await conn.execute(sql.begin_append, (self._stream_keys(streams), wanted, None))
        heads_cur = await conn.execute(sql.heads_of, (streams,), binary=True)
        # Only caller-chosen ids can be stored already. prepare=False: a plan cached
        # while the table was small would keep scanning it whole as it grows.
        known_cur = (
            await conn.execute(sql.events_by_id, (ids,), binary=True, prepare=False)
            if ids
            else None
        )
        # The wake-up rows of fenced requests, locked (with those the batch writes,
        # in id order, as every writer locks them) so no claim moves a lease between
        # this check and the commit. After begin_append: a row lock gives the
        # transaction its id, which must come with its positions. Then the same for
        # task rows (see task_locks), always after the wake-up rows the batch
        # touches: reaping locks in that order too.
        tasks = task_locks(requests)
        wakeups = (
            _wakeup_ids(
                [r.fence for r in requests if isinstance(r.fence, Fence)], _writes(requests)
            )
            if fenced_ids(requests) or tasks
            else []
        )
        leases_cur = await conn.execute(sql.lock_wakeups, (wakeups,)) if wakeups else None
        tasks_cur = await conn.execute(self._task_sql.lock, tasks) if tasks else None
        row = await begun.fetchone()
        first: int | None = None if row is None else row[0]
        heads = {sid: StreamHead(v, h, p) for sid, v, h, p in await heads_cur.fetchall()}
        found = [] if known_cur is None else await known_cur.fetchall()
        existing = {row.id: row for row in map(_row, found)}
        locked = [] if leases_cur is None else await leases_cur.fetchall()
        leases = {wid: LeaseState(owner, epoch) for wid, owner, epoch in locked}
        held = [] if tasks_cur is None else await tasks_cur.fetchall()
        task_leases = {tid: LeaseState(owner, epoch) for tid, owner, epoch in held}
        last = 0 if first is None else first - 1
        plan = plan_batch(requests, heads, existing, last, recorded_at_us, leases, task_leases)
        return first, plan, heads

    # -- the one-round-trip path ----------------------------------------------------
    #
    # After a commit this writer knows the next position the ledger will give out and
    # the heads of the streams it touched. If no other process has taken positions
    # since, the next batch can be planned from that knowledge and sent in one round
    # trip with the commit: begin_append checks the next position is the one we
    # planned with (else it raises and takes nothing), and any process
    # that wrote one of our streams since took positions since. Then the batch is
    # decided again from the database. So is a batch that reuses a caller's id stored
    # already (the guess never looks ids up) or whose fence does not hold.

    def _fast_plan(self, requests: list[AppendRequest], recorded_at_us: int) -> BatchPlan | None:
        if self._known_next is None:
            return None
        if task_locks(requests) is not None:
            # A task fence, retry or drop: the batch plans from task rows it locks
            # and reads first (see _plan). Puts of tasks alone may come this way:
            # such a batch holds no task row, so an insert that waits for a
            # conflicting row's holder closes no cycle of waits (see task_locks).
            return None
        if self._fast_skip:
            # Others are writing too: guesses keep missing, so skip a few.
            self._fast_skip -= 1
            return None
        heads: dict[str, StreamHead] = {}
        for request in requests:
            if request.stream_id not in self._known_heads:
                return None
            head = self._known_heads[request.stream_id]
            if head is not None:
                heads[request.stream_id] = head
        # Fences are assumed to hold here and checked in the transaction
        # (check_fences): if one does not, the batch is decided again from the reads.
        assumed = {
            r.fence.workflow_id: LeaseState(r.fence.owner, r.fence.epoch)
            for r in requests
            if isinstance(r.fence, Fence)
        }
        plan = plan_batch(requests, heads, {}, self._known_next - 1, recorded_at_us, assumed)
        if not plan.rows or any(isinstance(o, StoreError) for o in plan.outcomes):
            # Nothing that would collide proves the knowledge current, or a refusal
            # might rest on stale knowledge: ask the database.
            return None
        return plan

    async def _commit_fast(self, plan: BatchPlan) -> list[AppendResult | StoreError] | None:
        """The outcomes, or None if the guess missed and nothing was written."""
        fences = plan.fences
        first, last = plan.rows[0].position, plan.rows[-1].position
        with _driver_errors("append", self.location):
            conn = await self._writing_connection()
            try:
                async with _pipeline(conn):
                    await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    await conn.execute(
                        self._sql.begin_append,
                        (self._stream_keys(plan.heads), len(plan.rows), first),
                    )
                    if fences:
                        await conn.execute(
                            self._sql.check_fences,
                            (
                                _wakeup_ids(fences, plan.runtime),
                                [f.workflow_id for f in fences],
                                [f.owner for f in fences],
                                [f.epoch for f in fences],
                            ),
                        )
                    await self._write_plan(conn, plan)
                    await self._commit_and_notify(conn, plan, plan.rows[0].recorded_at_us)
            except (psycopg.IntegrityError, _PositionsMoved) as exc:
                # Another process took positions since our last batch; or a caller's
                # id is stored already, or a fence does not hold. The transaction is
                # void; decide again from the database.
                self._forget()
                self._fast_skip = min(64, self._fast_misses * 2 + 1)
                self._fast_misses += 1
                try:
                    await conn.rollback()
                    if not isinstance(exc, _PositionsMoved):
                        # Our positions were taken: hand them back if still the last.
                        await conn.execute(self._sql.give_back, (last, first - 1))
                except psycopg.Error:
                    await self._discard_writer()
                return None
            except psycopg.OperationalError as exc:
                # The connection died (perhaps while idle: a server restart; perhaps
                # during the commit) or the server ended the transaction. Find out
                # whether it committed before anything else.
                self._forget()
                session = await self._discard_writer()
                if await self._settled(plan, exc, session):
                    return plan.outcomes
                return None
            except BaseException:
                self._forget()
                await self._discard_writer()
                raise
        self._fast_misses = 0
        self._learn(list(plan.heads), {}, plan, first, last + 1)
        return plan.outcomes

    async def _settled(
        self,
        plan: BatchPlan,
        cause: BaseException,
        lost: _Session | None,
        taken: tuple[int, int] | None = None,
    ) -> bool:
        """Whether the transaction that wrote ``plan`` committed, after its connection
        failed at a point we cannot tell (before, during or after COMMIT).

        A transaction is all or nothing, so one question settles every request of
        the batch: are the rows the plan sealed stored, each at its position with
        its id and its hash? Not "is some event id stored": a caller's id may have
        been stored by an earlier append, and then would vouch for a batch that was
        never written. A hash covers the position, the predecessor and the moment
        the plan was sealed, so a row of another transaction cannot match, unless it
        is byte for byte the same event at the same place (the events are stored as
        reported, then, either way).

        The answer must be final, yet the lost session may live on at the server
        (a lost connection does not stop it at once, and over a broken network it
        may not even have read our COMMIT yet). So that session is ended first and
        waited for; only then is the question asked. If it cannot be asked, the
        caller learns that the append may or may not be stored, never that it was.

        ``taken``: the positions the lost transaction is known to have taken; if it
        did not commit, they are handed back (if still the last taken).
        """
        if not plan.rows:
            raise StoreUnavailableError(
                self.backend,
                f"append: {_reason(cause)}; the batch held only runtime rows, which "
                "leave no event to look for: they may or may not be stored",
            )
        first, last = plan.rows[0].position, plan.rows[-1].position
        try:
            if lost is None:
                raise psycopg.OperationalError("the lost session is not known")
            conn = await self._writing_connection()
            await self._end_session(conn, lost)
            cur = await conn.execute(self._sql.sealed_between, (first, last), binary=True)
            stored = {position: (eid, digest) for position, eid, digest in await cur.fetchall()}
            committed = all(stored.get(row.position) == (row.id, row.hash) for row in plan.rows)
            if not committed and taken is not None:
                await conn.execute(self._sql.give_back, (taken[1], taken[0] - 1))
        except psycopg.Error as exc:
            await self._discard_writer()
            raise StoreUnavailableError(
                self.backend,
                f"append: {_reason(cause)}; whether it was stored could not be checked "
                f"({_reason(exc)}): it may or may not be stored",
            ) from exc
        return committed

    async def _end_session(self, conn: Connection, session: _Session) -> None:
        """Terminate a lost session of this store's and wait until it has exited."""
        deadline = asyncio.get_running_loop().time() + _CONNECT_TIMEOUT
        while True:
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid = %s AND backend_start = %s",
                session,
            )
            if await cur.fetchone() is None:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise psycopg.OperationalError(
                    f"the lost session (backend {session[0]}) did not end in {_CONNECT_TIMEOUT} s"
                )
            await asyncio.sleep(0.02)

    def _learn(
        self,
        streams: list[str],
        read: dict[str, StreamHead],
        plan: BatchPlan,
        first: int | None,
        next_position: int | None,
    ) -> None:
        """Remember the heads this batch wrote or read, and the next position.

        ``first``: the first position the batch took (None: it took none).
        ``next_position``: the ledger's next position as this batch left it (None:
        unknown, another process took positions after ours).
        """
        if first is not None and first != self._known_next:
            # Another process took positions since our last batch: what we remember
            # of streams outside this batch (whose locks we held) may be stale.
            self._known_heads.clear()
        for stream in streams:
            head = plan.heads.get(stream) or read.get(stream)
            self._known_heads[stream] = head
            self._known_heads.move_to_end(stream)
        while len(self._known_heads) > _KNOWN_HEADS:
            self._known_heads.popitem(last=False)
        if first is not None:
            if next_position is None:
                self._forget()
            else:
                self._known_next = next_position

    def _forget(self) -> None:
        self._known_heads.clear()
        self._known_next = None

    async def _write_plan(self, conn: Connection, plan: BatchPlan) -> None:
        sql = self._sql
        async with conn.cursor() as cur:
            if plan.rows:
                await cur.executemany(sql.insert_event, [_params(row) for row in plan.rows])
                await cur.executemany(
                    sql.upsert_head,
                    [(s, h.version, h.last_hash, h.last_position) for s, h in plan.heads.items()],
                )
            await self._write_runtime(cur, plan.runtime)

    async def _commit_and_notify(
        self, conn: Connection, plan: BatchPlan, recorded_at_us: int
    ) -> None:
        await conn.execute("COMMIT")
        # "<last position>" wakes subscribers; " w:<store>" wakes workers in other
        # processes (the work is claimable now; see runtime.makes_work).
        payload = str(plan.last_position) if plan.rows else ""
        if makes_work(plan.runtime, recorded_at_us):
            payload += f" w:{self._tag}"
        if payload:
            # After the commit, as a transaction of its own (in the same round trip):
            # a NOTIFY inside a write transaction holds PostgreSQL's one notification
            # lock through that commit's flush, which would serialize every writer's
            # commit again. A crash between the two leaves subscribers and workers to
            # their poll.
            await conn.execute(self._sql.notify, (self.channel, payload))

    async def _write_runtime(
        self, cur: psycopg.AsyncCursor[TupleRow], writes: Sequence[RuntimeWrite]
    ) -> None:
        """Apply the runtime rows in order, pipelined with the rest of the batch."""
        touched = _touched(writes)
        if len(touched) > 1:
            # Take the wake-up rows in id order before changing them in the batch's
            # order: release_wakeups locks in id order too, so neither can hold one
            # row while waiting for another the other holds. (Claims never wait.)
            await cur.execute(self._sql.lock_wakeups, (list(touched),))
        statements = [_runtime_statement(self._sql, self._task_sql, w) for w in writes]
        # A run of writes of one kind goes as one executemany; the order is kept.
        for statement, run in itertools.groupby(statements, key=lambda t: t[0]):
            await cur.executemany(statement, [params for _, params in run])

    # -- reading --------------------------------------------------------------------

    async def _read_stream_rows(
        self, stream_id: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> list[EventRow]:
        if backwards:
            sql, bound = self._sql.stream_backward, from_version
            if bound is None:
                bound = 2**63 - 1
        else:
            sql, bound = self._sql.stream_forward, 1 if from_version is None else from_version
        rows = await self._fetch("read a stream", sql, (stream_id, bound, limit))
        return [_row(t) for t in rows]

    async def _read_all_rows(self, from_position: int, limit: int | None) -> list[EventRow]:
        waited: _SettleWait | None = None
        while True:
            found = await self._fetch("read the log", self._sql.read_all, (from_position, limit))
            rows = [_row(t) for t in found]
            if limit is not None and len(rows) >= limit:
                return rows
            reached = rows[-1].position if rows else from_position - 1
            if waited is None:
                waited = _SettleWait(await self._committed_tip())
            if not await waited.longer(reached):
                return rows

    async def _committed_tip(self) -> int:
        """The highest position committed, settled or not (see _SettleWait)."""
        rows = await self._fetch("read the log's tip", self._sql.committed_tip, ())
        return int(rows[0][0] or 0)

    async def _stream_head(self, stream_id: str) -> StreamHead | None:
        rows = await self._fetch("read a stream head", self._sql.stream_head, (stream_id,))
        return StreamHead(*rows[0]) if rows else None

    async def _stream_heads(self, after: str | None, limit: int) -> list[tuple[str, StreamHead]]:
        rows = await self._fetch(
            "read stream heads", self._sql.stream_heads, ("" if after is None else after, limit)
        )
        return [(sid, StreamHead(v, h, p)) for sid, v, h, p in rows]

    async def _head_position(self) -> int:
        waited = _SettleWait(await self._committed_tip())
        while True:
            rows = await self._fetch("read the head position", self._sql.head_position, ())
            head = int(rows[0][0]) if rows else 0
            if not await waited.longer(head):
                return head

    async def _save_snapshot(self, snapshot: Snapshot, recorded_at_us: int) -> None:
        params = (
            snapshot.stream_id,
            snapshot.version,
            snapshot.type,
            snapshot.schema_version,
            snapshot.state,
            from_micros(recorded_at_us),
        )
        await self._fetch("save a snapshot", self._sql.save_snapshot, params)

    async def _load_snapshot(self, stream_id: str) -> Snapshot | None:
        rows = await self._fetch("load a snapshot", self._sql.load_snapshot, (stream_id,))
        return _snapshot(rows[0]) if rows else None

    async def _load_stream_rows(self, stream_id: str) -> tuple[Snapshot | None, list[EventRow]]:
        # Both reads in one round trip (a worker loading an instance it just claimed
        # waits for this): the events read from after the snapshot as the second
        # statement sees it. Each statement has its own snapshot of the database, so
        # a snapshot saved between them shows as events that do not follow the one
        # read first; then it is read again, in turn.
        async def both(conn: Connection) -> tuple[list[TupleRow], list[TupleRow]]:
            async with _pipeline(conn):
                snap = await conn.execute(self._sql.load_snapshot, (stream_id,))
                events = await conn.execute(
                    self._sql.stream_after_snapshot, (stream_id, stream_id), binary=True
                )
                return await snap.fetchall(), await events.fetchall()

        found, tail = await self._pooled("load a stream", both)
        snapshot = _snapshot(found[0]) if found else None
        rows = [_row(t) for t in tail]
        first = 1 if snapshot is None else snapshot.version + 1
        if rows and rows[0].version != first:
            return await super()._load_stream_rows(stream_id)
        return snapshot, rows

    # -- runtime rows ---------------------------------------------------------------
    # Claims and releases are single autocommit statements on the reader pool: they
    # need no head lock, so they never wait for appends (see _fetch on retries).

    async def _claim_wakeups(
        self,
        owner: str,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: tuple[tuple[str, int], ...] | None,
    ) -> list[Lease]:
        params = {
            "owner": owner,
            "until": lease_until_us,
            "now": now_us,
            "limit": limit,
            **_kinds(workflows),
        }
        sql = self._sql.claim[workflows is not None]
        # The claim's commit does not wait for the disk: it is on the path from a
        # start to its first step, and losing it in a server crash is harmless. A
        # later durable commit (the claimer's first append) flushes it too, and
        # without one nothing the claimer did survived. A claim lost in a crash
        # lets the instance be claimed again, at the same epoch but by another
        # owner, and the fence (owner and epoch) refuses the first claimer's appends.
        rows = await self._fetch("claim wake-ups", sql, params, flushed=False)
        # RETURNING follows no order; COLLATE "C" order is Python's str order.
        return [Lease(wid, epoch) for wid, _, epoch in sorted(rows, key=lambda r: (r[1], r[0]))]

    async def database_now_us(self) -> int:
        self._check_open()
        rows = await self._fetch(
            "read the database's clock",
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
            (),
        )
        return int(rows[0][0])

    async def _renew_leases(
        self, owner: str, leases: list[Lease], lease_until_us: int
    ) -> list[Lease]:
        params = {
            "owner": owner,
            "until": lease_until_us,
            "ids": [lease.workflow_id for lease in leases],
            "epochs": [lease.epoch for lease in leases],
        }
        rows = await self._fetch("renew leases", self._sql.renew, params)
        kept = {(wid, epoch) for wid, epoch in rows}
        return [lease for lease in leases if (lease.workflow_id, lease.epoch) in kept]

    async def _next_wakeup(self, workflows: tuple[tuple[str, int], ...] | None) -> int | None:
        sql = self._sql.next_wakeup[workflows is not None]
        rows = await self._fetch("read the next wake-up", sql, _kinds(workflows))
        return None if rows[0][0] is None else int(rows[0][0])

    async def _release_wakeups(self, owner: str | None) -> int:
        if owner is None:
            rows = await self._fetch("release wake-ups", self._sql.release_all, ())
        else:
            rows = await self._fetch("release wake-ups", self._sql.release_owner, (owner,))
        return len(rows)

    async def _register_worker(self, row: WorkerRow) -> None:
        params = (
            row.worker_id,
            row.host,
            row.pid,
            list(row.queues),
            list(row.workflows),
            row.version,
            row.started_at_us,
            row.heartbeat_at_us,
            row.lease_us,
            row.in_flight,
            row.stopping,
        )
        await self._fetch("register a worker", self._sql.register_worker, params)

    async def _heartbeat_worker(
        self, worker_id: str, now_us: int, in_flight: int, stopping: bool
    ) -> bool:
        params = (now_us, in_flight, stopping, worker_id)
        rows = await self._fetch("record a heartbeat", self._sql.heartbeat_worker, params)
        return bool(rows)

    async def _deregister_worker(self, worker_id: str) -> None:
        await self._fetch("deregister a worker", self._sql.deregister_worker, (worker_id,))

    async def _list_workers(self) -> list[WorkerRow]:
        rows = await self._fetch("list workers", self._sql.list_workers, ())
        return [
            WorkerRow(
                r[0], r[1], r[2], tuple(r[3]), tuple(r[4]), r[5], r[6], r[7], r[8], r[9], r[10]
            )
            for r in rows
        ]

    async def _reap_workers(self, now_us: int) -> list[str]:
        rows = await self._fetch("reap workers", self._sql.reap_workers, {"now": now_us})
        return [wid for (wid,) in rows]

    async def _lease_owners(self) -> list[str]:
        rows = await self._fetch(
            "read lease owners",
            f"SELECT DISTINCT lease_owner FROM {self.schema}.wakeups "
            "WHERE lease_owner IS NOT NULL ORDER BY lease_owner",
            (),
        )
        return [owner for (owner,) in rows]

    async def _get_wakeup(self, workflow_id: str) -> WakeupRow | None:
        rows = await self._fetch("read a wake-up", self._sql.get_wakeup, (workflow_id,))
        return WakeupRow(*rows[0]) if rows else None

    async def _get_instance(self, workflow_id: str) -> InstanceRow | None:
        rows = await self._fetch("read an instance", self._sql.get_instance, (workflow_id,))
        return InstanceRow(*rows[0]) if rows else None

    async def _list_instances(
        self, status: str | None, after: str | None, limit: int
    ) -> list[InstanceRow]:
        sql = self._sql.list_instances[status is not None, after is not None]
        params = {"status": status, "after": after, "limit": limit}
        rows = await self._fetch("list instances", sql, params)
        return [InstanceRow(*r) for r in rows]


class _SettleWait:
    """Reads of the log show every append committed before they began: this store's
    own (read your writes) and any other process's.

    The log is read only up to the oldest write transaction still running anywhere
    in the database (ADR 008): a committed event stays unread while a transaction
    that began before its commit, and so may still take a lower position, is
    running. That takes milliseconds. A read that falls short of what was committed
    when it began looks again until it is reached, or until ``_SETTLE_WAIT`` has
    passed (a writer frozen inside its transaction), and then answers with the
    settled part: never beyond it, which is what keeps checkpoints safe.
    """

    def __init__(self, target: int) -> None:
        self._target = target
        self._delay = 0.001
        self._deadline: float | None = None

    async def longer(self, reached: int) -> bool:
        """Whether to read again, having read up to position ``reached``."""
        if reached >= self._target:
            return False
        now = asyncio.get_running_loop().time()
        if self._deadline is None:
            self._deadline = now + _SETTLE_WAIT
        elif now >= self._deadline:
            return False
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, 0.05)
        return True


def _snapshot(row: TupleRow) -> Snapshot:
    sid, version, type_name, schema_version, state, at = row
    return Snapshot(sid, version, type_name, schema_version, state, _utc(at))


def _utc(moment: datetime) -> datetime:
    # The session's TimeZone decides how timestamptz comes back; answer in UTC as the
    # other backends do.
    return moment.astimezone(UTC)
