"""SQLite specifics: the event loop never waits on another process's write lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import ledgerflow


async def test_an_append_waits_for_another_writer_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url) as store:
        await store.append("s", [ledgerflow.NewEvent("E")])
        other = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            append = asyncio.create_task(store.append("s", [ledgerflow.NewEvent("E")], 1))
            ticks = 0
            for _ in range(10):  # the loop keeps running other work meanwhile
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks == 10
            assert not append.done()  # still waiting for the lock, off the loop
        finally:
            other.execute("ROLLBACK")
            other.close()
        result = await asyncio.wait_for(append, 30)
        assert result.version == 2
