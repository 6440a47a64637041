"""The process that ``test_workflow_crash`` kills with SIGKILL, again and again.

Run as ``python tests/_crash_worker.py DB_URL EFFECTS_DB N``: it opens an Engine on
the ledger at ``DB_URL``, starts the instances ``w-0`` .. ``w-{N-1}`` of the
``crash-order`` workflow (starting is idempotent on the id, so a restart gets the
handles of the instances an earlier, killed run started) and exits 0 once every one
of them has finished.

Each step applies its effect to ``EFFECTS_DB``, a SQLite database standing for an
external system that deduplicates on the step's idempotency key, the way a payment
API does: in one committed transaction it records the attempt (``attempts``: one row
per execution), inserts the effect unless its key is there already (``effects``:
``INSERT OR IGNORE``) and answers with the effect as first applied. A fresh
connection per call, committed before the step returns: an effect is durable
whatever instant the kill lands at. Random pauses of 0-20 ms in the steps spread the
kills over every phase of a pass.

The environment variable ``LEDGERFLOW_CRASH_CONCURRENCY`` bounds the instances the
engine runs at once (default 4), which keeps work pending across many kills.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ledgerflow as lf

WORKFLOW_NAME = "crash-order"
STEPS: tuple[tuple[int, str], ...] = ((1, "reserve"), (2, "charge"), (4, "confirm"))
"""(seq, name) of each step of the workflow; seq 3 is the durable timer."""
TIMER_SEQ = 3
TIMER_SECONDS = 0.05
MAX_PAUSE = 0.02
DEFAULT_CONCURRENCY = 4
EFFECTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS effects ("
    "key TEXT PRIMARY KEY, step TEXT NOT NULL, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS attempts ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, step TEXT NOT NULL, "
    "value TEXT NOT NULL, pid INTEGER NOT NULL)",
)

_effects_path = Path("effects.db")


@dataclass(frozen=True)
class Order:
    n: int


@dataclass(frozen=True)
class Receipt:
    reservation: str
    charge: str
    confirmation: str


def expected_prefixes(n: int) -> dict[str, str]:
    """What each step's value of instance ``w-n`` starts with (a random token follows)."""
    return {"reserve": f"R-{n}:", "charge": f"C-{n}:", "confirm": f"K-{n}:"}


def connect_effects(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    con.execute("PRAGMA synchronous = FULL")
    return con


def init_effects(path: Path) -> None:
    con = connect_effects(path)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        for statement in EFFECTS_SCHEMA:
            con.execute(statement)
    finally:
        con.close()


def apply_effect(key: str, step: str, value: str) -> str:
    """Apply ``value`` under ``key`` once; answer the value first applied under it."""
    con = connect_effects(_effects_path)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute(
                "INSERT INTO attempts (key, step, value, pid) VALUES (?, ?, ?, ?)",
                (key, step, value, os.getpid()),
            )
            con.execute(
                "INSERT OR IGNORE INTO effects (key, step, value) VALUES (?, ?, ?)",
                (key, step, value),
            )
            row = con.execute("SELECT value FROM effects WHERE key = ?", (key,)).fetchone()
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    stored: str = row[0]
    return stored


def _token() -> str:
    return uuid.uuid4().hex[:12]


def _pause() -> None:
    time.sleep(random.uniform(0, MAX_PAUSE))


def reserve(order: Order) -> str:
    _pause()
    key = lf.current_step().idempotency_key
    value = apply_effect(key, "reserve", f"R-{order.n}:{_token()}")
    _pause()
    return value


def release(order: Order) -> None:
    """The compensation of ``reserve``; the normal path never triggers it."""
    apply_effect(lf.current_step().idempotency_key, "release", f"X-{order.n}:{_token()}")


async def charge(order: Order) -> str:
    await asyncio.sleep(random.uniform(0, MAX_PAUSE))
    key = lf.current_step().idempotency_key
    value = await asyncio.to_thread(apply_effect, key, "charge", f"C-{order.n}:{_token()}")
    await asyncio.sleep(random.uniform(0, MAX_PAUSE))
    return value


def confirm(order: Order, reservation: str, charged: str) -> str:
    _pause()
    key = lf.current_step().idempotency_key
    value = apply_effect(key, "confirm", f"K-{order.n}:{_token()}")
    _pause()
    return value


@lf.workflow(name=WORKFLOW_NAME, version=1)
async def crash_order(ctx: lf.WorkflowContext, order: Order) -> Receipt:
    reservation = await ctx.step(reserve, order, compensate=release)
    charged = await ctx.step(charge, order)
    await ctx.sleep(TIMER_SECONDS)
    confirmation = await ctx.step(confirm, order, reservation, charged)
    return Receipt(reservation, charged, confirmation)


async def main(db_url: str, count: int, concurrency: int) -> None:
    async with lf.Engine(db_url, workflows=[crash_order], concurrency=concurrency) as engine:
        handles = [await engine.start(crash_order, Order(n), id=f"w-{n}") for n in range(count)]
        receipts = await asyncio.gather(*(h.result() for h in handles))
    print(f"finished {len(receipts)} workflows", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _crash_worker.py DB_URL EFFECTS_DB N")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _effects_path = Path(sys.argv[2])
    init_effects(_effects_path)
    concurrency = int(os.environ.get("LEDGERFLOW_CRASH_CONCURRENCY", DEFAULT_CONCURRENCY))
    asyncio.run(main(sys.argv[1], int(sys.argv[3]), concurrency))
