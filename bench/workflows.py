"""Workflow engine benchmark on SQLite: latency, throughput, replay and restart, as
ratios to the raw commit floor.

    python bench/workflows.py

Prints one JSON line on stdout; progress goes to stderr. Everything runs in a fresh
temporary directory (removed afterwards), with the SQLite store's default durability
(WAL, synchronous=FULL), each phase on its own database file:

- floor: single-row INSERT + COMMIT with sqlite3 (as in bench/store.py), interleaved
  with the sequential and concurrent phases in 3 rounds; medians are reported.
- sequential: a 3-step workflow (three trivial async steps) started and awaited one
  at a time, 200 runs: latency (mean, p99) and steps/s.
- concurrent: 2,000 of them started at once (``asyncio.gather`` of starts, then of
  results) on an engine with concurrency 2,000: workflows/s and steps/s. For
  comparison, 2,000 more per round with nobody calling ``result()``, timed until
  ``list_workflows(status='running')`` is empty.
- resume: 1,000 instances that have done a step and wait (on a timer, and in a second
  run on a signal); the engine is closed, a new one opened on the same file, and the
  time until all 1,000 have finished is taken.
- replay: a workflow looping over 10,000 tiny steps is run once, then its history is
  replayed (``ledgerflow.workflow.replay``, and ``Engine.query``, which also reads and
  decodes the stream). The loop runs last and is scaled down (and says so) if it
  would not fit the time budget.

The RSS of 100,000 waiting instances is measured by bench/workflows_scale.py.
Targets: sequential steps/s >= 0.25 x floor, concurrent steps/s >= 1.0 x floor,
resuming 1,000 instances < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ledgerflow as lf
from ledgerflow.workflow import replay
from store import SQLiteFloor, note, ratio

ROUNDS = 3
FLOOR_SECONDS = 0.8
SEQUENTIAL_RUNS = 200
"""Split over the rounds, so each round's floor sits beside the runs it is compared to."""
CONCURRENT_WORKFLOWS = 2000
ENGINE_CONCURRENCY = 2000
STEPS_PER_WORKFLOW = 3
RESUME_INSTANCES = 1000
RESUME_TIMER_S = 0.3
"""The resumed workflow's timer; it is due by the time the second engine opens."""
REPLAY_STEPS = 10_000
REPLAY_PROBE_STEPS = 1000
"""Built first; its step rate projects how long the full history takes to build."""
RESULT_TIMEOUT_S = 60.0
POLL_S = 0.01

BUDGET_S = 55.0
"""The replay history is scaled down so that its build ends this long after start."""
BUILD_MARGIN = 1.3
"""Projected build times are multiplied by this before comparing them to the budget."""

TARGETS = {
    "sequential_steps_ratio": 0.25,
    "concurrent_steps_ratio": 1.0,
    "resume_1000_s": 2.0,
}


class BenchError(Exception):
    """The engine did something the benchmark does not accept: a wrong result, a
    workflow that never suspends or finishes."""


# -- the workflows ------------------------------------------------------------------


async def add_one(x: int) -> int:
    return x + 1


async def double(x: int) -> int:
    return x * 2


async def minus_three(x: int) -> int:
    return x - 3


@lf.workflow(name="bench.three_steps", version=1)
async def three_steps(ctx: lf.WorkflowContext, n: int) -> int:
    a = await ctx.step(add_one, n)
    b = await ctx.step(double, a)
    return await ctx.step(minus_three, b)


def three_steps_result(n: int) -> int:
    return (n + 1) * 2 - 3


async def tiny(i: int) -> int:
    return i


@lf.workflow(name="bench.loop", version=1)
async def loop(ctx: lf.WorkflowContext, steps: int) -> int:
    total = 0
    for i in range(steps):
        total += await ctx.step(tiny, i)
    ctx.expose(total)
    return total


def loop_result(steps: int) -> int:
    return steps * (steps - 1) // 2


@lf.workflow(name="bench.resume_timer", version=1)
async def resume_timer(ctx: lf.WorkflowContext, n: int) -> int:
    a = await ctx.step(add_one, n)
    await ctx.sleep(RESUME_TIMER_S)
    return await ctx.step(double, a)


@lf.workflow(name="bench.resume_signal", version=1)
async def resume_signal(ctx: lf.WorkflowContext, n: int) -> int:
    a = await ctx.step(add_one, n)
    await ctx.wait_for_signal("go", bool)
    return await ctx.step(double, a)


