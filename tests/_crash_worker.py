"""The process that ``test_workflow_crash`` kills with SIGKILL, again and again.

Run as ``python tests/_crash_worker.py DB_URL EFFECTS_DB N``: it opens an Engine on
the ledger at ``DB_URL`` (SQLite or PostgreSQL), starts the instances ``w-0`` ..
``w-{N-1}`` of the ``crash-order`` workflow, sending each its ``approve`` signal right
after starting it, and exits 0 once every one of them has finished. Starting is
idempotent on the id, so a restart gets the handles of the instances an earlier,
killed run started; it sends the signal again to each instance not finished yet, so
an instance may hold several ``approve`` signals: it takes the first, the others stay
unconsumed.

``crash-order`` waits for its signal, runs a step with a compensation, a step whose
first attempt fails (a retry), a child workflow (``crash-pack``, one step of its
own), a durable timer and a last step. ``COMMANDS`` lists what it issues, in order:
the test derives every ``seq`` from it.

Each step applies its effect to ``EFFECTS_DB``, a SQLite database standing for an
external system that deduplicates on the step's idempotency key, the way a payment
API does: in one committed transaction it records the attempt (``attempts``: one row
per execution), inserts the effect unless its key is there already (``effects``:
``INSERT OR IGNORE``) and answers with the effect as first applied. ``charge`` is
declined the first time its key is seen: the refusal is committed in
``first_attempts`` (one row per key, with the pid of the worker) before the step
raises, so exactly one attempt per instance fails whatever instant a kill lands at.
A fresh connection per call, committed before the step returns: an effect is
durable whatever instant the kill lands at. Random pauses of 0-20 ms in the steps
spread the kills over every phase of a pass.

The environment variable ``LEDGERFLOW_CRASH_CONCURRENCY`` bounds the instances the
engine runs at once (default 4), which keeps work pending across many kills.
``LEDGERFLOW_CRASH_LEASE`` is the engine's lease in seconds (default 0.5): a killed
worker is judged dead once its last heartbeat is older than that (ADR 009), and the
next worker reaps it then; a short lease keeps the kills landing on work in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ledgerflow as lf

WORKFLOW_NAME = "crash-order"
CHILD_NAME = "crash-pack"
SIGNAL_NAME = "approve"
TIMER_SECONDS = 0.05
MAX_PAUSE = 0.02
DEFAULT_CONCURRENCY = 4
DEFAULT_LEASE = 0.5
CHARGE_RETRY = lf.RetryPolicy(max_attempts=3, initial_interval=0.03)
"""``charge`` fails once, by design: a short pause before the retry (it holds an
engine slot meanwhile), long enough that some kills land between the two attempts."""

COMMANDS: tuple[tuple[str, str], ...] = (
    ("signal", SIGNAL_NAME),
    ("step", "reserve"),
    ("step", "charge"),
    ("child", CHILD_NAME),
    ("timer", "sleep"),
    ("step", "confirm"),
)
"""(kind, name) of each command ``crash_order`` issues, in order: command ``i + 1``
(its ``seq``) is ``COMMANDS[i]``. Keep in step with the workflow below: the test
checks every recorded command against this list."""
CHILD_COMMANDS: tuple[tuple[str, str], ...] = (("step", "pack"),)
"""The same for ``crash_pack``."""


def seq_of(kind: str, name: str, commands: tuple[tuple[str, str], ...] = COMMANDS) -> int:
    return commands.index((kind, name)) + 1


STEPS: tuple[tuple[int, str], ...] = tuple(
    (seq, name) for seq, (kind, name) in enumerate(COMMANDS, 1) if kind == "step"
)
"""(seq, name) of each step of ``crash_order``."""
CHILD_SEQ = seq_of("child", CHILD_NAME)
CHILD_STEPS: tuple[tuple[int, str], ...] = tuple(
    (seq, name) for seq, (kind, name) in enumerate(CHILD_COMMANDS, 1) if kind == "step"
)
RETRIED_STEP = "charge"

EFFECTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS effects ("
    "key TEXT PRIMARY KEY, step TEXT NOT NULL, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS attempts ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, step TEXT NOT NULL, "
    "value TEXT NOT NULL, pid INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS first_attempts (key TEXT PRIMARY KEY, pid INTEGER NOT NULL)",
)

_effects_path = Path("effects.db")


@dataclass(frozen=True)
class Order:
    n: int


@dataclass(frozen=True)
class Approval:
    n: int
    sender: int
    """The pid of the worker that sent it: tells the first signal from its repeats."""


@dataclass(frozen=True)
class Receipt:
    approval: Approval
    reservation: str
    charge: str
    packing: str
    confirmation: str


class Declined(Exception):
    """The external system refuses the first attempt of ``charge``."""


def child_id(workflow_id: str) -> str:
    """The id ``ctx.child`` gives the child of instance ``workflow_id`` (its default)."""
    return f"{workflow_id}.{CHILD_SEQ}"


def expected_prefixes(n: int) -> dict[str, str]:
    """What each step's value of instance ``w-n`` starts with (a random token follows)."""
    return {"reserve": f"R-{n}:", "charge": f"C-{n}:", "pack": f"P-{n}:", "confirm": f"K-{n}:"}


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


