"""Bodies of the worker processes of ``test_guards_faults``: engines in processes of
their own, on one SQLite file or PostgreSQL schema, whose steps call the resource
``erp`` under one named policy. One of them is killed with SIGKILL while its calls
hold the resource's bulkhead permits, or between the failures its breaker counts;
another carries on.

They run in processes started with the "spawn" method, so they live in a module of
their own that imports nothing from pytest. Each reports one plain, picklable result
on a queue: ``("ok", worker, payload)`` or ``("error", worker, traceback)``.

Every run of a step body appends lines to a log file opened with O_APPEND (lines from
several processes never mix): ``<pid> <n> start <time>`` when it begins and ``<pid>
<n> end <time> <ok>`` when it ends, times from ``time.time()``. A body killed with its
process logs no end. The test reads overlaps and counts from those lines.

A call may name a flag file: while it does not exist its body waits for it (the
worker is killed meanwhile); once the test has created it (after the kill), bodies
run through. Engines use ``SystemClock``, so the times the store holds
(permits' expiries) and the logs' times are on one clock.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from multiprocessing.queues import Queue
from typing import Any

import msgspec

import ledgerflow as lf
from ledgerflow.resilience.guards import BreakerMoved
from ledgerflow.workflow.history import StepAttemptFailed, StepDone, StepFailed

from ._workers import _report

RESOURCE = "erp"
TIMEOUT = 60.0
"""Guard against a hang (a wait that never ends), never an expectation of speed."""
POLL = 0.05
LEASE = 1.5
"""Seconds: each engine's lease, so its permits expire and it is judged dead soon
after a kill."""
HOLD = 0.3
"""Seconds a call to the ERP takes once the flag is there."""

BULKHEAD = lf.Policy(
    # A refused call (the bulkhead stayed full for max_wait) uses up no attempt: it is
    # retried after the backoff for as long as it takes. There are no real failures.
    retry=lf.Retry(max_attempts=3, initial_interval=0.1, multiplier=1, jitter=0),
    bulkhead=lf.Bulkhead(max_concurrent=2, max_wait=0.5),
)
OPEN_FOR = 600.0
BREAKER = lf.Policy(
    retry=lf.Retry(max_attempts=1, initial_interval=0.01, jitter=0),
    breaker=lf.Breaker(consecutive_failures=3, open_for=OPEN_FOR),
)


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One call to the ERP: where to log it, the flag it waits for, how it goes."""

    log: str
    flag: str | None
    """None: the call does not wait for a flag."""
    n: int
    healthy: bool = True
    hold: float = HOLD
    """Seconds the call takes once the flag is there."""


