"""``ledgerflow.testing``: time-skipping and run-until-idle, as users write tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest

import ledgerflow
from ledgerflow import WorkflowContext
from ledgerflow.testing import workflow_environment


@dataclass(frozen=True)
class Order:
    sku: str
    amount: int


def reserve(order: Order) -> str:
    return f"R-{order.sku}"


@ledgerflow.workflow(name="approve_or_expire", version=1)
async def approve_or_expire(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(reserve, order)
    approved = await ctx.wait_for_signal("approval", bool, timeout=timedelta(days=3))
    if approved is None:
        return "rejected"
    await ctx.sleep(timedelta(hours=1))
    return "placed" if approved else "declined"


async def test_three_days_pass_in_an_instant() -> None:
    async with workflow_environment(approve_or_expire) as env:
        handle = await env.engine.start(approve_or_expire, Order("a", 1), id="o-1")
        await env.run_until_idle()
        assert (await handle.describe()).waiting_for == "signal 'approval'"
        await env.advance(timedelta(days=2))
        assert (await handle.describe()).status == "running"
        await env.advance(timedelta(days=1))
        assert (await handle.describe()).status == "completed"
        assert await handle.result() == "rejected"


async def test_skip_timers_runs_through_every_timer() -> None:
    async with workflow_environment(approve_or_expire) as env:
        handle = await env.engine.start(approve_or_expire, Order("b", 1), id="o-2")
        await env.run_until_idle()
        await env.engine.signal("o-2", "approval", True)
        await env.run_until_idle(skip_timers=True)
        assert await handle.result() == "placed"


async def test_run_until_idle_leaves_signal_waits_waiting() -> None:
    async with workflow_environment(approve_or_expire, store="memory://") as env:
        await env.engine.start(approve_or_expire, Order("c", 1), id="o-3")
        await env.run_until_idle()
        described = await env.engine.describe("o-3")
    assert described.status == "running"
    assert described.waiting_for == "signal 'approval'"


async def test_run_until_idle_gives_up_after_its_timeout() -> None:
    @ledgerflow.workflow(name="spins", version=1)
    async def spins(ctx: WorkflowContext, n: int) -> int:
        for _ in range(10_000):
            await ctx.sleep(0)  # due at once, again and again
        return n

    async with workflow_environment(spins) as env:
        await env.engine.start(spins, 1, id="s-1")
        with pytest.raises(TimeoutError):
            await env.run_until_idle(timeout=0.05)
