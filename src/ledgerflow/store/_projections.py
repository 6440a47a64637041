"""Projections in the store: their checkpoints and leases (table ``projections``),
their read-model tables, and the one transaction that writes a batch's changes with
the new checkpoint (see ``docs/adr/015-projections.md``).

``ProjectionStore`` is mixed into every store: its public methods check their input
and call the backend's hooks. ``ReadModelSql`` builds the statements of the SQL
backends from a table's declaration (names are checked identifiers: nothing is
quoted that was not checked).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from ..errors import ConfigurationError
from ..projections.state import ProjectionFailure, ProjectionLease, ProjectionRow, Rebuild
from ..projections.tables import Column, Patch, Put, Remove, Table, TableWrite, check_name

__all__ = [
    "ProjectionFailure",
    "ProjectionLease",
    "ProjectionRow",
    "ProjectionStore",
    "ReadModelSql",
    "Seen",
    "TableMissing",
    "physical_name",
]


Seen = tuple[str, Any, "dict[str, Any] | None"]
"""A read-model row a handler read: (table, key, the row then, or None)."""


class TableMissing(Exception):
    """A read-model table that is not there: not made yet, or dropped by a rebuild's
    swap just after the reader looked up the live generation."""


def physical_name(projection: str, table: str, generation: int = 0) -> str:
    """The table's name in the database: ``rm_<projection>__<table>``, and
    ``__g<n>`` after it from the first rebuild on (checked names hold no ``__``)."""
    base = f"rm_{check_name(projection, 'projection name')}__{check_name(table, 'table name')}"
    return base if generation == 0 else f"{base}__g{generation}"


class ProjectionStore(abc.ABC):
    """The projection part of a store (see the module docstring)."""

    @abc.abstractmethod
    def _check_open(self) -> None: ...

    async def ensure_tables(
        self,
        projection: str,
        tables: Sequence[Table],
        *,
        generation: int = 0,
        version: int = 1,
        listed: bool = True,
    ) -> None:
        """Create the projection's row and the tables (and indexes) of ``generation``
        if missing; a new row's live generation is ``version``'s. ``listed=False``:
        the tables only (an inbox's, which has no checkpoint)."""
        self._check_open()
        check_name(projection, "projection name")
        await self._ensure_tables(projection, tables, generation, version, listed)

    async def consume(
        self,
        consumer: str,
        message_id: str,
        tables: Mapping[str, Table],
        writes: Sequence[TableWrite],
        *,
        now_us: int,
        seen: Sequence[Seen] = (),
    ) -> bool:
        """In one transaction: record ``message_id`` as processed by ``consumer`` and
        apply the writes to its tables; False (nothing written) if it was processed
        before. ``StaleReadError`` (nothing written) if a row in ``seen`` is not as
        the handler read it: the writes were made from it, and two processes of one
        consumer would each overwrite the other's update."""
        self._check_open()
        check_name(consumer, "consumer name")
        if not isinstance(message_id, str) or not message_id:
            raise ConfigurationError("a message needs an id to be processed once")
        return await self._consume(consumer, message_id, tables, writes, now_us, seen)

    async def consumed(self, consumer: str, message_id: str) -> bool:
        """Whether ``consumer`` processed ``message_id``."""
        self._check_open()
        return await self._consumed(check_name(consumer, "consumer name"), message_id)

    async def begin_rebuild(self, name: str, *, version: int) -> Rebuild:
        """Start building the next generation of the projection's tables from position
        0, by ``version`` of the projection (the one under way, if any, is kept)."""
        self._check_open()
        return await self._begin_rebuild(check_name(name, "projection name"), version)

    async def finish_rebuild(
        self, lease: ProjectionLease, tables: Sequence[Table], *, now_us: int
    ) -> None:
        """Make the rebuilt generation the live one (its checkpoint the projection's)
        and drop the tables of the old one, in one transaction, if the lease holds."""
        self._check_open()
        await self._finish_rebuild(lease, tables, now_us)

    async def claim_projection(
        self, name: str, owner: str, *, now_us: int, until_us: int
    ) -> ProjectionLease | None:
        """Take the projection's lease if it is free, expired or already ours; a new
        epoch when it changes hands. None if another runner holds it."""
        self._check_open()
        check_name(name, "projection name")
        return await self._claim_projection(name, owner, now_us, until_us)

    async def renew_projection(self, lease: ProjectionLease, *, until_us: int) -> bool:
        """Extend the lease; False if it was lost (another runner took over)."""
        self._check_open()
        return await self._renew_projection(lease, until_us)

    async def release_projection(self, lease: ProjectionLease) -> None:
        self._check_open()
        await self._release_projection(lease)

    async def project(
        self,
        lease: ProjectionLease,
        tables: Mapping[str, Table],
        *,
        from_position: int,
        to_position: int,
        event_at_us: int | None,
        writes: Sequence[TableWrite],
        now_us: int,
        generation: int = 0,
        rebuild: bool = False,
    ) -> None:
        """In one transaction: the writes to ``generation``'s tables, and the
        checkpoint (the rebuild's cursor, with ``rebuild``) moved from
        ``from_position`` to ``to_position``, if the lease still holds and nothing
        moved them meanwhile (``ProjectionLeaseLostError`` otherwise: nothing
        written)."""
        self._check_open()
        if to_position < from_position:
            raise ConfigurationError("a checkpoint only moves forward")
        await self._project(
            lease,
            tables,
            generation,
            rebuild,
            from_position,
            to_position,
            event_at_us,
            writes,
            now_us,
        )

    async def fail_projection(
        self, lease: ProjectionLease, failure: ProjectionFailure, *, now_us: int
    ) -> None:
        """Record that the event after the checkpoint failed (if the lease holds)."""
        self._check_open()
        await self._fail_projection(lease, failure, now_us)

    async def retry_projection(self, name: str) -> bool:
        """Clear a recorded failure: its runner tries the event again. False if the
        projection has none."""
        self._check_open()
        return await self._retry_projection(check_name(name, "projection name"))

    async def skip_projection(self, name: str, position: int) -> bool:
        """Move the checkpoint (the rebuild's cursor, during a rebuild) past the failed
        event at ``position`` and clear the failure; False if the projection is not
        failed there."""
        self._check_open()
        return await self._skip_projection(check_name(name, "projection name"), position)

    async def projection_row(self, name: str) -> ProjectionRow | None:
        self._check_open()
        return await self._projection_row(check_name(name, "projection name"))

    async def list_projections(self) -> list[ProjectionRow]:
        self._check_open()
        return await self._list_projections()

    async def read_model_get(
        self, projection: str, table: Table, key: Any, *, generation: int | None = None
    ) -> dict[str, Any] | None:
        """The row with ``key`` in ``generation`` (by default the live one)."""
        self._check_open()
        key = table.check_key(key)
        for last in (False, True):
            live = await self._generation(projection, generation)
            try:
                return await self._read_model_get(projection, table, key, live)
            except TableMissing:
                if last or generation is not None:
                    return None  # not made yet
                # A rebuild's swap dropped it after we looked: look again, once.
        return None  # pragma: no cover

    async def _generation(self, projection: str, generation: int | None) -> int:
        if generation is not None:
            return generation
        row = await self._projection_row(check_name(projection, "projection name"))
        return 0 if row is None else row.generation

    async def read_model_select(
        self,
        projection: str,
        table: Table,
        *,
        where: Mapping[str, Any] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
        generation: int | None = None,
    ) -> list[dict[str, Any]]:
        """Rows whose columns equal ``where``'s values (None: IS NULL), ordered by
        ``order_by`` (then the key), a page of ``limit`` from ``offset``, of
        ``generation`` (by default the live one)."""
        self._check_open()
        conditions = dict(where or {})
        for column, value in conditions.items():
            spec = table.columns.get(column)
            if spec is None:
                raise ConfigurationError(f"table {table.name!r} has no column {column!r}")
            if spec.kind == "json":
                raise ConfigurationError(f"table {table.name!r}: cannot filter on JSON {column!r}")
            conditions[column] = spec.check(table.name, value) if value is not None else None
        if order_by is not None and order_by not in table.columns:
            raise ConfigurationError(f"table {table.name!r} has no column {order_by!r}")
        if not 1 <= limit <= 10_000 or not 0 <= offset <= 2**63 - 1:
            raise ConfigurationError("limit must be 1..10000 and offset 0..2**63-1")
        for last in (False, True):
            live = await self._generation(projection, generation)
            try:
                return await self._read_model_select(
                    projection, table, conditions, order_by, descending, limit, offset, live
                )
            except TableMissing:
                if last or generation is not None:
                    return []  # not made yet
        return []  # pragma: no cover

    # -- the backend's hooks ----------------------------------------------------------

    @abc.abstractmethod
    async def _ensure_tables(
        self,
        projection: str,
        tables: Sequence[Table],
        generation: int,
        version: int,
        listed: bool,
    ) -> None: ...

    @abc.abstractmethod
    async def _consume(
        self,
        consumer: str,
        message_id: str,
        tables: Mapping[str, Table],
        writes: Sequence[TableWrite],
        now_us: int,
        seen: Sequence[Seen],
    ) -> bool: ...

    @abc.abstractmethod
    async def _consumed(self, consumer: str, message_id: str) -> bool: ...

    @abc.abstractmethod
    async def _begin_rebuild(self, name: str, version: int) -> Rebuild: ...

    @abc.abstractmethod
    async def _finish_rebuild(
        self, lease: ProjectionLease, tables: Sequence[Table], now_us: int
    ) -> None: ...

    @abc.abstractmethod
    async def _claim_projection(
        self, name: str, owner: str, now_us: int, until_us: int
    ) -> ProjectionLease | None: ...

    @abc.abstractmethod
    async def _renew_projection(self, lease: ProjectionLease, until_us: int) -> bool: ...

    @abc.abstractmethod
    async def _release_projection(self, lease: ProjectionLease) -> None: ...

    @abc.abstractmethod
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
    ) -> None: ...

    @abc.abstractmethod
    async def _fail_projection(
        self, lease: ProjectionLease, failure: ProjectionFailure, now_us: int
    ) -> None: ...

    @abc.abstractmethod
    async def _retry_projection(self, name: str) -> bool: ...

    @abc.abstractmethod
    async def _skip_projection(self, name: str, position: int) -> bool: ...

    @abc.abstractmethod
    async def _projection_row(self, name: str) -> ProjectionRow | None: ...

    @abc.abstractmethod
    async def _list_projections(self) -> list[ProjectionRow]: ...

    @abc.abstractmethod
    async def _read_model_get(
        self, projection: str, table: Table, key: Any, generation: int
    ) -> dict[str, Any] | None: ...

    @abc.abstractmethod
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
    ) -> list[dict[str, Any]]: ...


