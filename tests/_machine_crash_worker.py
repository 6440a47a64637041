"""The process that ``test_machine_crash`` kills with SIGKILL, again and again.

``python tests/_machine_crash_worker.py DB_URL EFFECTS_DB N`` starts the order
machines ``m-0`` .. ``m-{N-1}`` (idempotent on the id) and drives each to ``placed``,
reading where it is and sending the next event its state accepts; it exits 0 once all
completed. The ledger is the truth: a restarted worker goes on from there.

Each activity applies its effect to ``EFFECTS_DB``, an external system deduplicating
on the step's idempotency key: one transaction records the execution (``attempts``),
inserts the effect unless its key is there, answers with the value first applied.
``charge`` is declined the first time its key is seen, then retried by its policy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import ledgerflow as lf

EVENTS = {2: "approve", 3: "reserve", 5: "charge"}  # by seq; seq 1 enters `created`
STEPS = {4: "reserve", 6: "charge"}  # the activities' steps, by seq
RETRIED_SEQ = 6
MAX_PAUSE = 0.02
DRIVERS = 8  # instances driven at once
EFFECTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, step TEXT, value TEXT)",
    "CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY, key TEXT, step TEXT)",
    "CREATE TABLE IF NOT EXISTS first_attempts (key TEXT PRIMARY KEY)",
)

_effects_path = Path("effects.db")


def connect_effects(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    con.execute("PRAGMA synchronous = FULL")
    return con


def init_effects(path: Path) -> None:
    con = connect_effects(path)
    con.execute("PRAGMA journal_mode = WAL")
    for statement in EFFECTS_SCHEMA:
        con.execute(statement)
    con.close()


def apply_effect(step: str, call: lf.MachineCall, *, decline_first: bool = False) -> str:
    """Apply an effect under the step's idempotency key once, between random pauses;
    the value first applied under it."""
    key = lf.current_step().idempotency_key
    value = f"{step}-{call.instance_id}:{uuid.uuid4().hex[:12]}"
    time.sleep(random.uniform(0, MAX_PAUSE))
    con = connect_effects(_effects_path)
    try:
        con.execute("BEGIN IMMEDIATE")
        if decline_first:
            sql = "INSERT OR IGNORE INTO first_attempts (key) VALUES (?)"
            if con.execute(sql, (key,)).rowcount == 1:
                con.execute("COMMIT")
                raise ConnectionError(f"{step} {key}: declined on its first attempt")
        con.execute("INSERT INTO attempts (key, step) VALUES (?, ?)", (key, step))
        sql = "INSERT OR IGNORE INTO effects (key, step, value) VALUES (?, ?, ?)"
        con.execute(sql, (key, step, value))
        stored: str = con.execute("SELECT value FROM effects WHERE key = ?", (key,)).fetchone()[0]
        con.execute("COMMIT")
    finally:
        if con.in_transaction:
            con.execute("ROLLBACK")
        con.close()
    time.sleep(random.uniform(0, MAX_PAUSE))
    return stored


@lf.step(name="reserve")
def reserve(call: lf.MachineCall) -> str:
    return apply_effect("reserve", call)


@lf.step(name="release")
def release(call: lf.MachineCall, result: str) -> None:
    """The compensation of ``reserve``; the normal path never runs it."""
    apply_effect("release", call)


@lf.step(name="charge", retry=lf.RetryPolicy(max_attempts=3, initial_interval=0.03))
async def charge(call: lf.MachineCall) -> str:
    """Async, and declined on its first attempt: retried by its policy."""
    return await asyncio.to_thread(apply_effect, "charge", call, decline_first=True)


def order_machine() -> lf.Machine:
    data = {"approver": [None, "alice"]}
    m = lf.Machine("crash-machine", version=1, data=data, initial_data={"approver": None})
    m.state("created", initial=True)
    for name in ("approved", "reserved"):
        m.state(name)
    for name in ("placed", "compensated"):
        m.state(name, terminal=True)
    m.event("approve", payload={"approver": ["alice"]})
    m.transition("created", "approve", "approved", update=lambda d, p: {"approver": p["approver"]})
    m.transition("approved", "reserve", "reserved", activity=reserve, compensate=release)
    m.transition("reserved", "charge", "placed", activity=charge, failure="compensated")
    return m


MACHINE = order_machine()
PATH = ("start", *(t.label() for t in MACHINE.transitions))


async def drive(engine: lf.Engine, instance_id: str, slots: asyncio.Semaphore) -> None:
    """Send the events that take the instance to ``placed``, one at a time."""
    async with slots:
        handle = await engine.start(MACHINE, None, id=instance_id)
        while True:
            state = await engine.machine_state(instance_id)
            if state.state in ("placed", "compensated"):
                break  # its end is recorded next
            if state.pending is not None or not state.accepts:
                await asyncio.sleep(0.01)  # its turn is under way: read it again
                continue
            event = state.accepts[0]
            payload = {"approver": "alice"} if event == "approve" else None
            try:
                await engine.execute(instance_id, event, payload, timeout=5)
            except (lf.InvalidTransition, lf.WorkflowFinishedError, TimeoutError):
                await asyncio.sleep(0.01)
        outcome = await handle.result()
        if outcome.state != "placed":
            raise RuntimeError(f"{instance_id} ended in {outcome.state}")


async def main(db_url: str, count: int) -> None:
    lease = timedelta(seconds=0.5)
    async with lf.Engine(db_url, workflows=[MACHINE], lease=lease, concurrency=4) as engine:
        slots = asyncio.Semaphore(DRIVERS)
        await asyncio.gather(*(drive(engine, f"m-{n}", slots) for n in range(count)))
    print(f"placed {count} orders", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _machine_crash_worker.py DB_URL EFFECTS_DB N")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _effects_path = Path(sys.argv[2])
    init_effects(_effects_path)
    asyncio.run(main(sys.argv[1], int(sys.argv[3])))
