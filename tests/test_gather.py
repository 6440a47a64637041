"""Commands awaited together (``asyncio.gather``), on every backend.

A command that must wait (a timer, a signal, a running child, a step on a task queue)
holds its branch until the body can go no further; then the pass ends with every wait
(``run._Pass._hold``). A wait used to end the pass at once, before the other branches
had run: a sibling's failure went unseen until that wait was over, and the other
branches' waits were recorded a pass late.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest

import ledgerflow
from ledgerflow import RetryPolicy, WorkflowContext
from ledgerflow.testing import ManualClock
from ledgerflow.workflow.history import SignalTaken, TimerStarted

from ._engines import WAIT, EngineFactory, waiting_for

effects: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset() -> None:
    effects.clear()


def reserve(part: str) -> str:
    effects[f"reserve {part}"] += 1
    return f"R-{part}"


def unreserve(part: str, result: str) -> None:
    effects[f"unreserve {result}"] += 1


def confirm(part: str) -> str:
    if part == "bad":
        raise ValueError(f"{part} refuses")
    effects[f"confirm {part}"] += 1
    return part


@ledgerflow.workflow(name="gather.supplier")
async def supplier(ctx: WorkflowContext, part: str) -> str:
    await ctx.step(reserve, part, compensate=unreserve)
    if part != "bad":
        await ctx.sleep(timedelta(hours=1))
    return await ctx.step(confirm, part, retry=RetryPolicy.none())


@ledgerflow.workflow(name="gather.order")
async def order(ctx: WorkflowContext, parts: list[str]) -> list[str]:
    return list(await asyncio.gather(*(ctx.child(supplier, p) for p in parts)))


async def test_a_failing_child_cancels_its_siblings_started_before_it(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """The first child's wait ended the pass before the gather saw the second
    child fail: the parent waited for the first (an hour here; days in life), and
    it completed and kept its effect though the parent failed. Now the failure
    reaches the parent at once, and both siblings are cancelled and undone."""
    async with engine(order, supplier) as e:
        handle = await e.start(order, ["before", "bad", "after"], id="o-1")
        with pytest.raises(ledgerflow.WorkflowFailedError) as failed:
            await handle.result(timeout=WAIT)
        assert "bad refuses" in str(failed.value)
        # The failure that ended it, not the cancellation of a sibling it caused (the
        # last pass failed with whichever child came first in the gather).
        error = str((await e.describe("o-1")).error)
        assert error.startswith("ChildWorkflowError: child workflow 'o-1.2'"), error
        for child in ("o-1.1", "o-1.2", "o-1.3"):
            assert (await e.describe(child)).status == "compensated", child
    assert effects == {
        "reserve before": 1,
        "reserve bad": 1,
        "reserve after": 1,
        "unreserve R-before": 1,
        "unreserve R-bad": 1,
        "unreserve R-after": 1,
    }


@ledgerflow.workflow(name="gather.timers")
async def two_timers(ctx: WorkflowContext, n: int) -> str:
    await asyncio.gather(ctx.sleep(timedelta(hours=1)), ctx.sleep(timedelta(hours=2)))
    return "done"


async def test_timers_awaited_together_start_together(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """The second timer was started a pass late, when the first had fired: two
    hours and one hour awaited together took three."""
    async with engine(two_timers) as e:
        handle = await e.start(two_timers, 1, id="t-1")
        await waiting_for(e, "t-1", "timer")
        started = [x.data for x in await e.history("t-1") if isinstance(x.data, TimerStarted)]
        assert [t.seq for t in started] == [1, 2]
        assert started[1].fire_at_us - started[0].fire_at_us == 3_600_000_000
        # describe names both (it named the first only)
        assert (await e.describe("t-1")).waiting_for.count("timer until") == 2  # type: ignore[union-attr]
        clock.advance(timedelta(hours=2))
        assert await handle.result(timeout=WAIT) == "done"


@ledgerflow.workflow(name="gather.approvals")
async def two_approvals(ctx: WorkflowContext, n: int) -> list[str | None]:
    first, second = await asyncio.gather(
        ctx.wait_for_signal("approve", str), ctx.wait_for_signal("approve", str)
    )
    return [first, second]


@pytest.mark.parametrize("before", [True, False], ids=["sent before", "sent while waiting"])
async def test_one_signal_is_taken_by_one_of_two_waits(engine: EngineFactory, before: bool) -> None:
    """Two waits for "approve" awaited together each take the next one: a single
    signal satisfied both."""
    async with engine(two_approvals) as e:
        if before:
            await e.start(two_approvals, 1, id="a-1")
            await e.signal("a-1", "approve", "alice")
        else:
            await e.start(two_approvals, 1, id="a-1")
            await waiting_for(e, "a-1", "signal 'approve'")
            await e.signal("a-1", "approve", "alice")
        await asyncio.sleep(0.2)
        described = await e.describe("a-1")
        assert described.status == "running"
        assert described.waiting_for == "signal 'approve'"
        await e.signal("a-1", "approve", "bob")
        assert sorted(await e.handle("a-1").result(timeout=WAIT)) == ["alice", "bob"]
        taken = [x.data for x in await e.history("a-1") if isinstance(x.data, SignalTaken)]
        assert len({t.signal_version for t in taken}) == 2


@ledgerflow.step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
def unreserve_down(part: str, result: str) -> None:
    effects["unreserve attempt"] += 1
    raise RuntimeError("supplier API down: the reservation stays")


@ledgerflow.workflow(name="gather.stuck_supplier")
async def stuck_supplier(ctx: WorkflowContext, part: str) -> str:
    await ctx.step(reserve, part, compensate=unreserve_down)
    await ctx.sleep(timedelta(hours=1))
    return part


@ledgerflow.workflow(name="gather.stuck_order")
async def stuck_order(ctx: WorkflowContext, part: str) -> str:
    await ctx.step(reserve, "budget", compensate=unreserve)
    return await ctx.child(stuck_supplier, part)


async def test_a_parent_whose_childs_undo_gave_up_ends_compensation_failed(
    engine: EngineFactory,
) -> None:
    """Cancelled while its child ran; the child's compensation gave up, its
    reservation left in place. The parent ended ``compensated``, as if the whole
    saga were undone; only the child said otherwise."""
    async with engine(stuck_order, stuck_supplier) as e:
        handle = await e.start(stuck_order, "bolts", id="so-1")
        await waiting_for(e, "so-1.2", "timer")
        await e.cancel("so-1", "customer gave up")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        child = await e.describe("so-1.2")
        assert child.status == "compensation_failed"
        (left,) = child.undo_failed  # what describe says was left in place
        assert left.startswith("compensation "), left
        assert "supplier API down" in left, left
        parent = await e.describe("so-1")
        assert parent.status == "compensation_failed"
        assert parent.undo_failed == ("child so-1.2: compensation_failed",)
    assert effects["unreserve R-budget"] == 1  # the parent's own undo still ran
    assert effects["unreserve attempt"] == 2


def five() -> int:
    return 5


@ledgerflow.workflow(name="gather.values")
async def as_values(ctx: WorkflowContext, n: int) -> str:
    got = await asyncio.gather(
        ctx.sleep(timedelta(hours=1)), ctx.step(five), return_exceptions=True
    )
    return repr(got)


async def test_a_wait_taken_for_a_value_still_waits(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """``gather(..., return_exceptions=True)`` handed the wait's end of the pass to
    the body as a value: the workflow completed at once with "[Suspend('suspended'),
    5]", its timer never waited for."""
    async with engine(as_values) as e:
        handle = await e.start(as_values, 1, id="v-1")
        await waiting_for(e, "v-1", "timer")
        assert (await e.describe("v-1")).status == "running"
        clock.advance(timedelta(hours=1))
        assert await handle.result(timeout=WAIT) == "[None, 5]"
