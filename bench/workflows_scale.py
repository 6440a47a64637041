"""Memory of 100,000 workflow instances waiting for a signal, on SQLite.

    python bench/workflows_scale.py

Starts instances of a workflow that waits for a signal right away, 1,000 at a time
(``asyncio.gather`` of the starts of a chunk), on an engine with concurrency 1,000,
until 100,000 are started; waits until every one's wake-up row is idle (``due_at``
NULL: waiting for nothing but a signal; no lease: no pass running, since a waiting
instance should cost rows, not a coroutine); then takes the process RSS (VmRSS, after
``gc.collect()``) minus the RSS before the first start. The engine keeps its default
history cache of 10,000 instances, which accounts for most of that (see
``rss_delta_mib_every_10000_started``). A sample is then signalled and must finish, so
the rows really are resumable instances.

Starting is the slow part. Chunks are started only while the projected end of the
next one stays within the time budget; if that stops short of 100,000 the JSON says so
(``waiting_instances`` is what was measured, ``scaled_from`` what was asked for).
Prints one JSON line on stdout, progress on stderr; a fresh temporary database with
the store's default durability (WAL, synchronous=FULL), removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ledgerflow as lf
from store import note
from workflows import POLL_S, BenchError, count

WAITING = 100_000
CHUNK = 1000
ENGINE_CONCURRENCY = 1000
WARM_UP = 200
SAMPLE = 200
"""Instances signalled at the end, which must then finish."""
START_BY_S = 45.0
"""No chunk is started whose projected end (at the rate so far) falls after this many
seconds from the script's start."""
RSS_TARGET_MIB = 1024.0
ENGINE_CACHE_SIZE = 10_000
"""The engine's default: this many recently run histories stay in memory."""


@lf.workflow(name="bench.waiting", version=1)
async def waiting(ctx: lf.WorkflowContext, n: int) -> int:
    go = await ctx.wait_for_signal("go", bool)
    return n if go else -n


def rss_mib() -> float:
    """Current resident set size (VmRSS), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def start_chunk(eng: lf.Engine, prefix: str, first: int, n: int) -> None:
    await asyncio.gather(*(eng.start(waiting, i, id=f"{prefix}-{i}") for i in range(first, n)))


async def until_waiting(path: Path, n: int, timeout: float) -> None:
    """Until the wake-up table holds ``n`` rows, all waiting for nothing but a signal
    (``due_at`` NULL) and none leased (no pass running)."""
    deadline = time.perf_counter() + timeout
    while True:
        rows, idle = await asyncio.to_thread(
            lambda: (
                count(path, "SELECT count(*) FROM wakeups"),
                count(
                    path,
                    "SELECT count(*) FROM wakeups WHERE due_at IS NULL AND lease_owner IS NULL",
                ),
            )
        )
        if rows == idle == n:
            return
        if time.perf_counter() > deadline:
            raise BenchError(
                f"after {timeout:.0f} s, {idle} of {rows} wake-up rows are idle; expected {n}"
            )
        await asyncio.sleep(POLL_S)


async def run() -> dict[str, Any]:
    began = time.perf_counter()
    directory = Path(tempfile.mkdtemp(prefix="ledgerflow-bench-wfscale-"))
    path = directory / "waiting.db"
    try:
        async with lf.Engine(
            f"sqlite:///{path}",
            workflows=[waiting],
            concurrency=ENGINE_CONCURRENCY,
            cache_size=ENGINE_CACHE_SIZE,
        ) as eng:
            # Warm-up: connections, thread pools, statement caches exist before the
            # baseline; these instances finish and are not counted.
            await start_chunk(eng, "warm", 0, WARM_UP)
            await asyncio.gather(*(eng.signal(f"warm-{i}", "go", True) for i in range(WARM_UP)))
            await asyncio.gather(
                *(eng.handle(f"warm-{i}").result(timeout=60) for i in range(WARM_UP))
            )
            gc.collect()
            before = rss_mib()

            note(f"starting up to {WAITING} waiting instances, {CHUNK} at a time")
            start = time.perf_counter()
            started = 0
            by_10k: list[float] = []
            while started < WAITING:
                if started:
                    per_chunk = (time.perf_counter() - start) / (started / CHUNK)
                    if time.perf_counter() + per_chunk > began + START_BY_S:
                        note(f"out of time after {started} instances")
                        break
                await start_chunk(eng, "w", started, started + CHUNK)
                started += CHUNK
                if started % 10_000 == 0:
                    rate = started / (time.perf_counter() - start)
                    by_10k.append(rss_mib() - before)
                    note(f"{started} started ({rate:.0f}/s), RSS +{by_10k[-1]:.0f} MiB")
            starts_s = time.perf_counter() - start
            await until_waiting(path, started, timeout=30)
            suspended_s = time.perf_counter() - start
            gc.collect()
            after = rss_mib()
            peak = peak_rss_mib()
            note(f"{started} waiting: RSS +{after - before:.1f} MiB")

            sample = [f"w-{i}" for i in range(0, started, max(1, started // SAMPLE))]
            await asyncio.gather(*(eng.signal(wid, "go", True) for wid in sample))
            results = await asyncio.gather(*(eng.handle(wid).result(timeout=30) for wid in sample))
            expected = [int(wid.removeprefix("w-")) for wid in sample]
            if list(results) != expected:
                raise BenchError("signalled waiting instances returned wrong results")
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    delta = after - before
    out: dict[str, Any] = {
        "benchmark": "workflows_scale",
        "backend": "sqlite",
        "settings": {
            "journal_mode": "wal",
            "synchronous": "FULL",
            "sqlite_version": sqlite3.sqlite_version,
            "directory": str(directory.parent),
        },
        "waiting_instances": started,
    }
    if started != WAITING:
        out["scaled_from"] = WAITING
        out["projected_rss_delta_mib_at_scaled_from"] = round(delta * WAITING / started, 1)
    out |= {
        "engine_concurrency": ENGINE_CONCURRENCY,
        "start_chunk": CHUNK,
        "starts_s": round(starts_s, 2),
        "until_all_suspended_s": round(suspended_s, 2),
        "instances_suspended_per_s": round(started / suspended_s, 1),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(after, 1),
        "rss_delta_mib": round(delta, 1),
        "rss_per_instance_kib": round(delta * 1024 / started, 3),
        "peak_rss_mib": round(peak, 1),
        "rss_delta_mib_every_10000_started": [round(m, 1) for m in by_10k],
        "engine_cache_size": ENGINE_CACHE_SIZE,
        "sample_signalled_and_finished": len(sample),
        "targets": {"rss_delta_mib": f"< {RSS_TARGET_MIB:.0f} for {WAITING}"},
        "targets_met": {"rss_delta_mib": started == WAITING and delta < RSS_TARGET_MIB},
        "seconds": round(time.perf_counter() - began, 1),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    print(json.dumps(asyncio.run(run())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
