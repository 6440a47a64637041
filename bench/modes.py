"""One workflow's cost, the way users write code: the same 3-step workflow with
trivial steps, written with plain ``def`` steps and with ``async def`` steps, started
and awaited in the three ways application code does it.

    python bench/modes.py                        # sqlite
    python bench/modes.py --backend postgres     # or: all (sqlite, then postgres)
    python bench/modes.py --quick                # sizes / 5, a smoke test

Prints one JSON line per backend on stdout; progress goes to stderr. Each run uses a
fresh database (a temporary directory for SQLite, a new schema ``lf_bench_modes_<random>``
for PostgreSQL), removed afterwards, and an Engine with its DEFAULT settings (no
concurrency or thread override): what users get. The modes, each for both step kinds:

- ``sequential``: ``start`` then ``result()``, one workflow after the other.
- ``loop``: ``start`` awaited one at a time in a loop, then ``asyncio.gather`` of all
  the ``result()`` calls.
- ``gathered``: ``asyncio.gather`` of all the ``start`` calls, then of the results.

Every result is checked. A mode runs batches of ``n`` in the order def, async, async,
def, so drift in the machine or the database hits both kinds alike; a kind's
workflows/s is its 2 x ``n`` workflows over its two batches' time (first ``start`` call
to last result). Latency is per workflow, from its ``start`` call to its ``result()``
returning: in ``loop`` and ``gathered`` that includes waiting for the other starts, so
only the sequential figures are latencies in the usual sense (and have a target).
p50 and p99 are nearest-rank.

The floor is the one of bench/store.py: single-row INSERT + COMMIT, one connection,
sequential commits, same durability as the store (SQLite: sqlite3, WAL,
synchronous=FULL; PostgreSQL: psycopg, BEGIN/INSERT/COMMIT in one pipeline). It is
measured for 0.8 s before each mode and once at the end (``floor_rounds``); ratios use
the median. Before the timed runs every mode runs once, small and untimed, per kind.

Targets (issue 13), SQLite: sequential def steps ratio >= 0.5, loop >= 1.5, gathered
>= 2.5; def within 20 % of async in every mode (``def_to_async`` >= 0.8). Both
backends: sequential p99 <= 3 x p50. Missed targets are not errors; wrong results,
timeouts and exceptions are (``errors``, exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ledgerflow as lf
from store import fresh_database, note, pg_problem, ratio

BACKENDS = ("sqlite", "postgres")
MODES = ("sequential", "loop", "gathered")
KINDS = ("def", "async")
ORDER = ("def", "async", "async", "def")
"""The batches of one mode: each kind twice, mirrored."""
SIZES = {
    "sqlite": {"sequential": 200, "loop": 500, "gathered": 1000},
    "postgres": {"sequential": 100, "loop": 300, "gathered": 600},
}
"""Workflows per batch: a backend's run takes 20-35 s on the 2-core development machine
(2026-11-30: SQLite 140-220 wf/s sequential, PostgreSQL 15 50-90)."""
WARMUP = {"sequential": 10, "loop": 40, "gathered": 100}
QUICK_DIVISOR = 5
FLOOR_SECONDS = 0.8
STEPS_PER_WORKFLOW = 3
RESULT_TIMEOUT_S = 60.0

STEPS_RATIO_TARGETS = {"sequential": 0.5, "loop": 1.5, "gathered": 2.5}
"""SQLite only: the def kind's steps/s over the floor."""
DEF_TO_ASYNC_TARGET = 0.8
P99_OVER_P50_TARGET = 3.0
PEER_COMPARISON = (
    "DBOS Transact's figures for the same shapes are run by hand with the peer "
    "harness right after this script, on the same backend (see bench/README.md): "
    "its seq is sequential/def here, start is loop/def, async is gathered/async"
)


class BenchError(Exception):
    """The engine did something the benchmark does not accept: a wrong result."""


# -- the workflows: three trivial steps, as def and as async def -------------------------


