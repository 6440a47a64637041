"""SQLite EventStore: the embedded default.

One writer connection on its own thread takes every queued append in one
``BEGIN IMMEDIATE`` transaction (group commit); readers use their own connections,
which WAL lets run beside the writer. ``synchronous=FULL`` makes a commit durable
before the append returns: an acknowledged event survives a power cut. Other
processes may write the same file; SQLite's write lock serializes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote
from uuid import UUID

from .. import metrics
from ..errors import (
    ConfigurationError,
    InvalidEventDataError,
    LedgerflowError,
    LedgerNotFoundError,
    SchemaOutdatedError,
    SchemaVersionError,
    StoreCorruptError,
    StoreError,
    StoreInternalError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ..events import AppendResult, Snapshot
from ..hashing import from_micros, to_micros
from ..registry import EventRegistry
from ._base import BaseEventStore, Now, Pending
from ._migrations import missing_tables, pending, tables_of
from ._plan import (
    AppendRequest,
    EventRow,
    LeaseState,
    StreamHead,
    fenced_ids,
    fenced_tasks,
    plan_batch,
    reused_ids,
)
from ._sqlite_merkle import SQLiteMerkle
from ._sqlite_projections import SQLiteProjections
from ._sqlite_resources import SQLiteResources
from ._sqlite_runtime import SQLiteRuntime
from ._sqlite_schema import MIGRATIONS, apply_runtime
from ._sqlite_tasks import SQLiteTasks
from ._sqlite_vault import SQLiteVault
from .tiles import LeafRow

__all__ = ["MIGRATIONS", "SQLiteEventStore", "path_from_url"]

T = TypeVar("T")

log = logging.getLogger("ledgerflow.store.sqlite")

_COLUMNS = (
    "position, event_id, stream_id, version, type, schema_version, data, metadata, "
    "recorded_at, prev_hash, hash"
)
_KNOWN_HEADS = 10_000
"""Stream heads the writer remembers between commits (see _write_sync)."""
_INSERT_EVENT = f"INSERT INTO events ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
_SELECTED = (
    "position, CAST(event_id AS TEXT), CAST(stream_id AS TEXT), CAST(version AS INTEGER), "
    "CAST(type AS TEXT), CAST(schema_version AS INTEGER), CAST(data AS BLOB), "
    "CAST(metadata AS BLOB), CAST(recorded_at AS INTEGER), CAST(prev_hash AS BLOB), "
    "CAST(hash AS BLOB)"
)
"""``_COLUMNS`` as read: SQLite keeps whatever storage class an UPDATE gives a column,
and only an edit made outside ledgerflow gives one another; read as the store wrote
them, such values fail the hash check (``audit verify`` names the event) instead of
breaking whatever reads them."""
_UPSERT_HEAD = (
    "INSERT INTO streams (stream_id, version, last_hash, last_position) VALUES (?,?,?,?) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
    "last_hash = excluded.last_hash, last_position = excluded.last_position"
)
_LEDGER_TABLES = frozenset(
    {"events", "streams", "snapshots", "workflows", "wakeups", "workers", "tasks", "queues"}
)
_MIGRATION_COLUMNS = frozenset({"version", "name", "applied_at"})
_SCHEMA_DAMAGE = ("no such table", "no such column")
_TABLES = tables_of(MIGRATIONS)
_CHUNK = 500  # stays far below SQLite's bound-parameter limit
_NO_LIMIT = -1
_MAX_VERSION = 2**62


class _Busy(Exception):
    """Another connection holds the write lock right now."""


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


def _succeed(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _row(t: Sequence[Any]) -> EventRow:
    try:
        event_id = UUID(t[1])
    except ValueError:  # only an edit made outside ledgerflow stores one
        raise InvalidEventDataError(t[4], t[5], f"its id {t[1]!r:.60} is not a UUID") from None
    return EventRow(t[0], event_id, t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10])


def _audited_row(t: Sequence[Any]) -> EventRow:
    """``_row`` for verify: an event id that is no UUID (edited outside ledgerflow)
    reads as the nil UUID, which fails the hash check, rather than stopping it."""
    try:
        return _row(t)
    except InvalidEventDataError:
        return _row([t[0], str(UUID(int=0)), *t[2:]])


def _chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def path_from_url(url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db``
    absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigurationError(f"not a SQLite URL (want sqlite:///path): {url!r}")
    path = url[len(prefix) :].split("?", 1)[0]
    if not path:
        raise ConfigurationError(f"SQLite URL has no file path: {url!r}")
    return Path(path)


class SQLiteEventStore(
    SQLiteRuntime,
    SQLiteTasks,
    SQLiteResources,
    SQLiteProjections,
    SQLiteMerkle,
    SQLiteVault,
    BaseEventStore,
):
    backend = "sqlite"
    poll_interval = 0.25  # other processes' commits are only seen by polling
    readers = 2

    def __init__(
        self,
        path: str | Path,
        *,
        registry: EventRegistry | None = None,
        max_event_bytes: int | None = None,
        clock: Now | None = None,
        busy_timeout: float = 30.0,
        create: bool = True,
    ) -> None:
        kwargs: dict[str, Any] = {"registry": registry, "clock": clock, "create": create}
        if max_event_bytes is not None:
            kwargs["max_event_bytes"] = max_event_bytes
        super().__init__(**kwargs)
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._inbox: queue.SimpleQueue[Pending | _Call | None] = queue.SimpleQueue()
        self._con_lock = threading.Lock()  # the writer connection: one user at a time
        self._here: list[Pending] = []
        self._flush_scheduled = False
        self._writer_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_pool = ThreadPoolExecutor(self.readers, thread_name_prefix="ledgerflow-sqlite-r")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writer_con: sqlite3.Connection | None = None
        # Writer state (used under _con_lock only):
        self._busy_off = False  # the writer connection's busy timeout is 0 just now
        self._seen_version: int | None = None  # PRAGMA data_version at the last write
        self._known_last = 0  # the highest position then
        self._known_heads: OrderedDict[str, StreamHead] = OrderedDict()  # heads we wrote

    @property
    def location(self) -> str:
        return f"sqlite:///{self.path}"

    # -- plumbing -------------------------------------------------------------------

    def _uri(self) -> str:
        # mode=rw never creates the file: opening without create must leave no empty
        # database behind where there was none.
        mode = "rwc" if self.create else "rw"
        return f"file:{quote(self.path.as_posix(), safe='/')}?mode={mode}"

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(
            self._uri(),
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=True,
        )
        con.execute("PRAGMA synchronous = FULL")
        with self._lock:
            self._connections.append(con)
        return con

    def _reader(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            con.execute("PRAGMA query_only = 1")
            self._local.con = con
        return con

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: sqlite3.Error) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB":
            # Damaged pages: retrying reads the same bytes again.
            return StoreCorruptError(self.location, f"{type(exc).__name__}: {exc}")
        if name.startswith("SQLITE_READONLY"):
            # Waiting does not help: the file, its directory or the mount is read-only.
            return StoreReadOnlyError(self.location, str(exc))
        if str(exc).startswith(_SCHEMA_DAMAGE):
            # A table or column of the ledger gone (dropped or altered by hand after
            # the store opened): retrying meets the same schema.
            return StoreCorruptError(self.location, f"{type(exc).__name__}: {exc}")
        return StoreUnavailableError(self.backend, f"{type(exc).__name__}: {exc}")

    # -- the writer thread ----------------------------------------------------------
    #
    # One thread owns the writer connection. Appends reach it through a thread-safe
    # queue and come back through call_soon_threadsafe: no executor, no asyncio
    # writer task, so a lone append pays one hop each way. Whatever queued up while a
    # transaction ran is committed together in the next one (group commit).

    async def _on_writer(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the writer thread, in order with the appends."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Call(fn, future))
        return await future

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _writer_main(self) -> None:
        inbox = self._inbox
        held: Pending | _Call | None = None
        stopping = False
        while True:
            item: Pending | _Call | None
            if held is not None:
                item, held = held, None
            elif stopping:
                return
            else:
                item = inbox.get()
            if item is None:
                return
            if isinstance(item, _Call):
                with self._con_lock:
                    self._busy_on()
                    self._run_call(item)
                continue
            batch = [item]
            size = len(item.request.events)
            while size < self.max_batch_events:
                try:
                    following = inbox.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    stopping = True  # after this batch
                    break
                if isinstance(following, _Call):
                    held = following  # after this batch, in order
                    break
                batch.append(following)
                size += len(following.request.events)
            with self._con_lock:
                self._busy_on()
                outcomes = self._commit_sync(batch)
            self._post(self._resolve, batch, outcomes)

    def _commit_sync(
        self, batch: list[Pending], *, wait: bool = True
    ) -> list[AppendResult | LedgerflowError]:
        began = time.perf_counter()
        try:
            requests = [p.request for p in batch]
            written: list[AppendResult | LedgerflowError] = list(
                self._write_sync(requests, to_micros(self._clock()), wait=wait)
            )
            metrics.commit(self.backend, len(requests), time.perf_counter() - began)
            return written
        except _Busy:
            raise
        except sqlite3.Error as exc:
            return [self._unavailable(exc) for _ in batch]
        except LedgerflowError as exc:
            return [exc for _ in batch]
        except Exception as exc:  # a bug must not strand the callers
            log.exception("sqlite store: append batch failed")
            return [StoreInternalError(self.backend, exc) for _ in batch]

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.fn()
        except sqlite3.Error as exc:
            self._post(_fail, call.future, self._unavailable(exc))
        except Exception as exc:  # noqa: BLE001 - delivered to the caller, raised there
            self._post(_fail, call.future, exc)
        else:
            self._post(_succeed, call.future, result)

    def _start_writer(self) -> None:
        """Started in ``_open`` already: migrations run on the writer thread too."""

    async def _stop_writer(self) -> None:
        self._flush_here()  # appends of this turn go before the stop
        thread, self._writer_thread = self._writer_thread, None
        if thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(thread.join)

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        def run() -> list[Any]:
            return self._reader().execute(sql, params).fetchall()

        return await self._on(self._read_pool, run)

    async def check_ready(self) -> None:
        # A read of the ledger's own table: a file deleted, replaced or damaged since
        # the store opened fails it. Whether a write would succeed is not asked: a
        # connection open for writing keeps writing after a chmod, and a test write
        # would queue behind the appends of a busy writer.
        self._check_open()
        await self._read("SELECT max(version) FROM schema_migrations", ())

    # -- lifecycle ------------------------------------------------------------------

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._writer_thread = threading.Thread(
            target=self._writer_main, name="ledgerflow-sqlite-writer", daemon=True
        )
        self._writer_thread.start()
        await self._on_writer(self._open_writer)

    def _open_writer(self) -> None:
        try:
            self._open_writer_con()
        except sqlite3.DatabaseError as exc:
            name = getattr(exc, "sqlite_errorname", "")
            if name == "SQLITE_NOTADB":
                raise LedgerNotFoundError(self.location, f"not a SQLite database: {exc}") from exc
            if name == "SQLITE_CANTOPEN" and not self.create and not self.path.exists():
                # The plain message: the path in it says it all.
                raise LedgerNotFoundError(self.location) from exc
            raise

    def _open_writer_con(self) -> None:
        con = self._connect()
        self._writer_con = con
        if not self.create:
            self._check_ledger(con)
            return
        # Processes creating one new file at once can meet "database is locked"
        # without the busy handler being asked (SQLite refuses lock upgrades that
        # could deadlock): wait and try again, within the busy timeout.
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.01
        while True:
            try:
                self._ledger_version(con)  # refuses a file that is not ours to migrate
                self._check_writable(con)
                self._migrate(con)
                self._check_tables(con)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                if con.in_transaction:
                    con.execute("ROLLBACK")
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _ledger_version(self, con: sqlite3.Connection) -> int | None:
        """The schema version of the ledger in the file; None if it holds none.

        Raises ``LedgerNotFoundError`` for a file whose tables belong to another
        application: never ours to read or to migrate.
        """
        tables = {
            name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if "schema_migrations" not in tables:
            clash = sorted(tables & _LEDGER_TABLES)
            if clash:
                raise LedgerNotFoundError(
                    self.location,
                    f"it holds tables named like ledgerflow's ({', '.join(clash)}) "
                    "but no ledgerflow schema: another application's database",
                )
            return None
        columns = {row[1] for row in con.execute("PRAGMA table_info(schema_migrations)")}
        applied: object = None
        if columns >= _MIGRATION_COLUMNS:
            query = "SELECT coalesce(max(version), 0) FROM schema_migrations"
            (applied,) = con.execute(query).fetchone()
        if not isinstance(applied, int):
            raise LedgerNotFoundError(
                self.location, "its schema_migrations table belongs to another application"
            )
        return applied

    def _check_ledger(self, con: sqlite3.Connection) -> None:
        """Opening without create: the ledger must exist at this code's schema."""
        applied = self._ledger_version(con)
        if applied is None:
            (tables,) = con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            raise LedgerNotFoundError(
                self.location,
                "the database is empty" if not tables else "it holds no ledgerflow tables",
            )
        if applied == 0:
            raise LedgerNotFoundError(self.location, "its creation never completed")
        known = MIGRATIONS[-1].version
        if applied > known:
            raise SchemaVersionError(applied, known)
        if applied < known:
            raise SchemaOutdatedError(self.location, applied, known)
        self._check_tables(con)

    def _check_tables(self, con: sqlite3.Connection) -> None:
        """Every table of the schema is there (none dropped by hand): else every
        later call would fail on it, and as an outage to wait out."""
        found = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = _TABLES - found
        if missing:
            raise StoreCorruptError(self.location, missing_tables(missing))

    def _check_writable(self, con: sqlite3.Connection) -> None:
        """Fail now, not at the first append, if this file cannot be written.

        SQLite opens a file it may not write read-only without a word, and even
        grants ``BEGIN IMMEDIATE``; only a write is refused. Rewriting the header's
        user_version with its own value, then rolling back, is one that changes
        nothing.
        """
        (version,) = con.execute("PRAGMA user_version").fetchone()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            con.execute("ROLLBACK")

    def _migrate(self, con: sqlite3.Connection) -> None:
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreUnavailableError(self.backend, f"cannot use WAL on {self.path}: {mode}")
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        con.execute("BEGIN IMMEDIATE")
        try:
            applied = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            for migration in pending(MIGRATIONS, applied.fetchone()[0]):
                for statement in migration.statements:
                    con.execute(statement)
                con.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, datetime.now(UTC).isoformat()),
                )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    async def _close(self) -> None:
        await self._stop_writer()
        self._read_pool.shutdown(wait=True)
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()

    # -- writing --------------------------------------------------------------------

    async def _write_batch(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        return await self._on_writer(lambda: self._write_sync(requests, recorded_at_us))

    def _submit(self, pending: Pending) -> None:
        # Appends made in one turn of the event loop are committed together at its
        # end: on this thread if the writer is idle (a lone append then pays no
        # thread hop), else by the writer thread after what it is doing.
        self._here.append(pending)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_here)

    def _flush_here(self) -> None:
        self._flush_scheduled = False
        batch, self._here = self._here, []
        if not batch:
            return
        if self._inbox.empty() and self._con_lock.acquire(blocking=False):
            try:
                outcomes = self._commit_sync(batch, wait=False)
            except _Busy:
                pass  # another process is writing: the writer thread waits for it
            else:
                self._resolve(batch, outcomes)
                return
            finally:
                self._con_lock.release()
        for queued in batch:
            self._inbox.put(queued)

    def _busy_on(self) -> None:
        """The writer thread waits for another process's write lock (within the busy
        timeout); the event loop does not (see _begin). Each sets the timeout only
        when it changes hands: two PRAGMAs a commit were a tenth of its statements."""
        if self._busy_off and self._writer_con is not None:
            self._writer_con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._busy_off = False

    def _begin(self, con: sqlite3.Connection, *, wait: bool) -> None:
        if wait:
            con.execute("BEGIN IMMEDIATE")
            return
        # On the event loop we must not sit in the busy handler while another
        # process holds the write lock: try once, and let the writer thread wait.
        if not self._busy_off:
            con.execute("PRAGMA busy_timeout = 0")
            self._busy_off = True
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _Busy() from exc
            raise

    def _write_sync(
        self, requests: list[AppendRequest], recorded_at_us: int, *, wait: bool = True
    ) -> list[AppendResult | StoreError]:
        con = self._writer_con
        assert con is not None
        self._begin(con, wait=wait)
        try:
            # What this writer knows from its last write (the heads of the streams it
            # wrote, the highest position) holds while no other connection has
            # committed since: SQLite says so by data_version, which only other
            # connections' commits move (and none can commit while we hold the lock).
            (data_version,) = con.execute("PRAGMA data_version").fetchone()
            if data_version != self._seen_version:
                self._known_heads.clear()
                self._known_last = con.execute(
                    "SELECT coalesce(max(position), 0) FROM events"
                ).fetchone()[0]
            # Unknown until this commit is done: a failure leaves nothing to trust.
            self._seen_version = None
            streams = list({r.stream_id for r in requests})
            heads: dict[str, StreamHead] = {}
            unknown = []
            for stream in streams:
                known = self._known_heads.get(stream)
                if known is None:
                    unknown.append(stream)
                else:
                    heads[stream] = known
            for chunk in _chunks(unknown):
                marks = ",".join("?" * len(chunk))
                for sid, version, last_hash, last_position in con.execute(
                    "SELECT stream_id, version, last_hash, last_position FROM streams "
                    f"WHERE stream_id IN ({marks})",
                    chunk,
                ):
                    heads[sid] = StreamHead(version, last_hash, last_position)
            ids = [str(i) for i in reused_ids(requests)]
            existing: dict[UUID, EventRow] = {}
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                for t in con.execute(
                    f"SELECT {_COLUMNS} FROM events WHERE event_id IN ({marks})", chunk
                ):
                    row = _row(t)
                    existing[row.id] = row
            last = self._known_last
            leases: dict[str, LeaseState] = {}
            for chunk in _chunks(fenced_ids(requests)):
                marks = ",".join("?" * len(chunk))
                for wid, owner, epoch in con.execute(
                    "SELECT workflow_id, lease_owner, lease_epoch FROM wakeups "
                    f"WHERE workflow_id IN ({marks})",
                    chunk,
                ):
                    leases[wid] = LeaseState(owner, epoch)
            task_leases: dict[str, LeaseState] = {}
            for chunk in _chunks(fenced_tasks(requests)):
                marks = ",".join("?" * len(chunk))
                for tid, owner, epoch in con.execute(
                    "SELECT task_id, lease_owner, lease_epoch FROM tasks "
                    f"WHERE task_id IN ({marks})",
                    chunk,
                ):
                    task_leases[tid] = LeaseState(owner, epoch)
            plan = plan_batch(requests, heads, existing, last, recorded_at_us, leases, task_leases)
            if not plan.rows and not plan.runtime:
                con.execute("ROLLBACK")
                self._seen_version = data_version
                return plan.outcomes
            con.executemany(
                _INSERT_EVENT,
                [
                    (
                        r.position,
                        str(r.id),
                        r.stream_id,
                        r.version,
                        r.type,
                        r.schema_version,
                        r.data,
                        r.metadata,
                        r.recorded_at_us,
                        r.prev_hash,
                        r.hash,
                    )
                    for r in plan.rows
                ],
            )
            con.executemany(
                _UPSERT_HEAD,
                [(s, h.version, h.last_hash, h.last_position) for s, h in plan.heads.items()],
            )
            for write in plan.runtime:
                apply_runtime(con, write)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        self._known_last = plan.last_position
        for stream, head in plan.heads.items():
            self._known_heads[stream] = head
            self._known_heads.move_to_end(stream)
        while len(self._known_heads) > _KNOWN_HEADS:
            self._known_heads.popitem(last=False)
        self._seen_version = data_version
        return plan.outcomes

    # -- reading --------------------------------------------------------------------

    async def _read_stream_rows(
        self, stream_id: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> list[EventRow]:
        n = _NO_LIMIT if limit is None else limit
        if backwards:
            top = _MAX_VERSION if from_version is None else from_version
            sql = (
                f"SELECT {_SELECTED} FROM events WHERE stream_id = ? AND version <= ? "
                "ORDER BY version DESC LIMIT ?"
            )
            rows = await self._read(sql, (stream_id, top, n))
        else:
            bottom = 1 if from_version is None else from_version
            sql = (
                f"SELECT {_SELECTED} FROM events WHERE stream_id = ? AND version >= ? "
                "ORDER BY version LIMIT ?"
            )
            rows = await self._read(sql, (stream_id, bottom, n))
        return [_row(t) for t in rows]

    async def _read_all_rows(self, from_position: int, limit: int | None) -> list[EventRow]:
        n = _NO_LIMIT if limit is None else limit
        sql = f"SELECT {_SELECTED} FROM events WHERE position >= ? ORDER BY position LIMIT ?"
        return [_row(t) for t in await self._read(sql, (from_position, n))]

    async def _read_leaves(self, from_position: int, limit: int) -> list[LeafRow]:
        return await self._read(
            "SELECT position, CAST(stream_id AS TEXT), CAST(version AS INTEGER), "
            "CAST(hash AS BLOB) FROM events WHERE position >= ? "
            "ORDER BY position LIMIT ?",
            (from_position, limit),
        )

    async def _stream_head(self, stream_id: str) -> StreamHead | None:
        rows = await self._read(
            "SELECT version, last_hash, last_position FROM streams WHERE stream_id = ?",
            (stream_id,),
        )
        return StreamHead(*rows[0]) if rows else None

    async def _stream_heads(self, after: str | None, limit: int) -> list[tuple[str, StreamHead]]:
        rows = await self._read(
            "SELECT stream_id, version, last_hash, last_position FROM streams "
            "WHERE stream_id > ? ORDER BY stream_id LIMIT ?",
            ("" if after is None else after, limit),
        )
        return [(sid, StreamHead(v, h, p)) for sid, v, h, p in rows]

    async def _integrity_check(self) -> list[str]:
        # SQLite's own check: every page, every index entry against its table. A
        # file too broken to run it is itself the finding.
        def run() -> list[str]:
            try:
                found = self._reader().execute("PRAGMA integrity_check(100)").fetchall()
            except sqlite3.DatabaseError as exc:
                return [f"{type(exc).__name__}: {exc}"]
            lines = [str(row[0]) for row in found]
            return [] if lines == ["ok"] else lines

        return await self._on(self._read_pool, run)

    async def _read_snapshot(
        self, visit: Callable[[list[EventRow]], None], batch_size: int
    ) -> dict[str, StreamHead]:
        def run() -> dict[str, StreamHead]:
            # One read transaction: in WAL mode it sees the database as of its first
            # read, whatever commits meanwhile.
            con = self._reader()
            con.execute("BEGIN")
            try:
                cursor = con.execute(f"SELECT {_SELECTED} FROM events ORDER BY position")
                while batch := cursor.fetchmany(batch_size):
                    visit([_audited_row(t) for t in batch])
                heads = con.execute(
                    "SELECT stream_id, version, last_hash, last_position FROM streams"
                ).fetchall()
            finally:
                con.execute("COMMIT")
            return {sid: StreamHead(v, h, p) for sid, v, h, p in heads}

        return await self._on(self._read_pool, run)

    async def _head_position(self) -> int:
        rows = await self._read("SELECT coalesce(max(position), 0) FROM events", ())
        return int(rows[0][0])

    async def _save_snapshot(self, snapshot: Snapshot, recorded_at_us: int) -> None:
        def run() -> None:
            con = self._writer_con
            assert con is not None
            con.execute(
                "INSERT INTO snapshots VALUES (?,?,?,?,?,?) ON CONFLICT (stream_id) DO UPDATE "
                "SET version = excluded.version, type = excluded.type, "
                "schema_version = excluded.schema_version, state = excluded.state, "
                "recorded_at = excluded.recorded_at WHERE excluded.version >= snapshots.version",
                (
                    snapshot.stream_id,
                    snapshot.version,
                    snapshot.type,
                    snapshot.schema_version,
                    snapshot.state,
                    recorded_at_us,
                ),
            )

        await self._on_writer(run)

    async def _load_snapshot(self, stream_id: str) -> Snapshot | None:
        rows = await self._read(
            "SELECT stream_id, version, type, schema_version, state, recorded_at "
            "FROM snapshots WHERE stream_id = ?",
            (stream_id,),
        )
        if not rows:
            return None
        sid, version, type_name, schema_version, state, at = rows[0]
        return Snapshot(sid, version, type_name, schema_version, state, from_micros(at))

    # -- runtime rows ---------------------------------------------------------------

    def _write_con(self) -> sqlite3.Connection:
        con = self._writer_con
        assert con is not None
        return con
