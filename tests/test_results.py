"""``result()`` of instances this engine ran: answered from memory once ended (starts
in a loop, then results), read from the store when not kept."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

import ledgerflow
from ledgerflow import WorkflowContext
from ledgerflow.workflow import client as client_module

from ._engines import EngineFactory
from ._passes import outcome

WAIT = 10.0


def add_one(x: int) -> int:
    return x + 1


@ledgerflow.workflow(name="results.small", version=1)
async def small(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(add_one, n)


@ledgerflow.workflow(name="results.big", version=1)
async def big(ctx: WorkflowContext, n: int) -> str:
    return "x" * (client_module.RECENT_OUTCOME_BYTES + n)


@ledgerflow.workflow(name="results.medium", version=1)
async def medium(ctx: WorkflowContext, n: int) -> dict[str, str]:
    return {"text": "é" * 1000, "n": str(n)}  # ~2 KiB encoded: kept


@ledgerflow.workflow(name="results.fails", version=1)
async def fails(ctx: WorkflowContext, n: int) -> int:
    raise ValueError(f"no {n}")


class _Reads:
    """Counts the instance-row reads of an engine's store (one by one, or together:
    what ``result()`` polls)."""

    def __init__(self, e: ledgerflow.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        one, many = e.store.get_instance, e.store.get_instances

        async def counted(workflow_id: str) -> Any:
            self.count += 1
            return await one(workflow_id)

        async def counted_together(workflow_ids: Any) -> Any:
            self.count += len(workflow_ids)
            return await many(workflow_ids)

        monkeypatch.setattr(e.store, "get_instance", counted)
        monkeypatch.setattr(e.store, "get_instances", counted_together)


async def _ended(e: ledgerflow.Engine, workflow_id: str) -> None:
    """Until the instance has ended (its end told to this waiter)."""
    with contextlib.suppress(ledgerflow.WorkflowFailedError):
        await outcome(e, workflow_id)


async def test_ends_of_instances_run_here_are_answered_without_reading(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine(small, medium, fails) as e:
        handles = [await e.start(small, n, id=f"s-{n}") for n in range(5)]
        text = await e.start(medium, 3, id="m-3")
        failed = await e.start(fails, 7, id="f-7")
        for workflow_id in [*(h.id for h in handles), text.id, failed.id]:
            await _ended(e, workflow_id)
        reads = _Reads(e, monkeypatch)
        assert [await h.result(timeout=WAIT) for h in handles] == [1, 2, 3, 4, 5]
        assert await text.result(timeout=WAIT) == {"text": "é" * 1000, "n": "3"}
        with pytest.raises(ledgerflow.WorkflowFailedError, match="no 7"):
            await failed.result(timeout=WAIT)
        assert reads.count == 0


async def test_big_ends_and_the_oldest_are_read_from_the_store(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "RECENT_OUTCOMES", 2)
    async with engine(small, big) as e:
        large = await e.start(big, 3, id="big-3")
        await _ended(e, large.id)
        handles = [await e.start(small, n, id=f"s-{n}") for n in range(3)]
        for h in handles:
            await _ended(e, h.id)
        reads = _Reads(e, monkeypatch)
        assert await large.result(timeout=WAIT) == "x" * (client_module.RECENT_OUTCOME_BYTES + 3)
        assert reads.count == 1  # too big to keep
        assert await handles[0].result(timeout=WAIT) == 1
        assert reads.count == 2  # pushed out by the two after it
        assert [await h.result(timeout=WAIT) for h in handles[1:]] == [2, 3]
        assert reads.count == 2


async def test_another_engine_reads_what_this_one_ended(engine: EngineFactory) -> None:
    async with engine(small) as e:
        h = await e.start(small, 41, id="s-41")
        await _ended(e, h.id)
    async with engine(small) as other:
        assert await other.handle("s-41").result(timeout=WAIT) == 42