PROJECTION_COLUMNS = (
    "name, position, event_at, owner, epoch, lease_until, failed_position, failed_event, "
    "failed_type, error_type, error_message, failed_at, updated_at, generation, version, "
    "rebuild_generation, rebuild_version, rebuild_position"
)


def projection_row(row: Sequence[Any]) -> ProjectionRow:
    (name, position, event_at, owner, epoch, until, f_pos, f_event, f_type, e_type, e_msg,
     failed_at, updated_at, generation, version, r_gen, r_version, r_pos) = row  # fmt: skip
    failure = (
        None
        if f_pos is None
        else ProjectionFailure(int(f_pos), str(f_event), str(f_type), str(e_type), str(e_msg))
    )
    rebuild = None if r_gen is None else Rebuild(int(r_gen), int(r_version), int(r_pos))
    return ProjectionRow(
        str(name), int(position), event_at, owner, int(epoch), until, failure, failed_at,
        int(updated_at), int(generation), int(version), rebuild,
    )  # fmt: skip


Dialect = Literal["sqlite", "postgres"]

_SQLITE_TYPES = {
    "text": "TEXT",
    "integer": "INTEGER",
    "real": "REAL",
    "boolean": "INTEGER",
    "json": "TEXT",
}
_POSTGRES_TYPES = {
    "text": 'text COLLATE "C"',
    "integer": "bigint",
    "real": "double precision",
    "boolean": "boolean",
    "json": "jsonb",
}


