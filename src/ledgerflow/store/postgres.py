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
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from .._waiting import cancel_and_wait
from ..errors import (
    ConfigurationError,
    LedgerNotFoundError,
    SchemaOutdatedError,
    SchemaVersionError,
    StoreCorruptError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ..events import Snapshot
from ..hashing import from_micros
from ..registry import EventRegistry
from ._base import BaseEventStore, Now
from ._migrations import missing_tables, pending, tables_of
from ._plan import EventRow, StreamHead
from ._postgres_conn import (
    BACKEND,
    CONNECT_TIMEOUT,
    CONNECTION_DEFAULTS,
    DEFAULT_SCHEMA,
    RECONNECT_WINDOW,
    Connection,
    PostgresConnections,
    Session,
    channel_for,
    check_schema,
    configure_session,
    driver_errors,
    event_row,
    location_of,
    reason,
    split_url,
)
from ._postgres_merkle import PostgresMerkle
from ._postgres_projections import PostgresProjections
from ._postgres_resources import PostgresResources
from ._postgres_runtime import PostgresRuntime
from ._postgres_sql import Sql, allocator_key, migrations
from ._postgres_tasks import PostgresTasks
from ._postgres_vault import PostgresVault
from ._postgres_write import PostgresWrites, parts
from .tiles import LeafRow

__all__ = [
    "DEFAULT_SCHEMA",
    "PostgresEventStore",
    # Defined here before they moved to _postgres_conn; still importable from here.
    "channel_for",
    "check_schema",
    "split_url",
]

_NO_DATABASE = re.compile(r'FATAL: +database ".*" does not exist')

# The names tests and tools have used, from before these lived in other modules.
_migrations = migrations
_allocator_key = allocator_key
_parts = parts

log = logging.getLogger("ledgerflow.store.postgres")

_LISTEN_BACKOFF = (0.05, 5.0)
_SETTLE_WAIT = 2.0  # seconds a read may wait for committed events to settle


_WRITABLE = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'"
"""Whether the server is a standby, and whether this session's transactions are
read-only: either, and no write can succeed."""


# The store's parts: its connections (_postgres_conn), the write path
# (_postgres_write), runtime rows (_postgres_runtime), task rows (_postgres_tasks) and
# guarded resources (_postgres_resources); here its state, its lifecycle,
# notifications and reads. The mixins declare what they take from the store as
# abstract methods, so PostgresConnections comes first: a base listed before it
# would hide its methods behind those declarations.
class PostgresEventStore(
    PostgresConnections,
    PostgresWrites,
    PostgresRuntime,
    PostgresTasks,
    PostgresResources,
    PostgresProjections,
    PostgresMerkle,
    PostgresVault,
    BaseEventStore,
):
    backend = BACKEND
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
        defaults = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
        self._conninfo = make_conninfo(conninfo, **defaults)
        self._location = location_of(self._conninfo, schema)
        self._sql = Sql(schema)
        self._writer_conn: Connection | None = None
        self._writer_session: Session | None = None
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

    # -- lifecycle ------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            try:
                with driver_errors("connect", self.location):
                    conn = await self._writing_connection()
            except StoreUnavailableError as exc:
                # Waiting cannot make a mistyped database name exist.
                if not self.create and _NO_DATABASE.search(str(exc.__cause__)):
                    raise LedgerNotFoundError(self.location, "its database does not exist") from exc
                raise
            if self.create:
                with driver_errors("check that the database can be written", self.location):
                    await self._check_writable(conn)
                with driver_errors("migrate the schema", self.location):
                    await self._migrate(conn)
                    await self._check_tables(conn)
                with driver_errors("check the role's privileges", self.location):
                    await self._check_privileges(conn)
            else:
                with driver_errors("look for the ledger", self.location):
                    await self._check_ledger(conn)
            pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
                self._conninfo,
                kwargs={"autocommit": True},
                min_size=1,
                max_size=max(1, self.readers),
                open=False,
                name=f"ledgerflow-{self.schema}",
                configure=configure_session,
                # During an outage a caller waits this long for a connection, then
                # hears StoreUnavailableError (the pool's default, 30 s, held HTTP
                # requests that long before their 503).
                timeout=CONNECT_TIMEOUT,
                # The pool's reconnection attempts back off from 1 s, doubling, for
                # this long; then a caller's wait starts afresh from 1 s. Its default
                # (300 s) let the delay grow with the outage: after 90 s down, 20-26 s
                # passed before the first connection came back.
                reconnect_timeout=RECONNECT_WINDOW,
            )
            with driver_errors("open the reader pool", self.location):
                await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
            self._pool = pool
        except BaseException:
            await self._release()
            raise

    async def _check_writable(self, conn: Connection) -> None:
        """Fail at open, not at the first append, where nothing can be written."""
        cur = await conn.execute(_WRITABLE)
        row = await cur.fetchone()
        assert row is not None
        self._refuse_read_only(*row)

    async def check_ready(self) -> None:
        # After open the server may have become a standby (a fail-over that demoted
        # it) or read-only (default_transaction_read_only set since): every write
        # would fail, so the store is not ready, though it answers.
        self._check_open()

        async def look(conn: Connection) -> tuple[bool, bool]:
            cur = await conn.execute(_WRITABLE)
            row = await cur.fetchone()
            assert row is not None
            standby, read_only = bool(row[0]), bool(row[1])
            if read_only:
                # A session takes the database's (or role's) default when it
                # connects and keeps it: a pooled connection opened while the
                # database was read-only said so for as long as it lived (an hour),
                # after the database took writes again. Closed, the pool replaces it,
                # and the next look is a fresh session's.
                await conn.close()
            return standby, read_only

        self._refuse_read_only(*await self._pooled("check the store is writable", look))

    def _refuse_read_only(self, standby: bool, read_only: bool) -> None:
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
            "resources": ("INSERT", "UPDATE"),
            "permits": ("INSERT", "UPDATE", "DELETE"),
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
        await self._check_tables(conn)

    async def _check_tables(self, conn: Connection) -> None:
        """Every table of the schema is there (none dropped by hand): else every
        later call would fail on it."""
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,)
        )
        found = {name for (name,) in await cur.fetchall()}
        missing = tables_of(migrations(self.schema)) - found
        if missing:
            raise StoreCorruptError(self.location, missing_tables(missing))

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
            await cancel_and_wait([listener])
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
                    reason(exc),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LISTEN_BACKOFF[1])

    async def _announce_work(self) -> None:
        # As the payload of an append that makes work: " w:<our tag>" (our own
        # listener ignores it; whoever gave the work back pokes its own workers).
        # Best effort: a lost one costs other workers a poll interval.
        try:
            await self._fetch("announce work", self._sql.notify, (self.channel, f" w:{self._tag}"))
        except StoreUnavailableError as exc:
            log.warning("postgres store: cannot wake other workers (%s)", exc)

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
        found = await self._fetch("read a stream", sql, (stream_id, bound, limit))
        rows = [event_row(t) for t in found]
        if rows and (limit is None or len(rows) < limit) and not backwards:
            # Read to its end (no limit, or fewer rows than it): the stream's head
            # as of now, which lets the next append to it (a worker's, after loading
            # an instance) take the one-round-trip path.
            self._learn_head(stream_id, rows[-1])
        return rows

    async def _read_all_rows(self, from_position: int, limit: int | None) -> list[EventRow]:
        found = await self._settled_rows(self._sql.read_all, from_position, limit)
        return [event_row(t) for t in found]

    async def _read_leaves(self, from_position: int, limit: int) -> list[LeafRow]:
        found = await self._settled_rows(self._sql.read_leaves, from_position, limit)
        return [(p, s, v, bytes(h)) for p, s, v, h in found]

    async def _settled_rows(self, sql: str, from_position: int, limit: int | None) -> list[Any]:
        """Rows of the settled log from ``from_position`` (position first in each),
        read again while short of what had committed when the read began."""
        waited: _SettleWait | None = None
        while True:
            found = await self._fetch("read the log", sql, (from_position, limit))
            if limit is not None and len(found) >= limit:
                return found
            reached = found[-1][0] if found else from_position - 1
            if waited is None:
                waited = _SettleWait(await self._committed_tip())
            if not await waited.longer(reached):
                return found

    async def _committed_tip(self) -> int:
        """The highest position committed, settled or not (see _SettleWait)."""
        rows = await self._fetch("read the log's tip", self._sql.committed_tip, ())
        return int(rows[0][0] or 0)

    async def _read_snapshot(
        self, visit: Callable[[list[EventRow]], None], batch_size: int
    ) -> dict[str, StreamHead]:
        sql = self._sql

        async def run(conn: Any) -> dict[str, StreamHead]:
            # One REPEATABLE READ transaction: every statement sees the snapshot of
            # its first. Rows of transactions still running are invisible to it, and
            # so are the heads they move: the two agree (read_all's settled filter is
            # for followers that must not skip a position; here it would hide rows
            # whose heads are visible).
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                position = 1
                while True:
                    cur = await conn.execute(sql.snapshot_rows, (position, batch_size), binary=True)
                    found = await cur.fetchall()
                    if not found:
                        break
                    rows = [event_row(t) for t in found]
                    visit(rows)
                    position = rows[-1].position + 1
                cur = await conn.execute(sql.all_heads, binary=True)
                heads = {sid: StreamHead(v, h, p) for sid, v, h, p in await cur.fetchall()}
            finally:
                await conn.rollback()
            return heads

        return await self._pooled("read a snapshot of the ledger", run)

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
