"""The EventStore contract, run on every backend (memory, SQLite, PostgreSQL).

Each test gets a fresh, empty store from the ``store``/``store_url`` fixtures; the
few that depend on durability or on a schema table say which backends they need.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

import ledgerflow
from ledgerflow import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AlreadyAppended,
    Appended,
    ConcurrencyError,
    DuplicateEventError,
    EventRegistry,
    InvalidEventDataError,
    Metadata,
    NewEvent,
    RecordedEvent,
    SchemaVersionError,
    Snapshot,
    StoreClosedError,
    StoreError,
    StreamNotFoundError,
)
from ledgerflow.hashing import GENESIS_HASH, chain_hash, to_micros
from ledgerflow.store._base import BaseEventStore

from .conftest import raw_sql

WAIT = 30.0
"""Guard against a hang, never an assertion about speed."""


def ev(n: int) -> NewEvent:
    """A plain event with data ``{"n": n}`` and a fresh id."""
    return NewEvent("noted", {"n": n}, id=uuid.uuid4())


def migration_rows(url: str) -> list[tuple[Any, ...]]:
    """``schema_migrations`` as stored, read straight from the database."""
    return raw_sql(
        url, "SELECT version, name, applied_at FROM {t}schema_migrations ORDER BY version"
    )


# -- append ------------------------------------------------------------------------


async def test_append_returns_new_version_and_contiguous_positions(
    store: BaseEventStore,
) -> None:
    first = await store.append("order-1", [ev(1), ev(2)], expected_version=NO_STREAM)
    assert first == Appended("order-1", 2, (1, 2))
    other = await store.append("order-2", [ev(3)])
    assert other == Appended("order-2", 1, (3,))
    more = await store.append("order-1", [ev(4), ev(5), ev(6)], expected_version=2)
    assert more == Appended("order-1", 5, (4, 5, 6))
    assert await store.stream_version("order-1") == 5
    assert await store.stream_version("order-2") == 1
    assert await store.stream_version("nothing-here") == 0
    assert await store.head_position() == 6
    events = await store.read_stream("order-1")
    assert [e.version for e in events] == [1, 2, 3, 4, 5]
    assert [e.position for e in events] == [1, 2, 4, 5, 6]
    assert [e.data for e in events] == [{"n": n} for n in (1, 2, 4, 5, 6)]


async def test_empty_store_has_no_position(store: BaseEventStore) -> None:
    assert await store.head_position() == 0
    assert await store.read_all() == []


@dataclass(frozen=True)
class Priced:
    sku: str
    cents: int


async def test_events_of_one_call_are_atomic(store_url: str, registry: EventRegistry) -> None:
    registry.register(Priced, "priced")
    async with ledgerflow.open_store(store_url, registry=registry, max_event_bytes=4096) as store:
        await store.append("cart", [ev(0)])
        bad_third: list[object] = [
            Priced("a", 1),
            NewEvent("priced", {"sku": "b", "cents": 2}),
            NewEvent("priced", {"sku": "c", "cents": "three"}),
        ]
        with pytest.raises(InvalidEventDataError):
            await store.append("cart", bad_third)
        too_big_third: list[object] = [ev(1), ev(2), NewEvent("noted", {"x": "y" * 5000})]
        with pytest.raises(ledgerflow.EventTooLargeError):
            await store.append("cart", too_big_third)
        assert await store.stream_version("cart") == 1
        assert await store.head_position() == 1
        assert [e.data for e in await store.read_all()] == [{"n": 0}]
        # The refused events can still be appended once fixed: nothing half-exists.
        fixed: list[object] = [bad_third[0], bad_third[1], Priced("c", 3)]
        assert await store.append("cart", fixed, expected_version=1) == Appended(
            "cart", 4, (2, 3, 4)
        )


# -- expected version --------------------------------------------------------------


async def test_expected_version_int(store: BaseEventStore) -> None:
    await store.append("s", [ev(1)], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        await store.append("s", [ev(2)], expected_version=0)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", 0, 1)
    with pytest.raises(ConcurrencyError) as info:
        await store.append("s", [ev(2)], expected_version=2)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", 2, 1)
    with pytest.raises(ConcurrencyError) as info:
        await store.append("t", [ev(2)], expected_version=1)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("t", 1, 0)
    assert info.value.retryable
    assert await store.append("s", [ev(2)], expected_version=1) == Appended("s", 2, (2,))
    assert await store.head_position() == 2


async def test_expected_version_no_stream(store: BaseEventStore) -> None:
    assert await store.append("s", [ev(1)], expected_version=NO_STREAM) == Appended("s", 1, (1,))
    with pytest.raises(ConcurrencyError) as info:
        await store.append("s", [ev(2)], expected_version=NO_STREAM)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", NO_STREAM, 1)
    assert "expected version NO_STREAM, actual version 1" in str(info.value)
    assert await store.head_position() == 1


async def test_expected_version_stream_exists(store: BaseEventStore) -> None:
    with pytest.raises(ConcurrencyError) as info:
        await store.append("s", [ev(1)], expected_version=STREAM_EXISTS)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == (
        "s",
        STREAM_EXISTS,
        0,
    )
    assert await store.head_position() == 0
    await store.append("s", [ev(1)])
    assert await store.append("s", [ev(2)], expected_version=STREAM_EXISTS) == Appended(
        "s", 2, (2,)
    )
    assert await store.append("s", [ev(3)], expected_version=STREAM_EXISTS) == Appended(
        "s", 3, (3,)
    )


async def test_expected_version_any(store: BaseEventStore) -> None:
    assert await store.append("s", [ev(1)], expected_version=ANY) == Appended("s", 1, (1,))
    assert await store.append("s", [ev(2)], expected_version=ANY) == Appended("s", 2, (2,))
    assert await store.append("s", [ev(3)]) == Appended("s", 3, (3,))  # ANY is the default


# -- idempotency -------------------------------------------------------------------


async def test_same_ids_and_content_are_stored_once(store: BaseEventStore) -> None:
    events = [ev(1), ev(2)]
    first = await store.append("s", events, expected_version=NO_STREAM)
    await store.append("other", [ev(9)])
    head = await store.head_position()
    # A retry after an acknowledged append, even with its now-stale expected version.
    again = await store.append("s", events, expected_version=NO_STREAM)
    assert again == AlreadyAppended("s", first.version, first.positions)
    assert isinstance(again, AlreadyAppended)
    again_any = await store.append("s", list(events))
    assert again_any == AlreadyAppended("s", 2, (1, 2))
    assert await store.head_position() == head
    assert [e.id for e in await store.read_stream("s")] == [e.id for e in events]


async def test_same_id_with_other_content_is_refused(store: BaseEventStore) -> None:
    event_id = uuid.uuid4()
    await store.append("s", [NewEvent("noted", {"n": 1}, id=event_id)])
    head = await store.head_position()
    cases: list[NewEvent] = [
        NewEvent("noted", {"n": 2}, id=event_id),
        NewEvent("other", {"n": 1}, id=event_id),
        NewEvent("noted", {"n": 1}, id=event_id, schema_version=2),
        NewEvent("noted", {"n": 1}, id=event_id, metadata=Metadata(actor="mallory")),
    ]
    for case in cases:
        with pytest.raises(DuplicateEventError) as info:
            await store.append("s", [case])
        assert info.value.event_id == event_id
    # The same event on another stream is other content too.
    with pytest.raises(DuplicateEventError) as info:
        await store.append("t", [NewEvent("noted", {"n": 1}, id=event_id)])
    assert info.value.event_id == event_id
    assert await store.head_position() == head
    assert await store.stream_version("t") == 0


async def test_partial_overlap_is_refused(store: BaseEventStore) -> None:
    a, b, c = ev(1), ev(2), ev(3)
    await store.append("s", [a, b])
    with pytest.raises(DuplicateEventError):
        await store.append("s", [a, b, c])
    with pytest.raises(DuplicateEventError):
        await store.append("s", [c, a])
    # Ids stored by two different appends cannot be replayed as one.
    d = ev(4)
    await store.append("s", [c])
    await store.append("s", [d])
    with pytest.raises(DuplicateEventError):
        await store.append("s", [b, d])
    assert await store.head_position() == 4
    assert [e.id for e in await store.read_stream("s")] == [a.id, b.id, c.id, d.id]


async def test_id_repeated_inside_one_call_is_refused(store: BaseEventStore) -> None:
    same = ev(1)
    with pytest.raises(DuplicateEventError) as info:
        await store.append("s", [same, ev(2), same])
    assert info.value.event_id == same.id
    assert await store.head_position() == 0
    assert await store.stream_version("s") == 0


async def test_concurrent_retries_of_one_append_store_it_once(store: BaseEventStore) -> None:
    events = [ev(1), ev(2)]
    results = await asyncio.gather(*(store.append("s", events) for _ in range(5)))
    assert sum(isinstance(r, Appended) for r in results) == 1
    assert {(r.version, r.positions) for r in results} == {(2, (1, 2))}
    assert await store.head_position() == 2


# -- reading -----------------------------------------------------------------------


async def test_read_stream_directions_and_slices(store: BaseEventStore) -> None:
    for n in range(1, 6):
        await store.append("s", [ev(n)])
        await store.append("noise", [ev(100 + n)])

    def versions(events: list[RecordedEvent]) -> list[int]:
        assert all(e.stream_id == "s" for e in events)
        assert all(e.data == {"n": e.version} for e in events)
        return [e.version for e in events]

    assert versions(await store.read_stream("s")) == [1, 2, 3, 4, 5]
    assert versions(await store.read_stream("s", from_version=3)) == [3, 4, 5]
    assert versions(await store.read_stream("s", limit=2)) == [1, 2]
    assert versions(await store.read_stream("s", from_version=2, limit=2)) == [2, 3]
    assert versions(await store.read_stream("s", from_version=6)) == []
    assert versions(await store.read_stream("s", limit=0)) == []
    assert versions(await store.read_stream("s", backwards=True)) == [5, 4, 3, 2, 1]
    assert versions(await store.read_stream("s", backwards=True, limit=2)) == [5, 4]
    assert versions(await store.read_stream("s", backwards=True, from_version=3)) == [3, 2, 1]
    assert versions(await store.read_stream("s", backwards=True, from_version=3, limit=2)) == [
        3,
        2,
    ]
    assert versions(await store.read_stream("s", backwards=True, from_version=99)) == [
        5,
        4,
        3,
        2,
        1,
    ]


async def test_read_of_unknown_stream_raises(store: BaseEventStore) -> None:
    await store.append("known", [ev(1)])
    with pytest.raises(StreamNotFoundError) as info:
        await store.read_stream("unknown")
    assert info.value.stream_id == "unknown"
    with pytest.raises(StreamNotFoundError):
        await store.read_stream("unknown", backwards=True, limit=1)


async def test_read_all_in_global_order(store: BaseEventStore) -> None:
    plan = ["a", "b", "a", "c", "b", "a"]
    for n, stream in enumerate(plan, start=1):
        await store.append(stream, [ev(n)])
    everything = await store.read_all()
    assert [e.position for e in everything] == [1, 2, 3, 4, 5, 6]
    assert [e.stream_id for e in everything] == plan
    assert [e.data["n"] for e in everything] == [1, 2, 3, 4, 5, 6]
    assert [e.version for e in everything] == [1, 1, 2, 1, 2, 3]
    assert [e.position for e in await store.read_all(from_position=4)] == [4, 5, 6]
    assert [e.position for e in await store.read_all(limit=2)] == [1, 2]
    assert [e.position for e in await store.read_all(from_position=3, limit=2)] == [3, 4]
    assert await store.read_all(from_position=7) == []
    assert await store.read_all(limit=0) == []
    assert [e.id for e in await store.read_all(from_position=5)] == [e.id for e in everything[4:]]
    rows = await store.read_rows(from_position=2, limit=3)
    assert [(r.position, r.id) for r in rows] == [(e.position, e.id) for e in everything[1:4]]


# -- the envelope ------------------------------------------------------------------


async def test_envelope_fields_round_trip(store_url: str) -> None:
    moment = [datetime(2031, 4, 5, 6, 7, 8, 123456, tzinfo=UTC)]
    async with ledgerflow.open_store(store_url, clock=lambda: moment[0]) as store:
        meta = Metadata(
            actor="alice",
            correlation_id="corr-1",
            causation_id="cause-1",
            tenant="acme",
            reason="customer asked",
            extra={"ip": "10.0.0.1", "attempt": 2},
        )
        first = NewEvent("order.created", {"sku": "x", "qty": 2}, metadata=meta, id=uuid.uuid4())
        bare = NewEvent("order.noted", {}, schema_version=4, id=uuid.uuid4())
        await store.append("order-1", [first, bare])
        later = datetime(2031, 4, 5, 8, 0, 0, 1, tzinfo=timezone(timedelta(hours=2)))
        moment[0] = later
        shared = Metadata(actor="bob", reason="batch")
        await store.append("order-1", [ev(3), NewEvent("x", {}, metadata=meta)], metadata=shared)
        events = await store.read_stream("order-1")
    e1, e2, e3, e4 = events
    assert (e1.id, e1.stream_id, e1.version, e1.position) == (first.id, "order-1", 1, 1)
    assert (e1.type, e1.schema_version, e1.data) == ("order.created", 1, {"sku": "x", "qty": 2})
    assert e1.metadata == meta
    assert e1.metadata.extra == {"ip": "10.0.0.1", "attempt": 2}
    assert (e2.id, e2.type, e2.schema_version, e2.data) == (bare.id, "order.noted", 4, {})
    assert e2.metadata == Metadata()
    assert e1.recorded_at == e2.recorded_at == datetime(2031, 4, 5, 6, 7, 8, 123456, tzinfo=UTC)
    assert e1.recorded_at.utcoffset() == timedelta(0)
    assert e3.recorded_at == e4.recorded_at == later
    # Call-level metadata fills in for events without their own, and only for those.
    assert e3.metadata == shared
    assert e4.metadata == meta


async def test_hash_chain(store: BaseEventStore) -> None:
    await store.append("a", [ev(1), ev(2)])
    await store.append("b", [ev(3)])
    await store.append("a", [NewEvent("noted", {"n": 4}, metadata=Metadata(actor="x"))])
    await store.append("b", [ev(5), ev(6)])
    events = await store.read_all()
    rows = await store.read_rows()
    assert len(rows) == len(events) == 6
    last_hash: dict[str, bytes] = {}
    for event, row in zip(events, rows, strict=True):
        assert (row.id, row.position, row.stream_id, row.version) == (
            event.id,
            event.position,
            event.stream_id,
            event.version,
        )
        assert (row.hash, row.prev_hash) == (event.hash, event.prev_hash)
        assert row.data == msgspec.json.encode(event.data)
        assert msgspec.json.decode(row.metadata, type=Metadata) == event.metadata
        assert row.recorded_at_us == to_micros(event.recorded_at)
        assert event.prev_hash == last_hash.get(event.stream_id, GENESIS_HASH)
        assert event.hash == chain_hash(
            event.prev_hash,
            event.id,
            event.stream_id,
            event.version,
            event.position,
            event.type,
            event.schema_version,
            row.data,
            row.metadata,
            to_micros(event.recorded_at),
        )
        last_hash[event.stream_id] = event.hash
    assert bytes(32) == GENESIS_HASH
    assert len({e.hash for e in events}) == 6
    heads = dict(await store.stream_heads())
    assert {s: (h.version, h.last_hash, h.last_position) for s, h in heads.items()} == {
        "a": (3, last_hash["a"], 4),
        "b": (3, last_hash["b"], 6),
    }


# -- snapshots ---------------------------------------------------------------------


async def test_snapshots_save_load_and_replace_only_if_newer(store_url: str) -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, 5, tzinfo=UTC)
    async with ledgerflow.open_store(store_url, clock=lambda: now) as store:
        assert await store.load_snapshot("cart") is None
        await store.save_snapshot(Snapshot("cart", 5, "cart.state", 1, b"five"))
        kept = await store.load_snapshot("cart")
        assert kept == Snapshot("cart", 5, "cart.state", 1, b"five", now)
        await store.save_snapshot(Snapshot("cart", 3, "cart.state", 1, b"three"))
        assert await store.load_snapshot("cart") == kept
        given = datetime(2030, 2, 2, tzinfo=UTC)
        await store.save_snapshot(Snapshot("cart", 7, "cart.state2", 2, b"\x00seven", given))
        assert await store.load_snapshot("cart") == Snapshot(
            "cart", 7, "cart.state2", 2, b"\x00seven", given
        )
        await store.save_snapshot(Snapshot("other", 1, "o", 1, b""))
        other = await store.load_snapshot("other")
        assert other is not None
        assert other.state == b""
        loaded = await store.load_snapshot("cart")
        assert loaded is not None
        assert loaded.version == 7


# -- subscriptions -----------------------------------------------------------------


async def _collect(store: BaseEventStore, into: asyncio.Queue[RecordedEvent], **kw: int) -> None:
    async for event in store.subscribe(**kw):
        await into.put(event)


async def _take(queue: asyncio.Queue[RecordedEvent], n: int) -> list[RecordedEvent]:
    return [await asyncio.wait_for(queue.get(), WAIT) for _ in range(n)]


async def test_subscribe_catches_up_then_follows_until_close(store: BaseEventStore) -> None:
    await store.append("a", [ev(1), ev(2)])
    await store.append("b", [ev(3)])
    got: asyncio.Queue[RecordedEvent] = asyncio.Queue()
    task = asyncio.create_task(_collect(store, got, batch_size=2))
    caught_up = await _take(got, 3)
    assert [e.position for e in caught_up] == [1, 2, 3]
    await store.append("c", [ev(4)])
    await store.append("a", [ev(5), ev(6), ev(7)])
    live = await _take(got, 4)
    assert [(e.position, e.stream_id, e.data["n"]) for e in live] == [
        (4, "c", 4),
        (5, "a", 5),
        (6, "a", 6),
        (7, "a", 7),
    ]
    assert got.empty()
    await store.close()
    await asyncio.wait_for(task, WAIT)
    assert task.exception() is None
    assert got.empty()


async def test_subscribe_from_position(store: BaseEventStore) -> None:
    for n in range(1, 5):
        await store.append("s", [ev(n)])
    got: asyncio.Queue[RecordedEvent] = asyncio.Queue()
    task = asyncio.create_task(_collect(store, got, from_position=3))
    assert [e.position for e in await _take(got, 2)] == [3, 4]
    await store.append("s", [ev(5)])
    assert [e.data for e in await _take(got, 1)] == [{"n": 5}]
    await store.close()
    await asyncio.wait_for(task, WAIT)


async def test_subscribe_on_empty_store_waits_for_first_event(store: BaseEventStore) -> None:
    got: asyncio.Queue[RecordedEvent] = asyncio.Queue()
    task = asyncio.create_task(_collect(store, got))
    await store.append("s", [ev(1)])
    assert [e.position for e in await _take(got, 1)] == [1]
    await store.close()
    await asyncio.wait_for(task, WAIT)


# -- concurrency inside one process ------------------------------------------------


async def test_racing_tasks_exactly_one_wins_each_version(store: BaseEventStore) -> None:
    for expected in range(3):
        tries = [
            store.append("s", [ev(expected * 100 + t)], expected_version=expected)
            for t in range(20)
        ]
        results = await asyncio.gather(*tries, return_exceptions=True)
        winners = [r for r in results if isinstance(r, Appended)]
        losers = [r for r in results if isinstance(r, ConcurrencyError)]
        assert len(winners) == 1
        assert winners[0].version == expected + 1
        assert len(losers) == 19
        assert {(e.stream_id, e.expected, e.actual) for e in losers} == {
            ("s", expected, expected + 1)
        }
    assert await store.stream_version("s") == 3
    assert await store.head_position() == 3


async def test_retrying_writers_get_distinct_versions(store: BaseEventStore) -> None:
    conflicts: list[tuple[object, int, int]] = []

    async def writer(w: int) -> list[tuple[int, uuid.UUID]]:
        acks: list[tuple[int, uuid.UUID]] = []
        for i in range(4):
            event_id = uuid.uuid4()
            event = NewEvent("tick", {"w": w, "i": i}, id=event_id)
            while True:
                version = await store.stream_version("s")
                try:
                    result = await store.append("s", [event], expected_version=version)
                except ConcurrencyError as error:
                    conflicts.append((error.expected, error.actual, version))
                    continue
                assert isinstance(result, Appended)
                acks.append((result.version, event_id))
                break
        return acks

    acks = [a for w in await asyncio.gather(*(writer(w) for w in range(8))) for a in w]
    assert conflicts  # eight writers reading the same version must have collided
    assert all(expected == read < actual for expected, actual, read in conflicts)
    assert sorted(v for v, _ in acks) == list(range(1, 33))
    stored = {e.version: e.id for e in await store.read_stream("s")}
    assert stored == dict(acks)


async def test_group_commit_of_many_streams(store_url: str) -> None:
    calls = [0]

    def clock() -> datetime:
        calls[0] += 1
        return datetime.now(UTC)

    async with ledgerflow.open_store(store_url, clock=clock) as store:
        results = await asyncio.gather(
            *(store.append(f"s-{i}", [ev(i)], expected_version=NO_STREAM) for i in range(500))
        )
        assert all(isinstance(r, Appended) and r.version == 1 for r in results)
        assert sorted(p for r in results for p in r.positions) == list(range(1, 501))
        assert await store.head_position() == 500
        everything = await store.read_all()
        assert [e.position for e in everything] == list(range(1, 501))
        assert {e.stream_id: e.data["n"] for e in everything} == {f"s-{i}": i for i in range(500)}
        by_stream = {r.stream_id: r.positions for r in results}
        assert all(by_stream[e.stream_id] == (e.position,) for e in everything)
    # The clock is read once per commit: fewer commits than appends means grouping.
    assert calls[0] < 500


# -- durability and schema ---------------------------------------------------------


def _skip_memory(url: str) -> None:
    if url.startswith("memory"):
        pytest.skip("the memory backend keeps nothing after close, by design")


async def test_data_survives_close_and_reopen(store_url: str) -> None:
    _skip_memory(store_url)
    pair = [ev(1), ev(2)]
    async with ledgerflow.open_store(store_url) as store:
        first = await store.append("s", pair)
        await store.append("t", [ev(3)], metadata=Metadata(actor="a"))
        await store.save_snapshot(Snapshot("s", 2, "state", 1, b"st"))
        before = await store.read_all()
    async with ledgerflow.open_store(store_url) as store:
        assert await store.read_all() == before
        assert await store.head_position() == 3
        assert await store.stream_version("s") == 2
        snap = await store.load_snapshot("s")
        assert snap is not None
        assert snap.state == b"st"
        assert await store.append("s", pair) == AlreadyAppended("s", 2, first.positions)
        assert await store.append("s", [ev(4)], expected_version=2) == Appended("s", 3, (4,))
        assert (await store.read_stream("s"))[-1].prev_hash == before[1].hash


async def test_migrations_are_recorded_once(store_url: str) -> None:
    _skip_memory(store_url)
    async with ledgerflow.open_store(store_url) as store:
        await store.append("s", [ev(1)])
    recorded = migration_rows(store_url)
    assert recorded
    assert [r[0] for r in recorded] == list(range(1, len(recorded) + 1))
    assert all(r[1] for r in recorded)
    async with ledgerflow.open_store(store_url) as store:
        assert await store.head_position() == 1
    assert migration_rows(store_url) == recorded


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    from ledgerflow.store.sqlite import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url) as store:
        await store.append("s", [ev(1)])
    known = MIGRATIONS[-1].version
    con = sqlite3.connect(tmp_path / "ledger.db")
    con.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 'x')", (known + 1,))
    con.commit()
    con.close()
    store = ledgerflow.open_store(url)
    with pytest.raises(SchemaVersionError) as info:
        await store.open()
    await store.close()
    assert (info.value.found, info.value.known) == (known + 1, known)
    assert [r[0] for r in migration_rows(url)] == [*range(1, known + 1), known + 1]
    con = sqlite3.connect(tmp_path / "ledger.db")
    assert con.execute("SELECT count(*) FROM events").fetchone() == (1,)
    con.close()


async def test_failed_open_releases_what_it_took(tmp_path: Path) -> None:
    """close() after a failed open() must still release the threads and connections
    the attempt took (here: SQLite refusing a newer schema)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url):
        pass
    con = sqlite3.connect(tmp_path / "ledger.db")
    con.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 'x')")
    con.commit()
    con.close()
    threads_before = set(threading.enumerate())
    store = ledgerflow.open_store(url)
    with pytest.raises(SchemaVersionError):
        await store.open()
    await store.close()
    leftover = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert leftover == []


