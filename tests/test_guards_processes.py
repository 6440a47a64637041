"""A resource's guards hold across worker processes: one circuit breaker, one
bulkhead and one rate limit, whose state every engine on the store shares.

Engines run in processes of their own (``tests/_guard_worker.py``), on one SQLite
file or one PostgreSQL schema. Their step bodies log each call (pid, start, end) to
files; the bounds are checked on those logs after every process is done. The bounds
are the guards' own (at most 3 calls at once, at most R calls a second), never a
speed: timeouts only guard against a hang.
"""

from __future__ import annotations

import queue
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest

from . import _guard_worker as w
from ._guard_harness import (
    JOIN_TIMEOUT,
    RESULT_TIMEOUT,
    ctx,
    declare,
    most_at_once,
    processes,
    spawn,
)


def reports(results: Any, count: int) -> dict[int, Any]:
    """Each worker's payload, as they arrive; the first error fails the test at once."""
    payloads: dict[int, Any] = {}
    for _ in range(count):
        try:
            kind, worker, payload = results.get(timeout=RESULT_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no report within {RESULT_TIMEOUT}s; got {sorted(payloads)}")
        assert kind == "ok", f"worker {worker}:\n{payload}"
        payloads[worker] = payload
    return payloads


def finish(started: list[BaseProcess]) -> None:
    for process in started:
        process.join(timeout=JOIN_TIMEOUT)
        assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"


Line = tuple[int, float, float, bool]
"""A logged call: (pid, start, end, succeeded)."""


def calls(*logs: Path) -> list[Line]:
    lines: list[Line] = []
    for log in logs:
        if not log.exists():
            continue
        for text in log.read_text().splitlines():
            pid, start, end, ok = text.split()
            lines.append((int(pid), float(start), float(end), ok == "1"))
    return lines


# -- one breaker --------------------------------------------------------------------------


async def test_a_breaker_opened_in_one_process_refuses_calls_in_another(
    shared_url: str, tmp_path: Path
) -> None:
    """A fails three calls in a row, which opens the breaker; B, which called the same
    resource while it was closed, is then refused at once: the call never reaches the
    ERP in B, and B's history records the refusal."""
    log = tmp_path / "erp.log"
    warm, opened, done = ctx.Event(), ctx.Event(), ctx.Event()
    results: Any = ctx.Queue()
    await declare(shared_url, w.BREAKER)
    with processes() as started:
        spawn(started, w.open_the_breaker, shared_url, str(log), warm, opened, done, results)
        spawn(started, w.meet_the_open_breaker, shared_url, str(log), warm, opened, results)
        got = reports(results, 2)
        done.set()
        finish(started)
    a, b = got[0], got[1]
    assert len(a["failures"]) == 3
    assert all("ERP unreachable" in f for f in a["failures"])
    assert a["resource"]["state"] == "open"
    # The ERP saw B's first call, then A's three: never B's second.
    logged = calls(log)
    assert [(pid, ok) for pid, _, _, ok in logged] == [(b["pid"], True)] + [(a["pid"], False)] * 3
    assert b["before"] == "po-100"
    # B's call was refused, used up no attempt, and waits for the breaker to half-open,
    # or a minute, whichever comes first, to look at it again.
    [refused] = b["attempts"]
    assert refused["refused"] is True
    assert refused["error_type"] == "CircuitOpenError"
    assert refused["attempt"] == 1
    assert "circuit 'erp' is open since" in refused["message"]
    assert "3 failures in a row" in refused["message"]
    assert w.OPEN_FOR > 60
    assert 50 < refused["retry_in_s"] <= 61
    assert b["status"] == "running"  # on a timer, until the breaker half-opens
    # One move, made by A (its owner name holds its pid), seen by B in the ledger.
    [(previous, state, by, reason)] = b["moves"]
    assert (previous, state, by) == ("closed", "open", a["owner"])
    assert reason.startswith("3 failures in a row; last: ConnectionError")
    assert b["resource"]["state"] == "open"
    assert b["resource"]["transitions"] == 1


# -- one bulkhead ---------------------------------------------------------------------------


async def test_a_bulkhead_of_three_holds_across_four_processes(
    shared_url: str, tmp_path: Path
) -> None:
    """Four processes each start four calls that hold the ERP 0.25 s, at once: never
    more than three run at a time, across processes, and every call completes."""
    count, hold = 4, 0.25
    logs = [tmp_path / f"bulk-{i}.log" for i in range(w.WORKERS)]
    start = ctx.Barrier(w.WORKERS)
    results: Any = ctx.Queue()
    await declare(shared_url, w.BULKHEAD)
    with processes() as started:
        for i in range(w.WORKERS):
            args = (shared_url, i, str(logs[i]), count, hold, start, results)
            spawn(started, w.crowd_the_bulkhead, *args)
        got = reports(results, w.WORKERS)
        finish(started)
    for i, payload in got.items():
        assert payload["results"] == [f"po-{i * 100 + n}" for n in range(count)]
        # Only refusals (waited max_wait for a permit), never a failed call.
        assert {tuple(f) for f in payload["failed"]} <= {(True, "BulkheadFullError")}
    logged = calls(*logs)
    assert len(logged) == w.WORKERS * count  # each call ran once
    for i, payload in got.items():  # each in the process that started it
        assert {pid for pid, *_ in calls(logs[i])} == {payload["pid"]}
    most = most_at_once([(s, e) for _, s, e, _ in logged])
    refusals = sum(len(p["failed"]) for p in got.values())
    print(f"bulkhead: at most {most} calls at once; {refusals} refused attempts")
    assert most <= 3
    assert most >= 2  # there was contention to bound
    # Each permit went with its call's outcome.
    assert all(p["resource"]["permits"] == 0 for p in got.values())


# -- one rate limit ---------------------------------------------------------------------------


async def test_a_rate_limit_holds_across_processes(shared_url: str, tmp_path: Path) -> None:
    """Four processes each start twelve calls at once, against 20 calls a second
    (burst 1) across all of them: the calls went no faster than that (within 10 %),
    and no one-second window held more than the rate plus the burst."""
    count = 12
    logs = [tmp_path / f"limited-{i}.log" for i in range(w.WORKERS)]
    start = ctx.Barrier(w.WORKERS)
    results: Any = ctx.Queue()
    await declare(shared_url, w.RATE_LIMIT)
    with processes() as started:
        for i in range(w.WORKERS):
            args = (shared_url, i, str(logs[i]), count, start, results)
            spawn(started, w.crowd_the_rate_limit, *args)
        got = reports(results, w.WORKERS)
        finish(started)
    for i, payload in got.items():
        assert payload["results"] == [f"po-{i * 100 + n}" for n in range(count)]
        assert payload["failed"] == []
    starts = sorted(s for _, s, _, _ in calls(*logs))
    n = len(starts)
    assert n == w.WORKERS * count  # each call ran once
    for i, payload in got.items():  # each in the process that started it
        assert {pid for pid, *_ in calls(logs[i])} == {payload["pid"]}
    achieved = (n - 1) / (starts[-1] - starts[0])
    busiest = max(sum(1 for s in starts[i:] if s - t < 1.0) for i, t in enumerate(starts))
    print(f"rate limit {w.RATE}/s: achieved {achieved:.2f}/s, busiest second {busiest}")
    assert achieved <= w.RATE * 1.10
    assert achieved >= w.RATE * 0.5  # sanity: the limiter let calls through
    assert busiest <= w.RATE + w.BURST + 2
