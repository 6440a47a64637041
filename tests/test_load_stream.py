"""``load_stream``: a stream's latest snapshot and the events after it, read
consistently, on every backend. Workers load the history of each instance they
claim this way."""

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


async def test_a_stream_read_to_its_end_is_appended_to_in_one_round_trip(
    store: BaseEventStore, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker loads an instance another process wrote, then appends to it: the head
    the read found lets that append take the one-round-trip path; a head gone stale
    meanwhile is caught (the append is decided again) and never written on."""
    if store.backend != "postgres":
        pytest.skip("only PostgreSQL has a one-round-trip path")
    from ledgerflow import ConcurrencyError, verify_ledger

    from ._adapters import open_adapter

    async with open_adapter(store_url) as other:
        await other.append("s", [ev(0), ev(1)])
        await store.append("mine", [ev(0)])  # this writer now knows the next position
        await store.append("mine", [ev(1)], expected_version=1)
        fast = _fast_commits(store, monkeypatch)
        await store.load_stream("s")
        await store.append("s", [ev(2)], expected_version=2)
        assert fast == [True]
        await store.load_stream("s")
        await other.append("s", [ev(3)], expected_version=3)  # the head goes stale
        with pytest.raises(ConcurrencyError):
            await store.append("s", [ev(4)], expected_version=3)
        assert [e.version for e in await store.read_stream("s")] == [1, 2, 3, 4]
        assert (await verify_ledger(store)).ok


async def test_a_limited_read_that_reaches_the_end_teaches_the_head(
    store: BaseEventStore, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold worker reads a short history with a limit: fewer rows than the limit is
    the stream's end, and the next append takes the one-round-trip path; a read cut
    by its limit is not the end and teaches nothing."""
    if store.backend != "postgres":
        pytest.skip("only PostgreSQL has a one-round-trip path")
    from ._adapters import open_adapter

    async with open_adapter(store_url) as other:
        await other.append("short", [ev(0), ev(1)])
        await other.append("cut", [ev(0), ev(1), ev(2)])
        await store.append("mine", [ev(0)])  # this writer now knows the next position
        fast = _fast_commits(store, monkeypatch)
        await store.read_stream("short", limit=128)
        await store.append("short", [ev(2)], expected_version=2)
        assert fast == [True]
        await store.read_stream("cut", limit=2)
        await store.append("cut", [ev(3)], expected_version=3)
        assert fast == [True]  # not guessed: decided from the database


def _fast_commits(store: BaseEventStore, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each one-round-trip attempt of ``store`` from now on: True if it committed."""
    fast: list[bool] = []
    real = store._commit_fast  # type: ignore[attr-defined]

    async def commit_fast(plan: object) -> object:
        outcome = await real(plan)
        fast.append(outcome is not None)
        return outcome

    monkeypatch.setattr(store, "_commit_fast", commit_fast)
    return fast
