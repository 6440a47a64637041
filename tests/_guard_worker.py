"""Bodies of the worker processes of ``test_guards_processes``: engines in processes of
their own, on one SQLite file or PostgreSQL schema, whose steps call the resource
``erp`` under one named policy, so that its breaker, bulkhead and rate limit are
shared through the store and nothing else.

They run in processes started with the "spawn" method, so they live in a module of
their own that imports nothing from pytest. Each reports one plain, picklable result
on a queue: ``("ok", worker, payload)`` or ``("error", worker, traceback)``.

Every run of a step body appends one line to a log file opened with O_APPEND (so
lines from several processes never mix): ``<pid> <start> <end> <ok>``, times from
``time.time()``. The test counts calls and measures overlaps and rates from those
lines, never from globals of a process.

Each engine registers workflows under names of its own, so it runs the instances it
started and no other process's (a worker claims only workflows it registered).
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import msgspec

import ledgerflow as lf
from ledgerflow.resilience.guards import STATE_FRESH_S, BreakerMoved
from ledgerflow.workflow.history import StepAttemptFailed

from ._workers import _report

RESOURCE = "erp"
WORKERS = 4
"""Processes in the bulkhead and rate-limit tests."""
TIMEOUT = 60.0
"""Guard against a hang (a sibling process died, a wait that never ends), never an
expectation of speed."""
POLL = 0.05

OPEN_FOR = 600.0
BREAKER = lf.Policy(
    retry=lf.Retry(max_attempts=1, initial_interval=0.01, jitter=0),
    breaker=lf.Breaker(consecutive_failures=3, open_for=OPEN_FOR),
)
BULKHEAD = lf.Policy(
    # A refused call uses up no attempt: these are for real failures (there are none).
    retry=lf.Retry(max_attempts=3, initial_interval=0.05, multiplier=1, jitter=0),
    bulkhead=lf.Bulkhead(max_concurrent=3, max_wait=1.0),
)
RATE = 20.0
BURST = 1
RATE_LIMIT = lf.Policy(
    retry=lf.Retry(max_attempts=3, initial_interval=0.05, multiplier=1, jitter=0),
    rate_limit=lf.RateLimit(rate=RATE, burst=BURST),
)


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One call to the ERP: where to log it, and how it goes."""

    log: str
    n: int
    healthy: bool = True
    hold: float = 0.0
    """Seconds the call takes."""