def add_one(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def minus_three(x: int) -> int:
    return x - 3


async def add_one_async(x: int) -> int:
    return x + 1


async def double_async(x: int) -> int:
    return x * 2


async def minus_three_async(x: int) -> int:
    return x - 3


@lf.workflow(name="modes.three_def", version=1)
async def three_def(ctx: lf.WorkflowContext, n: int) -> int:
    a = await ctx.step(add_one, n)
    b = await ctx.step(double, a)
    return await ctx.step(minus_three, b)


@lf.workflow(name="modes.three_async", version=1)
async def three_async(ctx: lf.WorkflowContext, n: int) -> int:
    a = await ctx.step(add_one_async, n)
    b = await ctx.step(double_async, a)
    return await ctx.step(minus_three_async, b)


WORKFLOWS: dict[str, lf.WorkflowDefinition[int, int]] = {"def": three_def, "async": three_async}


def expected(n: int) -> int:
    return (n + 1) * 2 - 3


# -- the modes ---------------------------------------------------------------------------

Workflow = lf.WorkflowDefinition[int, int]
Handle = lf.WorkflowHandle[int]


@dataclass
class Batch:
    elapsed: float
    """First start call to last result."""
    latencies: list[float]
    """Per workflow: its start call to its result() returning."""


def check(prefix: str, results: list[int]) -> None:
    wrong = [i for i, r in enumerate(results) if r != expected(i)]
    if wrong:
        i = wrong[0]
        raise BenchError(
            f"{prefix}: {len(wrong)} of {len(results)} results are wrong "
            f"(first: {prefix}-{i} gave {results[i]}, expected {expected(i)})"
        )


async def finish(handle: Handle, began: float) -> tuple[int, float]:
    result = await handle.result(timeout=RESULT_TIMEOUT_S)
    return result, time.perf_counter() - began


async def sequential(eng: lf.Engine, wf: Workflow, prefix: str, n: int) -> Batch:
    latencies: list[float] = []
    results: list[int] = []
    began = time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        handle = await eng.start(wf, i, id=f"{prefix}-{i}")
        results.append(await handle.result(timeout=RESULT_TIMEOUT_S))
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - began
    check(prefix, results)
    return Batch(elapsed, latencies)


async def settle(prefix: str, began: float, started: list[tuple[Handle, float]]) -> Batch:
    """Gather the results of ``started`` (handle, time of its start call)."""
    outcomes = await asyncio.gather(*(finish(h, t) for h, t in started))
    elapsed = time.perf_counter() - began
    check(prefix, [r for r, _ in outcomes])
    return Batch(elapsed, [lat for _, lat in outcomes])


async def loop(eng: lf.Engine, wf: Workflow, prefix: str, n: int) -> Batch:
    began = time.perf_counter()
    started: list[tuple[Handle, float]] = []
    for i in range(n):
        start = time.perf_counter()
        started.append((await eng.start(wf, i, id=f"{prefix}-{i}"), start))
    return await settle(prefix, began, started)


async def gathered(eng: lf.Engine, wf: Workflow, prefix: str, n: int) -> Batch:
    async def start(i: int) -> tuple[Handle, float]:
        began = time.perf_counter()
        return await eng.start(wf, i, id=f"{prefix}-{i}"), began

    began = time.perf_counter()
    return await settle(prefix, began, list(await asyncio.gather(*map(start, range(n)))))


RUNNERS: dict[str, Callable[[lf.Engine, Workflow, str, int], Awaitable[Batch]]] = {
    "sequential": sequential,
    "loop": loop,
    "gathered": gathered,
}


def percentile(values: list[float], q: int) -> float:
    """Nearest-rank ``q``-th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-q * len(ordered) // 100) - 1)]


def figures(batches: list[Batch], n: int, floor: float) -> dict[str, Any]:
    """One kind's figures in one mode, from its batches."""
    latencies = [lat for b in batches for lat in b.latencies]
    wf_s = len(latencies) / sum(b.elapsed for b in batches)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {
        "n": n,
        "batches": len(batches),
        "workflows_per_s": round(wf_s, 1),
        "workflows_per_s_batches": [round(n / b.elapsed, 1) for b in batches],
        "steps_per_s": round(wf_s * STEPS_PER_WORKFLOW, 1),
        "steps_ratio": ratio(wf_s * STEPS_PER_WORKFLOW, floor),
        "latency_p50_ms": round(p50 * 1000, 2),
        "latency_p99_ms": round(p99 * 1000, 2),
        "latency_max_ms": round(max(latencies) * 1000, 2),
        "latency_p99_over_p50": round(p99 / p50, 2),
    }


# -- a fresh database and its floor ------------------------------------------------------


# -- the run -----------------------------------------------------------------------------


async def measure(eng: lf.Engine, backend: str, mode: str, n: int) -> dict[str, list[Batch]]:
    """The batches of one mode, in ``ORDER``, by kind."""
    runs: dict[str, list[Batch]] = {kind: [] for kind in KINDS}
    for index, kind in enumerate(ORDER):
        batch = await RUNNERS[mode](eng, WORKFLOWS[kind], f"{mode}-{kind}-{index}", n)
        runs[kind].append(batch)
        note(
            f"{backend}: {mode} {kind} x{n}: {n / batch.elapsed:.0f} wf/s, "
            f"p50 {percentile(batch.latencies, 50) * 1000:.1f} ms, "
            f"p99 {percentile(batch.latencies, 99) * 1000:.1f} ms"
        )
    return runs


async def run_backend(backend: str, sizes: dict[str, int], quick: bool) -> dict[str, Any]:
    began = time.perf_counter()
    errors: list[str] = []
    floors: list[float] = []
    runs: dict[str, dict[str, list[Batch]]] = {}
    settings: dict[str, Any] = {}
    events: dict[str, int] = {}

    def failed(what: str, exc: BaseException) -> None:
        traceback.print_exc(file=sys.stderr)
        errors.append(f"{what}: {type(exc).__name__}: {exc}")

    try:
        async with fresh_database(backend, "bench_modes") as (url, floor, db_settings):
            settings.update(db_settings)
            async with lf.Engine(url, workflows=list(WORKFLOWS.values())) as eng:
                settings["engine"] = f"defaults (concurrency {eng.concurrency})"
                note(f"{backend}: warming up")
                await floor.commits_per_s(0.2)
                for mode in MODES:
                    for kind in KINDS:
                        await RUNNERS[mode](
                            eng, WORKFLOWS[kind], f"warm-{mode}-{kind}", WARMUP[mode]
                        )
                for kind in KINDS:
                    events[kind] = len(await eng.history(f"warm-sequential-{kind}-0"))
                for mode in MODES:
                    floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                    try:
                        runs[mode] = await measure(eng, backend, mode, sizes[mode])
                    except Exception as exc:  # noqa: BLE001 - recorded, traceback on stderr
                        failed(mode, exc)
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                note(f"{backend}: floor rounds {[round(f) for f in floors]} commits/s")
    except Exception as exc:  # noqa: BLE001 - recorded, traceback on stderr
        failed(backend, exc)

    floor_rate = statistics.median(floors) if floors else 0.0  # no floor: no runs either
    modes: dict[str, Any] = {}
    for mode, kinds in runs.items():
        out: dict[str, Any] = {k: figures(b, sizes[mode], floor_rate) for k, b in kinds.items()}
        out["def_to_async"] = ratio(out["def"]["workflows_per_s"], out["async"]["workflows_per_s"])
        modes[mode] = out

    targets: dict[str, str] = {}
    met: dict[str, bool] = {}

    def target(key: str, op: str, limit: float) -> None:
        """``key`` is a path into ``modes``: mode.kind.figure or mode.figure."""
        got: Any = modes
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        targets[key] = f"{op} {limit}"
        met[key] = got is not None and (got >= limit if op == ">=" else got <= limit)

    if backend == "sqlite":
        for mode, limit in STEPS_RATIO_TARGETS.items():
            target(f"{mode}.def.steps_ratio", ">=", limit)
        for mode in MODES:
            target(f"{mode}.def_to_async", ">=", DEF_TO_ASYNC_TARGET)
    for kind in KINDS:
        target(f"sequential.{kind}.latency_p99_over_p50", "<=", P99_OVER_P50_TARGET)

    settings |= {
        "sizes": sizes,
        "quick": quick,
        "batch_order": list(ORDER),
        "warmup": WARMUP,
        "floor_seconds": FLOOR_SECONDS,
        "python": sys.version.split()[0],
    }
    return {
        "benchmark": "modes",
        "backend": backend,
        "settings": settings,
        "floor_commits_per_s": round(floor_rate, 1) if floors else None,
        "floor_rounds": [round(f, 1) for f in floors],
        "events_per_workflow": events,
        "modes": modes,
        "targets": targets,
        "targets_met": met,
        "peer_comparison": PEER_COMPARISON,
        "errors": errors,
        "seconds": round(time.perf_counter() - began, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", choices=(*BACKENDS, "all"), default="sqlite", help="default: sqlite"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"sizes / {QUICK_DIVISOR}, for a smoke test"
    )
    args = parser.parse_args(argv)
    status = 0
    for backend in BACKENDS if args.backend == "all" else (args.backend,):
        if backend == "postgres" and (problem := pg_problem()):
            note(f"cannot run postgres: {problem}")
            line: dict[str, Any] = {"benchmark": "modes", "backend": backend, "error": problem}
        else:
            sizes = {
                mode: max(1, n // QUICK_DIVISOR) if args.quick else n
                for mode, n in SIZES[backend].items()
            }
            line = asyncio.run(run_backend(backend, sizes, args.quick))
        print(json.dumps(line), flush=True)
        if line.get("error") or line.get("errors"):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
