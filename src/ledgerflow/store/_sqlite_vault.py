"""The SQLite store's key vault for personal data (ADR 020): the ``subject_keys``
table of migration 9 behind ``personal.KeyVault``. Keys are created and destroyed on
the writer connection; a destroyed key's page is overwritten (``secure_delete``) and
the write-ahead log checkpointed, so no copy stays in the database files."""

from __future__ import annotations

import abc
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from ..personal import SubjectKey

__all__ = ["SUBJECT_KEYS_TABLE", "SQLiteVault"]

T = TypeVar("T")

SUBJECT_KEYS_TABLE = """CREATE TABLE subject_keys (
    subject TEXT PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    key BLOB NOT NULL,
    created_at INTEGER NOT NULL
)"""

_CHUNK = 500  # bound parameters per statement


class SQLiteVault(abc.ABC):
    """Mixed into ``SQLiteEventStore``."""

    @abc.abstractmethod
    async def _in_transaction(
        self, fn: Callable[[sqlite3.Connection], T], *, flushed: bool = True
    ) -> T: ...

    @abc.abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]: ...

    async def _vault_keys(self, subjects: Collection[str]) -> dict[str, SubjectKey]:
        wanted = sorted(set(subjects))
        found = await self._select_keys("subject", wanted)
        missing = [s for s in wanted if s not in found]
        if missing:

            def create(con: sqlite3.Connection) -> None:
                now = time.time_ns() // 1000
                con.executemany(
                    "INSERT INTO subject_keys VALUES (?,?,?,?) ON CONFLICT (subject) DO NOTHING",
                    [(s, str(uuid.uuid4()), os.urandom(32), now) for s in missing],
                )

            await self._in_transaction(create)
            found.update(await self._select_keys("subject", missing))
        return {s: SubjectKey(k, key) for s, (k, key) in found.items()}

    async def _vault_keys_by_id(self, key_ids: Collection[str]) -> dict[str, bytes]:
        found = await self._select_keys("key_id", sorted(set(key_ids)))
        return dict(found.values())

    async def _select_keys(self, column: str, values: list[str]) -> dict[str, tuple[str, bytes]]:
        found: dict[str, tuple[str, bytes]] = {}
        for start in range(0, len(values), _CHUNK):
            chunk = values[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = await self._read(
                f"SELECT subject, key_id, key FROM subject_keys WHERE {column} IN ({marks})",
                chunk,
            )
            found.update((subject, (key_id, key)) for subject, key_id, key in rows)
        return found

    async def _vault_destroy(self, subject: str) -> str | None:
        def destroy(con: sqlite3.Connection) -> str | None:
            row = con.execute(
                "SELECT key_id FROM subject_keys WHERE subject = ?", (subject,)
            ).fetchone()
            if row is None:
                return None
            con.execute("PRAGMA secure_delete = ON")
            con.execute("DELETE FROM subject_keys WHERE subject = ?", (subject,))
            return str(row[0])

        destroyed = await self._in_transaction(destroy)
        if destroyed is not None:
            await self._read("PRAGMA wal_checkpoint(TRUNCATE)", ())
        return destroyed

    async def _vault_key_id(self, subject: str) -> str | None:
        rows = await self._read("SELECT key_id FROM subject_keys WHERE subject = ?", (subject,))
        return str(rows[0][0]) if rows else None

    async def _purge_snapshots(self, mentioning: str) -> int:
        def purge(con: sqlite3.Connection) -> int:
            cur = con.execute(
                "DELETE FROM snapshots WHERE stream_id IN "
                "(SELECT DISTINCT stream_id FROM events WHERE instr(data, ?) > 0)",
                (mentioning.encode(),),
            )
            return cur.rowcount

        return await self._in_transaction(purge)
