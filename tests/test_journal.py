"""How a cold runner loads an instance's history: a short one in one read, from the
start; a long one from its snapshot and the events after it."""

from __future__ import annotations

from typing import Any

import pytest

import ledgerflow
from ledgerflow import WorkflowContext
from ledgerflow.workflow import journal
from ledgerflow.workflow.history import History

from ._engines import EngineFactory, waiting_for

WAIT = 10.0


def tick(i: int) -> int:
    return i


@ledgerflow.workflow(name="journal.ticks", version=1)
async def ticks(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += await ctx.step(tick, i)
    await ctx.wait_for_signal("go")
    return total


class _Reads:
    def __init__(self, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in ("read_stream", "load_stream", "load_snapshot"):
            real = getattr(store, name)

            async def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                self.calls.append(_name)
                return await _real(*args, **kw)

            monkeypatch.setattr(store, name, counted)


async def test_a_short_history_is_one_read_from_the_start(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine(ticks, snapshot_every=4) as e:
        await e.start(ticks, 5, id="t-5")
        await waiting_for(e, "t-5", "signal 'go'")
        assert await e.store.load_snapshot("wf-t-5") is not None  # it has one
        events = await e.store.read_stream("wf-t-5")
        reads = _Reads(e.store, monkeypatch)
        loaded = await journal.load_history(e.store, "t-5")
        assert reads.calls == ["read_stream"]
        assert loaded.snapshot() == History.of("t-5", events).snapshot()
        await e.signal("t-5", "go")
        assert await e.handle("t-5").result(timeout=WAIT) == sum(range(5))


async def test_a_long_history_is_loaded_from_its_snapshot(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = journal.SHORT_HISTORY  # two events a step: well past the short ones
    async with engine(ticks, snapshot_every=50) as e:
        await e.start(ticks, n, id="t-long")
        await waiting_for(e, "t-long", "signal 'go'")
        events = await e.store.read_stream("wf-t-long")
        reads = _Reads(e.store, monkeypatch)
        loaded = await journal.load_history(e.store, "t-long")
        assert reads.calls == ["read_stream", "load_stream"]
        assert loaded.snapshot() == History.of("t-long", events).snapshot()
