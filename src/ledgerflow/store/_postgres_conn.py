"""How the PostgreSQL store reaches its server: URLs and schema names, the writer
connection and its server session, the reader pool, pipelines, and psycopg's errors
turned into the store's; and the decoding of an event row, which the write path and
the reads share.

``PostgresConnections`` is mixed into ``PostgresEventStore`` ahead of the other
mixins: its methods are what they declare as abstract (see ``postgres.py``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.abc import Params
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from ..errors import (
    ConfigurationError,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ..hashing import to_micros
from ._plan import EventRow

__all__ = [
    "BACKEND",
    "CONNECTION_DEFAULTS",
    "CONNECT_TIMEOUT",
    "DEAD_PEER",
    "DEFAULT_SCHEMA",
    "RECONNECT_WINDOW",
    "Connection",
    "PostgresConnections",
    "Session",
    "channel_for",
    "check_schema",
    "configure_session",
    "driver_errors",
    "event_row",
    "location_of",
    "pipeline",
    "reason",
    "split_url",
]

BACKEND = "postgres"
DEFAULT_SCHEMA = "ledgerflow"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MAX_IDENTIFIER = 63  # NAMEDATALEN - 1: longer channel names are refused by pg_notify
CONNECT_TIMEOUT = 10
RECONNECT_WINDOW = 5.0
"""Seconds a pool's chain of reconnection attempts lasts (see postgres._open)."""
DEAD_PEER = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
"""How a TCP connection notices a server that is gone without a word: one whose
address now leads nowhere (a failover that moved the name to a new primary, a cut
network path, a host powered off) sends no reset. Without these a query waited for
its answer until the kernel's keepalive, two hours after the last packet, and a write
through ~15 minutes of retransmissions. Now a silent connection is probed after 10 s,
every 5 s, three times, and data left unacknowledged for 30 s ends it: the call hears
``StoreUnavailableError`` and the next one connects afresh. Probes and acknowledgements
are the server's kernel's answers, not PostgreSQL's, so a long query on a busy server
is never cut. A URL's own values win (``?keepalives_idle=60``); Unix sockets ignore
them."""
CONNECTION_DEFAULTS = {
    "connect_timeout": str(CONNECT_TIMEOUT),
    "application_name": "ledgerflow",
    **DEAD_PEER,
}
_ROLLBACK_WAIT = 1.0  # seconds a failed writer's rollback may take before we just close
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
Session = tuple[int, datetime]
"""A server session: its backend's pid and start time (a pid alone may be reused)."""


def event_row(t: Sequence[Any]) -> EventRow:
    """An event as the statements that read ``events`` return it."""
    return EventRow(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], to_micros(t[8]), t[9], t[10])


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


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


@contextlib.contextmanager
def driver_errors(action: str, location: str) -> Iterator[None]:
    """Let no psycopg type cross the port: OperationalError (lost connection, server
    shutdown, timeouts, serialization failures) is the retryable kind."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(BACKEND, f"{action}: {reason(exc)}") from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        # A table or column of the ledger gone (dropped or altered by hand after the
        # store opened): retrying meets the same schema. (Not UndefinedFunction: an
        # operator missing for a parameter's type is a caller's mistake.)
        raise StoreCorruptError(location, f"could not {action}: {reason(exc)}") from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        # A standby, or sessions made read-only since the store opened: retrying on
        # this server cannot help.
        raise StoreReadOnlyError(location, f"could not {action}: {reason(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(f"postgres store could not {action}: {reason(exc)}") from exc


@contextlib.asynccontextmanager
async def pipeline(conn: Connection) -> AsyncIterator[None]:
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


async def configure_session(conn: Connection) -> None:
    # An acknowledged append must survive a server crash whatever the server,
    # database or role default says (synchronous_commit = off acknowledges commits
    # before they reach the disk). Claims and releases on the reader pool write too.
    await conn.execute("SELECT set_config('synchronous_commit', 'on', false)")


def location_of(conninfo: str, schema: str) -> str:
    """The ledger's address fit for messages: a URL without password."""
    params = conninfo_to_dict(conninfo)
    user, host, port = params.get("user"), params.get("host") or "", params.get("port")
    netloc = (f"{user}@" if user else "") + str(host) + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{params.get('dbname') or ''}?schema={schema}"


class PostgresConnections(abc.ABC):
    """Mixed into ``PostgresEventStore``: its writer connection and reader pool."""

    _conninfo: str
    _writer_conn: Connection | None
    _writer_session: Session | None
    _pool: AsyncConnectionPool[Connection] | None

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The ledger's address, for errors."""

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

    async def _discard_writer(self) -> Session | None:
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
                async with pipeline(conn):
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
                async with pipeline(conn):
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
        with driver_errors(action, self.location):
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
