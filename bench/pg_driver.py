"""PostgreSQL driver floor: psycopg 3 (async) against asyncpg on the same server.

    python bench/pg_driver.py

Prints one JSON line: for each driver, the rate of bare round trips, of one-row
INSERTs committed alone (autocommit, and in an explicit BEGIN ... COMMIT the way the
store must write), and of 100-row executemany batches committed together; then the
psycopg / asyncpg ratio of each. Both drivers write event-shaped rows into one table
made for the run and dropped afterwards. ``store_batch100`` is the store's own write:
lock the head row, read back ids, insert 100 rows, move the head, commit.
``copy100`` is each driver's bulk path (binary COPY) for the same 100 rows.

Each case alternates between the drivers at every operation, so a slow patch of the
disk or a noisy neighbour hits both alike; a driver's rate is the operations it did
over the time they took. Runs in about 20 s.

The explicit transaction is the figure that matters to the store: psycopg's pipeline
sends BEGIN, the statements and COMMIT in one round trip; asyncpg has no pipeline for
parameterized statements, so each of them waits for the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from store import PG_URL, events_shaped_table

CASE_SECONDS = 3.0
BATCH = 100
DATA = b'{"account":"acc-000042","amount":1250,"currency":"EUR","memo":"invoice 2024-117"}'
COLUMNS = 11
COPY_TYPES = [
    "int8", "uuid", "text", "int8", "text", "int4", "bytea", "bytea", "timestamptz", "bytea",
    "bytea",
]  # fmt: skip

Step = Callable[[], Awaitable[int]]


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Rows:
    """Event-shaped rows with positions unique across both drivers."""

    def __init__(self) -> None:
        self.position = 0

    def next(self) -> tuple[Any, ...]:
        self.position += 1
        return (
            self.position,
            uuid.uuid4(),
            "bench",
            self.position,
            "account.deposited",
            1,
            DATA,
            b"{}",
            datetime.now(UTC),
            bytes(32),
            os.urandom(32),
        )

    def batch(self) -> list[tuple[Any, ...]]:
        return [self.next() for _ in range(BATCH)]


async def interleaved(seconds: float, steps: dict[str, Step]) -> dict[str, float]:
    """Units per second of each step (which returns how many units it did), taking
    turns one operation at a time."""
    done = dict.fromkeys(steps, 0)
    spent = dict.fromkeys(steps, 0.0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, step in steps.items():
            start = time.perf_counter()
            done[name] += await step()
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in steps}


def psycopg_cases(con: psycopg.AsyncConnection[Any], table: str, rows: Rows) -> dict[str, Step]:
    insert = f"INSERT INTO {table} VALUES ({', '.join(['%s'] * COLUMNS)})"

    async def roundtrip() -> int:
        await con.execute("SELECT %s::int", (1,))
        return 1

    async def autocommit_insert() -> int:
        await con.execute(insert, rows.next(), binary=True)
        return 1

    async def tx_insert() -> int:
        async with con.pipeline():
            await con.execute("BEGIN")
            await con.execute(insert, rows.next(), binary=True)
            await con.execute("COMMIT")
        return 1

    async def batch() -> int:
        async with con.pipeline():
            await con.execute("BEGIN")
            async with con.cursor(binary=True) as cur:
                await cur.executemany(insert, rows.batch())
            await con.execute("COMMIT")
        return 1

    async def copy() -> int:
        statement = f"COPY {table} FROM STDIN (FORMAT BINARY)"
        async with con.transaction(), con.cursor() as cur, cur.copy(statement) as stream:
            stream.set_types(COPY_TYPES)
            for row in rows.batch():
                await stream.write_row(row)
        return 1

    async def store_batch() -> int:
        batch = rows.batch()
        async with con.pipeline():
            await con.execute("BEGIN")
            lock = await con.execute(f"SELECT position FROM {table}_head FOR UPDATE")
            known = await con.execute(
                f"SELECT position FROM {table} WHERE event_id = ANY(%s::uuid[])",
                ([row[1] for row in batch],),
            )
            await lock.fetchone()
            await known.fetchall()
            async with con.cursor(binary=True) as cur:
                await cur.executemany(insert, batch)
            await con.execute(f"UPDATE {table}_head SET position = %s", (batch[-1][0],))
            await con.execute("COMMIT")
        return 1

    return {
        "roundtrip_per_s": roundtrip,
        "autocommit_insert_per_s": autocommit_insert,
        "tx_insert_commit_per_s": tx_insert,
        "batch100_commits_per_s": batch,
        "store_batch100_commits_per_s": store_batch,
        "copy100_commits_per_s": copy,
    }


def asyncpg_cases(con: Any, table: str, rows: Rows) -> dict[str, Step]:
    insert = f"INSERT INTO {table} VALUES ({', '.join(f'${i + 1}' for i in range(COLUMNS))})"

    async def roundtrip() -> int:
        await con.fetchval("SELECT $1::int", 1)
        return 1

    async def autocommit_insert() -> int:
        await con.execute(insert, *rows.next())
        return 1

    async def tx_insert() -> int:
        async with con.transaction():
            await con.execute(insert, *rows.next())
        return 1

    async def batch() -> int:
        async with con.transaction():
            await con.executemany(insert, rows.batch())
        return 1

    async def copy() -> int:
        schema, name = table.split(".")
        async with con.transaction():
            await con.copy_records_to_table(name, records=rows.batch(), schema_name=schema)
        return 1

    async def store_batch() -> int:
        batch = rows.batch()
        async with con.transaction():
            await con.fetchval(f"SELECT position FROM {table}_head FOR UPDATE")
            await con.fetch(
                f"SELECT position FROM {table} WHERE event_id = ANY($1::uuid[])",
                [row[1] for row in batch],
            )
            await con.executemany(insert, batch)
            await con.execute(f"UPDATE {table}_head SET position = $1", batch[-1][0])
        return 1

    return {
        "roundtrip_per_s": roundtrip,
        "autocommit_insert_per_s": autocommit_insert,
        "tx_insert_commit_per_s": tx_insert,
        "batch100_commits_per_s": batch,
        "store_batch100_commits_per_s": store_batch,
        "copy100_commits_per_s": copy,
    }


async def settings(con: psycopg.AsyncConnection[Any]) -> dict[str, str]:
    found = {}
    for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method"):
        cur = await con.execute("SELECT current_setting(%s)", (name,))
        row = await cur.fetchone()
        found[name] = "?" if row is None else str(row[0])
    return found


async def run() -> dict[str, Any]:
    import asyncpg

    table = f"public.lf_bench_driver_{uuid.uuid4().hex[:12]}"
    admin = await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)
    try:
        await admin.execute(events_shaped_table(table))
        await admin.execute(f"CREATE TABLE {table}_head (position bigint NOT NULL)")
        await admin.execute(f"INSERT INTO {table}_head VALUES (0)")
        server = await settings(admin)
        pg = await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)
        apg = await asyncpg.connect(PG_URL)
        try:
            rows = Rows()
            cases = {
                "psycopg": psycopg_cases(pg, table, rows),
                "asyncpg": asyncpg_cases(apg, table, rows),
            }
            figures: dict[str, dict[str, float]] = {driver: {} for driver in cases}
            for name in cases["psycopg"]:
                note(f"pg_driver: {name}")
                steps = {driver: cases[driver][name] for driver in cases}
                await interleaved(0.1, steps)  # warm up: prepared statements, caches
                for driver, value in (await interleaved(CASE_SECONDS, steps)).items():
                    figures[driver][name] = round(value, 1)
        finally:
            await pg.close()
            await apg.close()
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}, {table}_head")
        await admin.close()

    for by_case in figures.values():
        for name in ("batch100", "store_batch100", "copy100"):
            by_case[f"{name}_rows_per_s"] = round(by_case[f"{name}_commits_per_s"] * BATCH, 1)
    return {
        "bench": "pg_driver",
        "server": server,
        "drivers": {"psycopg": psycopg.__version__, "asyncpg": asyncpg.__version__},
        "seconds_per_case": CASE_SECONDS,
        **figures,
        "psycopg_over_asyncpg": {
            name: round(figures["psycopg"][name] / figures["asyncpg"][name], 3)
            for name in figures["psycopg"]
        },
    }


def main() -> None:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        print(json.dumps({"bench": "pg_driver", "skipped": "asyncpg is not installed"}))
        return
    try:
        result = asyncio.run(run())
    except (psycopg.OperationalError, OSError) as exc:
        print(json.dumps({"bench": "pg_driver", "skipped": f"PostgreSQL unavailable: {exc}"}))
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()
