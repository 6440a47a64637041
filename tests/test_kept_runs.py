"""Kept runs (ADR 026): an instance that waits keeps its workflow code alive in the
engine's memory, and the next pass goes on from where it waits instead of replaying
the history from the top. A mailbox of signals or a polling loop cost every wake the
whole history before (quadratic in the loop's length: 2,000 polls took 34 s, 4,000
signals did not finish in 3 minutes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import pytest

import ledgerflow
from ledgerflow import WorkflowContext
from ledgerflow.testing import ManualClock

from ._engines import WAIT, EngineFactory, waiting_for

bodies: list[str] = []
"""Each time a body starts from its top (a replay or the first run)."""
effects: list[int] = []


@pytest.fixture(autouse=True)
def clean() -> None:
    bodies.clear()
    effects.clear()


@dataclass(frozen=True)
class Item:
    n: int


def apply(n: int) -> int:
    effects.append(n)
    return n


@ledgerflow.workflow(name="kept.mailbox", version=1)
async def mailbox(ctx: WorkflowContext, count: int) -> int:
    bodies.append(ctx.workflow_id)
    total = 0
    for _ in range(count):
        item = await ctx.wait_for_signal("item", Item)
        assert item is not None  # no timeout: one comes
        total += await ctx.step(apply, item.n)
    return total


@ledgerflow.workflow(name="kept.poller", version=1)
async def poller(ctx: WorkflowContext, count: int) -> int:
    bodies.append(ctx.workflow_id)
    total = 0
    for i in range(count):
        total += await ctx.step(apply, i)
        await ctx.sleep(timedelta(seconds=1))
    return total


async def test_a_mailbox_takes_its_signals_without_replaying_its_history(
    engine: EngineFactory,
) -> None:
    async with engine(mailbox) as e:
        handle = await e.start(mailbox, 40, id="box-1")
        for i in range(40):
            await waiting_for(e, "box-1", "signal")
            await e.signal("box-1", "item", Item(i))
        assert await handle.result(timeout=WAIT) == sum(range(40))
    assert effects == list(range(40))  # each step once, in order
    # Started once, not once a signal: every later pass went on from its wait.
    assert bodies == ["box-1"]


async def test_signals_sent_while_it_works_are_taken_in_order(engine: EngineFactory) -> None:
    """News that fails a pass's append (a signal landing meanwhile) makes the next
    pass look again at once: the kept body takes it, none is lost or taken twice."""
    async with engine(mailbox) as e:
        handle = await e.start(mailbox, 60, id="box-2")
        await asyncio.gather(*(e.signal("box-2", "item", Item(i)) for i in range(60)))
        assert await handle.result(timeout=WAIT) == sum(range(60))
    assert sorted(effects) == list(range(60))


async def ticking(handle: ledgerflow.WorkflowHandle[int], clock: ManualClock) -> int:
    """The result, the clock moved on a second at a time until it comes."""
    for _ in range(500):
        clock.advance(timedelta(seconds=1))
        try:
            return await handle.result(timeout=0.05)
        except TimeoutError:
            continue
    raise AssertionError("it never ended")


async def test_a_poller_goes_on_from_its_timer(engine: EngineFactory, clock: ManualClock) -> None:
    async with engine(poller) as e:
        handle = await e.start(poller, 12, id="poll-1")
        assert await ticking(handle, clock) == sum(range(12))
    assert effects == list(range(12))
    assert bodies == ["poll-1"]


async def test_without_kept_runs_every_wake_replays(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(poller, keep_waiting=0) as e:
        handle = await e.start(poller, 3, id="poll-2")
        assert await ticking(handle, clock) == sum(range(3))
    assert effects == [0, 1, 2]
    assert bodies == ["poll-2"] * 4  # the first run and a replay for each timer


async def test_another_engine_in_between_makes_the_kept_run_stale(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept by a first engine, advanced by a second, then woken in the first again:
    the first must not go on from its old wait (its history moved on under it)."""

    async def claims_nothing() -> bool:
        return False

    async with engine(mailbox) as first:
        handle = await first.start(mailbox, 3, id="box-3")
        await waiting_for(first, "box-3", "signal")
        assert bodies == ["box-3"]
        with monkeypatch.context() as paused:
            paused.setattr(first, "_claim", claims_nothing)  # only the second claims
            async with engine(mailbox) as second:
                await second.signal("box-3", "item", Item(1))
                await until_effects(1)
                await waiting_for(second, "box-3", "signal")
        await first.signal("box-3", "item", Item(2))
        await until_effects(2)
        await first.signal("box-3", "item", Item(3))
        assert await handle.result(timeout=WAIT) == 6
    assert effects == [1, 2, 3]
    # The second engine replayed it, and the first replayed it once more (its kept
    # run was stale), then went on from there.
    assert bodies == ["box-3"] * 3


async def until_effects(count: int) -> None:
    for _ in range(2000):  # a hang guard
        if len(effects) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} effects never came: {effects}")


async def test_keep_waiting_must_not_be_negative() -> None:
    with pytest.raises(ledgerflow.ConfigurationError, match="keep_waiting"):
        ledgerflow.Engine("memory://", keep_waiting=-1)


async def test_a_closed_engine_keeps_no_run(engine: EngineFactory) -> None:
    """A pass that ended while the engine closed kept its run after close had
    dropped the others: its body stayed pending for ever (trial S: 13 of 20)."""
    async with engine(mailbox) as e:
        for i in range(20):
            await e.start(mailbox, 1000, id=f"box-c{i}")

        async def feed(i: int) -> None:
            for n in range(1000):
                await e.signal(f"box-c{i}", "item", Item(n))

        feeding = [asyncio.ensure_future(feed(i)) for i in range(20)]
        await asyncio.sleep(0.3)
        await e.close()
        for task in feeding:
            task.cancel()
        await asyncio.gather(*feeding, return_exceptions=True)
        assert not e._kept
