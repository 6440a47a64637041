"""The memory store's projections: rows and read-model tables in dicts, with the
same rules as the SQL backends (one lease, fenced commits, failures that stop)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..errors import ProjectionLeaseLostError, StaleReadError
from ..projections.state import Rebuild
from ..projections.tables import Patch, Put, Remove, Table, TableWrite
from ._projections import (
    ProjectionFailure,
    ProjectionLease,
    ProjectionRow,
    Seen,
    physical_name,
)

__all__ = ["MemoryProjections"]


class MemoryProjections:
    """Mixed into ``MemoryEventStore``."""

    _projections: dict[str, ProjectionRow]
    _read_models: dict[str, dict[Any, dict[str, Any]]]

    def _init_projections(self) -> None:
        self._projections = {}
        self._read_models = {}
        self._inbox: set[tuple[str, str]] = set()

    async def _ensure_tables(
        self,
        projection: str,
        tables: Sequence[Table],
        generation: int,
        version: int,
        listed: bool,
    ) -> None:
        if listed:
            row = self._projections.setdefault(projection, _new(projection))
            if row.version == 0:
                self._projections[projection] = replace(row, version=version)
        for table in tables:
            self._read_models.setdefault(physical_name(projection, table.name, generation), {})

    async def _consume(
        self,
        consumer: str,
        message_id: str,
        tables: Mapping[str, Table],
        writes: Sequence[TableWrite],
        now_us: int,
        seen: Sequence[Seen],
    ) -> bool:
        for table, key, then in seen:
            if await self._read_model_get(consumer, tables[table], key, 0) != then:
                raise StaleReadError(consumer, table, key)
        if (consumer, message_id) in self._inbox:
            return False
        self._apply_writes(consumer, 0, tables, writes)
        self._inbox.add((consumer, message_id))
        return True

    async def _consumed(self, consumer: str, message_id: str) -> bool:
        return (consumer, message_id) in self._inbox

    def _apply_writes(
        self, owner: str, generation: int, tables: Mapping[str, Table], writes: Sequence[TableWrite]
    ) -> None:
        """All or nothing: applied to copies, swapped in at the end."""
        touched: dict[str, dict[Any, dict[str, Any]]] = {}
        for write in writes:
            name = physical_name(owner, write.table, generation)
            rows = touched.get(name)
            if rows is None:
                rows = touched[name] = copy.deepcopy(self._read_models.setdefault(name, {}))
            key_column = tables[write.table].key
            if isinstance(write, Put):
                rows[write.row[key_column]] = copy.deepcopy(write.row)
            elif isinstance(write, Patch):
                if write.key in rows:
                    rows[write.key].update(copy.deepcopy(write.changes))
            elif isinstance(write, Remove):
                rows.pop(write.key, None)
        self._read_models.update(touched)

    async def _begin_rebuild(self, name: str, version: int) -> Rebuild:
        row = self._projections.setdefault(name, _new(name))
        if row.rebuild is not None:
            return row.rebuild
        rebuild = Rebuild(row.generation + 1, version, 0)
        self._projections[name] = replace(row, rebuild=rebuild)
        return rebuild

    async def _finish_rebuild(
        self, lease: ProjectionLease, tables: Sequence[Table], now_us: int
    ) -> None:
        row = self._holds(lease)
        if row is None or row.rebuild is None or row.failure is not None:
            raise ProjectionLeaseLostError(lease.name, lease.owner, lease.epoch, "lease lost")
        for table in tables:
            self._read_models.pop(physical_name(lease.name, table.name, row.generation), None)
        rebuilt = row.rebuild
        self._projections[lease.name] = replace(
            row,
            generation=rebuilt.generation,
            version=rebuilt.version,
            position=rebuilt.position,
            rebuild=None,
            updated_at_us=now_us,
        )

    async def _claim_projection(
        self, name: str, owner: str, now_us: int, until_us: int
    ) -> ProjectionLease | None:
        row = self._projections.setdefault(name, _new(name))
        held = row.owner is not None and row.lease_until_us is not None
        if held and row.owner != owner and (row.lease_until_us or 0) >= now_us:
            return None
        epoch = row.epoch if row.owner == owner and held else row.epoch + 1
        self._projections[name] = replace(row, owner=owner, epoch=epoch, lease_until_us=until_us)
        return ProjectionLease(name, owner, epoch, row.position)

    def _holds(self, lease: ProjectionLease) -> ProjectionRow | None:
        row = self._projections.get(lease.name)
        if row is None or row.owner != lease.owner or row.epoch != lease.epoch:
            return None
        return row

    async def _renew_projection(self, lease: ProjectionLease, until_us: int) -> bool:
        row = self._holds(lease)
        if row is None:
            return False
        self._projections[lease.name] = replace(row, lease_until_us=until_us)
        return True

    async def _release_projection(self, lease: ProjectionLease) -> None:
        row = self._holds(lease)
        if row is not None:
            self._projections[lease.name] = replace(row, owner=None, lease_until_us=None)

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
        row = self._holds(lease)
        if row is None:
            raise ProjectionLeaseLostError(lease.name, lease.owner, lease.epoch, "lease lost")
        cursor = row.rebuild.position if rebuild and row.rebuild is not None else row.position
        expected = row.rebuild.generation if rebuild and row.rebuild is not None else row.generation
        if (
            cursor != from_position
            or row.failure is not None
            or (rebuild and row.rebuild is None)
            or expected != generation
        ):
            raise ProjectionLeaseLostError(
                lease.name, lease.owner, lease.epoch, "its checkpoint moved meanwhile"
            )
        self._apply_writes(lease.name, generation, tables, writes)
        if rebuild and row.rebuild is not None:
            self._projections[lease.name] = replace(
                row, rebuild=replace(row.rebuild, position=to_position), updated_at_us=now_us
            )
            return
        self._projections[lease.name] = replace(
            row,
            position=to_position,
            event_at_us=event_at_us if event_at_us is not None else row.event_at_us,
            updated_at_us=now_us,
        )

    async def _fail_projection(
        self, lease: ProjectionLease, failure: ProjectionFailure, now_us: int
    ) -> None:
        row = self._holds(lease)
        if row is None:
            raise ProjectionLeaseLostError(lease.name, lease.owner, lease.epoch, "lease lost")
        self._projections[lease.name] = replace(
            row, failure=failure, failed_at_us=now_us, updated_at_us=now_us
        )

    async def _retry_projection(self, name: str) -> bool:
        row = self._projections.get(name)
        if row is None or row.failure is None:
            return False
        self._projections[name] = replace(row, failure=None, failed_at_us=None)
        return True

    async def _skip_projection(self, name: str, position: int) -> bool:
        row = self._projections.get(name)
        if row is None or row.failure is None or row.failure.position != position:
            return False
        if row.rebuild is not None:
            self._projections[name] = replace(
                row,
                rebuild=replace(row.rebuild, position=position),
                failure=None,
                failed_at_us=None,
            )
            return True
        self._projections[name] = replace(row, position=position, failure=None, failed_at_us=None)
        return True

    async def _projection_row(self, name: str) -> ProjectionRow | None:
        return self._projections.get(name)

    async def _list_projections(self) -> list[ProjectionRow]:
        return [self._projections[n] for n in sorted(self._projections)]

    async def _read_model_get(
        self, projection: str, table: Table, key: Any, generation: int
    ) -> dict[str, Any] | None:
        found = self._read_models.get(physical_name(projection, table.name, generation), {}).get(
            key
        )
        return None if found is None else copy.deepcopy(found)

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
        stored = self._read_models.get(physical_name(projection, table.name, generation), {})
        rows = [
            r
            for r in stored.values()
            if all(r.get(c) == v if v is not None else r.get(c) is None for c, v in where.items())
        ]
        column = order_by or table.key

        def order(r: dict[str, Any]) -> tuple[Any, ...]:
            value = r.get(column)
            # NULLs sort last ascending (PostgreSQL's rule; SQLite puts them first: the
            # contract tests avoid ordering on NULLs).
            return (value is None, value if value is not None else 0, r[table.key])

        rows.sort(key=order, reverse=descending)
        return [copy.deepcopy(r) for r in rows[offset : offset + limit]]


def _new(name: str) -> ProjectionRow:
    return ProjectionRow(name, 0, None, None, 0, None, None, None, 0)