def _line(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {text}\n".encode())
    finally:
        os.close(fd)


def call_erp(call: Call) -> str:
    """The ERP, called from a step thread: blocks until the flag file exists (a
    worker killed meanwhile never returns), then takes ``call.hold`` seconds."""
    _line(call.log, f"{call.n} start {time.time()!r}")
    ok = False
    try:
        deadline = time.monotonic() + TIMEOUT
        while call.flag is not None and not os.path.exists(call.flag):
            if time.monotonic() > deadline:
                raise AssertionError(f"call {call.n}: no flag within {TIMEOUT}s")
            time.sleep(0.02)
        time.sleep(call.hold)
        if not call.healthy:
            raise ConnectionError("ERP unreachable")
        ok = True
        return f"po-{call.n}"
    finally:
        _line(call.log, f"{call.n} end {time.time()!r} {int(ok)}")


def _flow(name: str) -> lf.WorkflowDefinition[Call, str]:
    async def purchase(ctx: lf.WorkflowContext, call: Call) -> str:
        return await ctx.step(call_erp, call, policy=RESOURCE)

    return lf.workflow(name=name, version=1)(purchase)


BULK = _flow("faults.bulk")
"""Registered by both workers of the bulkhead test: the survivor takes over the
killed one's instances."""
TRIP_A = _flow("faults.trip.a")
TRIP_B = _flow("faults.trip.b")
"""The breaker test's workers register one each: the survivor never runs the killed
one's blocked call, so what the breaker counts is exactly what each worker did."""


def _engine(url: str, workflow: lf.WorkflowDefinition[Call, str], policy: lf.Policy) -> lf.Engine:
    return lf.Engine(
        url,
        workflows=[workflow],
        policies={RESOURCE: policy},
        clock=lf.SystemClock(),
        poll_interval=POLL,
        lease=timedelta(seconds=LEASE),
    )


def summary(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "state": row.state,
        "transitions": row.transitions,
        "consecutive": row.consecutive,
        "window_calls": row.window_calls,
        "window_failures": row.window_failures,
        "permits": row.permits,
    }


async def _outcomes(e: lf.Engine, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each instance's recorded step outcomes, in ledger order."""
    found: dict[str, list[dict[str, Any]]] = {}
    for workflow_id in ids:
        found[workflow_id] = []
        for ev in await e.history(workflow_id):
            data = ev.data
            if isinstance(data, StepAttemptFailed):
                kind = "refused" if data.refused else "attempt_failed"
                found[workflow_id].append(
                    {"kind": kind, "error_type": data.error_type, "position": ev.position}
                )
            elif isinstance(data, StepFailed):
                found[workflow_id].append(
                    {"kind": "failed", "error_type": data.error_type, "position": ev.position}
                )
            elif isinstance(data, StepDone):
                found[workflow_id].append(
                    {"kind": "done", "error_type": None, "position": ev.position}
                )
    return found


async def _park(e: lf.Engine) -> None:
    """Run (and so keep the engine's calls, leases and permits alive) until killed."""
    await asyncio.sleep(TIMEOUT * 3)
    raise AssertionError(f"worker {e.owner} was not killed")


# -- a bulkhead whose holder is killed ------------------------------------------------------


def hold_the_bulkhead(
    url: str, log: str, flag: str, ids: list[str], hold: float, results: Queue[Any]
) -> None:
    """Worker A: start one call per id (each takes a permit and blocks on the flag,
    then, wherever it runs again, takes ``hold`` seconds), report who it is, then run
    on until the test kills it."""
    worker = 0

    async def body() -> None:
        async with _engine(url, BULK, BULKHEAD) as e:
            for n, workflow_id in enumerate(ids):
                await e.start(BULK, Call(log=log, flag=flag, n=n, hold=hold), id=workflow_id)
            results.put(("ok", worker, {"pid": os.getpid(), "owner": e.owner}))
            await _park(e)

    _report(worker, results, body)


def _starts(log: str) -> set[tuple[int, int]]:
    """The (pid, n) of every call logged as started."""
    if not os.path.exists(log):
        return set()
    with open(log) as lines:
        return {(int(pid), int(n)) for pid, n, what, *_ in map(str.split, lines) if what == "start"}


async def _started_here(log: str, count: int) -> None:
    """Until this process has started the calls numbered below ``count``."""
    wanted = {(os.getpid(), n) for n in range(count)}
    async with asyncio.timeout(TIMEOUT):
        while True:
            if wanted <= _starts(log):
                return
            await asyncio.sleep(0.02)


def take_over_the_bulkhead(
    url: str,
    log: str,
    flag: str,
    theirs: list[str],
    ours: list[str],
    after_reruns: bool,
    results: Queue[Any],
) -> None:
    """Worker B, started after A was killed: start one call per id of ``ours`` (at
    once, or ``after_reruns``: once this worker runs A's calls again), which wait for
    room in the bulkhead if need be, and see every instance, A's included (taken over
    once A is judged dead), complete."""
    worker = 1

    async def body() -> dict[str, Any]:
        async with _engine(url, BULK, BULKHEAD) as e:
            if after_reruns:
                await _started_here(log, len(theirs))
            first = len(theirs)
            for n, workflow_id in enumerate(ours, start=first):
                await e.start(BULK, Call(log=log, flag=flag, n=n), id=workflow_id)
            done = await asyncio.gather(
                *(e.handle(i).result(timeout=TIMEOUT) for i in [*theirs, *ours])
            )
            # Every outcome is recorded, and this engine still runs (closing gives
            # back whatever it holds): nothing may be held any more.
            row = await e.store.resource_state(RESOURCE, now_us=e._now_us())
            return {
                "pid": os.getpid(),
                "owner": e.owner,
                "results": done,
                "outcomes": await _outcomes(e, [*theirs, *ours]),
                "resource": summary(row),
            }

    _report(worker, results, body)


# -- a breaker whose counter is killed ------------------------------------------------------


def fail_twice_then_hang(url: str, log: str, flag: str, results: Queue[Any]) -> None:
    """Worker A: two calls fail (the ERP is down), each recorded; report; then a third
    call starts and blocks on the flag until the test kills the worker."""
    worker = 0

    async def body() -> None:
        async with _engine(url, TRIP_A, BREAKER) as e:
            failures = []
            for n in range(2):
                handle = await e.start(
                    TRIP_A, Call(log=log, flag=None, n=n, healthy=False), id=f"a-{n}"
                )
                try:
                    await handle.result(timeout=TIMEOUT)
                except lf.WorkflowFailedError as failed:
                    failures.append(str(failed))
                else:
                    raise AssertionError(f"a-{n} succeeded with the ERP down")
            row = await e.store.resource_state(RESOURCE, now_us=e._now_us())
            results.put(
                (
                    "ok",
                    worker,
                    {
                        "pid": os.getpid(),
                        "owner": e.owner,
                        "failures": failures,
                        "resource": summary(row),
                    },
                )
            )
            await e.start(TRIP_A, Call(log=log, flag=flag, n=2, healthy=False), id="a-2")
            await _park(e)

    _report(worker, results, body)


def fail_until_refused(url: str, log: str, flag: str, most: int, results: Queue[Any]) -> None:
    """Worker B, started after A was killed: call the (still down) ERP one call at a
    time, each awaited, until a call is refused by the open breaker (or ``most``
    calls were made); report what the ledger holds."""
    worker = 1

    async def body() -> dict[str, Any]:
        async with _engine(url, TRIP_B, BREAKER) as e:
            before = summary(await e.store.resource_state(RESOURCE, now_us=e._now_us()))
            ids: list[str] = []
            for n in range(10, 10 + most):
                workflow_id = f"b-{n}"
                ids.append(workflow_id)
                handle = await e.start(
                    TRIP_B, Call(log=log, flag=flag, n=n, healthy=False), id=workflow_id
                )
                refused = False
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        history = await e.history(workflow_id)
                        if any(isinstance(ev.data, StepFailed) for ev in history):
                            break
                        if any(
                            isinstance(ev.data, StepAttemptFailed) and ev.data.refused
                            for ev in history
                        ):
                            refused = True
                            break
                        await asyncio.sleep(0.02)
                if refused:
                    break
                try:
                    await handle.result(timeout=TIMEOUT)
                except lf.WorkflowFailedError:
                    pass
                else:
                    raise AssertionError(f"{workflow_id} succeeded with the ERP down")
            moves = await e.store.read_stream(f"breaker-{RESOURCE}")
            row = await e.store.resource_state(RESOURCE, now_us=e._now_us())
            return {
                "pid": os.getpid(),
                "owner": e.owner,
                "before": before,
                "ids": ids,
                "outcomes": await _outcomes(e, ["a-0", "a-1", "a-2", *ids]),
                "moves": [
                    {
                        "previous": m.data.previous,
                        "state": m.data.state,
                        "by": m.data.by,
                        "workflow_id": m.data.workflow_id,
                        "reason": m.data.reason,
                        "consecutive": m.data.consecutive,
                        "window_calls": m.data.window_calls,
                        "window_failures": m.data.window_failures,
                        "position": m.position,
                    }
                    for m in moves
                    if isinstance(m.data, BreakerMoved)
                ],
                "resource": summary(row),
            }

    _report(worker, results, body)
