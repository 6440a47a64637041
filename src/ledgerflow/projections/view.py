"""What a projection's handler writes through: its tables as of the batch so far.

Writes are collected, not executed: the runner hands them to the store with the
checkpoint, in one transaction. ``get`` answers from the batch's own writes first
(so a handler sees what the events before it did), then from the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .definition import Projection
from .tables import Patch, Put, Remove, Table, TableWrite

__all__ = ["View"]

_GONE: Any = object()

Reader = Callable[[str, Any], Awaitable[dict[str, Any] | None]]
"""Reads a stored row: (table name, key) to the row or None."""


class View:
    """A projection's tables during one batch (see the module docstring)."""

    def __init__(self, projection: Projection, read: Reader) -> None:
        self.projection = projection
        self._read = read
        self.writes: list[TableWrite] = []
        self._by_key: dict[tuple[str, Any], list[TableWrite]] = {}
        """Each row's writes in this batch, in order: what a read replays."""
        self._rows: dict[tuple[str, Any], Any] = {}
        """Rows as the batch left them: a dict, or ``_GONE``; absent if untouched
        and unread."""

    def put(self, table: Table | str, row: dict[str, Any]) -> None:
        """Insert ``row``, or replace the row with its key (columns left out: None)."""
        spec = self.projection.table(table)
        checked = spec.check_row(row)
        key = checked[spec.key]
        self._add(Put(spec.name, checked), key)
        self._rows[(spec.name, key)] = checked

    def update(self, table: Table | str, key: Any, **changes: Any) -> None:
        """Set these columns of the row with ``key``; nothing if there is none."""
        spec = self.projection.table(table)
        key = spec.check_key(key)
        checked = spec.check_changes(changes)
        self._add(Patch(spec.name, key, checked), key)
        known = self._rows.get((spec.name, key))
        if isinstance(known, dict):
            self._rows[(spec.name, key)] = {**known, **checked}
        elif known is None:
            self._rows.pop((spec.name, key), None)  # unknown until read: read it then

    def delete(self, table: Table | str, key: Any) -> None:
        spec = self.projection.table(table)
        key = spec.check_key(key)
        self._add(Remove(spec.name, key), key)
        self._rows[(spec.name, key)] = _GONE

    async def get(self, table: Table | str, key: Any) -> dict[str, Any] | None:
        """The row with ``key`` as the batch has it so far; None if there is none."""
        spec = self.projection.table(table)
        key = spec.check_key(key)
        known = self._rows.get((spec.name, key))
        if known is _GONE:
            return None
        if isinstance(known, dict):
            return dict(known)
        row = await self._read(spec.name, key)
        # The batch's writes to it so far apply on top, in order.
        for write in self._by_key.get((spec.name, key), ()):
            if isinstance(write, Put):
                row = dict(write.row)
            elif isinstance(write, Patch):
                row = None if row is None else {**row, **write.changes}
            else:
                row = None
        self._rows[(spec.name, key)] = _GONE if row is None else row
        return None if row is None else dict(row)

    def _add(self, write: TableWrite, key: Any) -> None:
        self.writes.append(write)
        self._by_key.setdefault((write.table, key), []).append(write)

    def mark(self) -> int:
        """Where the writes are now: ``undo(mark)`` drops what came after."""
        return len(self.writes)

    def undo(self, mark: int) -> None:
        """Drop the writes after ``mark`` (a failed handler's); rows are worked out
        again from the store and the writes kept when next read."""
        if len(self.writes) > mark:
            del self.writes[mark:]
            self._rows.clear()
            self._by_key.clear()
            for write in self.writes:
                key = write.key if isinstance(write, Patch | Remove) else _key_of(self, write)
                self._by_key.setdefault((write.table, key), []).append(write)


def _key_of(view: View, write: Put) -> Any:
    return write.row[view.projection.tables[write.table].key]
