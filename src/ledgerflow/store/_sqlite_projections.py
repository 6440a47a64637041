"""The SQLite store's projections: the ``projections`` table (migration 7), the
read-model tables, and the hooks of ``_projections.ProjectionStore``. Every write
goes through the store's one writer connection, so a batch's writes and its
checkpoint are one transaction of that connection."""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import ProjectionLeaseLostError, StaleReadError, StoreError
from ..projections.state import Rebuild
from ..projections.tables import Table, TableWrite
from ._migrations import Migration
from ._projections import (
    PROJECTION_COLUMNS,
    ProjectionFailure,
    ProjectionLease,
    ProjectionRow,
    ReadModelSql,
    Seen,
    TableMissing,
    physical_name,
    projection_row,
    runs,
)

__all__ = ["PROJECTION_MIGRATION", "SQLiteProjections"]

T = TypeVar("T")

PROJECTION_MIGRATION = Migration(
    7,
    "projections: checkpoints, leases, failures",
    (
        """CREATE TABLE projections (
            name TEXT PRIMARY KEY,
            position INTEGER NOT NULL DEFAULT 0,
            event_at INTEGER,
            owner TEXT,
            epoch INTEGER NOT NULL DEFAULT 0,
            lease_until INTEGER,
            failed_position INTEGER,
            failed_event TEXT,
            failed_type TEXT,
            error_type TEXT,
            error_message TEXT,
            failed_at INTEGER,
            updated_at INTEGER NOT NULL DEFAULT 0,
            generation INTEGER NOT NULL DEFAULT 0,
            version INTEGER NOT NULL DEFAULT 0,
            rebuild_generation INTEGER,
            rebuild_version INTEGER,
            rebuild_position INTEGER
        ) WITHOUT ROWID""",
        # The messages each consumer has applied (bus.Inbox): its writes and this
        # row commit together, so a message delivered again applies nothing.
        """CREATE TABLE inbox (
            consumer TEXT NOT NULL,
            message_id TEXT NOT NULL,
            processed_at INTEGER NOT NULL,
            PRIMARY KEY (consumer, message_id)
        ) WITHOUT ROWID""",
    ),
)

_ADD = "INSERT INTO projections (name) VALUES (?) ON CONFLICT DO NOTHING"


