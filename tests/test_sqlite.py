"""SQLite specifics: the event loop never waits on another process's write lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

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


async def test_a_writer_trusts_what_it_knows_only_while_no_one_else_wrote(
    tmp_path: Path,
) -> None:
    """The writer remembers the heads it wrote and the last position between
    commits (no reads for them), and forgets them once another connection has
    committed: two stores on one file taking turns on the same streams keep every
    version, position and hash chain right, and the loser of a race is told."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url) as one, ledgerflow.open_store(url) as two:
        expected = 0
        for turn in range(40):
            store = (one, two)[turn % 3 % 2]  # runs of one writer, then the other
            stream = ("a", "b")[turn % 2]
            done = await store.append(stream, [ledgerflow.NewEvent("E", {"turn": turn})])
            assert done.positions == (turn + 1,)
            expected += 1
        with pytest.raises(ledgerflow.ConcurrencyError):
            # "a" moved on through the other store since this one last wrote it.
            await two.append("a", [ledgerflow.NewEvent("E")], expected_version=19)
        await one.append("a", [ledgerflow.NewEvent("E")], expected_version=20)
        raw = sqlite3.connect(tmp_path / "ledger.db")
        try:  # another process: a row of its own, straight into the file
            raw.execute("UPDATE streams SET version = version WHERE stream_id = 'a'")
            raw.commit()
        finally:
            raw.close()
        last = await one.append("b", [ledgerflow.NewEvent("E")], expected_version=20)
        assert last.positions == (expected + 2,)
        assert [e.version for e in await one.read_stream("a")] == list(range(1, 22))
        assert (await ledgerflow.verify_ledger(one)).ok
