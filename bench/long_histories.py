"""What a wake costs as an instance's history grows (ADR 026, kept runs): a poller
(a step, then a short timer, in a loop) and a mailbox (a signal taken, then a step,
in a loop), each run by one engine, with kept runs (the default) and without
(``Engine(keep_waiting=0)``: every wake replays the history from the top).

    python bench/long_histories.py                 # sqlite, then postgres if it answers
    python bench/long_histories.py --backend sqlite

One JSON line per backend. For each shape and arm: the time per iteration over the
first and the last ``WINDOW`` iterations of ``ITERATIONS``, and their ratio
(``growth``: 1.0 when a wake costs the same however long the history; replaying,
it grows with the history). The machine's speed cancels out of the ratio. A fresh
database each run, removed afterwards; under a minute a backend.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ledgerflow as lf
from store import fresh_database, main, note

ITERATIONS = 600
WINDOW = 100
TARGET_GROWTH = 1.5
"""Kept runs: the last iterations may cost at most this much more than the first."""

marks: list[float] = []
ticked = asyncio.Event()


async def tick(i: int) -> int:
    marks.append(time.perf_counter())
    ticked.set()
    return i


@dataclass(frozen=True)
class Item:
    n: int


@lf.workflow(name="bench.poller", version=1)
async def poller(ctx: lf.WorkflowContext, count: int) -> int:
    total = 0
    for i in range(count):
        total += await ctx.step(tick, i)
        await ctx.sleep(timedelta(milliseconds=1))
    return total


@lf.workflow(name="bench.mailbox", version=1)
async def mailbox(ctx: lf.WorkflowContext, count: int) -> int:
    total = 0
    for _ in range(count):
        item = await ctx.wait_for_signal("item", Item)
        assert item is not None
        total += await ctx.step(tick, item.n)
    return total


def per_iteration() -> dict[str, float]:
    first = (marks[WINDOW] - marks[0]) / WINDOW
    last = (marks[-1] - marks[-1 - WINDOW]) / WINDOW
    return {
        "first_ms": round(first * 1000, 3),
        "last_ms": round(last * 1000, 3),
        "growth": round(last / first, 2),
    }


async def run_shape(url: str, shape: str, keep: int) -> dict[str, float]:
    marks.clear()
    async with lf.Engine(url, workflows=[poller, mailbox], keep_waiting=keep) as engine:
        wf = poller if shape == "poller" else mailbox
        handle = await engine.start(wf, ITERATIONS, id=f"{shape}-{keep}")
        if shape == "mailbox":
            for i in range(ITERATIONS):
                ticked.clear()
                await engine.signal(handle.id, "item", Item(i))
                # One at a time, as a mailbox fed by events: each a wake of its own.
                await asyncio.wait_for(ticked.wait(), 60)
        await handle.result(timeout=120)
    return per_iteration()


async def run_backend(backend: str) -> dict[str, Any]:
    began = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "long_histories", "backend": backend}
    async with fresh_database(backend, "long") as (url, _floor, settings):
        result["settings"] = {**settings, "iterations": ITERATIONS, "window": WINDOW}
        for shape in ("poller", "mailbox"):
            for arm, keep in (("kept", 1000), ("replayed", 0)):
                note(f"{backend}: {shape}, {arm}")
                result[f"{shape}_{arm}"] = await run_shape(url, shape, keep)
    result["target_growth_kept"] = TARGET_GROWTH
    result["targets_met"] = {
        shape: result[f"{shape}_kept"]["growth"] <= TARGET_GROWTH for shape in ("poller", "mailbox")
    }
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


if __name__ == "__main__":
    sys.exit(main(run_backend, __doc__))
