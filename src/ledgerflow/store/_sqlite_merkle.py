"""The SQLite store's Merkle tiles and checkpoints (ADR 019): migration 9 (with the
key vault's table, ADR 020) and the hooks of ``BaseEventStore``. Writes go through
the store's one writer connection."""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._migrations import Migration
from ._sqlite_vault import SUBJECT_KEYS_TABLE
from .tiles import Checkpoint, MerkleTile, decode_entries, encode_entries

__all__ = ["MERKLE_MIGRATION", "SQLiteMerkle"]

T = TypeVar("T")

MERKLE_MIGRATION = Migration(
    9,
    "audit: Merkle tiles, checkpointed tree heads, personal-data keys",
    (
        """CREATE TABLE merkle_tiles (
            tile INTEGER PRIMARY KEY,
            first_position INTEGER NOT NULL,
            last_position INTEGER NOT NULL,
            root BLOB NOT NULL,
            size INTEGER NOT NULL,
            entries BLOB NOT NULL
        )""",
        "CREATE INDEX merkle_tiles_by_position ON merkle_tiles (last_position)",
        """CREATE TABLE checkpoints (
            tree_size INTEGER PRIMARY KEY,
            last_position INTEGER NOT NULL,
            root BLOB NOT NULL,
            timestamp_ms INTEGER NOT NULL,
            frontier BLOB NOT NULL,
            key_id BLOB,
            signature BLOB
        )""",
        SUBJECT_KEYS_TABLE,
    ),
)

_TILE = "tile, first_position, last_position, root, size"
_CHECKPOINT = "tree_size, last_position, root, timestamp_ms, frontier, key_id, signature"


# A tile being filled grows; a sealed one (or a larger one from another
# checkpointer) is kept as it is.
_PUT_TILE = (
    f"INSERT INTO merkle_tiles ({_TILE}, entries) VALUES (?,?,?,?,?,?) "
    "ON CONFLICT (tile) DO UPDATE SET last_position = excluded.last_position, "
    "root = excluded.root, size = excluded.size, entries = excluded.entries "
    "WHERE excluded.size > merkle_tiles.size"
)


def _tile_params(t: MerkleTile) -> tuple[Any, ...]:
    return (t.tile, t.first_position, t.last_position, t.root, t.size, encode_entries(t.entries))


def _tile(row: Sequence[Any]) -> MerkleTile:
    entries = decode_entries(row[5]) if len(row) > 5 else ()
    return MerkleTile(row[0], row[1], row[2], row[3], row[4], entries)


class SQLiteMerkle(abc.ABC):
    """Mixed into ``SQLiteEventStore``."""

    @abc.abstractmethod
    async def _in_transaction(
        self, fn: Callable[[sqlite3.Connection], T], *, flushed: bool = True
    ) -> T: ...

    @abc.abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]: ...

    async def _save_checkpoint(
        self, tiles: Sequence[MerkleTile], checkpoint: Checkpoint
    ) -> Checkpoint:
        def save(con: sqlite3.Connection) -> Checkpoint:
            con.executemany(_PUT_TILE, [_tile_params(t) for t in tiles])
            c = checkpoint
            con.execute(
                f"INSERT INTO checkpoints ({_CHECKPOINT}) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT DO NOTHING",
                (
                    c.tree_size,
                    c.last_position,
                    c.root,
                    c.timestamp_ms,
                    c.frontier,
                    c.key_id,
                    c.signature,
                ),
            )
            row = con.execute(
                f"SELECT {_CHECKPOINT} FROM checkpoints WHERE tree_size = ?", (c.tree_size,)
            ).fetchone()
            return Checkpoint(*row)

        return await self._in_transaction(save)

    async def _merkle_tiles(self, first: int, limit: int, entries: bool) -> list[MerkleTile]:
        columns = f"{_TILE}, entries" if entries else _TILE
        rows = await self._read(
            f"SELECT {columns} FROM merkle_tiles WHERE tile >= ? ORDER BY tile LIMIT ?",
            (first, limit),
        )
        return [_tile(r) for r in rows]

    async def _merkle_tile_of(self, position: int) -> MerkleTile | None:
        rows = await self._read(
            f"SELECT {_TILE}, entries FROM merkle_tiles WHERE last_position >= ? "
            "ORDER BY last_position LIMIT 1",
            (position,),
        )
        return _tile(rows[0]) if rows and rows[0][1] <= position else None

    async def _checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        rows = await self._read(
            f"SELECT {_CHECKPOINT} FROM checkpoints WHERE tree_size > ? ORDER BY tree_size LIMIT ?",
            (after_size, limit),
        )
        return [Checkpoint(*r) for r in rows]

    async def _latest_checkpoint(self) -> Checkpoint | None:
        rows = await self._read(
            f"SELECT {_CHECKPOINT} FROM checkpoints ORDER BY tree_size DESC LIMIT 1", ()
        )
        return Checkpoint(*rows[0]) if rows else None
