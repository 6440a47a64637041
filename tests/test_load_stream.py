"""``load_stream``: a stream's latest snapshot and the events after it, in one
consistent read (one round trip on PostgreSQL), on every backend. Workers load the
history of each instance they claim this way."""

from __future__ import annotations

import uuid

import pytest

from ledgerflow import NewEvent, Snapshot, StreamNotFoundError
from ledgerflow.store._base import BaseEventStore


def ev(n: int) -> NewEvent:
    return NewEvent("noted", {"n": n}, id=uuid.uuid4())


async def test_without_a_snapshot_it_is_the_whole_stream(store: BaseEventStore) -> None:
    await store.append("s", [ev(i) for i in range(3)])
    snapshot, events = await store.load_stream("s")
    assert snapshot is None
    assert [e.version for e in events] == [1, 2, 3]
    assert events == await store.read_stream("s")


async def test_with_a_snapshot_it_is_the_snapshot_and_the_tail(store: BaseEventStore) -> None:
    await store.append("s", [ev(i) for i in range(5)])
    await store.save_snapshot(Snapshot("s", 3, "state", 1, b"three"))
    snapshot, events = await store.load_stream("s")
    assert snapshot is not None
    assert (snapshot.version, snapshot.state) == (3, b"three")
    assert [e.data["n"] for e in events] == [3, 4]
    await store.save_snapshot(Snapshot("s", 5, "state", 1, b"five"))
    snapshot, events = await store.load_stream("s")
    assert snapshot is not None
    assert (snapshot.version, events) == (5, [])


async def test_a_stream_that_is_not_there_is_not_found(store: BaseEventStore) -> None:
    with pytest.raises(StreamNotFoundError):
        await store.load_stream("nowhere")


async def test_a_snapshot_saved_between_the_two_reads_is_read_again(
    store: BaseEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the two reads are separate statements: one that sees a newer
    snapshot than the other would give a tail that does not follow; it is read
    again instead of handing the loader a history with a hole."""
    if store.backend != "postgres":
        pytest.skip("only PostgreSQL reads the two in separate statements at once")
    await store.append("s", [ev(i) for i in range(6)])
    await store.save_snapshot(Snapshot("s", 2, "state", 1, b"two"))
    sql = store._sql  # type: ignore[attr-defined]
    # The tail as if a snapshot at 4 had been saved after the first statement.
    monkeypatch.setattr(
        sql,
        "stream_after_snapshot",
        sql.stream_after_snapshot.replace("coalesce(", "4 + 0 * coalesce("),
    )
    snapshot, events = await store.load_stream("s")
    assert snapshot is not None
    assert snapshot.version == 2
    assert [e.version for e in events] == [3, 4, 5, 6]
