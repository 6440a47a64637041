"""The PostgreSQL store's projections: the ``projections`` table (migration 8, see
``_postgres_sql.migrations``), the read-model tables in the store's schema, and the
hooks of ``_projections.ProjectionStore``, on its reader pool.

A batch is one READ COMMITTED transaction: the fenced checkpoint UPDATE first (it
locks the projection's row, so a concurrent runner or an operator's skip waits for
it or finds it moved), then the writes, pipelined."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.abc import Params
from psycopg.rows import TupleRow

from ..errors import ProjectionLeaseLostError, StaleReadError, StoreError
from ..projections.state import Rebuild
from ..projections.tables import Table, TableWrite
from ._migrations import Migration
from ._postgres_keys import inbox_key
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

__all__ = ["PostgresProjections", "projection_migration"]

T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]


def projection_migration(schema: str) -> Migration:
    """As SQLite's migration 7."""
    return Migration(
        8,
        "projections: checkpoints, leases, failures",
        (
            f"""CREATE TABLE {schema}.projections (
                name text COLLATE "C" PRIMARY KEY,
                position bigint NOT NULL DEFAULT 0,
                event_at bigint,
                owner text,
                epoch bigint NOT NULL DEFAULT 0,
                lease_until bigint,
                failed_position bigint,
                failed_event text,
                failed_type text,
                error_type text,
                error_message text,
                failed_at bigint,
                updated_at bigint NOT NULL DEFAULT 0,
                generation bigint NOT NULL DEFAULT 0,
                version bigint NOT NULL DEFAULT 0,
                rebuild_generation bigint,
                rebuild_version bigint,
                rebuild_position bigint
            )""",
            f"""CREATE TABLE {schema}.inbox (
                consumer text COLLATE "C" NOT NULL,
                message_id text COLLATE "C" NOT NULL,
                processed_at bigint NOT NULL,
                PRIMARY KEY (consumer, message_id)
            )""",
        ),
    )


