"""A worker claims only instances of the workflows it registered (issue 12).

Engines that registered different workflows stranded each other's instances: a worker
that knew only ``insurance`` claimed ``trip`` instances and parked them as ``stuck``
(38 of 60), and a full worker never resumed them. Now claims (and the scheduler's
look at the next due time) name the (name, version) pairs the engine can run.
"""

from __future__ import annotations

import asyncio

import pytest

import ledgerflow
from ledgerflow import WorkflowClient, WorkflowContext
from ledgerflow.store._base import BaseEventStore

from ._engines import WAIT, EngineFactory

REAL = ledgerflow.SystemClock()
"""Workers poll on a clock that moves by itself: the test's ManualClock would wait."""


def price(n: int) -> int:
    return n * 10


@ledgerflow.workflow(name="routing.trip", version=1)
async def trip(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(price, n)


@ledgerflow.workflow(name="routing.trip", version=2)
async def trip_v2(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(price, n) + 1


@ledgerflow.workflow(name="routing.insurance", version=1)
async def insurance(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(price, n) + 2


async def test_a_worker_leaves_instances_it_cannot_run_to_one_that_can(
    engine: EngineFactory,
) -> None:
    async with engine(insurance, poll_interval=0.02, clock=REAL) as narrow:
        client = WorkflowClient(narrow.store, workflows=[trip, insurance], clock=REAL)
        for i in range(20):
            await client.start(trip, i, id=f"t-{i}")
        await client.start(insurance, 1, id="i-1")
        assert await client.handle("i-1").result(timeout=WAIT) == 12
        await asyncio.sleep(0.3)  # the narrow worker looks for work ~15 times meanwhile
        for i in range(20):
            described = await narrow.describe(f"t-{i}")
            assert described.status == "running"  # waiting for a worker, not parked
            wakeup = await narrow.store.get_wakeup(f"t-{i}")
            assert wakeup is not None
            assert wakeup.lease_epoch == 0  # never claimed
        async with engine(trip, insurance, poll_interval=0.02, clock=REAL) as full:
            results = await asyncio.gather(
                *(full.handle(f"t-{i}").result(timeout=WAIT) for i in range(20))
            )
    assert results == [i * 10 for i in range(20)]


async def test_versions_route_too(engine: EngineFactory) -> None:
    async with engine(trip_v2, poll_interval=0.02, clock=REAL) as new_only:
        client = WorkflowClient(new_only.store, workflows=[trip, trip_v2], clock=REAL)
        await client.start(trip, 3, id="old")  # the latest version is v2: start v1 by object
        await client.start(trip_v2, 3, id="new")
        assert await client.handle("new").result(timeout=WAIT) == 31
        await asyncio.sleep(0.2)
        assert (await new_only.describe("old")).status == "running"
        async with engine(trip, poll_interval=0.02, clock=REAL) as old_only:
            assert await old_only.handle("old").result(timeout=WAIT) == 30


async def test_claims_and_next_due_name_what_they_may_take(store: BaseEventStore) -> None:
    from ledgerflow.store.runtime import InstanceRow, Lease, PutInstance, Schedule

    for wid, name, due in (("a", "x", 5), ("b", "y", 3), ("c", "x", 9)):
        await store.append(
            wid,
            [ledgerflow.NewEvent(type="Noted", data={})],
            runtime=[
                PutInstance(InstanceRow(wid, name, 1, "running", None, 0, 0)),
                Schedule(wid, due),
            ],
        )
    assert await store.next_wakeup(workflows=[("x", 1)]) == 5
    assert await store.next_wakeup(workflows=[("y", 1)]) == 3
    assert await store.next_wakeup(workflows=[("x", 2)]) is None
    assert await store.next_wakeup(workflows=[]) is None
    assert await store.next_wakeup() == 3
    assert await store.claim_wakeups(
        "w", now_us=100, lease_until_us=200, limit=9, workflows=[("x", 1), ("z", 4)]
    ) == [Lease("a", 1), Lease("c", 1)]
    assert (
        await store.claim_wakeups("w", now_us=100, lease_until_us=200, limit=9, workflows=[]) == []
    )
    assert await store.claim_wakeups("w", now_us=100, lease_until_us=200, limit=9) == [
        Lease("b", 1)
    ]
    with pytest.raises(ledgerflow.InvalidEventDataError, match="workflow version"):
        await store.next_wakeup(workflows=[("x", "1")])  # type: ignore[list-item]