# -- a closed store ----------------------------------------------------------------


Use = Callable[[BaseEventStore], Any]

CLOSED_USES: dict[str, Use] = {
    "append": lambda s: s.append("s", [ev(1)]),
    "read_stream": lambda s: s.read_stream("s"),
    "read_all": lambda s: s.read_all(),
    "read_rows": lambda s: s.read_rows(),
    "stream_version": lambda s: s.stream_version("s"),
    "head_position": lambda s: s.head_position(),
    "stream_heads": lambda s: s.stream_heads(),
    "save_snapshot": lambda s: s.save_snapshot(Snapshot("s", 1, "t", 1, b"")),
    "load_snapshot": lambda s: s.load_snapshot("s"),
    "subscribe": lambda s: anext(s.subscribe()),
    "open": lambda s: s.open(),
}


@pytest.mark.parametrize("use", list(CLOSED_USES))
async def test_closed_store_refuses_use(store: BaseEventStore, use: str) -> None:
    await store.append("s", [ev(1)])
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(StoreClosedError):
        await CLOSED_USES[use](store)


async def test_close_commits_queued_appends(store_url: str) -> None:
    async with ledgerflow.open_store(store_url) as store:
        # gather starts its tasks in order: every append is queued before close runs.
        outcomes = await asyncio.gather(
            *(store.append(f"s{i}", [ev(i)]) for i in range(20)), store.close()
        )
    results = [r for r in outcomes[:-1] if isinstance(r, Appended)]
    assert len(results) == 20
    assert sorted(p for r in results for p in r.positions) == list(range(1, 21))
    if store_url.startswith("memory"):
        return
    async with ledgerflow.open_store(store_url) as store:
        assert await store.head_position() == 20


async def test_unopened_store_refuses_use(store_url: str) -> None:
    store = ledgerflow.open_store(store_url)
    with pytest.raises(StoreError, match="not open"):
        await store.append("s", [ev(1)])
    with pytest.raises(StoreError, match="not open"):
        await store.read_all()
    async with store:
        assert await store.head_position() == 0