def _digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:20]


class ReadModelSql:
    """Statements on one read-model table, for one SQL dialect."""

    def __init__(self, dialect: Dialect, qualified: str, table: Table) -> None:
        self.dialect = dialect
        self.table = table
        self.name = qualified
        p = "?" if dialect == "sqlite" else "%s"
        self.p = p
        columns = list(table.columns)
        self.columns = columns
        listed = ", ".join(columns)
        self.select_columns = listed
        types = _SQLITE_TYPES if dialect == "sqlite" else _POSTGRES_TYPES
        defs = [
            f"{c.name} {types[c.kind]}"
            + (" PRIMARY KEY" if c.name == table.key else "")
            + ("" if c.nullable or c.name == table.key else " NOT NULL")
            for c in table.columns.values()
        ]
        suffix = " WITHOUT ROWID" if dialect == "sqlite" else ""
        self.create = f"CREATE TABLE IF NOT EXISTS {qualified} ({', '.join(defs)}){suffix}"
        bare = qualified.split(".")[-1]
        # Named by a digest: the plain name could pass PostgreSQL's 63 characters,
        # which it would cut silently (and two cut names could meet).
        self.indexes = [
            f"CREATE INDEX IF NOT EXISTS ix_{_digest(bare, column)} ON {qualified} ({column})"
            for column in table.indexes
        ]
        others = [c for c in columns if c != table.key]
        update = (
            ", ".join(f"{c} = excluded.{c}" for c in others)
            if others
            else f"{table.key} = excluded.{table.key}"
        )
        self.put = (
            f"INSERT INTO {qualified} ({listed}) VALUES ({', '.join([p] * len(columns))}) "
            f"ON CONFLICT ({table.key}) DO UPDATE SET {update}"
        )
        self.remove = f"DELETE FROM {qualified} WHERE {table.key} = {p}"
        self.get = f"SELECT {listed} FROM {qualified} WHERE {table.key} = {p}"

    def patch(self, changes: Mapping[str, Any]) -> str:
        sets = ", ".join(f"{c} = {self.p}" for c in changes)
        return f"UPDATE {self.name} SET {sets} WHERE {self.table.key} = {self.p}"

    def select(
        self, where: Mapping[str, Any], order_by: str | None, descending: bool
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in where.items():
            if value is None:
                clauses.append(f"{column} IS NULL")
            else:
                clauses.append(f"{column} = {self.p}")
                params.append(self.encode(self.table.columns[column], value))
        sql = f"SELECT {self.select_columns} FROM {self.name}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        direction = " DESC" if descending else ""
        order = [f"{order_by}{direction}"] if order_by and order_by != self.table.key else []
        order.append(f"{self.table.key}{direction}")
        sql += f" ORDER BY {', '.join(order)} LIMIT {self.p} OFFSET {self.p}"
        return sql, params

    def encode(self, column: Column, value: Any) -> Any:
        if value is None:
            return None
        if column.kind == "json":
            encoded = msgspec.json.encode(value)
            if self.dialect == "sqlite":
                return encoded.decode()
            from psycopg.types.json import Jsonb  # only the PostgreSQL store gets here

            return Jsonb(value, dumps=lambda v: msgspec.json.encode(v).decode())
        if column.kind == "boolean" and self.dialect == "sqlite":
            return int(value)
        return value

    def encode_row(self, row: Mapping[str, Any]) -> list[Any]:
        return [self.encode(self.table.columns[c], row[c]) for c in self.columns]

    def decode_row(self, row: Sequence[Any]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for column, value in zip(self.columns, row, strict=True):
            spec = self.table.columns[column]
            if value is not None and self.dialect == "sqlite":
                if spec.kind == "json":
                    value = msgspec.json.decode(value)
                elif spec.kind == "boolean":
                    value = bool(value)
            found[column] = value
        return found

    def write(self, write: TableWrite) -> tuple[str, list[Any]]:
        """The statement and parameters of one write."""
        if isinstance(write, Put):
            return self.put, self.encode_row(write.row)
        if isinstance(write, Patch):
            params = [self.encode(self.table.columns[c], v) for c, v in write.changes.items()]
            return self.patch(write.changes), [*params, write.key]
        if isinstance(write, Remove):
            return self.remove, [write.key]
        raise TypeError(f"not a table write: {write!r}")  # pragma: no cover


def runs(statements: Sequence[tuple[str, list[Any]]]) -> list[tuple[str, list[list[Any]]]]:
    """Consecutive statements with the same SQL, grouped (their order kept): each run
    can go to the database as one ``executemany``."""
    grouped: list[tuple[str, list[list[Any]]]] = []
    for sql, params in statements:
        if grouped and grouped[-1][0] == sql:
            grouped[-1][1].append(params)
        else:
            grouped.append((sql, [params]))
    return grouped
