"""Workers wake when work appears, not at their next poll (issue 12).

A worker that only polled took ~0.5 s (p50, ``--poll 1``) from a client's start to the
first step. Appends that make an instance claimable now (a start or resume without a
lease, a signal, a cancellation, a child's end: ``runtime.makes_work``) wake the
schedulers of this process at once and, on PostgreSQL, of every process through
LISTEN/NOTIFY. These tests give the worker a poll interval far longer than the test
may take, so only a wake-up can explain that the work got done.
"""

from __future__ import annotations

import asyncio

import pytest

import ledgerflow
from ledgerflow import WorkflowClient, WorkflowContext
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store.runtime import (
    WAKE_AHEAD_US,
    Nudge,
    Schedule,
    Unschedule,
    makes_work,
)

from . import _passes
from ._adapters import open_adapter
from ._engines import EngineFactory
from .conftest import pg_url

NEVER = 3600.0
"""The workers' poll interval: they never poll within a test."""
WAIT = 20.0
"""Only guards against a hang."""


def double(n: int) -> int:
    return n * 2


@ledgerflow.workflow(name="wakeups.double", version=1)
async def doubling(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(double, n)


@ledgerflow.workflow(name="wakeups.waiting", version=1)
async def waiting(ctx: WorkflowContext, n: int) -> int:
    extra = await ctx.wait_for_signal("more", int)
    return n + (extra or 0)


def test_what_makes_work() -> None:
    now = 1_000_000_000
    assert makes_work([Nudge("a", now + 10**9)], now)  # a nudge: the instance may run
    assert makes_work([Schedule("a", now)], now)
    assert makes_work([Schedule("a", now + WAKE_AHEAD_US)], now)
    assert not makes_work([Schedule("a", now + WAKE_AHEAD_US + 1)], now)  # a later timer
    assert not makes_work([Schedule("a", None)], now)  # waits for a signal or a child
    assert not makes_work([Schedule("a", now, "me", now + 1)], now)  # leased: its writer's
    assert not makes_work([Unschedule("a")], now)
    assert not makes_work([], now)
    assert makes_work([Unschedule("b"), Schedule("a", now)], now)


async def test_a_start_by_another_client_wakes_the_worker(engine: EngineFactory) -> None:
    async with engine(doubling, poll_interval=NEVER, clock=ledgerflow.SystemClock()) as worker:
        await asyncio.sleep(0.05)  # the scheduler is asleep, for an hour
        client = WorkflowClient(worker.store, workflows=[doubling])
        handle = await client.start(doubling, 21)
        assert await handle.result(timeout=WAIT) == 42


@pytest.mark.postgres
async def test_a_start_in_another_process_wakes_the_worker(pg_schema: str) -> None:
    """Another store object stands for another process: it shares no memory with the
    worker's, only the database."""
    url = pg_url(pg_schema)
    async with ledgerflow.Engine(url, workflows=[doubling, waiting], poll_interval=NEVER) as worker:
        await asyncio.sleep(0.05)
        async with open_adapter(url) as elsewhere:
            client = WorkflowClient(elsewhere, workflows=[doubling, waiting])
            started = await client.start(doubling, 4)
            assert await started.result(timeout=WAIT) == 8
            # A signal sent from there wakes it too (a nudge).
            signalled = await client.start(waiting, 1)
            await _passes.waiting(worker, signalled.id, "signal")
            await asyncio.sleep(0.05)  # the pass has ended: the instance waits, unleased
            await client.signal(signalled.id, "more", 2)
            assert await signalled.result(timeout=WAIT) == 3


async def test_a_failing_watcher_stops_neither_appends_nor_other_watchers(
    store: BaseEventStore,
) -> None:
    woken: list[str] = []

    def broken() -> None:
        raise RuntimeError("a watcher's bug")

    unwatch_broken = await store.watch_work(broken)  # called first
    unwatch = await store.watch_work(lambda: woken.append("woken"))
    for n in range(2):
        appended = await store.append(
            f"wf-{n}", [ledgerflow.NewEvent("E")], runtime=[Nudge(f"wf-{n}", 0)]
        )
        assert isinstance(appended, ledgerflow.Appended)
    # At least once per append (PostgreSQL's listener also wakes watchers when it
    # connects, in case it missed a notification).
    assert len(woken) >= 2
    unwatch()
    unwatch()  # twice is harmless
    unwatch_broken()
    before = len(woken)
    await store.append("wf-3", [ledgerflow.NewEvent("E")], runtime=[Nudge("wf-3", 0)])
    assert len(woken) == before  # unwatched


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["wake-ups handed back", "tasks handed back", "worker reaped"])
async def test_leases_given_back_wake_the_workers_of_other_processes(
    pg_schema: str, how: str
) -> None:
    """A graceful stop hands its leases back so that the next worker takes over at
    once; another process's worker heard nothing and waited for its poll."""
    from ledgerflow.store.runtime import PutTask, TaskRow, WorkerRow

    url = pg_url(pg_schema)
    async with open_adapter(url) as stopping, open_adapter(url) as elsewhere:
        now = await stopping.database_now_us()
        await stopping.register_worker(
            WorkerRow("gone", "h", 1, ("erp",), (), "v", now - 10**7, now - 10**7, 10**6, 1)
        )
        task = TaskRow("wf/1", "wf", 1, "step", "s", "erp", "{}", now)
        await stopping.append(
            "wf-wf",
            [ledgerflow.NewEvent("x", {})],
            runtime=[Schedule("wf", now, "gone", now + 10**9), PutTask(task)],
        )
        await stopping.claim_tasks(
            "gone", queues=["erp"], now_us=now, lease_until_us=now + 10**9, limit=1
        )
        woken = asyncio.Event()
        unwatch = await elsewhere.watch_work(woken.set)
        await asyncio.sleep(0.2)  # listening
        woken.clear()
        if how == "wake-ups handed back":
            assert await stopping.release_wakeups("gone") == 1
        elif how == "tasks handed back":
            assert await stopping.release_tasks("gone") == 1
        else:
            assert await stopping.reap_workers(now) == ["gone"]
        await asyncio.wait_for(woken.wait(), WAIT)
        unwatch()
