"""``ctx.patched``: new code branches for old histories. Instances started on the old
code replay on the new one along the old path; new ones take the new path and record
it; ``deprecate_patch`` drops the old path later while histories that recorded the
marker still replay. The replay gate tells each deploy apart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import ledgerflow
from ledgerflow.workflow.gate import replay_check

from ._engines import waiting_for

log: list[str] = []


@ledgerflow.step()
def reserve(n: int) -> int:
    log.append(f"reserve {n}")
    return n


@ledgerflow.step()
def check(n: int) -> int:
    log.append(f"check {n}")
    return n


@ledgerflow.step()
def ship(n: int) -> int:
    log.append(f"ship {n}")
    return n


@ledgerflow.workflow(name="order", version=1)
async def old(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    await ctx.step(reserve, n)
    await ctx.wait_for_signal("go")
    return await ctx.step(ship, n)


@ledgerflow.workflow(name="order", version=1)
async def naive(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    await ctx.step(check, n)  # added in front: breaks instances past this point
    await ctx.step(reserve, n)
    await ctx.wait_for_signal("go")
    return await ctx.step(ship, n)


@ledgerflow.workflow(name="order", version=1)
async def patched(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    if ctx.patched("check-first"):
        await ctx.step(check, n)
    await ctx.step(reserve, n)
    await ctx.wait_for_signal("go")
    return await ctx.step(ship, n)


@ledgerflow.workflow(name="order", version=1)
async def deprecated(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    ctx.deprecate_patch("check-first")
    await ctx.step(check, n)
    await ctx.step(reserve, n)
    await ctx.wait_for_signal("go")
    return await ctx.step(ship, n)


async def test_old_instances_keep_the_old_path_and_new_ones_take_the_new(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.Engine(url, workflows=[old]) as engine:
        await engine.start(old, 1, id="before")
        await waiting_for(engine, "before", "signal 'go'")
    async with ledgerflow.open_store(url) as store:
        assert not (await replay_check(store, [naive])).ok  # what patching is for
        assert (await replay_check(store, [patched])).ok

    log.clear()
    async with ledgerflow.Engine(url, workflows=[patched]) as engine:
        after = await engine.start(patched, 2, id="after")
        await waiting_for(engine, "after", "signal 'go'")
        for workflow_id in ("before", "after"):
            await engine.signal(workflow_id, "go")
        assert await asyncio.wait_for(engine.handle("before").result(), 10) == 1
        assert await asyncio.wait_for(after.result(), 10) == 2
        assert (await engine.describe("before")).patches == ()
        assert (await engine.describe("after")).patches == ("check-first",)
    # The old instance went on along its path; the new one took the new path.
    assert sorted(log) == ["check 2", "reserve 2", "ship 1", "ship 2"]

    async with ledgerflow.open_store(url) as store:
        # Every history there (one with the marker, one without) replays on the
        # patched code; the deprecated code replays the one with the marker.
        assert (await replay_check(store, [patched], statuses=["completed"])).ok
        gate = await replay_check(store, [deprecated], statuses=["completed"])
        assert [b.workflow_id for b in gate.breakages] == ["before"]


async def test_a_deprecated_patch_records_no_marker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.Engine(url, workflows=[deprecated]) as engine:
        await engine.start(deprecated, 3, id="fresh")
        await waiting_for(engine, "fresh", "signal 'go'")
        assert (await engine.describe("fresh")).patches == ()
        types = [e.type for e in await engine.store.read_stream("wf-fresh")]
    assert "wf.patched" not in types
