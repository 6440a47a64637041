"""The PostgreSQL store's key vault for personal data (ADR 020): the
``subject_keys`` table of migration 10 behind ``personal.KeyVault``, on the reader
pool. A destroyed key's row is vacuumed at once, so its bytes do not wait in a dead
tuple for autovacuum (WAL segments and backups keep theirs until they age out)."""

from __future__ import annotations

import abc
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import psycopg
from psycopg.abc import Params
from psycopg.rows import TupleRow

from ..personal import SubjectKey

__all__ = ["PostgresVault", "subject_keys_table"]

T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]


def subject_keys_table(schema: str) -> str:
    return f"""CREATE TABLE {schema}.subject_keys (
        subject text PRIMARY KEY,
        key_id text NOT NULL UNIQUE,
        key bytea NOT NULL,
        created_at bigint NOT NULL
    )"""


class PostgresVault(abc.ABC):
    """Mixed into ``PostgresEventStore``."""

    schema: str

    @abc.abstractmethod
    async def _fetch(
        self, action: str, sql: str, params: Params, *, flushed: bool = True
    ) -> list[TupleRow]: ...

    @abc.abstractmethod
    async def _pooled(self, action: str, run: Callable[[Connection], Awaitable[T]]) -> T: ...

    async def _vault_keys(self, subjects: Collection[str]) -> dict[str, SubjectKey]:
        wanted = sorted(set(subjects))
        rows = await self._fetch(
            "read subject keys",
            f"SELECT subject, key_id, key FROM {self.schema}.subject_keys "
            "WHERE subject = ANY(%s::text[])",
            (wanted,),
        )
        found = {s: SubjectKey(k, bytes(key)) for s, k, key in rows}
        missing = [s for s in wanted if s not in found]
        if missing:
            now = time.time_ns() // 1000
            created = [(s, str(uuid.uuid4()), os.urandom(32)) for s in missing]
            rows = await self._fetch(
                "create subject keys",
                f"INSERT INTO {self.schema}.subject_keys "
                "SELECT s, k, key, %s FROM unnest(%s::text[], %s::text[], %s::bytea[]) "
                "AS t(s, k, key) ON CONFLICT (subject) DO NOTHING",
                (now, [c[0] for c in created], [c[1] for c in created], [c[2] for c in created]),
            )
            rows = await self._fetch(
                "read subject keys",
                f"SELECT subject, key_id, key FROM {self.schema}.subject_keys "
                "WHERE subject = ANY(%s::text[])",
                (missing,),
            )
            found.update({s: SubjectKey(k, bytes(key)) for s, k, key in rows})
        return found

    async def _vault_keys_by_id(self, key_ids: Collection[str]) -> dict[str, bytes]:
        rows = await self._fetch(
            "read subject keys",
            f"SELECT key_id, key FROM {self.schema}.subject_keys WHERE key_id = ANY(%s::text[])",
            (sorted(set(key_ids)),),
        )
        return {k: bytes(key) for k, key in rows}

    async def _vault_destroy(self, subject: str) -> str | None:
        rows = await self._fetch(
            "destroy a subject key",
            f"DELETE FROM {self.schema}.subject_keys WHERE subject = %s RETURNING key_id",
            (subject,),
        )
        if not rows:
            return None

        async def vacuum(conn: Connection) -> None:
            await conn.set_autocommit(True)
            try:
                await conn.execute(f"VACUUM {self.schema}.subject_keys")
            finally:
                await conn.set_autocommit(False)

        with contextlib.suppress(psycopg.Error):  # best effort: autovacuum follows anyway
            await self._pooled("vacuum subject keys", vacuum)
        return str(rows[0][0])

    async def _vault_key_id(self, subject: str) -> str | None:
        rows = await self._fetch(
            "read a subject key",
            f"SELECT key_id FROM {self.schema}.subject_keys WHERE subject = %s",
            (subject,),
        )
        return str(rows[0][0]) if rows else None

    async def _purge_snapshots(self, mentioning: str) -> int:
        s = self.schema
        rows = await self._fetch(
            "drop snapshots",
            f"WITH gone AS (DELETE FROM {s}.snapshots WHERE stream_id IN "
            f"(SELECT DISTINCT stream_id FROM {s}.events WHERE position(%s IN data) > 0) "
            "RETURNING 1) SELECT count(*) FROM gone",
            (mentioning.encode(),),
        )
        return int(rows[0][0])