class PostgresProjections(abc.ABC):
    """Mixed into ``PostgresEventStore``."""

    schema: str

    @abc.abstractmethod
    async def _fetch(
        self, action: str, sql: str, params: Params, *, flushed: bool = True
    ) -> list[TupleRow]: ...

    @abc.abstractmethod
    async def _transaction(
        self, action: str, fn: Callable[[Connection], Awaitable[T]], *, flushed: bool = True
    ) -> T: ...

    def _model_sql(self, projection: str, table: Table, generation: int) -> ReadModelSql:
        return ReadModelSql(
            "postgres", f"{self.schema}.{physical_name(projection, table.name, generation)}", table
        )

    async def _ensure_tables(
        self,
        projection: str,
        tables: Sequence[Table],
        generation: int,
        version: int,
        listed: bool,
    ) -> None:
        s = self.schema
        models = [self._model_sql(projection, t, generation) for t in tables]
        statements = [statement for m in models for statement in (m.create, *m.indexes)]

        async def create(conn: Connection) -> None:
            # Runners of one projection may start together: their DDL takes turns.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{s}.rm",))
            if listed:
                await conn.execute(
                    f"INSERT INTO {s}.projections (name) VALUES (%s) ON CONFLICT DO NOTHING",
                    (projection,),
                )
                await conn.execute(
                    f"UPDATE {s}.projections SET version = %s WHERE name = %s AND version = 0",
                    (version, projection),
                )
            for statement in statements:
                await conn.execute(statement)

        await self._transaction("create read-model tables", create)

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
        record = (
            f"INSERT INTO {self.schema}.inbox (consumer, message_id, processed_at) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1"
        )
        # The consumer's processes commit one at a time while they check what their
        # handlers read (a row read as missing cannot be locked).
        lock = inbox_key(self.schema, consumer)

        async def consume(conn: Connection) -> bool:
            if seen:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                for table, key, then in seen:
                    model = models[table]
                    cur = await conn.execute(model.get, (key,))
                    found = await cur.fetchone()
                    if (None if found is None else model.decode_row(found)) != then:
                        raise StaleReadError(consumer, table, key)
            # The row is taken (or waited for) first: a concurrent delivery of the same
            # message commits first or finds it.
            cur = await conn.execute(record, (consumer, message_id, now_us))
            if await cur.fetchone() is None:
                return False
            for sql, many in runs(statements):
                async with conn.cursor() as cur:
                    await cur.executemany(sql, many)
            return True

        return await self._transaction("apply a message once", consume)

    async def _consumed(self, consumer: str, message_id: str) -> bool:
        rows = await self._fetch(
            "look up a processed message",
            f"SELECT 1 FROM {self.schema}.inbox WHERE consumer = %s AND message_id = %s",
            (consumer, message_id),
        )
        return bool(rows)

    async def _begin_rebuild(self, name: str, version: int) -> Rebuild:
        s = self.schema

        async def begin(conn: Connection) -> Rebuild:
            await conn.execute(
                f"INSERT INTO {s}.projections (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,)
            )
            await conn.execute(
                f"UPDATE {s}.projections SET rebuild_generation = generation + 1, "
                "rebuild_version = %s, rebuild_position = 0 WHERE name = %s "
                "AND rebuild_generation IS NULL",
                (version, name),
            )
            cur = await conn.execute(
                f"SELECT rebuild_generation, rebuild_version, rebuild_position "
                f"FROM {s}.projections WHERE name = %s",
                (name,),
            )
            row = await cur.fetchone()
            assert row is not None
            return Rebuild(int(row[0]), int(row[1]), int(row[2]))

        return await self._transaction("begin a projection's rebuild", begin)

    async def _finish_rebuild(
        self, lease: ProjectionLease, tables: Sequence[Table], now_us: int
    ) -> None:
        s = self.schema

        async def finish(conn: Connection) -> None:
            cur = await conn.execute(
                f"SELECT generation FROM {s}.projections WHERE name = %s AND owner = %s "
                "AND epoch = %s AND rebuild_generation IS NOT NULL AND failed_position IS NULL "
                "FOR UPDATE",
                (lease.name, lease.owner, lease.epoch),
            )
            row = await cur.fetchone()
            if row is None:
                raise ProjectionLeaseLostError(
                    lease.name, lease.owner, lease.epoch, "lease lost or no rebuild"
                )
            for table in tables:
                old = physical_name(lease.name, table.name, int(row[0]))
                await conn.execute(f"DROP TABLE IF EXISTS {s}.{old}")
            await conn.execute(
                f"UPDATE {s}.projections SET generation = rebuild_generation, "
                "version = rebuild_version, position = rebuild_position, "
                "rebuild_generation = NULL, rebuild_version = NULL, rebuild_position = NULL, "
                "updated_at = %s WHERE name = %s",
                (now_us, lease.name),
            )

        await self._transaction("finish a projection's rebuild", finish)

    async def _claim_projection(
        self, name: str, owner: str, now_us: int, until_us: int
    ) -> ProjectionLease | None:
        s = self.schema

        async def claim(conn: Connection) -> ProjectionLease | None:
            await conn.execute(
                f"INSERT INTO {s}.projections (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,)
            )
            cur = await conn.execute(
                f"SELECT owner, epoch, lease_until, position FROM {s}.projections "
                "WHERE name = %s FOR UPDATE",
                (name,),
            )
            row = await cur.fetchone()
            assert row is not None
            held_by, epoch, until, position = row
            if held_by is not None and held_by != owner and until is not None and until >= now_us:
                return None
            if held_by != owner or until is None:
                epoch += 1
            await conn.execute(
                f"UPDATE {s}.projections SET owner = %s, epoch = %s, lease_until = %s "
                "WHERE name = %s",
                (owner, epoch, until_us, name),
            )
            return ProjectionLease(name, owner, int(epoch), int(position))

        return await self._transaction("claim a projection", claim)

    async def _renew_projection(self, lease: ProjectionLease, until_us: int) -> bool:
        rows = await self._fetch(
            "renew a projection's lease",
            f"UPDATE {self.schema}.projections SET lease_until = %s WHERE name = %s "
            "AND owner = %s AND epoch = %s RETURNING 1",
            (until_us, lease.name, lease.owner, lease.epoch),
        )
        return len(rows) == 1

    async def _release_projection(self, lease: ProjectionLease) -> None:
        await self._fetch(
            "release a projection",
            f"UPDATE {self.schema}.projections SET owner = NULL, lease_until = NULL "
            "WHERE name = %s AND owner = %s AND epoch = %s",
            (lease.name, lease.owner, lease.epoch),
        )

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
        s = self.schema
        checkpoint: str
        params: tuple[Any, ...]
        if rebuild:
            checkpoint = (
                f"UPDATE {s}.projections SET rebuild_position = %s, updated_at = %s "
                "WHERE name = %s AND owner = %s AND epoch = %s AND rebuild_position = %s "
                "AND rebuild_generation = %s AND failed_position IS NULL RETURNING 1"
            )
            params = (
                to_position, now_us, lease.name, lease.owner, lease.epoch, from_position,
                generation,
            )  # fmt: skip
        else:
            checkpoint = (
                f"UPDATE {s}.projections SET position = %s, event_at = coalesce(%s, event_at), "
                "updated_at = %s WHERE name = %s AND owner = %s AND epoch = %s AND position = %s "
                "AND generation = %s AND failed_position IS NULL RETURNING 1"
            )
            params = (
                to_position, event_at_us, now_us, lease.name, lease.owner, lease.epoch,
                from_position, generation,
            )  # fmt: skip

        async def project(conn: Connection) -> None:
            cur = await conn.execute(checkpoint, params)
            if await cur.fetchone() is None:
                raise ProjectionLeaseLostError(
                    lease.name, lease.owner, lease.epoch, "lease lost or checkpoint moved"
                )
            for sql, many in runs(statements):
                async with conn.cursor() as cur:
                    await cur.executemany(sql, many)

        await self._transaction("apply a projection's batch", project)

    async def _fail_projection(
        self, lease: ProjectionLease, failure: ProjectionFailure, now_us: int
    ) -> None:
        rows = await self._fetch(
            "record a projection's failure",
            f"UPDATE {self.schema}.projections SET failed_position = %s, failed_event = %s, "
            "failed_type = %s, error_type = %s, error_message = %s, failed_at = %s, "
            "updated_at = %s WHERE name = %s AND owner = %s AND epoch = %s RETURNING 1",
            (failure.position, failure.event_id, failure.event_type, failure.error_type,
             failure.message, now_us, now_us, lease.name, lease.owner, lease.epoch),
        )  # fmt: skip
        if not rows:
            raise ProjectionLeaseLostError(lease.name, lease.owner, lease.epoch, "lease lost")

    async def _retry_projection(self, name: str) -> bool:
        rows = await self._fetch(
            "retry a projection",
            f"UPDATE {self.schema}.projections SET failed_position = NULL, failed_event = NULL, "
            "failed_type = NULL, error_type = NULL, error_message = NULL, failed_at = NULL "
            "WHERE name = %s AND failed_position IS NOT NULL RETURNING 1",
            (name,),
        )
        return len(rows) == 1

    async def _skip_projection(self, name: str, position: int) -> bool:
        rows = await self._fetch(
            "skip a projection's event",
            f"UPDATE {self.schema}.projections SET "
            "position = CASE WHEN rebuild_generation IS NULL THEN %(p)s ELSE position END, "
            "rebuild_position = CASE WHEN rebuild_generation IS NULL THEN NULL ELSE %(p)s END, "
            "failed_position = NULL, failed_event = NULL, failed_type = NULL, error_type = NULL, "
            "error_message = NULL, failed_at = NULL WHERE name = %(n)s AND failed_position = %(p)s "
            "RETURNING 1",
            {"p": position, "n": name},
        )
        return len(rows) == 1

    async def _projection_row(self, name: str) -> ProjectionRow | None:
        rows = await self._fetch(
            "read a projection",
            f"SELECT {PROJECTION_COLUMNS} FROM {self.schema}.projections WHERE name = %s",
            (name,),
        )
        return projection_row(rows[0]) if rows else None

    async def _list_projections(self) -> list[ProjectionRow]:
        rows = await self._fetch(
            "list projections",
            f"SELECT {PROJECTION_COLUMNS} FROM {self.schema}.projections ORDER BY name",
            (),
        )
        return [projection_row(r) for r in rows]

    async def _read_model_get(
        self, projection: str, table: Table, key: Any, generation: int
    ) -> dict[str, Any] | None:
        model = self._model_sql(projection, table, generation)
        rows = await self._read_model("read a read-model row", model.get, (key,))
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
        rows = await self._read_model("query a read model", sql, [*params, limit, offset])
        return [model.decode_row(r) for r in rows]

    async def _read_model(self, action: str, sql: str, params: Params) -> list[TupleRow]:
        """A read of a read-model table (``TableMissing`` if it is not there)."""
        try:
            return await self._fetch(action, sql, params)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UndefinedTable):
                raise TableMissing(sql) from None
            raise