def resume_result(n: int) -> int:
    return (n + 1) * 2


WORKFLOWS = [three_steps, loop, resume_timer, resume_signal]


# -- helpers ------------------------------------------------------------------------


def engine(path: Path, concurrency: int = ENGINE_CONCURRENCY) -> lf.Engine:
    return lf.Engine(f"sqlite:///{path}", workflows=WORKFLOWS, concurrency=concurrency)


def count(path: Path, sql: str, params: tuple[Any, ...] = ()) -> int:
    """A count straight from the database file, on a read-only connection of its own."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(con.execute(sql, params).fetchone()[0])
    finally:
        con.close()


async def until_suspended(path: Path, event_type: str, n: int, timeout: float = 60.0) -> None:
    """Until ``n`` instances have recorded ``event_type`` and none holds a lease (no
    pass is running)."""
    deadline = time.perf_counter() + timeout
    while True:
        waiting = await asyncio.to_thread(
            count, path, "SELECT count(*) FROM events WHERE type = ?", (event_type,)
        )
        leased = await asyncio.to_thread(
            count, path, "SELECT count(*) FROM wakeups WHERE lease_owner IS NOT NULL"
        )
        if waiting >= n and leased == 0:
            return
        if time.perf_counter() > deadline:
            raise BenchError(
                f"after {timeout:.0f} s only {waiting} of {n} instances recorded "
                f"{event_type} ({leased} still leased)"
            )
        await asyncio.sleep(POLL_S)


def check(what: str, got: list[int], expected: list[int]) -> None:
    if got != expected:
        wrong = sum(g != e for g, e in zip(got, expected, strict=True))
        raise BenchError(f"{what}: {wrong} of {len(expected)} results are wrong")


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


# -- sequential and concurrent, interleaved with the floor --------------------------


async def sequential(eng: lf.Engine, prefix: str, runs: int) -> tuple[list[float], float]:
    """Start a 3-step workflow and await its result, ``runs`` times one after the
    other; (latencies in seconds, elapsed seconds)."""
    latencies: list[float] = []
    began = time.perf_counter()
    for i in range(runs):
        start = time.perf_counter()
        handle = await eng.start(three_steps, i, id=f"{prefix}-{i}")
        result = await handle.result(timeout=RESULT_TIMEOUT_S)
        latencies.append(time.perf_counter() - start)
        if result != three_steps_result(i):
            raise BenchError(f"{handle.id}: result {result}, expected {three_steps_result(i)}")
    return latencies, time.perf_counter() - began


@dataclass(frozen=True)
class ConcurrentRun:
    start_s: float
    """The gather of the starts."""
    total_s: float
    """From the first start until the last result."""


async def concurrent(eng: lf.Engine, prefix: str, n: int) -> ConcurrentRun:
    """``n`` 3-step workflows started at once, then all their results awaited at once."""
    began = time.perf_counter()
    handles = await asyncio.gather(
        *(eng.start(three_steps, i, id=f"{prefix}-{i}") for i in range(n))
    )
    started = time.perf_counter()
    results = await asyncio.gather(*(h.result(timeout=RESULT_TIMEOUT_S) for h in handles))
    done = time.perf_counter()
    check(f"concurrent {prefix}", list(results), [three_steps_result(i) for i in range(n)])
    return ConcurrentRun(started - began, done - began)


async def unobserved(eng: lf.Engine, path: Path, prefix: str, n: int) -> float:
    """``n`` 3-step workflows started at once with nobody awaiting their results; seconds
    until ``list_workflows(status='running')`` is empty (one query per 10 ms). Compared
    with ``concurrent``, what the ``result()`` calls cost."""
    began = time.perf_counter()
    await asyncio.gather(*(eng.start(three_steps, i, id=f"{prefix}-{i}") for i in range(n)))
    deadline = began + RESULT_TIMEOUT_S
    while await eng.list_workflows(status="running", limit=1):
        if time.perf_counter() > deadline:
            raise BenchError(f"{prefix}: instances still running after {RESULT_TIMEOUT_S} s")
        await asyncio.sleep(POLL_S)
    elapsed = time.perf_counter() - began
    completed = await asyncio.to_thread(
        count,
        path,
        "SELECT count(*) FROM workflows WHERE workflow_id LIKE ? AND status = 'completed'",
        (f"{prefix}-%",),
    )
    if completed != n:
        raise BenchError(f"{prefix}: {completed} of {n} instances completed")
    last = await eng.handle(f"{prefix}-{n - 1}").result(timeout=1)
    if last != three_steps_result(n - 1):
        raise BenchError(f"{prefix}-{n - 1}: result {last}")
    return elapsed


async def rounds(directory: Path, floor: SQLiteFloor) -> dict[str, Any]:
    path = directory / "engine.db"
    async with engine(path) as eng:
        note("warming up")
        await floor.commits_per_s(0.2)
        await sequential(eng, "warm-seq", 10)
        await concurrent(eng, "warm-conc", 200)

        floors: list[float] = []
        latencies: list[float] = []
        seq_rates: list[float] = []
        conc: list[ConcurrentRun] = []
        bare: list[float] = []
        for n in range(ROUNDS):
            floors.append(await floor.commits_per_s(FLOOR_SECONDS))
            runs = SEQUENTIAL_RUNS // ROUNDS + (n < SEQUENTIAL_RUNS % ROUNDS)
            lat, elapsed = await sequential(eng, f"seq-{n}", runs)
            latencies += lat
            seq_rates.append(runs / elapsed)
            conc.append(await concurrent(eng, f"conc-{n}", CONCURRENT_WORKFLOWS))
            bare.append(await unobserved(eng, path, f"bare-{n}", CONCURRENT_WORKFLOWS))
            note(
                f"round {n + 1}: floor {floors[-1]:.0f}/s, sequential {seq_rates[-1]:.1f} wf/s "
                f"(mean {statistics.mean(lat) * 1000:.1f} ms), concurrent "
                f"{CONCURRENT_WORKFLOWS / conc[-1].total_s:.0f} wf/s "
                f"({CONCURRENT_WORKFLOWS / bare[-1]:.0f} wf/s without result() calls)"
            )
        events = len(await eng.history("seq-0-0"))

    floor_rate = statistics.median(floors)
    seq_wf = statistics.median(seq_rates)
    conc_wf = statistics.median(CONCURRENT_WORKFLOWS / c.total_s for c in conc)
    bare_wf = statistics.median(CONCURRENT_WORKFLOWS / b for b in bare)
    seq_steps = seq_wf * STEPS_PER_WORKFLOW
    conc_steps = conc_wf * STEPS_PER_WORKFLOW
    return {
        "floor_commits_per_s": round(floor_rate, 1),
        "floor_rounds": [round(f, 1) for f in floors],
        "events_per_three_step_workflow": events,
        "sequential_runs": len(latencies),
        "sequential_latency_mean_ms": round(statistics.mean(latencies) * 1000, 2),
        "sequential_latency_p99_ms": round(p99(latencies) * 1000, 2),
        "sequential_latency_max_ms": round(max(latencies) * 1000, 2),
        "sequential_workflows_per_s": round(seq_wf, 1),
        "sequential_steps_per_s": round(seq_steps, 1),
        "sequential_steps_ratio": ratio(seq_steps, floor_rate),
        "concurrent_workflows": CONCURRENT_WORKFLOWS,
        "engine_concurrency": ENGINE_CONCURRENCY,
        "concurrent_workflows_per_s": round(conc_wf, 1),
        "concurrent_steps_per_s": round(conc_steps, 1),
        "concurrent_steps_ratio": ratio(conc_steps, floor_rate),
        "concurrent_rounds_ms": [round(c.total_s * 1000, 1) for c in conc],
        "concurrent_start_ms": round(statistics.median(c.start_s for c in conc) * 1000, 1),
        "concurrent_without_result_calls_workflows_per_s": round(bare_wf, 1),
        "concurrent_without_result_calls_steps_ratio": ratio(
            bare_wf * STEPS_PER_WORKFLOW, floor_rate
        ),
    }


# -- resuming after a restart -------------------------------------------------------


async def resume_by_timer(directory: Path) -> float:
    """1,000 instances that did a step and sleep on a timer; the engine closes, the
    timers come due, a new engine opens: seconds from opening it until no instance is
    left running (watched with ``list_workflows``, one query per 10 ms)."""
    path = directory / "resume-timer.db"
    async with engine(path, RESUME_INSTANCES) as eng:
        await asyncio.gather(
            *(eng.start(resume_timer, i, id=f"t-{i}") for i in range(RESUME_INSTANCES))
        )
        await until_suspended(path, "wf.timer_started", RESUME_INSTANCES)
    due = await asyncio.to_thread(count, path, "SELECT max(due_at) FROM wakeups")
    await asyncio.sleep(max(0.0, due / 1e6 - time.time()) + 0.05)

    eng = engine(path, RESUME_INSTANCES)
    start = time.perf_counter()
    await eng.start_engine()
    try:
        deadline = start + RESULT_TIMEOUT_S
        while await eng.list_workflows(status="running", limit=1):
            if time.perf_counter() > deadline:
                raise BenchError(f"resume: instances still running after {RESULT_TIMEOUT_S} s")
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - start
        results = await asyncio.gather(
            *(eng.handle(f"t-{i}").result(timeout=5) for i in range(RESUME_INSTANCES))
        )
    finally:
        await eng.close()
    check("resume by timer", list(results), [resume_result(i) for i in range(RESUME_INSTANCES)])
    return elapsed


async def resume_by_signal(directory: Path) -> float:
    """1,000 instances that did a step and wait for a signal; the engine closes, a new
    one opens: seconds from opening it, through signalling all 1,000
    (``Engine.signal``, gathered), until all their ``result()`` calls have returned."""
    path = directory / "resume-signal.db"
    async with engine(path, RESUME_INSTANCES) as eng:
        await asyncio.gather(
            *(eng.start(resume_signal, i, id=f"s-{i}") for i in range(RESUME_INSTANCES))
        )
        await until_suspended(path, "wf.signal_waiting", RESUME_INSTANCES)

    eng = engine(path, RESUME_INSTANCES)
    start = time.perf_counter()
    await eng.start_engine()
    try:
        ids = [f"s-{i}" for i in range(RESUME_INSTANCES)]
        await asyncio.gather(*(eng.signal(wid, "go", True) for wid in ids))
        results = await asyncio.gather(
            *(eng.handle(wid).result(timeout=RESULT_TIMEOUT_S) for wid in ids)
        )
        elapsed = time.perf_counter() - start
    finally:
        await eng.close()
    check("resume by signal", list(results), [resume_result(i) for i in range(RESUME_INSTANCES)])
    return elapsed


# -- replaying a long history -------------------------------------------------------


@dataclass(frozen=True)
class Replayed:
    steps: int
    build_s: float
    replay_ms: float
    """``ledgerflow.workflow.replay`` over the history already read; median of 5."""
    query_ms: float
    """``Engine.query``: read the stream, decode it, replay; median of 3."""


async def long_history(eng: lf.Engine, steps: int) -> Replayed:
    workflow_id = f"loop-{steps}"
    start = time.perf_counter()
    handle = await eng.start(loop, steps, id=workflow_id)
    result = await handle.result(timeout=BUDGET_S)
    build_s = time.perf_counter() - start
    if result != loop_result(steps):
        raise BenchError(f"{workflow_id}: result {result}, expected {loop_result(steps)}")
    events = await eng.history(workflow_id)
    if len(events) != steps + 2:
        raise BenchError(f"{workflow_id}: {len(events)} events, expected {steps + 2}")

    async def replayed() -> None:
        exposed = await replay(loop, events)
        if exposed != loop_result(steps):
            raise BenchError(f"replay of {workflow_id} exposed {exposed}")

    async def queried() -> None:
        exposed = await eng.query(workflow_id)
        if exposed != loop_result(steps):
            raise BenchError(f"query of {workflow_id} exposed {exposed}")

    await replayed()  # warm-up
    replay_s = statistics.median([await timed(replayed) for _ in range(5)])
    await queried()
    query_s = statistics.median([await timed(queried) for _ in range(3)])
    return Replayed(steps, build_s, replay_s * 1000, query_s * 1000)


async def replays(directory: Path, deadline: float) -> dict[str, Any]:
    async with engine(directory / "replay.db") as eng:
        note(f"replay: building a {REPLAY_PROBE_STEPS}-step history")
        probe = await long_history(eng, REPLAY_PROBE_STEPS)
        rate = probe.steps / probe.build_s
        left = deadline - time.perf_counter()
        steps = REPLAY_STEPS
        if REPLAY_STEPS / rate * BUILD_MARGIN > left:
            steps = max(REPLAY_PROBE_STEPS, int(left / BUILD_MARGIN * rate) // 1000 * 1000)
        note(f"replay: building a {steps}-step history (~{steps / rate:.0f} s at {rate:.0f}/s)")
        full = probe if steps == REPLAY_PROBE_STEPS else await long_history(eng, steps)
    out: dict[str, Any] = {
        "replay_history_steps": full.steps,
        "replay_build_s": round(full.build_s, 2),
        "replay_build_steps_per_s": round(full.steps / full.build_s, 1),
        "replay_ms": round(full.replay_ms, 1),
        "replay_us_per_step": round(full.replay_ms * 1000 / full.steps, 2),
        "query_ms": round(full.query_ms, 1),
        "query_us_per_step": round(full.query_ms * 1000 / full.steps, 2),
        "replay_1000_steps_ms": round(probe.replay_ms, 2),
    }
    if full.steps != REPLAY_STEPS:
        out["replay_scaled_from"] = REPLAY_STEPS
        out["replay_10000_ms_extrapolated"] = round(full.replay_ms * REPLAY_STEPS / full.steps, 1)
    return out


# -- the run ------------------------------------------------------------------------


async def run() -> dict[str, Any]:
    began = time.perf_counter()
    errors: list[str] = []
    figures: dict[str, Any] = {}

    async def phase(name: str, body: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        note(name)
        try:
            figures.update(await body())
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, traceback on stderr
            traceback.print_exc(file=sys.stderr)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    directory = Path(tempfile.mkdtemp(prefix="ledgerflow-bench-wf-"))
    floor = SQLiteFloor(directory / "floor.db")
    try:
        await phase("sequential and concurrent", lambda: rounds(directory, floor))

        async def resumes() -> dict[str, Any]:
            by_timer = await resume_by_timer(directory)
            note(f"resume by timer: {by_timer * 1000:.0f} ms")
            by_signal = await resume_by_signal(directory)
            note(f"resume by signal: {by_signal * 1000:.0f} ms")
            return {
                "resume_instances": RESUME_INSTANCES,
                "resume_timer_ms": round(by_timer * 1000, 1),
                "resume_signal_ms": round(by_signal * 1000, 1),
            }

        await phase("resume after restart", resumes)
        await phase("replay", lambda: replays(directory, began + BUDGET_S))
    finally:
        await floor.close()
        shutil.rmtree(directory, ignore_errors=True)

    def met(key: str, ok: Callable[[float], bool]) -> bool:
        value = figures.get(key)
        return value is not None and ok(value)

    return {
        "benchmark": "workflows",
        "backend": "sqlite",
        "settings": {
            "journal_mode": "wal",
            "synchronous": "FULL",
            "sqlite_version": sqlite3.sqlite_version,
            "directory": str(directory.parent),
        },
        **figures,
        "resume_method": {
            "timer": (
                f"{RESUME_INSTANCES} instances did a step and sleep {RESUME_TIMER_S} s; "
                "engine closed; once the timers are due a new Engine opens on the same "
                "file; time from opening it until list_workflows(status='running') is "
                "empty"
            ),
            "signal": (
                f"{RESUME_INSTANCES} instances did a step and wait for a signal; engine "
                "closed; time from opening a new Engine, through Engine.signal to all "
                "(gathered), until all result() calls return"
            ),
        },
        "waiting_rss_measured_by": "bench/workflows_scale.py",
        "targets": {key: f">= {value}" for key, value in TARGETS.items() if key != "resume_1000_s"}
        | {"resume_1000_s": f"< {TARGETS['resume_1000_s']}"},
        "targets_met": {
            "sequential_steps_ratio": met(
                "sequential_steps_ratio", lambda v: v >= TARGETS["sequential_steps_ratio"]
            ),
            "concurrent_steps_ratio": met(
                "concurrent_steps_ratio", lambda v: v >= TARGETS["concurrent_steps_ratio"]
            ),
            "resume_1000_timer_s": met(
                "resume_timer_ms", lambda v: v / 1000 < TARGETS["resume_1000_s"]
            ),
            "resume_1000_signal_s": met(
                "resume_signal_ms", lambda v: v / 1000 < TARGETS["resume_1000_s"]
            ),
        },
        "rounds": ROUNDS,
        "errors": errors,
        "seconds": round(time.perf_counter() - began, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    print(json.dumps(asyncio.run(run())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