def _logged(call: Call, start: float, ok: bool) -> None:
    line = f"{os.getpid()} {start!r} {time.time()!r} {int(ok)}\n"
    fd = os.open(call.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def call_erp(call: Call) -> str:
    """The ERP, called from a step thread."""
    start = time.time()
    ok = False
    try:
        if call.hold:
            time.sleep(call.hold)
        if not call.healthy:
            raise ConnectionError("ERP unreachable")
        ok = True
        return f"po-{call.n}"
    finally:
        _logged(call, start, ok)


async def call_erp_async(call: Call) -> str:
    """The ERP, called on the engine's event loop."""
    start = time.time()
    ok = False
    try:
        if call.hold:
            await asyncio.sleep(call.hold)
        if not call.healthy:
            raise ConnectionError("ERP unreachable")
        ok = True
        return f"po-{call.n}"
    finally:
        _logged(call, start, ok)


def _flow(name: str, *, sync: bool) -> lf.WorkflowDefinition[Call, str]:
    async def purchase(ctx: lf.WorkflowContext, call: Call) -> str:
        if sync:
            return await ctx.step(call_erp, call, policy=RESOURCE)
        return await ctx.step(call_erp_async, call, policy=RESOURCE)

    return lf.workflow(name=name, version=1)(purchase)


FAILING = _flow("guards.failing", sync=True)
HEALTHY = _flow("guards.healthy", sync=True)
BULK = [_flow(f"guards.bulk.{w}", sync=w % 2 == 0) for w in range(WORKERS)]
"""Half the workers call the ERP from step threads, half on their event loop."""
LIMITED = [_flow(f"guards.limited.{w}", sync=w % 2 == 0) for w in range(WORKERS)]


def _engine(url: str, workflow: lf.WorkflowDefinition[Call, str], policy: lf.Policy) -> lf.Engine:
    return lf.Engine(
        url,
        workflows=[workflow],
        policies={RESOURCE: policy},
        clock=lf.SystemClock(),
        poll_interval=POLL,
    )


async def _wait(event: Event, what: str) -> None:
    """Wait for another process, off the event loop (the engine keeps running)."""
    if not await asyncio.to_thread(event.wait, TIMEOUT):
        raise TimeoutError(f"waited {TIMEOUT}s for {what}")


def _resource(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "state": row.state,
        "transitions": row.transitions,
        "consecutive": row.consecutive,
        "permits": row.permits,
    }


# -- one breaker, two processes -------------------------------------------------------


def open_the_breaker(
    url: str, log: str, warm: Event, opened: Event, done: Event, results: Queue[Any]
) -> None:
    """Process A: once B has called the ERP, fail three calls in a row (the ERP is
    down), which opens the breaker; say so, then stay up until the test is done."""
    worker = 0
    reported = False

    async def body() -> None:
        nonlocal reported
        async with _engine(url, FAILING, BREAKER) as e:
            await _wait(warm, "process B's first call")
            failures = []
            for i in range(3):
                handle = await e.start(FAILING, Call(log=log, n=i, healthy=False), id=f"a-{i}")
                try:
                    await handle.result(timeout=TIMEOUT)
                except lf.WorkflowFailedError as failed:
                    failures.append(str(failed))
                else:
                    raise AssertionError(f"a-{i} succeeded with the ERP down")
            state = await e.store.resource_state(RESOURCE, now_us=e._now_us())
            results.put(
                (
                    "ok",
                    worker,
                    {
                        "pid": os.getpid(),
                        "owner": e.owner,
                        "failures": failures,
                        "resource": _resource(state),
                    },
                )
            )
            reported = True
            opened.set()
            await _wait(done, "the test to end")

    try:
        asyncio.run(body())
    except BaseException:
        if not reported:
            results.put(("error", worker, traceback.format_exc()))
        raise  # after a report: a non-zero exit code, which the test checks


def meet_the_open_breaker(
    url: str, log: str, warm: Event, opened: Event, results: Queue[Any]
) -> None:
    """Process B: call the healthy ERP once (the breaker is closed), then, once A has
    opened the breaker, start another call: refused, without reaching the ERP."""
    worker = 1

    async def body() -> dict[str, Any]:
        async with _engine(url, HEALTHY, BREAKER) as e:
            first = await e.start(HEALTHY, Call(log=log, n=100), id="b-0")
            before = await first.result(timeout=TIMEOUT)
            warm.set()
            await _wait(opened, "process A to open the breaker")
            # A worker's copy of a closed breaker may be STATE_FRESH_S old (documented):
            # B read it for its first call; past that, B must see what A did.
            await asyncio.sleep(STATE_FRESH_S)
            await e.start(HEALTHY, Call(log=log, n=101), id="b-1")
            async with asyncio.timeout(TIMEOUT):
                while True:
                    attempts = [
                        ev.data
                        for ev in await e.history("b-1")
                        if isinstance(ev.data, StepAttemptFailed)
                    ]
                    if attempts:
                        break
                    await asyncio.sleep(0.02)
            instance = await e.store.get_instance("b-1")
            assert instance is not None
            moves = await e.store.read_stream(f"breaker-{RESOURCE}")
            state = await e.store.resource_state(RESOURCE, now_us=e._now_us())
            now_us = e._now_us()
            return {
                "pid": os.getpid(),
                "before": before,
                "attempts": [
                    {
                        "attempt": a.attempt,
                        "refused": a.refused,
                        "error_type": a.error_type,
                        "message": a.message,
                        "retry_in_s": None
                        if a.retry_at_us is None
                        else (a.retry_at_us - now_us) / 1e6,
                    }
                    for a in attempts
                ],
                "status": str(instance.status),
                "moves": [
                    (m.data.previous, m.data.state, m.data.by, m.data.reason)
                    for m in moves
                    if isinstance(m.data, BreakerMoved)
                ],
                "resource": _resource(state),
            }

    _report(worker, results, body)


# -- a bulkhead and a rate limit across processes ---------------------------------------


async def _run_all(
    e: lf.Engine, flow: lf.WorkflowDefinition[Call, str], calls: list[Call], prefix: str
) -> dict[str, Any]:
    """Start every call at once, wait for all, and return what their histories say."""
    handles = await asyncio.gather(
        *(e.start(flow, call, id=f"{prefix}-{call.n}") for call in calls)
    )
    done = await asyncio.gather(*(h.result(timeout=TIMEOUT) for h in handles))
    failed = [
        (ev.data.refused, ev.data.error_type)
        for h in handles
        for ev in await e.history(h.id)
        if isinstance(ev.data, StepAttemptFailed)
    ]
    return {"pid": os.getpid(), "results": done, "failed": failed}


def crowd_the_bulkhead(
    url: str, worker: int, log: str, count: int, hold: float, start: Barrier, results: Queue[Any]
) -> None:
    """Start ``count`` calls that each hold the ERP ``hold`` seconds, together with
    the other workers (behind one bulkhead), and wait for them all."""

    async def body() -> dict[str, Any]:
        flow = BULK[worker]
        async with _engine(url, flow, BULKHEAD) as e:
            await asyncio.to_thread(start.wait, TIMEOUT)
            calls = [Call(log=log, n=worker * 100 + i, hold=hold) for i in range(count)]
            outcome = await _run_all(e, flow, calls, f"bulk-{worker}")
            # Once every worker's calls are done, and before any engine stops (which
            # gives back what it holds), the permits are all back.
            await asyncio.to_thread(start.wait, TIMEOUT)
            row = await e.store.resource_state(RESOURCE, now_us=e._now_us())
            await asyncio.to_thread(start.wait, TIMEOUT)
            return {**outcome, "resource": _resource(row)}

    _report(worker, results, body)


def crowd_the_rate_limit(
    url: str, worker: int, log: str, count: int, start: Barrier, results: Queue[Any]
) -> None:
    """Start ``count`` quick calls at once, together with the other workers (behind
    one rate limit), and wait for them all."""

    async def body() -> dict[str, Any]:
        flow = LIMITED[worker]
        async with _engine(url, flow, RATE_LIMIT) as e:
            await asyncio.to_thread(start.wait, TIMEOUT)
            calls = [Call(log=log, n=worker * 100 + i) for i in range(count)]
            return await _run_all(e, flow, calls, f"limited-{worker}")

    _report(worker, results, body)
