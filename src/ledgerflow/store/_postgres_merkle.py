"""The PostgreSQL store's Merkle tiles and checkpoints (ADR 019): migration 10 and
the hooks of ``BaseEventStore``, on the store's reader pool."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.abc import Params
from psycopg.rows import TupleRow

from ._migrations import Migration
from ._postgres_vault import subject_keys_table
from .tiles import Checkpoint, MerkleTile, decode_entries, encode_entries

__all__ = ["PostgresMerkle", "merkle_migration"]

T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]

_TILE = "tile, first_position, last_position, root, size"
_CHECKPOINT = "tree_size, last_position, root, timestamp_ms, frontier, key_id, signature"


def merkle_migration(schema: str) -> Migration:
    """As SQLite's migration 9."""
    return Migration(
        10,
        "audit: Merkle tiles, checkpointed tree heads, personal-data keys",
        (
            f"""CREATE TABLE {schema}.merkle_tiles (
                tile bigint PRIMARY KEY,
                first_position bigint NOT NULL,
                last_position bigint NOT NULL,
                root bytea NOT NULL,
                size integer NOT NULL,
                entries bytea NOT NULL
            )""",
            # Not UNIQUE: two checkpointers sealing the same tile at once conflict on
            # the primary key, which ON CONFLICT settles; a second unique index would
            # fail the later one instead.
            f"CREATE INDEX merkle_tiles_by_position ON {schema}.merkle_tiles (last_position)",
            f"""CREATE TABLE {schema}.checkpoints (
                tree_size bigint PRIMARY KEY,
                last_position bigint NOT NULL,
                root bytea NOT NULL,
                timestamp_ms bigint NOT NULL,
                frontier bytea NOT NULL,
                key_id bytea,
                signature bytea
            )""",
            subject_keys_table(schema),
        ),
    )


def _tile(row: Sequence[Any]) -> MerkleTile:
    entries = decode_entries(bytes(row[5])) if len(row) > 5 else ()
    return MerkleTile(row[0], row[1], row[2], bytes(row[3]), row[4], entries)


def _checkpoint(row: Sequence[Any]) -> Checkpoint:
    size, last, root, at, frontier, key_id, signature = row
    return Checkpoint(
        size,
        last,
        bytes(root),
        at,
        bytes(frontier),
        None if key_id is None else bytes(key_id),
        None if signature is None else bytes(signature),
    )


class PostgresMerkle(abc.ABC):
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

    async def _save_checkpoint(
        self, tiles: Sequence[MerkleTile], checkpoint: Checkpoint
    ) -> Checkpoint:
        s = self.schema
        c = checkpoint

        async def save(conn: Connection) -> Checkpoint:
            async with conn.cursor() as cur:
                if tiles:
                    # A tile being filled grows; a sealed one (or a larger one from
                    # another checkpointer) is kept as it is.
                    await cur.executemany(
                        f"INSERT INTO {s}.merkle_tiles AS kept ({_TILE}, entries) "
                        "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (tile) DO UPDATE SET "
                        "last_position = excluded.last_position, root = excluded.root, "
                        "size = excluded.size, entries = excluded.entries "
                        "WHERE excluded.size > kept.size",
                        [
                            (
                                t.tile,
                                t.first_position,
                                t.last_position,
                                t.root,
                                t.size,
                                encode_entries(t.entries),
                            )
                            for t in tiles
                        ],
                    )
                await cur.execute(
                    f"INSERT INTO {s}.checkpoints ({_CHECKPOINT}) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
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
                await cur.execute(
                    f"SELECT {_CHECKPOINT} FROM {s}.checkpoints WHERE tree_size = %s",
                    (c.tree_size,),
                )
                row = await cur.fetchone()
            assert row is not None  # inserted, or kept from another checkpointer
            return _checkpoint(row)

        return await self._transaction("save a checkpoint", save)

    async def _merkle_tiles(self, first: int, limit: int, entries: bool) -> list[MerkleTile]:
        columns = f"{_TILE}, entries" if entries else _TILE
        rows = await self._fetch(
            "read Merkle tiles",
            f"SELECT {columns} FROM {self.schema}.merkle_tiles WHERE tile >= %s "
            "ORDER BY tile LIMIT %s",
            (first, limit),
        )
        return [_tile(r) for r in rows]

    async def _merkle_tile_of(self, position: int) -> MerkleTile | None:
        rows = await self._fetch(
            "read a Merkle tile",
            f"SELECT {_TILE}, entries FROM {self.schema}.merkle_tiles "
            "WHERE last_position >= %s ORDER BY last_position LIMIT 1",
            (position,),
        )
        return _tile(rows[0]) if rows and rows[0][1] <= position else None

    async def _checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        rows = await self._fetch(
            "read checkpoints",
            f"SELECT {_CHECKPOINT} FROM {self.schema}.checkpoints WHERE tree_size > %s "
            "ORDER BY tree_size LIMIT %s",
            (after_size, limit),
        )
        return [_checkpoint(r) for r in rows]

    async def _latest_checkpoint(self) -> Checkpoint | None:
        rows = await self._fetch(
            "read the latest checkpoint",
            f"SELECT {_CHECKPOINT} FROM {self.schema}.checkpoints ORDER BY tree_size DESC LIMIT 1",
            (),
        )
        return _checkpoint(rows[0]) if rows else None