class SQLiteProjections(abc.ABC):
    """Mixed into ``SQLiteEventStore``."""

    @abc.abstractmethod
    async def _in_transaction(
        self, fn: Callable[[sqlite3.Connection], T], *, flushed: bool = True
    ) -> T: ...

    @abc.abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]: ...

    def _model_sql(self, projection: str, table: Table, generation: int) -> ReadModelSql:
        return ReadModelSql("sqlite", physical_name(projection, table.name, generation), table)

    async def _ensure_tables(
        self,
        projection: str,
        tables: Sequence[Table],
        generation: int,
        version: int,
        listed: bool,
    ) -> None:
        models = [self._model_sql(projection, t, generation) for t in tables]
        statements = [s for m in models for s in (m.create, *m.indexes)]

        def create(con: sqlite3.Connection) -> None:
            if listed:
                con.execute(_ADD, (projection,))
                con.execute(
                    "UPDATE projections SET version = ? WHERE name = ? AND version = 0",
                    (version, projection),
                )
            for statement in statements:
                con.execute(statement)

        await self._in_transaction(create)

    async def _consume(
        self,
        consumer: str,
        message_id: str,
        tables: Mapping[str, Table],
        writes: Sequence[TableWrite],
        now_us: int,
        seen: Sequence[Seen],
    ) -> bool:
        models = {name: self._model_sql(consumer, t, 0) for name, t in tables.items()}
        statements = [models[w.table].write(w) for w in writes]

        def consume(con: sqlite3.Connection) -> bool:
            # One writer: nothing changes between this look and the commit.
            for table, key, then in seen:
                model = models[table]
                found = con.execute(model.get, (key,)).fetchone()
                if (None if found is None else model.decode_row(found)) != then:
                    raise StaleReadError(consumer, table, key)
            new = con.execute(
                "INSERT INTO inbox (consumer, message_id, processed_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (consumer, message_id, now_us),
            ).rowcount
            if not new:
                return False
            for sql, many in runs(statements):
                con.executemany(sql, many)
            return True

        return await self._in_transaction(consume)

    async def _consumed(self, consumer: str, message_id: str) -> bool:
        rows = await self._read(
            "SELECT 1 FROM inbox WHERE consumer = ? AND message_id = ?", (consumer, message_id)
        )
        return bool(rows)

    async def _begin_rebuild(self, name: str, version: int) -> Rebuild:
        def begin(con: sqlite3.Connection) -> Rebuild:
            con.execute(_ADD, (name,))
            con.execute(
                "UPDATE projections SET rebuild_generation = generation + 1, "
                "rebuild_version = ?, rebuild_position = 0 WHERE name = ? "
                "AND rebuild_generation IS NULL",
                (version, name),
            )
            g, v, p = con.execute(
                "SELECT rebuild_generation, rebuild_version, rebuild_position FROM projections "
                "WHERE name = ?",
                (name,),
            ).fetchone()
            return Rebuild(g, v, p)

        return await self._in_transaction(begin)

    async def _finish_rebuild(
        self, lease: ProjectionLease, tables: Sequence[Table], now_us: int
    ) -> None:
        def finish(con: sqlite3.Connection) -> None:
            row = con.execute(
                "SELECT generation FROM projections WHERE name = ? AND owner = ? AND epoch = ? "
                "AND rebuild_generation IS NOT NULL AND failed_position IS NULL",
                (lease.name, lease.owner, lease.epoch),
            ).fetchone()
            if row is None:
                raise ProjectionLeaseLostError(
                    lease.name, lease.owner, lease.epoch, "lease lost or no rebuild"
                )
            for table in tables:
                con.execute(f"DROP TABLE IF EXISTS {physical_name(lease.name, table.name, row[0])}")
            con.execute(
                "UPDATE projections SET generation = rebuild_generation, "
                "version = rebuild_version, position = rebuild_position, "
                "rebuild_generation = NULL, rebuild_version = NULL, rebuild_position = NULL, "
                "updated_at = ? WHERE name = ?",
                (now_us, lease.name),
            )

        await self._in_transaction(finish)

    async def _claim_projection(
        self, name: str, owner: str, now_us: int, until_us: int
    ) -> ProjectionLease | None:
        def claim(con: sqlite3.Connection) -> ProjectionLease | None:
            con.execute(_ADD, (name,))
            row = con.execute(
                "SELECT owner, epoch, lease_until, position FROM projections WHERE name = ?",
                (name,),
            ).fetchone()
            held_by, epoch, until, position = row
            if held_by is not None and held_by != owner and until is not None and until >= now_us:
                return None
            if held_by != owner or until is None:
                epoch += 1
            con.execute(
                "UPDATE projections SET owner = ?, epoch = ?, lease_until = ? WHERE name = ?",
                (owner, epoch, until_us, name),
            )
            return ProjectionLease(name, owner, epoch, position)

        return await self._in_transaction(claim)

    async def _renew_projection(self, lease: ProjectionLease, until_us: int) -> bool:
        def renew(con: sqlite3.Connection) -> bool:
            return (
                con.execute(
                    "UPDATE projections SET lease_until = ? WHERE name = ? AND owner = ? "
                    "AND epoch = ?",
                    (until_us, lease.name, lease.owner, lease.epoch),
                ).rowcount
                == 1
            )

        return await self._in_transaction(renew)

    async def _release_projection(self, lease: ProjectionLease) -> None:
        def release(con: sqlite3.Connection) -> None:
            con.execute(
                "UPDATE projections SET owner = NULL, lease_until = NULL WHERE name = ? "
                "AND owner = ? AND epoch = ?",
                (lease.name, lease.owner, lease.epoch),
            )

        await self._in_transaction(release)

    async def _project(
        self,
        lease: ProjectionLease,
        tables: Mapping[str, Table],
        generation: int,
        rebuild: bool,
        from_position: int,
        to_position: int,
        event_at_us: int | None,
        writes: Sequence[TableWrite],
        now_us: int,
    ) -> None:
        models = {name: self._model_sql(lease.name, t, generation) for name, t in tables.items()}
        statements = [models[w.table].write(w) for w in writes]
        if rebuild:
            checkpoint = (
                "UPDATE projections SET rebuild_position = ?, updated_at = ? WHERE name = ? "
                "AND owner = ? AND epoch = ? AND rebuild_position = ? AND rebuild_generation = ? "
                "AND failed_position IS NULL"
            )
            params: tuple[Any, ...] = (
                to_position, now_us, lease.name, lease.owner, lease.epoch, from_position,
                generation,
            )  # fmt: skip
        else:
            checkpoint = (
                "UPDATE projections SET position = ?, event_at = coalesce(?, event_at), "
                "updated_at = ? WHERE name = ? AND owner = ? AND epoch = ? AND position = ? "
                "AND generation = ? AND failed_position IS NULL"
            )
            params = (
                to_position, event_at_us, now_us, lease.name, lease.owner, lease.epoch,
                from_position, generation,
            )  # fmt: skip

        def project(con: sqlite3.Connection) -> None:
            moved = con.execute(checkpoint, params)
            if moved.rowcount != 1:
                raise ProjectionLeaseLostError(
                    lease.name, lease.owner, lease.epoch, "lease lost or checkpoint moved"
                )
            for sql, many in runs(statements):
                con.executemany(sql, many)

        await self._in_transaction(project)

    async def _fail_projection(
        self, lease: ProjectionLease, failure: ProjectionFailure, now_us: int
    ) -> None:
        def fail(con: sqlite3.Connection) -> None:
            done = con.execute(
                "UPDATE projections SET failed_position = ?, failed_event = ?, failed_type = ?, "
                "error_type = ?, error_message = ?, failed_at = ?, updated_at = ? "
                "WHERE name = ? AND owner = ? AND epoch = ?",
                (failure.position, failure.event_id, failure.event_type, failure.error_type,
                 failure.message, now_us, now_us, lease.name, lease.owner, lease.epoch),
            )  # fmt: skip
            if done.rowcount != 1:
                raise ProjectionLeaseLostError(lease.name, lease.owner, lease.epoch, "lease lost")

        await self._in_transaction(fail)

    async def _retry_projection(self, name: str) -> bool:
        def retry(con: sqlite3.Connection) -> bool:
            return (
                con.execute(
                    "UPDATE projections SET failed_position = NULL, failed_event = NULL, "
                    "failed_type = NULL, error_type = NULL, error_message = NULL, "
                    "failed_at = NULL WHERE name = ? AND failed_position IS NOT NULL",
                    (name,),
                ).rowcount
                == 1
            )

        return await self._in_transaction(retry)

    async def _skip_projection(self, name: str, position: int) -> bool:
        def skip(con: sqlite3.Connection) -> bool:
            return (
                con.execute(
                    "UPDATE projections SET "
                    "position = CASE WHEN rebuild_generation IS NULL THEN ?1 ELSE position END, "
                    "rebuild_position = "
                    "CASE WHEN rebuild_generation IS NULL THEN NULL ELSE ?1 END, "
                    "failed_position = NULL, failed_event = NULL, failed_type = NULL, "
                    "error_type = NULL, error_message = NULL, failed_at = NULL WHERE name = ?2 "
                    "AND failed_position = ?1",
                    (position, name),
                ).rowcount
                == 1
            )

        return await self._in_transaction(skip)

    async def _projection_row(self, name: str) -> ProjectionRow | None:
        rows = await self._read(
            f"SELECT {PROJECTION_COLUMNS} FROM projections WHERE name = ?", (name,)
        )
        return projection_row(rows[0]) if rows else None

    async def _list_projections(self) -> list[ProjectionRow]:
        rows = await self._read(f"SELECT {PROJECTION_COLUMNS} FROM projections ORDER BY name", ())
        return [projection_row(r) for r in rows]

    async def _read_model_get(
        self, projection: str, table: Table, key: Any, generation: int
    ) -> dict[str, Any] | None:
        model = self._model_sql(projection, table, generation)
        rows = await self._read_model(model.get, (key,))
        return model.decode_row(rows[0]) if rows else None

    async def _read_model_select(
        self,
        projection: str,
        table: Table,
        where: Mapping[str, Any],
        order_by: str | None,
        descending: bool,
        limit: int,
        offset: int,
        generation: int,
    ) -> list[dict[str, Any]]:
        model = self._model_sql(projection, table, generation)
        sql, params = model.select(where, order_by, descending)
        rows = await self._read_model(sql, [*params, limit, offset])
        return [model.decode_row(r) for r in rows]

    async def _read_model(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """A read of a read-model table (``TableMissing`` if it is not there)."""
        try:
            return await self._read(sql, params)
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, sqlite3.OperationalError) and "no such table" in str(cause):
                raise TableMissing(sql) from None
            raise
