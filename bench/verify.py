"""How fast a state-machine definition is verified: a machine with about 100,000
reachable configurations, explored in full; and how fast its instances take events on
the engine (``execute``), as a ratio to the SQLite commit floor measured in the same run.

    python bench/verify.py            # prints one JSON line
    python bench/verify.py --quick    # about 10,000 configurations, executes / 5

The machine: an order process whose data are a stock level (0..N-1), an amount class,
an approval count and a retry counter, so that the configurations are the product of
those domains over its states. Reports the configurations explored, seconds,
configurations per second, the transitions that fired and peak memory (tracemalloc,
which slows the run: measured in a second run), and the findings (it is sound: none
expected). No database is involved in that part.

Then ``execute``, the way users write it, on SQLite (a file database in a temporary
directory, WAL as the store opens it) and an Engine with its default settings. The
machine loops ``idle --tick--> idle`` with a plain ``def`` activity returning a small
value, and ``idle --stop--> stopped`` (terminal):

- ``execute_seq``: one instance, ``await engine.execute(id, "tick")`` in a loop; its
  history grows by 3 events per execute, so the last executes read a longer history
  than the first (p50 of the first and the last ``TAIL`` executes say how much that
  costs).
- ``execute_many``: ``MANY_INSTANCES`` instances, each sent its ticks in its own
  sequential loop, the loops gathered; started before the clock runs.

Every returned state is checked (``idle``, the activity's result), then every instance
is sent ``stop`` and must end in ``stopped``. The floor is the one of bench/store.py
(single-row INSERT + COMMIT, sqlite3, WAL, synchronous=FULL, on the same disk), for
``FLOOR_SECONDS`` before each mode and once at the end; ratios use the median. p50 and
p99 are nearest-rank. A mode stops early (``executes`` says how many ran) once it has
run ``MODE_BUDGET_S``, so the whole run stays under a minute. A wrong result or an
exception is recorded in ``errors`` (exit status 1); the verifier figures still print.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import traceback
import tracemalloc
from typing import Any

import ledgerflow as lf
from ledgerflow.statemachine import Machine, eventually, verify
from modes import percentile
from store import fresh_database, note, ratio

TARGET_CONFIGURATIONS = 100_000

SEQ_EXECUTES = 300
"""``execute_seq``: ticks sent to the one instance (its history ends at ~900 events)."""
MANY_INSTANCES = 200
MANY_EXECUTES_EACH = 10
"""``execute_many``: instances, and ticks each (histories stay short: ~30 events)."""
QUICK_DIVISOR = 5
TAIL = 50
"""``execute_seq`` reports the p50 latency of its first and its last ``TAIL`` executes."""
FLOOR_SECONDS = 0.8
MODE_BUDGET_S = 15.0
EXECUTE_TIMEOUT_S = 30.0
RESULT = "pong"


def machine(stock: int) -> Machine:
    m = Machine(
        "bench_order",
        data={
            "stock": range(stock),
            "amount": ["small", "large"],
            "approvals": range(3),
            "tries": range(4),
        },
        initial_data={"approvals": 0, "tries": 0},
    )
    for name in ("created", "pending", "approved", "reserved", "charged"):
        m.state(name, initial=name == "created")
    for name in ("placed", "rejected", "failed"):
        m.state(name, terminal=True)
    m.transition("created", "submit", "pending")
    m.transition(
        "pending",
        "approve",
        "pending",
        guard=lambda d, p: d["amount"] == "large" and d["approvals"] < 1,
        update=lambda d, p: {**d, "approvals": d["approvals"] + 1},
    )
    m.transition(
        "pending",
        "approve",
        "approved",
        guard=lambda d, p: d["amount"] == "small" or d["approvals"] >= 1,
        update=lambda d, p: {**d, "approvals": min(2, d["approvals"] + 1)},
    )
    m.transition("pending", "reject", "rejected")
    m.transition(
        "approved",
        "reserve",
        "reserved",
        guard=lambda d, p: d["stock"] > 0,
        update=lambda d, p: {**d, "stock": d["stock"] - 1},
    )
    m.transition("approved", "out_of_stock", "failed", guard=lambda d, p: d["stock"] == 0)
    m.transition(
        "reserved",
        "charge_failed",
        "reserved",
        guard=lambda d, p: d["tries"] < 3,
        update=lambda d, p: {**d, "tries": d["tries"] + 1},
    )
    m.transition("reserved", "charge", "charged")
    m.transition("reserved", "give_up", "failed", guard=lambda d, p: d["tries"] == 3)
    m.transition("charged", "place", "placed")
    m.property("ends", eventually(lambda s, d: m.states[s].terminal))
    return m


# -- execute on the engine -------------------------------------------------------------


class BenchError(Exception):
    """The engine did something the benchmark does not accept: a wrong result."""


def ping(call: lf.MachineCall) -> str:
    """The activity: a plain ``def`` returning a small value."""
    return RESULT


def ticker() -> lf.Machine:
    m = lf.Machine("bench_ticker")
    m.state("idle", initial=True)
    m.state("stopped", terminal=True)
    m.transition("idle", "tick", "idle", activity=ping)
    m.transition("idle", "stop", "stopped")
    return m


def check(instance_id: str, state: lf.MachineState, expected: str) -> None:
    got = (state.state, state.results.get("ping"))
    if got != (expected, RESULT):
        raise BenchError(f"{instance_id}: execute gave {got}, expected {(expected, RESULT)}")


async def ticks(eng: lf.Engine, instance_id: str, n: int, deadline: float) -> list[float]:
    """Send ``n`` ticks one after another (fewer if ``deadline`` passes); latencies."""
    latencies: list[float] = []
    for _ in range(n):
        began = time.perf_counter()
        state = await eng.execute(instance_id, "tick", timeout=EXECUTE_TIMEOUT_S)
        latencies.append(time.perf_counter() - began)
        check(instance_id, state, "idle")
        if began >= deadline:
            break
    return latencies


async def stop(eng: lf.Engine, instance_id: str) -> None:
    state = await eng.execute(instance_id, "stop", timeout=EXECUTE_TIMEOUT_S)
    check(instance_id, state, "stopped")


async def execute_seq(eng: lf.Engine, m: lf.Machine, n: int) -> dict[str, Any]:
    await eng.start(m, None, id="seq")
    began = time.perf_counter()
    latencies = await ticks(eng, "seq", n, began + MODE_BUDGET_S)
    elapsed = time.perf_counter() - began
    await stop(eng, "seq")
    rate = len(latencies) / elapsed
    tail = min(TAIL, len(latencies))
    return {
        "executes": len(latencies),
        "history_events": len(await eng.history("seq")),
        "seconds": round(elapsed, 2),
        "executes_per_s": round(rate, 1),
        "latency_p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 2),
        f"latency_p50_first_{TAIL}_ms": round(percentile(latencies[:tail], 50) * 1000, 2),
        f"latency_p50_last_{TAIL}_ms": round(percentile(latencies[-tail:], 50) * 1000, 2),
    }


async def execute_many(eng: lf.Engine, m: lf.Machine, instances: int, each: int) -> dict[str, Any]:
    ids = [f"many-{i}" for i in range(instances)]
    for instance_id in ids:
        await eng.start(m, None, id=instance_id)
    began = time.perf_counter()
    deadline = began + MODE_BUDGET_S
    done = await asyncio.gather(*(ticks(eng, i, each, deadline) for i in ids))
    elapsed = time.perf_counter() - began
    await asyncio.gather(*(stop(eng, i) for i in ids))
    executes = sum(len(latencies) for latencies in done)
    rate = executes / elapsed
    return {
        "instances": instances,
        "executes": executes,
        "seconds": round(elapsed, 2),
        "executes_per_s": round(rate, 1),
    }


async def run_execute(quick: bool) -> dict[str, Any]:
    """The ``execute`` figures, the floor beside them, and what went wrong."""
    divisor = QUICK_DIVISOR if quick else 1
    seq_n, many_each = SEQ_EXECUTES // divisor, max(1, MANY_EXECUTES_EACH // divisor)
    floors: list[float] = []
    out: dict[str, Any] = {}
    errors: list[str] = []
    m = ticker()
    try:
        async with fresh_database("sqlite", "bench_verify") as (url, floor, settings):
            async with lf.Engine(url, workflows=[m]) as eng:
                note("execute: warming up")
                await floor.commits_per_s(0.2)
                await eng.start(m, None, id="warm")
                await ticks(eng, "warm", 10, time.perf_counter() + MODE_BUDGET_S)
                await stop(eng, "warm")
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                out["execute_seq"] = await execute_seq(eng, m, seq_n)
                note(f"execute_seq: {out['execute_seq']}")
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                out["execute_many"] = await execute_many(eng, m, MANY_INSTANCES, many_each)
                note(f"execute_many: {out['execute_many']}")
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                settings["engine"] = f"defaults (concurrency {eng.concurrency})"
            out["execute_settings"] = settings
    except Exception as exc:  # noqa: BLE001 - recorded, traceback on stderr
        traceback.print_exc(file=sys.stderr)
        errors.append(f"execute: {type(exc).__name__}: {exc}")
    floor_rate = statistics.median(floors) if floors else 0.0  # no floor: no runs either
    for mode in ("execute_seq", "execute_many"):
        if mode in out:  # the ratio to the floor's median over the run
            out[mode]["ratio"] = ratio(out[mode]["executes_per_s"], floor_rate)
    note(f"execute: floor rounds {[round(f) for f in floors]} commits/s")
    return {
        "floor_commits_per_s": round(floor_rate, 1) if floors else None,
        "floor_rounds": [round(f, 1) for f in floors],
        **out,
        "errors": errors,
    }


# -- the verifier ------------------------------------------------------------------------


def run(stock: int) -> dict[str, Any]:
    m = machine(stock)
    began = time.perf_counter()
    report = verify(m, max_configurations=10 * TARGET_CONFIGURATIONS)
    seconds = time.perf_counter() - began
    tracemalloc.start()
    verify(machine(stock), max_configurations=10 * TARGET_CONFIGURATIONS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "benchmark": "verify",
        "configurations": report.configurations,
        "distinct_transitions_fired": report.transitions_fired,
        "seconds": round(seconds, 2),
        "configurations_per_s": round(report.configurations / seconds),
        "peak_mib": round(peak / 2**20, 1),
        "findings": [str(f) for f in report.findings],
        "bounded": report.bounded,
        "notes": list(report.notes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    # Per stock level: 8 states x 2 amounts x 3 approvals x 4 tries (not all reachable).
    stock = 280 if args.quick else 2_800
    began = time.perf_counter()
    line = run(stock)
    note(f"verify: {line['configurations']} configurations in {line['seconds']} s")
    line |= asyncio.run(run_execute(args.quick))
    line["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(line), flush=True)
    return 1 if line["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