def apply_effect(key: str, step: str, value: str, *, decline_first: bool = False) -> str:
    """Apply ``value`` under ``key`` once; answer the value first applied under it.

    With ``decline_first``, the first call for ``key`` is refused instead: the
    refusal is committed, then ``Declined`` raised.
    """
    con = connect_effects(_effects_path)
    declined = False
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            if decline_first:
                declined = (
                    con.execute(
                        "INSERT OR IGNORE INTO first_attempts (key, pid) VALUES (?, ?)",
                        (key, os.getpid()),
                    ).rowcount
                    == 1
                )
            if not declined:
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
    if declined:
        raise Declined(f"{step} {key}: declined on its first attempt")
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
    value = await asyncio.to_thread(
        apply_effect, key, "charge", f"C-{order.n}:{_token()}", decline_first=True
    )
    await asyncio.sleep(random.uniform(0, MAX_PAUSE))
    return value


def pack(order: Order) -> str:
    _pause()
    key = lf.current_step().idempotency_key
    value = apply_effect(key, "pack", f"P-{order.n}:{_token()}")
    _pause()
    return value


def confirm(order: Order, reservation: str, charged: str, packing: str) -> str:
    _pause()
    key = lf.current_step().idempotency_key
    value = apply_effect(key, "confirm", f"K-{order.n}:{_token()}")
    _pause()
    return value


@lf.workflow(name=CHILD_NAME, version=1)
async def crash_pack(ctx: lf.WorkflowContext, order: Order) -> str:
    return await ctx.step(pack, order)


@lf.workflow(name=WORKFLOW_NAME, version=1)
async def crash_order(ctx: lf.WorkflowContext, order: Order) -> Receipt:
    approval = await ctx.wait_for_signal(SIGNAL_NAME, Approval)
    if approval is None:  # no timeout: cannot happen
        raise RuntimeError("no approval")
    reservation = await ctx.step(reserve, order, compensate=release)
    charged = await ctx.step(charge, order, retry=CHARGE_RETRY)
    packing = await ctx.child(crash_pack, order)
    await ctx.sleep(TIMER_SECONDS)
    confirmation = await ctx.step(confirm, order, reservation, charged, packing)
    return Receipt(approval, reservation, charged, packing, confirmation)


WORKFLOWS = (crash_order, crash_pack)


async def main(db_url: str, count: int, concurrency: int, lease: float) -> None:
    async with lf.Engine(
        db_url, workflows=WORKFLOWS, concurrency=concurrency, lease=timedelta(seconds=lease)
    ) as engine:
        handles = []
        for n in range(count):
            handle = await engine.start(crash_order, Order(n), id=f"w-{n}")
            with contextlib.suppress(lf.WorkflowFinishedError):  # done in an earlier run
                await engine.signal(handle.id, SIGNAL_NAME, Approval(n, os.getpid()))
            handles.append(handle)
        receipts = await asyncio.gather(*(h.result() for h in handles))
    print(f"finished {len(receipts)} workflows", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _crash_worker.py DB_URL EFFECTS_DB N")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _effects_path = Path(sys.argv[2])
    init_effects(_effects_path)
    concurrency = int(os.environ.get("LEDGERFLOW_CRASH_CONCURRENCY", DEFAULT_CONCURRENCY))
    lease = float(os.environ.get("LEDGERFLOW_CRASH_LEASE", DEFAULT_LEASE))
    asyncio.run(main(sys.argv[1], int(sys.argv[3]), concurrency, lease))
