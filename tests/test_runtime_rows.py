"""Runtime rows (workflow instances and wake-ups), run on every backend.

They ride along with appends (``append(..., runtime=[...])``) and are written only
if the append is: see ``ledgerflow.store.runtime``. Times are plain integers
(microseconds); the store never reads a clock for them, so the tests pick them.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledgerflow
from ledgerflow import (
    AlreadyAppended,
    Appended,
    AppendResult,
    ConcurrencyError,
    DuplicateEventError,
    NewEvent,
    verify_ledger,
)
from ledgerflow.hashing import GENESIS_HASH, chain_hash
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store._runtime_rows import matches
from ledgerflow.store.runtime import (
    InstanceQuery,
    InstanceRow,
    Lease,
    Nudge,
    PutInstance,
    RuntimeWrite,
    Schedule,
    Unschedule,
    WakeupRow,
)

from ._adapters import open_adapter
from .conftest import pg_url, raw_sql

WAIT = 30.0
"""Guard against a hang, never an assertion about speed."""


def ev(n: int = 0) -> NewEvent:
    return NewEvent("noted", {"n": n}, id=uuid.uuid4())


def instance(
    workflow_id: str,
    status: str = "running",
    *,
    name: str = "order",
    version: int = 1,
    parent_id: str | None = None,
    created: int = 1_000,
    updated: int | None = None,
) -> InstanceRow:
    return InstanceRow(
        workflow_id,
        name,
        version,
        status,
        parent_id,
        created,
        created if updated is None else updated,
    )


async def write(store: BaseEventStore, *writes: RuntimeWrite, stream: str = "") -> AppendResult:
    """Append one event to a fresh stream (or ``stream``) carrying ``writes``."""
    return await store.append(stream or f"s-{uuid.uuid4().hex}", [ev()], runtime=writes)


async def due(store: BaseEventStore, *rows: tuple[str, int | None]) -> None:
    """Unleased wake-ups, one (workflow id, due time) each, in one append."""
    await write(store, *(Schedule(wid, at) for wid, at in rows))


def _skip_memory(url: str) -> None:
    if url.startswith("memory"):
        pytest.skip("the memory backend keeps nothing after close, by design")


def migration_versions(url: str) -> list[tuple[int, str]]:
    """``schema_migrations`` (version, name) as stored, read straight from the database."""
    rows = raw_sql(url, "SELECT version, name FROM {t}schema_migrations ORDER BY version")
    return [(v, n) for v, n in rows]


# -- instance rows -----------------------------------------------------------------


async def test_put_instance_inserts_then_updates_keeping_created_at(
    store: BaseEventStore,
) -> None:
    assert await store.get_instance("wf-1") is None
    await write(store, PutInstance(instance("wf-1", "running", created=100)))
    assert await store.get_instance("wf-1") == instance("wf-1", "running", created=100)

    changed = InstanceRow("wf-1", "renamed", 3, "completed", "parent-9", 999, 250)
    await write(store, PutInstance(changed))
    assert await store.get_instance("wf-1") == InstanceRow(
        "wf-1", "renamed", 3, "completed", "parent-9", 100, 250
    )
    # The parent can be cleared again; created_at stays the first one.
    await write(store, PutInstance(instance("wf-1", "failed", created=5, updated=300)))
    assert await store.get_instance("wf-1") == InstanceRow(
        "wf-1", "order", 1, "failed", None, 100, 300
    )
    assert await store.get_instance("wf-2") is None


async def test_get_instances_reads_many_rows_at_once(store: BaseEventStore) -> None:
    """One read for many instances (a client polling thousands of results), in
    statements of at most 500 ids; missing ids are left out, repeated ones once."""
    await write(
        store, *(PutInstance(instance(f"wf-{i}", "running", created=i)) for i in range(1200))
    )
    wanted = [f"wf-{i}" for i in range(0, 1300, 2)] + ["wf-0", "nobody", "wf-\u00e9"]
    found = await store.get_instances(wanted)
    assert sorted(r.workflow_id for r in found) == sorted(f"wf-{i}" for i in range(0, 1200, 2))
    assert {r.workflow_id: r for r in found}["wf-4"] == instance("wf-4", "running", created=4)
    assert await store.get_instances([]) == []
    with pytest.raises(ledgerflow.InvalidEventDataError):
        await store.get_instances([1])  # type: ignore[list-item]


async def test_instance_row_values_round_trip(store: BaseEventStore) -> None:
    row = InstanceRow("wf-é\u2028🙂", "naïve name", 2**31 - 1, "st", "p-🙂", 2**62, -(2**62))
    await write(store, PutInstance(row))
    assert await store.get_instance(row.workflow_id) == row


# -- wake-up rows ------------------------------------------------------------------


async def test_schedule_sets_due_time_and_lease_exactly_as_given(store: BaseEventStore) -> None:
    assert await store.get_wakeup("wf") is None
    # A new row with a lease starts at epoch 1; every Schedule with an owner takes the
    # next epoch, one without keeps it.
    await write(store, Schedule("wf", 500, "worker-a", 900))
    assert await store.get_wakeup("wf") == WakeupRow("wf", 500, "worker-a", 900, 1)
    # A later time replaces an earlier one (no min() as with Nudge) ...
    await write(store, Schedule("wf", 800))
    assert await store.get_wakeup("wf") == WakeupRow("wf", 800, None, None, 1)
    # ... and None waits for no time at all, with or without a lease.
    await write(store, Schedule("wf", None, "worker-b", 1_000))
    assert await store.get_wakeup("wf") == WakeupRow("wf", None, "worker-b", 1_000, 2)
    await write(store, Schedule("wf", 2**62))
    assert await store.get_wakeup("wf") == WakeupRow("wf", 2**62, None, None, 2)
    # Without a lease, a new row starts at epoch 0.
    await write(store, Schedule("unleased", 7))
    assert await store.get_wakeup("unleased") == WakeupRow("unleased", 7, None, None, 0)


async def test_nudge_makes_due_no_later_and_leaves_the_lease(store: BaseEventStore) -> None:
    # Absent: inserted, due at the nudge, held by nobody.
    await write(store, Nudge("new", 300))
    assert await store.get_wakeup("new") == WakeupRow("new", 300, None, None, 0)

    # A nudge keeps the lease's epoch too.
    await write(store, Schedule("wf", 500, "worker-a", 900))
    await write(store, Nudge("wf", 700))  # later than the due time: no change
    assert await store.get_wakeup("wf") == WakeupRow("wf", 500, "worker-a", 900, 1)
    await write(store, Nudge("wf", 200))  # earlier: moved forward, lease kept
    assert await store.get_wakeup("wf") == WakeupRow("wf", 200, "worker-a", 900, 1)

    await write(store, Schedule("waiting", None, "worker-b", 50))
    await write(store, Nudge("waiting", 10_000))  # no due time yet: takes the nudge's
    assert await store.get_wakeup("waiting") == WakeupRow("waiting", 10_000, "worker-b", 50, 1)


async def test_unschedule_deletes_the_wakeup_only(store: BaseEventStore) -> None:
    await write(
        store,
        PutInstance(instance("wf")),
        Schedule("wf", 100, "worker-a", 200),
        Schedule("other", 100),
    )
    await write(store, Unschedule("wf"))
    assert await store.get_wakeup("wf") is None
    assert await store.get_instance("wf") == instance("wf")
    assert await store.get_wakeup("other") == WakeupRow("other", 100, None, None)
    await write(store, Unschedule("never-scheduled"))  # nothing to delete: no error
    assert await store.get_wakeup("never-scheduled") is None


async def test_writes_of_one_append_apply_in_order(store: BaseEventStore) -> None:
    await write(store, Schedule("a", 10), Unschedule("a"), Nudge("a", 30))
    await write(store, Nudge("b", 5), Schedule("b", 100), Nudge("b", 50), Nudge("b", 70))
    await write(store, Schedule("c", 1), Schedule("c", 2), Unschedule("c"))
    await write(
        store,
        PutInstance(instance("d", "running", created=1)),
        Schedule("d", 9),
        PutInstance(instance("d", "waiting", created=2, updated=3)),
        Unschedule("d"),
        PutInstance(instance("d", "completed", created=4, updated=5)),
    )
    assert await store.get_wakeup("a") == WakeupRow("a", 30, None, None)
    assert await store.get_wakeup("b") == WakeupRow("b", 50, None, None)
    assert await store.get_wakeup("c") is None
    assert await store.get_wakeup("d") is None
    assert await store.get_instance("d") == instance("d", "completed", created=1, updated=5)


async def test_appends_of_one_batch_apply_in_queue_order(store: BaseEventStore) -> None:
    results = await asyncio.gather(
        *(write(store, Schedule("wf", 10 * i), Nudge(f"n{i % 3}", 100 - i)) for i in range(1, 31))
    )
    assert all(isinstance(r, Appended) for r in results)
    assert await store.get_wakeup("wf") == WakeupRow("wf", 300, None, None)
    assert [await store.get_wakeup(f"n{k}") for k in range(3)] == [
        WakeupRow("n0", 70, None, None),
        WakeupRow("n1", 72, None, None),
        WakeupRow("n2", 71, None, None),
    ]


# -- written only with the events --------------------------------------------------


async def test_refused_appends_write_no_runtime_rows(store: BaseEventStore) -> None:
    events = [ev(1), ev(2)]
    await store.append("s", events, runtime=[Schedule("kept", 10)])

    with pytest.raises(ConcurrencyError):
        await store.append("s", [ev(3)], expected_version=0, runtime=[Schedule("c", 1)])
    repeat = await store.append("s", events, runtime=[Schedule("kept", 99), Schedule("r", 1)])
    assert repeat == AlreadyAppended("s", 2, (1, 2))
    reused = NewEvent("noted", {"other": True}, id=events[0].id)
    with pytest.raises(DuplicateEventError):
        await store.append("t", [reused], runtime=[PutInstance(instance("d"))])

    assert await store.get_wakeup("kept") == WakeupRow("kept", 10, None, None)
    assert await store.get_wakeup("c") is None
    assert await store.get_wakeup("r") is None
    assert await store.get_instance("d") is None
    assert await store.head_position() == 2


async def test_in_one_batch_only_the_appended_requests_write_their_rows(
    store_url: str,
) -> None:
    batches = 0

    def clock() -> datetime:
        # Read once per group-commit batch: counts them.
        nonlocal batches
        batches += 1
        return datetime(2025, 1, 1, tzinfo=UTC)

    async with open_adapter(store_url, clock=clock) as store:
        events = [ev(1)]
        await store.append("s", events, runtime=[Schedule("first", 1)])
        before = batches
        # gather queues every append before the writer task next runs: one batch.
        outcomes = await asyncio.gather(
            store.append("a", [ev(2)], runtime=[Schedule("a", 2), PutInstance(instance("a"))]),
            store.append("s", [ev(3)], expected_version=0, runtime=[Schedule("conflict", 3)]),
            store.append("s", events, runtime=[Schedule("first", 99), Schedule("repeat", 4)]),
            store.append("b", [ev(5)], runtime=[Nudge("first", 0), Schedule("b", 5)]),
            store.append(
                "s", [ev(6)], expected_version=1, runtime=[PutInstance(instance("s-next"))]
            ),
            store.append("s", [ev(7)], expected_version=1, runtime=[Schedule("stale", 7)]),
            return_exceptions=True,
        )
        assert batches == before + 1

        assert outcomes[0] == Appended("a", 1, (2,))
        assert isinstance(outcomes[1], ConcurrencyError)
        assert outcomes[2] == AlreadyAppended("s", 1, (1,))
        assert outcomes[3] == Appended("b", 1, (3,))
        assert outcomes[4] == Appended("s", 2, (4,))
        assert isinstance(outcomes[5], ConcurrencyError)  # version 1 was taken just before

        assert await store.get_wakeup("a") == WakeupRow("a", 2, None, None)
        assert await store.get_instance("a") == instance("a")
        assert await store.get_wakeup("b") == WakeupRow("b", 5, None, None)
        assert await store.get_wakeup("first") == WakeupRow("first", 0, None, None)
        assert await store.get_instance("s-next") == instance("s-next")
        for absent in ("conflict", "repeat", "stale"):
            assert await store.get_wakeup(absent) is None


async def test_runtime_rows_without_events_are_guarded_by_the_stream_version(
    store: BaseEventStore,
) -> None:
    await store.append("wf", [ev(1), ev(2)], runtime=[Schedule("wf", 10)])

    done = await store.append("wf", [], expected_version=2, runtime=[Schedule("wf", 20, "w", 30)])
    assert done == Appended("wf", 2, ())
    assert await store.get_wakeup("wf") == WakeupRow("wf", 20, "w", 30, 1)
    with pytest.raises(ConcurrencyError):
        await store.append("wf", [], expected_version=1, runtime=[Unschedule("wf")])
    assert await store.get_wakeup("wf") == WakeupRow("wf", 20, "w", 30, 1)
    # Nothing was appended by either.
    assert await store.head_position() == 2
    assert await store.stream_version("wf") == 2

    # Version 0: the stream must not exist yet, and still does not afterwards.
    fresh = await store.append("nothing", [], expected_version=0, runtime=[Nudge("n", 5)])
    assert fresh == Appended("nothing", 0, ())
    assert await store.get_wakeup("n") == WakeupRow("n", 5, None, None)
    with pytest.raises(ledgerflow.StreamNotFoundError):
        await store.read_stream("nothing")

    # Without an exact version there is nothing to guard with.
    for loose in (ledgerflow.ANY, ledgerflow.NO_STREAM, ledgerflow.STREAM_EXISTS):
        with pytest.raises(ledgerflow.InvalidEventDataError):
            await store.append("wf", [], expected_version=loose, runtime=[Unschedule("wf")])
    assert await store.get_wakeup("wf") == WakeupRow("wf", 20, "w", 30, 1)


async def test_guarded_writes_in_one_batch_see_the_appends_before_them(
    store: BaseEventStore,
) -> None:
    await store.append("wf", [ev(1)])
    outcomes = await asyncio.gather(
        store.append("wf", [], expected_version=1, runtime=[Schedule("first", 1)]),
        store.append("wf", [ev(2)], expected_version=1, runtime=[Schedule("wf", 2)]),
        store.append("wf", [], expected_version=1, runtime=[Schedule("stale", 3)]),
        store.append("wf", [], expected_version=2, runtime=[Schedule("wf", 4, "w", 9)]),
        store.append("other", [], expected_version=0, runtime=[PutInstance(instance("o"))]),
        return_exceptions=True,
    )
    assert outcomes[0] == Appended("wf", 1, ())
    assert outcomes[1] == Appended("wf", 2, (2,))
    assert isinstance(outcomes[2], ConcurrencyError)
    assert outcomes[3] == Appended("wf", 2, ())
    assert outcomes[4] == Appended("other", 0, ())
    assert await store.get_wakeup("first") == WakeupRow("first", 1, None, None)
    assert await store.get_wakeup("stale") is None
    assert await store.get_wakeup("wf") == WakeupRow("wf", 4, "w", 9, 1)
    assert await store.get_instance("o") == instance("o")
    assert await store.head_position() == 2


async def test_a_batch_of_guarded_writes_alone_is_committed(store_url: str) -> None:
    async with open_adapter(store_url) as store:
        await store.append("wf", [ev(1)])
        outcomes = await asyncio.gather(
            *(
                store.append("wf", [], expected_version=1, runtime=[Schedule(f"wf-{i}", i)])
                for i in range(5)
            )
        )
        assert outcomes == [Appended("wf", 1, ())] * 5
        for i in range(5):
            assert await store.get_wakeup(f"wf-{i}") == WakeupRow(f"wf-{i}", i, None, None)
    if store_url.startswith("memory"):
        return
    async with open_adapter(store_url) as store:
        assert await store.next_wakeup() == 0
        assert await store.head_position() == 1


# -- claiming ----------------------------------------------------------------------


async def test_claim_takes_due_rows_earliest_first_and_leases_them(
    store: BaseEventStore,
) -> None:
    await due(store, ("late", 300), ("b", 100), ("a", 100), ("early", 50), ("idle", None))
    await due(store, ("now", 200), ("future", 201))

    claimed = await store.claim_wakeups("w1", now_us=200, lease_until_us=1_000, limit=10)
    # due_at <= now, by (due_at, id); each claim takes the row's next epoch.
    assert claimed == [Lease("early", 1), Lease("a", 1), Lease("b", 1), Lease("now", 1)]
    for wid, at in [("early", 50), ("a", 100), ("b", 100), ("now", 200)]:
        assert await store.get_wakeup(wid) == WakeupRow(wid, at, "w1", 1_000, 1)
    for wid, maybe in [("late", 300), ("future", 201), ("idle", None)]:
        assert await store.get_wakeup(wid) == WakeupRow(wid, maybe, None, None, 0)

    # Held rows are nobody's to take, not even their holder's, until the lease ends.
    assert await store.claim_wakeups("w1", now_us=200, lease_until_us=2_000, limit=10) == []
    assert await store.claim_wakeups("w2", now_us=300, lease_until_us=2_000, limit=10) == [
        Lease("future", 1),
        Lease("late", 1),
    ]
    assert await store.claim_wakeups("w3", now_us=10**15, lease_until_us=1, limit=10) == [
        Lease("early", 2),
        Lease("a", 2),
        Lease("b", 2),
        Lease("now", 2),
        Lease("future", 2),
        Lease("late", 2),
    ]
    assert await store.get_wakeup("idle") == WakeupRow("idle", None, None, None, 0)


async def test_claim_respects_the_limit_in_order(store: BaseEventStore) -> None:
    await due(store, *((f"wf-{i:02}", 100 - i // 2) for i in range(10)))
    order = sorted((f"wf-{i:02}" for i in range(10)), key=lambda w: (100 - int(w[3:]) // 2, w))

    assert await store.claim_wakeups("w", now_us=100, lease_until_us=500, limit=0) == []
    assert await store.claim_wakeups("w", now_us=100, lease_until_us=500, limit=-1) == []
    got = [
        await store.claim_wakeups(f"w{k}", now_us=100, lease_until_us=500, limit=3)
        for k in range(5)
    ]
    first = [[Lease(wid, 1) for wid in part] for part in (order[0:3], order[3:6], order[6:9])]
    assert got == [*first, [Lease(order[9], 1)], []]


async def test_a_lease_ends_strictly_after_lease_until(store: BaseEventStore) -> None:
    await due(store, ("wf", 100))
    claim = await store.claim_wakeups("w1", now_us=100, lease_until_us=500, limit=1)
    assert claim == [Lease("wf", 1)]
    assert await store.claim_wakeups("w2", now_us=499, lease_until_us=900, limit=1) == []
    assert await store.claim_wakeups("w2", now_us=500, lease_until_us=900, limit=1) == []
    claim = await store.claim_wakeups("w2", now_us=501, lease_until_us=900, limit=1)
    assert claim == [Lease("wf", 2)]
    assert await store.get_wakeup("wf") == WakeupRow("wf", 100, "w2", 900, 2)


async def test_scheduled_and_nudged_leases_hold_off_claims(store: BaseEventStore) -> None:
    # A runner that rescheduled its own instance keeps the lease it wrote.
    await write(store, Schedule("held", 10, "runner", 400))
    # A nudge makes a held instance due sooner but does not take it from its holder.
    await write(store, Schedule("nudged", 1_000, "runner", 400), Nudge("nudged", 20))
    # A lease is an owner and an end, or nothing: half a lease cannot be written.
    with pytest.raises(ValueError, match="lease"):
        Schedule("stuck", 10, "runner", None)

    assert await store.claim_wakeups("other", now_us=400, lease_until_us=900, limit=9) == []
    # Both were written with a lease (epoch 1); the claim takes the next.
    assert await store.claim_wakeups("other", now_us=401, lease_until_us=900, limit=9) == [
        Lease("held", 2),
        Lease("nudged", 2),
    ]
    assert await store.get_wakeup("nudged") == WakeupRow("nudged", 20, "other", 900, 2)
    # next_wakeup names the first instant a claim can succeed: after the lease ends.
    assert await store.next_wakeup() == 901


async def test_concurrent_claimers_never_share_a_row(store: BaseEventStore) -> None:
    ids = [f"wf-{i:03}" for i in range(120)]
    await due(store, *((wid, i % 7) for i, wid in enumerate(ids)))
    # Half of them were held by a worker whose lease has run out.
    dead = await store.claim_wakeups("dead", now_us=10, lease_until_us=50, limit=60)
    assert [lease.epoch for lease in dead] == [1] * 60
    held_before = {lease.workflow_id for lease in dead}

    async with asyncio.timeout(WAIT):
        claims = await asyncio.gather(
            *(
                store.claim_wakeups(f"w{k}", now_us=100, lease_until_us=1_000, limit=4)
                for k in range(40)
            )
        )
    claimed = [lease.workflow_id for batch in claims for lease in batch]
    assert all(len(batch) <= 4 for batch in claims)
    assert len(claimed) == len(set(claimed))
    rest = await store.claim_wakeups("late", now_us=100, lease_until_us=1_000, limit=1_000)
    assert sorted(claimed + [lease.workflow_id for lease in rest]) == ids
    for k, batch in enumerate(claims):
        for lease in batch:
            # The next epoch after the dead worker's, where it held the row.
            assert lease.epoch == (2 if lease.workflow_id in held_before else 1)
            row = await store.get_wakeup(lease.workflow_id)
            assert row is not None
            assert (row.lease_owner, row.lease_until_us, row.lease_epoch) == (
                f"w{k}",
                1_000,
                lease.epoch,
            )


async def test_claims_from_two_postgres_stores_never_overlap(pg_schema: str) -> None:
    url = pg_url(pg_schema)
    ids = [f"wf-{i:04}" for i in range(400)]
    async with open_adapter(url) as one, open_adapter(url) as two:
        for start in range(0, len(ids), 100):
            await due(one, *((wid, int(wid[3:]) % 11) for wid in ids[start : start + 100]))

        async def worker(store: BaseEventStore, owner: str) -> list[str]:
            mine: list[str] = []
            while batch := await store.claim_wakeups(
                owner, now_us=100, lease_until_us=10_000, limit=3
            ):
                assert len(batch) <= 3
                assert all(lease.epoch == 1 for lease in batch)  # each row's first claim
                mine.extend(lease.workflow_id for lease in batch)
            return mine

        workers = [(s, f"{name}-{k}") for s, name in ((one, "one"), (two, "two")) for k in range(6)]
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*(worker(s, owner) for s, owner in workers))
        owners = [owner for _, owner in workers]
        claimed = [wid for mine in results for wid in mine]
        assert sorted(claimed) == ids  # every row, each exactly once
        for owner, mine in zip(owners, results, strict=True):
            for wid in mine:
                row = WakeupRow(wid, int(wid[3:]) % 11, owner, 10_000, 1)
                assert await two.get_wakeup(wid) == row
        # Both stores took part: the claims really ran side by side.
        assert any(results[:6])
        assert any(results[6:])


# -- next wake-up and release ------------------------------------------------------


async def test_next_wakeup_counts_held_rows_from_when_their_lease_ends(
    store: BaseEventStore,
) -> None:
    assert await store.next_wakeup() is None
    await due(store, ("idle", None))
    await write(store, Schedule("held-idle", None, "w", 5))
    assert await store.next_wakeup() is None

    await due(store, ("free", 500))
    assert await store.next_wakeup() == 500
    await write(store, Schedule("held-long", 100, "w", 800))  # claimable after its lease
    assert await store.next_wakeup() == 500
    await write(store, Schedule("held-short", 100, "w", 300))
    assert await store.next_wakeup() == 301
    await write(store, Schedule("held-past", 250, "w", 40))  # lease over: its due time
    assert await store.next_wakeup() == 250
    await write(store, Nudge("free", 7))
    assert await store.next_wakeup() == 7
    await write(store, Unschedule("free"), Unschedule("held-past"))
    assert await store.next_wakeup() == 301


async def test_release_by_owner_and_all(store: BaseEventStore) -> None:
    await due(store, *((f"wf-{i}", i) for i in range(6)), ("idle", None))
    assert await store.claim_wakeups("a", now_us=10, lease_until_us=900, limit=2) == [
        Lease("wf-0", 1),
        Lease("wf-1", 1),
    ]
    assert await store.claim_wakeups("b", now_us=10, lease_until_us=900, limit=3) == [
        Lease("wf-2", 1),
        Lease("wf-3", 1),
        Lease("wf-4", 1),
    ]
    await write(store, Schedule("idle", None, "a", 900))

    assert await store.release_wakeups("nobody") == 0
    assert await store.release_wakeups("a") == 3
    # A release keeps the epoch.
    assert await store.get_wakeup("wf-0") == WakeupRow("wf-0", 0, None, None, 1)
    assert await store.get_wakeup("idle") == WakeupRow("idle", None, None, None, 1)
    assert await store.get_wakeup("wf-2") == WakeupRow("wf-2", 2, "b", 900, 1)
    assert await store.release_wakeups("a") == 0
    # Released rows are claimable at once; b's are not.
    assert await store.claim_wakeups("c", now_us=10, lease_until_us=900, limit=9) == [
        Lease("wf-0", 2),
        Lease("wf-1", 2),
        Lease("wf-5", 1),
    ]

    assert await store.release_wakeups() == 6
    assert await store.release_wakeups() == 0
    epochs = [2, 2, 1, 1, 1, 1]
    for i in range(6):
        row = WakeupRow(f"wf-{i}", i, None, None, epochs[i])
        assert await store.get_wakeup(f"wf-{i}") == row
    assert await store.next_wakeup() == 0


# -- listing -----------------------------------------------------------------------


async def test_list_instances_in_code_point_order_with_paging_and_status(
    store: BaseEventStore,
) -> None:
    ids = ["b", "B", "a", "_x", "é", "Z", "a-1", "a_1", "10", "9", "a\u00e9", "🙂"]
    statuses = itertools.cycle(["running", "completed", "running", "failed"])
    rows = [instance(wid, next(statuses), created=i) for i, wid in enumerate(ids)]
    await write(store, *(PutInstance(r) for r in rows))
    by_id = sorted(rows, key=lambda r: r.workflow_id)

    assert await store.list_instances() == by_id
    assert await store.list_instances(limit=0) == []
    assert await store.list_instances(after="a") == [r for r in by_id if r.workflow_id > "a"]
    assert await store.list_instances(after="\U0010ffff") == []

    pages: list[list[InstanceRow]] = []
    after: str | None = None
    while page := await store.list_instances(after=after, limit=5):
        pages.append(page)
        after = page[-1].workflow_id
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [r for p in pages for r in p] == by_id

    running = [r for r in by_id if r.status == "running"]
    assert await store.list_instances(status="running") == running
    assert await store.list_instances(status="running", limit=2) == running[:2]
    assert (
        await store.list_instances(status="running", after=running[1].workflow_id, limit=2)
        == running[2:4]
    )
    assert await store.list_instances(status="failed") == [r for r in by_id if r.status == "failed"]
    assert await store.list_instances(status="unknown") == []

    # A status change moves the row between filters.
    await write(store, PutInstance(instance("b", "completed", created=77, updated=88)))
    assert "b" not in [r.workflow_id for r in await store.list_instances(status="running")]
    assert "b" in [r.workflow_id for r in await store.list_instances(status="completed")]


# A population that trips naive filters: LIKE wildcards and the escape in ids and
# names, ASCII and non-ASCII case variants, tenant prefixes, ties on creation time.
POPULATION = [
    instance(wid, status, name=name, created=created)
    for wid, status, name, created in [
        ("acme/ord-1", "running", "order", 10),
        ("acme/ord-2", "completed", "order", 20),
        ("acme/Ord-3", "failed", "Order", 20),
        ("acme/refund-1", "running", "refund", 30),
        ("acme-eu/ord-1", "running", "order", 15),
        ("acme_/x", "stuck", "order", 25),
        ("acmeX/x", "running", "order", 25),
        ("ac%e/x", "running", "pay%ment", 5),
        ("back\\slash", "running", "order_v2", 40),
        ("plain", "completed", "ordervv2", 40),
        ("émile/ord", "running", "Émission", 50),
        ("ÉMILE/ord", "running", "émission", 50),
        ("🙂/ord", "running", "order", 60),
        ("\U0010ffff/z", "running", "order", 60),
        ("zeta", "running", "ORDER", 70),
        ("summer", "completed", "Été", 1),
    ]
]


async def put_population(store: BaseEventStore) -> None:
    if await store.get_instance(POPULATION[0].workflow_id) is None:
        await write(store, *(PutInstance(r) for r in POPULATION))


def expected(query: InstanceQuery, after: str | None = None) -> list[InstanceRow]:
    """The model: which rows a query lists, and in what order."""
    rows = [r for r in POPULATION if matches(r, query)]
    if query.newest_first:
        rows.sort(key=lambda r: (r.created_at_us, r.workflow_id), reverse=True)
        if after is not None:
            mark = next(r for r in POPULATION if r.workflow_id == after)
            rows = [
                r for r in rows if (r.created_at_us, r.workflow_id) < (mark.created_at_us, after)
            ]
    else:
        rows.sort(key=lambda r: r.workflow_id)
        rows = [r for r in rows if after is None or r.workflow_id > after]
    return rows


async def listed(store: BaseEventStore, query: InstanceQuery, *, page: int) -> list[InstanceRow]:
    """Every page of ``query``, each after the last id of the one before."""
    rows: list[InstanceRow] = []
    after: str | None = None
    while chunk := await store.list_instances(query=query, after=after, limit=page):
        assert len(chunk) <= page
        rows += chunk
        after = chunk[-1].workflow_id
    return rows


def ids(rows: list[InstanceRow]) -> list[str]:
    return [r.workflow_id for r in rows]


async def test_list_instances_by_each_filter(store: BaseEventStore) -> None:
    await put_population(store)

    async def listing(**fields: Any) -> list[str]:
        return ids(await store.list_instances(query=InstanceQuery(**fields), limit=100))

    # A tenant's prefix is a range, not a pattern: "acme_/" holds no wildcard.
    assert await listing(id_prefix="acme/") == [
        "acme/Ord-3",
        "acme/ord-1",
        "acme/ord-2",
        "acme/refund-1",
    ]
    assert await listing(id_prefix="acme_/") == ["acme_/x"]
    assert await listing(id_prefix="ac%") == ["ac%e/x"]
    assert await listing(id_prefix="\U0010ffff") == ["\U0010ffff/z"]
    assert await listing(id_prefix="") == ids(sorted(POPULATION, key=lambda r: r.workflow_id))
    assert await listing(id_prefix="nobody/") == []

    assert await listing(name="Order") == ["acme/Ord-3"]
    assert await listing(name="order", status="running", id_prefix="acme") == [
        "acme-eu/ord-1",
        "acme/ord-1",
        "acmeX/x",
    ]

    # Text: a substring of the id or the name, ASCII letters in either case, and
    # the wildcards and the escape as themselves.
    assert await listing(text="ORD-") == ["acme-eu/ord-1", "acme/Ord-3", "acme/ord-1", "acme/ord-2"]
    assert await listing(text="%") == ["ac%e/x"]
    assert await listing(text="_v") == ["back\\slash"]
    assert await listing(text="\\") == ["back\\slash"]
    assert await listing(text="refund") == ["acme/refund-1"]
    # Within the prefix asked for, the id is searched after it (a tenant's "acme/"
    # matched every id of the tenant for "cme" or "e/").
    assert await listing(id_prefix="acme/", text="cme") == []
    assert await listing(id_prefix="acme/", text="e/") == []
    assert await listing(id_prefix="acme/", text="ord-") == [
        "acme/Ord-3",
        "acme/ord-1",
        "acme/ord-2",
    ]
    assert await listing(id_prefix="émile/", text="ÉMILE") == []
    # Non-ASCII letters match as written only (both backends' LIKE folds ASCII).
    assert await listing(text="émi") == ["ÉMILE/ord", "émile/ord"]
    assert await listing(text="Émi") == ["ÉMILE/ord", "émile/ord"]
    assert await listing(text="ÉMILE") == ["ÉMILE/ord"]
    assert await listing(text="été") == []
    assert await listing(text="ÉTÉ") == []
    assert await listing(text="Été") == ["summer"]

    assert await listing(created_from_us=40, created_before_us=60) == [
        "back\\slash",
        "plain",
        "ÉMILE/ord",
        "émile/ord",
    ]
    assert await listing(created_before_us=10) == ["ac%e/x", "summer"]

    # Newest first, ties by id descending.
    assert (await listing(newest_first=True))[:5] == [
        "zeta",
        "\U0010ffff/z",
        "🙂/ord",
        "émile/ord",
        "ÉMILE/ord",
    ]
    assert await listing(newest_first=True, created_from_us=20, created_before_us=26) == [
        "acme_/x",
        "acmeX/x",
        "acme/ord-2",
        "acme/Ord-3",
    ]

    with pytest.raises(ledgerflow.LedgerflowError, match="status"):
        await store.list_instances(status="running", query=InstanceQuery(status="failed"))
    with pytest.raises(ledgerflow.LedgerflowError, match="NUL"):
        await store.list_instances(query=InstanceQuery(text="a\x00"))
    with pytest.raises(ledgerflow.LedgerflowError, match="created_from_us"):
        await store.list_instances(query=InstanceQuery(created_from_us=2**64))


async def test_newest_first_pages_resume_after_the_last_row_even_among_ties(
    store: BaseEventStore,
) -> None:
    await put_population(store)
    query = InstanceQuery(newest_first=True)
    for page in (1, 2, 3, 7):
        assert ids(await listed(store, query, page=page)) == ids(expected(query))
    # A page mark that no longer exists lists nothing, on every backend alike.
    assert await store.list_instances(query=query, after="gone") == []


QUERIES = st.builds(
    InstanceQuery,
    status=st.none() | st.sampled_from(["running", "completed", "failed", "stuck"]),
    name=st.none() | st.sampled_from(["order", "Order", "ORDER", "refund", "pay%ment"]),
    id_prefix=st.none()
    | st.sampled_from(["", "acme", "acme/", "acme_", "ac%", "é", "É", "\U0010ffff", "zz"])
    | st.text(max_size=3).filter(lambda t: "\x00" not in t),  # NUL is refused (tested apart)
    text=st.none()
    | st.text(alphabet="aAoOrRdD%_\\/-éÉ1🙂mMeEtT", max_size=3).filter(lambda t: "\x00" not in t),
    created_from_us=st.none() | st.integers(0, 80),
    created_before_us=st.none() | st.integers(0, 80),
    newest_first=st.booleans(),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(query=QUERIES, page=st.integers(1, 6))
async def test_list_instances_agrees_with_the_model(
    store: BaseEventStore, query: InstanceQuery, page: int
) -> None:
    await put_population(store)
    assert await listed(store, query, page=page) == expected(query)


# -- durability and schema ---------------------------------------------------------


async def test_runtime_rows_survive_close_and_reopen(store_url: str) -> None:
    _skip_memory(store_url)
    async with open_adapter(store_url) as store:
        await write(
            store,
            PutInstance(instance("wf-1", parent_id="root", created=5, updated=6)),
            Schedule("wf-1", 100, "w", 900),
            Schedule("wf-2", None),
        )
    async with open_adapter(store_url) as store:
        assert await store.get_instance("wf-1") == instance(
            "wf-1", parent_id="root", created=5, updated=6
        )
        assert await store.get_wakeup("wf-1") == WakeupRow("wf-1", 100, "w", 900, 1)
        assert await store.get_wakeup("wf-2") == WakeupRow("wf-2", None, None, None, 0)
        assert await store.next_wakeup() == 901
        assert await store.release_wakeups() == 1
    async with open_adapter(store_url) as store:
        assert await store.get_wakeup("wf-1") == WakeupRow("wf-1", 100, None, None, 1)


async def test_migration_2_is_recorded(store_url: str) -> None:
    _skip_memory(store_url)
    async with open_adapter(store_url) as store:
        await write(store, PutInstance(instance("wf")))
    recorded = migration_versions(store_url)
    # 4 is the registry of workers on SQLite, 5 task queues, 6 guarded resources, 7
    # projections, 8 an index by creation time, 9 the audit tables, 10 the tasks'
    # recorded attempts and 11 their hand-backs; on PostgreSQL 4 is the global order
    # by transaction visibility, then one more each.
    last = 12 if "postgres" in store_url else 11
    assert [v for v, _ in recorded] == list(range(1, last + 1))
    assert recorded[1][1] == "workflow instances and wake-ups"
    assert recorded[2][1] == "lease epochs (fencing)"
    assert recorded[-8][1] == "the registry of workers"
    assert recorded[-7][1] == "task queues"
    assert recorded[-6][1] == "guarded resources: breakers, rate limits, bulkheads"
    assert recorded[-5][1] == "projections: checkpoints, leases, failures"
    assert recorded[-4][1] == "instances listed newest first"
    assert recorded[-3][1] == "audit: Merkle tiles, checkpointed tree heads, personal-data keys"
    assert recorded[-2][1] == "task attempts lost with their workers"
    assert recorded[-1][1] == "task attempts handed back unfinished"


async def test_sqlite_database_at_schema_1_is_upgraded_on_open(tmp_path: Path) -> None:
    from ledgerflow.store.sqlite import MIGRATIONS

    path = tmp_path / "old.db"
    first = MIGRATIONS[0]
    assert first.version == 1
    # Build the database exactly as the release that knew only migration 1 left it,
    # with one event in it.
    event_id, at = uuid.uuid4(), 1_700_000_000_000_000
    data, metadata = b'{"n":1}', b"{}"
    digest = chain_hash(GENESIS_HASH, event_id, "s", 1, 1, "noted", 1, data, metadata, at)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute(
            "CREATE TABLE schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for statement in first.statements:
            con.execute(statement)
        con.execute(
            "INSERT INTO schema_migrations VALUES (1, ?, '2024-01-01T00:00:00+00:00')",
            (first.name,),
        )
        con.execute(
            "INSERT INTO events VALUES (1, ?, 's', 1, 'noted', 1, ?, ?, ?, ?, ?)",
            (str(event_id), data, metadata, at, GENESIS_HASH, digest),
        )
        con.execute("INSERT INTO streams VALUES ('s', 1, ?, 1)", (digest,))
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    assert "wakeups" not in tables

    url = f"sqlite:///{path}"
    async with open_adapter(url) as store:
        [event] = await store.read_stream("s")
        assert (event.id, event.data, event.hash) == (event_id, {"n": 1}, digest)
        assert (await verify_ledger(store)).ok
        assert await store.get_wakeup("wf") is None
        assert await store.list_instances() == []
        result = await store.append(
            "s",
            [ev(2)],
            expected_version=1,
            runtime=[Schedule("wf", 5), PutInstance(instance("wf"))],
        )
        assert result == Appended("s", 2, (2,))
        assert await store.claim_wakeups("w", now_us=5, lease_until_us=9, limit=1) == [
            Lease("wf", 1)
        ]
        assert await store.get_wakeup("wf") == WakeupRow("wf", 5, "w", 9, 1)
        assert (await verify_ledger(store)).ok
    assert migration_versions(url) == [
        (1, first.name),
        (2, MIGRATIONS[1].name),
        (3, MIGRATIONS[2].name),
        (4, MIGRATIONS[3].name),
        (5, MIGRATIONS[4].name),
        (6, MIGRATIONS[5].name),
        (7, MIGRATIONS[6].name),
        (8, MIGRATIONS[7].name),
        (9, MIGRATIONS[8].name),
        (10, MIGRATIONS[9].name),
        (11, MIGRATIONS[10].name),
    ]


# -- the store must be open --------------------------------------------------------

RuntimeUse = Callable[[BaseEventStore], Any]

RUNTIME_USES: dict[str, RuntimeUse] = {
    "claim_wakeups": lambda s: s.claim_wakeups("w", now_us=1, lease_until_us=2, limit=1),
    "next_wakeup": lambda s: s.next_wakeup(),
    "release_wakeups": lambda s: s.release_wakeups(),
    "get_wakeup": lambda s: s.get_wakeup("wf"),
    "get_instance": lambda s: s.get_instance("wf"),
    "list_instances": lambda s: s.list_instances(),
}


@pytest.mark.parametrize("use", list(RUNTIME_USES))
async def test_closed_store_refuses_runtime_calls(store: BaseEventStore, use: str) -> None:
    await store.close()
    with pytest.raises(ledgerflow.StoreClosedError):
        await RUNTIME_USES[use](store)


async def test_lease_owners_lists_who_holds_leases(store: BaseEventStore) -> None:
    assert await store.lease_owners() == []
    await write(store, Schedule("a", 1, "w2", 50), Schedule("b", 2, "w1", 50), Schedule("c", 3))
    await write(store, Schedule("d", 4, "w2", 60))
    assert await store.lease_owners() == ["w1", "w2"]
    await store.release_wakeups("w2")
    assert await store.lease_owners() == ["w1"]
