"""Loading an aggregate whose stream holds 1,000,000 events, from its snapshot.

    python bench/aggregate_1m.py                   # sqlite, then postgres if it answers
    python bench/aggregate_1m.py --backend postgres

Writes 1,000,000 events to one stream through the store (appends of 5,000 events, each
expecting the version the last returned), lets ``Repository.save`` take a snapshot near
the end, appends a few events more, then times ``Repository.load`` (median of 7 after
a warm-up). Target: under 50 ms. One JSON line per backend on stdout; a fresh database
each time, removed afterwards. ``bench/store.py`` measures the same inline when the
fill fits its own time budget; this script is for backends where it does not.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from store import (
    AGGREGATE_1M_EVENTS,
    BUDGET_S,
    BULK_CHUNK,
    LOAD_1M_TARGET_MS,
    TAIL_EVENTS,
    OutOfTime,
    build_aggregate,
    main,
    note,
    open_bench,
)


async def run_backend(backend: str) -> dict[str, Any]:
    began = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "aggregate_1m",
        "backend": backend,
        "events": AGGREGATE_1M_EVENTS,
        "events_per_append": BULK_CHUNK,
        "events_after_snapshot": TAIL_EVENTS,
    }
    async with open_bench(backend) as bench:
        note(f"{backend}: writing {AGGREGATE_1M_EVENTS} events")
        try:
            _, run = await build_aggregate(
                bench.store, "1m", AGGREGATE_1M_EVENTS, deadline=began + BUDGET_S
            )
        except OutOfTime as exc:
            note(f"{backend}: gave up: {exc}")
            result |= {
                "aggregate_1m_load_ms": None,
                "error": f"the fill did not finish within {BUDGET_S:.0f} s: {exc}",
                "targets_met": {"aggregate_1m_load_ms": False},
            }
        else:
            result |= {
                "fill_events_per_s": round(run.fill_events_per_s, 1),
                "fill_s": round(run.fill_s, 1),
                "aggregate_1m_load_ms": round(run.load_ms, 2),
                "targets_met": {"aggregate_1m_load_ms": run.load_ms < LOAD_1M_TARGET_MS},
            }
        result["settings"] = bench.settings
    result["targets"] = {"aggregate_1m_load_ms": f"< {LOAD_1M_TARGET_MS}"}
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


if __name__ == "__main__":
    sys.exit(main(run_backend, __doc__))
