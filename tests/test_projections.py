"""Projections on every backend: read models built from the log, writes and checkpoint
in one fenced transaction, failures that stop (retry, skip), one runner at a time."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledgerflow as lf
from ledgerflow.projections import Projection, ProjectionRunner, ReadModel, Table, View
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter


@dataclass(frozen=True)
class Placed:
    customer: str
    amount_cents: int


@dataclass(frozen=True)
class Approved:
    approver: str


@dataclass(frozen=True)
class Cancelled:
    reason: str


@dataclass(frozen=True)
class Noise:
    n: int


ORDERS = Table(
    "orders",
    key="order_id",
    columns={
        "order_id": str,
        "status": str,
        "customer": str,
        "amount_cents": int,
        "approver": str | None,
        "notes": dict,
    },
    indexes=("status", "customer"),
)


def orders_projection(fail_on: set[str] | None = None, name: str = "orders") -> Projection:
    p = Projection(name, tables=[ORDERS])

    @p.on(Placed)
    def placed(event: lf.RecordedEvent, view: View) -> None:
        if fail_on and event.stream_id in fail_on:
            raise ValueError(f"cannot project {event.stream_id}")
        view.put(
            ORDERS,
            {
                "order_id": event.stream_id,
                "status": "placed",
                "customer": event.data.customer,
                "amount_cents": event.data.amount_cents,
                "notes": {"placed_at": event.position},
            },
        )

    @p.on(Approved)
    async def approved(event: lf.RecordedEvent, view: View) -> None:
        row = await view.get(ORDERS, event.stream_id)
        assert row is not None, "approved before placed"
        view.update(ORDERS, event.stream_id, status="approved", approver=event.data.approver)

    @p.on("test.cancelled")
    def cancelled(event: lf.RecordedEvent, view: View) -> None:
        view.delete(ORDERS, event.stream_id)

    return p


@pytest.fixture
async def ledger(store_url: str) -> Any:
    registry = lf.EventRegistry()
    registry.register(Placed, "test.placed")
    registry.register(Approved, "test.approved")
    registry.register(Cancelled, "test.cancelled")
    registry.register(Noise, "test.noise")
    async with open_adapter(store_url, registry=registry) as store:
        yield store


async def test_a_projection_builds_its_read_model_and_checkpoint(ledger: BaseEventStore) -> None:
    await ledger.append("o-1", [Placed("acme", 500), Approved("alice")])
    await ledger.append("o-2", [Placed("bob", 70)])
    await ledger.append("noise", [Noise(1), Noise(2)])
    await ledger.append("o-3", [Placed("acme", 900), Cancelled("dup")])
    projection = orders_projection()
    runner = ProjectionRunner(ledger, [projection], batch_size=3)
    assert await runner.catch_up() == 5  # the noise is read past, not handled
    model = ReadModel(ledger, projection)
    assert await model.get(ORDERS, "o-1") == {
        "order_id": "o-1",
        "status": "approved",
        "customer": "acme",
        "amount_cents": 500,
        "approver": "alice",
        "notes": {"placed_at": 1},
    }
    assert await model.get(ORDERS, "o-3") is None
    placed = await model.select(ORDERS, where={"status": "placed"})
    assert [r["order_id"] for r in placed] == ["o-2"]
    by_amount = await model.select(ORDERS, order_by="amount_cents", descending=True)
    assert [r["order_id"] for r in by_amount] == ["o-1", "o-2"]
    assert await model.select(ORDERS, where={"approver": None}) == placed
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.position == await ledger.head_position()
    assert row.failure is None
    # Nothing new: nothing applied, the checkpoint stays.
    assert await runner.catch_up() == 0
    with pytest.raises(lf.ConfigurationError):
        await model.select(ORDERS, where={"notes": {}})
    with pytest.raises(lf.ConfigurationError):
        await model.select(ORDERS, where={"nope": 1})


async def test_writes_and_checkpoint_commit_together_or_not_at_all(
    ledger: BaseEventStore,
) -> None:
    projection = orders_projection()
    await ledger.append("o-1", [Placed("acme", 500)])
    await ledger.ensure_tables("orders", [ORDERS])
    lease = await ledger.claim_projection("orders", "me", now_us=0, until_us=10**12)
    assert lease is not None
    write = lf.projections.tables.Put(
        "orders",
        ORDERS.check_row(
            {"order_id": "x", "status": "s", "customer": "c", "amount_cents": 1, "notes": {}}
        ),
    )
    # The checkpoint moved meanwhile (from_position is stale): nothing is written.
    with pytest.raises(lf.ProjectionLeaseLostError):
        await ledger.project(
            lease,
            projection.tables,
            from_position=5,
            to_position=6,
            event_at_us=None,
            writes=[write],
            now_us=1,
        )
    assert await ledger.read_model_get("orders", ORDERS, "x") is None
    assert (await ledger.projection_row("orders")).position == 0  # type: ignore[union-attr]
    # Another runner took the lease over: the old lease writes nothing.
    taken = await ledger.claim_projection("orders", "other", now_us=10**12 + 1, until_us=10**13)
    assert taken is not None
    assert taken.epoch == lease.epoch + 1
    with pytest.raises(lf.ProjectionLeaseLostError):
        await ledger.project(
            lease,
            projection.tables,
            from_position=0,
            to_position=1,
            event_at_us=None,
            writes=[write],
            now_us=1,
        )
    assert await ledger.read_model_get("orders", ORDERS, "x") is None
    assert not await ledger.renew_projection(lease, until_us=10**14)
    await ledger.project(
        taken,
        projection.tables,
        from_position=0,
        to_position=1,
        event_at_us=7,
        writes=[write],
        now_us=2,
    )
    assert (await ledger.read_model_get("orders", ORDERS, "x")) is not None
    row = await ledger.projection_row("orders")
    assert row is not None
    assert (row.position, row.event_at_us, row.owner) == (1, 7, "other")


async def test_a_failing_handler_stops_the_projection_until_retried_or_skipped(
    ledger: BaseEventStore,
) -> None:
    await ledger.append("o-1", [Placed("acme", 500)])
    await ledger.append("o-bad", [Placed("evil", 1)])
    await ledger.append("o-2", [Placed("bob", 70)])
    broken = orders_projection(fail_on={"o-bad"})
    runner = ProjectionRunner(ledger, [broken])
    assert await runner.catch_up() == 1
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.position == 1  # o-1 committed; stopped before o-bad
    assert row.failure is not None
    assert (row.failure.position, row.failure.event_type) == (2, "test.placed")
    assert row.failure.error_type == "ValueError"
    assert "cannot project o-bad" in row.failure.message
    assert await runner.catch_up() == 0  # stays stopped
    model = ReadModel(ledger, broken)
    assert [r["order_id"] for r in await model.select(ORDERS)] == ["o-1"]
    # Retried with the handler still failing: stopped again at the same event.
    assert await ledger.retry_projection("orders")
    assert await runner.catch_up() == 0
    assert (await ledger.projection_row("orders")).failure is not None  # type: ignore[union-attr]
    assert not await ledger.skip_projection("orders", 3)  # not where it failed
    assert await ledger.skip_projection("orders", 2)
    assert await runner.catch_up() == 1
    assert [r["order_id"] for r in await model.select(ORDERS)] == ["o-1", "o-2"]
    assert not await ledger.retry_projection("orders")  # nothing to retry


@dataclass(frozen=True)
class PlacedV2:
    customer: str
    amount_cents: int
    currency: str


async def test_an_event_this_code_cannot_decode_stops_only_a_projection_that_wants_it(
    ledger: BaseEventStore,
) -> None:
    """Newer code elsewhere wrote events of a schema version this code does not
    know. The projection failed its whole batch, over and over, shown as running
    with no failure (even for an event type it has no handler for). Now it passes
    over an event no handler of its wants, and stops, visibly, at one a handler
    does want: retry once the code knows it, or skip it."""
    await ledger.append("o-1", [Placed("acme", 500)])
    mine = ledger.registry
    newer = lf.EventRegistry()  # another service, newer code, on the same ledger
    newer.register(Noise, "test.noise", version=2)
    newer.register(PlacedV2, "test.placed", version=2)
    ledger.registry = newer
    try:
        await ledger.append("n-1", [Noise(1)])
        newer_placed = await ledger.append("o-eur", [PlacedV2("eve", 9, "EUR")])
    finally:
        ledger.registry = mine
    await ledger.append("o-2", [Placed("bob", 70)])
    runner = ProjectionRunner(ledger, [orders_projection()])
    assert await runner.catch_up() == 1  # o-1; n-1 passed over; stopped at o-eur
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.failure is not None
    assert row.failure.position == newer_placed.positions[0]
    assert row.failure.error_type == "InvalidEventDataError"
    assert "newer than the registered 1" in row.failure.message
    assert row.position == newer_placed.positions[0] - 1
    assert await ledger.skip_projection("orders", newer_placed.positions[0])
    assert await runner.catch_up() == 1
    model = ReadModel(ledger, orders_projection())
    assert [r["order_id"] for r in await model.select(ORDERS)] == ["o-1", "o-2"]


async def test_handlers_slower_than_the_lease_do_not_lose_it_to_a_second_runner(
    ledger: BaseEventStore,
) -> None:
    """Handlers that together take longer than the lease, with a second runner
    waiting: the lease (renewed between batches) ran out mid-batch, the other
    runner took it, and each threw the other's batch away, calling the handlers of
    every event again and again (9 calls of one event in 30 s, with `def` handlers
    in two processes). A batch now ends once it has run a third of the lease."""
    calls: Counter[int] = Counter()
    notify = Projection("notify")  # no tables: its handler acts elsewhere

    @notify.on("test.placed")
    async def send(event: lf.RecordedEvent, view: View) -> None:
        await asyncio.sleep(0.03)  # a slow call to another system
        calls[event.position] += 1

    for n in range(40):
        await ledger.append(f"o-{n}", [Placed("acme", n)])
    runners = [
        ProjectionRunner(
            ledger, [notify], owner=name, lease=timedelta(seconds=0.6), poll_interval=0.05
        )
        for name in ("first", "second")
    ]
    for runner in runners:
        runner.start()
    try:
        async with asyncio.timeout(20):
            while True:
                row = await ledger.projection_row("notify")
                if row is not None and row.position == 40:
                    break
                await asyncio.sleep(0.05)
    finally:
        for runner in runners:
            await runner.stop()
    assert sorted(calls) == list(range(1, 41))
    assert max(calls.values()) == 1, calls


async def test_one_runner_at_a_time_and_a_dead_ones_lease_expires(
    ledger: BaseEventStore,
) -> None:
    await ledger.append("o-1", [Placed("acme", 500)])
    now = [1_000_000]
    second = ProjectionRunner(ledger, [orders_projection()], owner="second", now_us=lambda: now[0])
    # A runner "first" holds the projection (and then dies without a word).
    held = await ledger.claim_projection(
        "orders", "first", now_us=now[0], until_us=now[0] + 30_000_000
    )
    assert held is not None
    with pytest.raises(lf.ProjectionHeldError, match="held by another runner") as held_by:
        await second.catch_up()
    assert held_by.value.owner == "first"
    assert held_by.value.retryable  # it was a ConfigurationError: "fix your setup"
    now[0] += 31_000_000  # first's lease ran out: it is taken as dead
    assert await second.catch_up() == 1
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.epoch == held.epoch + 1
    assert row.owner is None  # a one-off catch-up gives it back
    # first comes back: its lease is gone, so its writes are refused.
    with pytest.raises(lf.ProjectionLeaseLostError):
        await ledger.project(
            held, {}, from_position=0, to_position=1, event_at_us=None, writes=[], now_us=now[0]
        )


async def test_a_running_runner_follows_new_events(ledger: BaseEventStore) -> None:
    projection = orders_projection()
    runner = ProjectionRunner(ledger, [projection], poll_interval=0.05)
    runner.start()
    try:
        await ledger.append("o-1", [Placed("acme", 500)])
        model = ReadModel(ledger, projection)
        await until(model, lambda row: row is not None)
        await ledger.append("o-1", [Approved("zoe")], expected_version=1)
        await until(model, lambda row: (row or {}).get("approver") == "zoe")
    finally:
        await runner.stop()
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.owner is None  # given back on stop


async def until(model: ReadModel, ok: Any) -> None:
    """Return once order o-1's row satisfies ``ok`` (a hang guard, not a speed bound)."""
    async with asyncio.timeout(20):
        while True:
            if ok(await model.get(ORDERS, "o-1")):
                return
            await asyncio.sleep(0.01)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]), st.sampled_from(["place", "approve", "cancel"])
        ),
        max_size=30,
    ),
    st.integers(1, 7),
)
def test_the_read_model_is_the_fold_of_the_events(steps: list[tuple[str, str]], batch: int) -> None:
    asyncio.run(_fold_case(steps, batch))


async def _fold_case(steps: list[tuple[str, str]], batch: int) -> None:
    registry = lf.EventRegistry()
    registry.register(Placed, "test.placed")
    registry.register(Approved, "test.approved")
    registry.register(Cancelled, "test.cancelled")
    async with open_adapter("memory://", registry=registry) as store:
        expected: dict[str, dict[str, Any]] = {}
        for n, (order, action) in enumerate(steps):
            if action == "place":
                await store.append(order, [Placed(f"c{n}", n)])
                expected[order] = {"status": "placed", "amount_cents": n, "approver": None}
            elif action == "approve" and order in expected:
                await store.append(order, [Approved(f"u{n}")])
                expected[order] |= {"status": "approved", "approver": f"u{n}"}
            elif action == "cancel":
                await store.append(order, [Cancelled("x")])
                expected.pop(order, None)
        projection = orders_projection()
        await ProjectionRunner(store, [projection], batch_size=batch).catch_up()
        rows = await ReadModel(store, projection).select(ORDERS, limit=100)
        got = {
            r["order_id"]: {k: r[k] for k in ("status", "amount_cents", "approver")} for r in rows
        }
        assert got == expected


async def test_retry_and_skip_are_recorded_with_who_and_why(ledger: BaseEventStore) -> None:
    from ledgerflow.projections import operations

    await ledger.append("o-bad", [Placed("evil", 1)])
    await ledger.append("o-1", [Placed("acme", 5)])
    runner = ProjectionRunner(ledger, [orders_projection(fail_on={"o-bad"})])
    await runner.catch_up()
    (stopped,) = await operations.status(ledger)
    assert stopped.failure is not None
    assert (stopped.position, stopped.behind) == (0, 2)
    assert stopped.seconds_behind >= 0
    await operations.retry(ledger, "orders", actor="ops", reason="fixed the data")
    await runner.catch_up()
    with pytest.raises(lf.ProjectionNotFailedError, match="position 1, not 2"):
        await operations.skip(ledger, "orders", reason="bad order", position=2)
    with pytest.raises(lf.ProjectionNotFailedError, match="reason"):
        await operations.skip(ledger, "orders", reason=" ")
    skipped = await operations.skip(ledger, "orders", reason="bad order", actor="ops")
    assert skipped.position == 1
    await runner.catch_up()
    (caught_up,) = await operations.status(ledger, "orders")
    assert (caught_up.behind, caught_up.failure) == (0, None)
    record = [e.data for e in await ledger.read_stream("projection-orders")]
    assert [type(r).__name__ for r in record] == ["ProjectionRetried", "ProjectionSkipped"]
    assert record[1].reason == "bad order"
    assert record[1].actor == "ops"
    assert record[1].event_type == "test.placed"
    with pytest.raises(lf.ProjectionNotFailedError):
        await operations.retry(ledger, "orders")
    with pytest.raises(lf.ProjectionNotFoundError):
        await operations.status(ledger, "nope")


async def test_an_engine_runs_its_projections(engine: Any) -> None:
    projection = orders_projection()
    registry = lf.EventRegistry()
    _register(registry)
    async with engine(projections=[projection], registry=registry) as running:
        await running.store.append("o-1", [Placed("acme", 5)])
        model = ReadModel(running.store, projection)
        await until(model, lambda row: row is not None)
        row = await running.store.projection_row("orders")
        assert row is not None
        assert row.owner == running.owner
    async with engine() as later:
        row = await later.store.projection_row("orders")
        assert row is not None
        assert row.owner is None  # given back when the engine closed
        assert row.position == 1


def _register(registry: lf.EventRegistry) -> None:
    for cls, name in ((Placed, "test.placed"), (Approved, "test.approved")):
        if registry.class_of(name) is None:
            registry.register(cls, name)


# -- rebuilds -----------------------------------------------------------------------------


async def test_a_rebuild_while_writes_go_on_ends_identical_to_the_live_model(
    ledger: BaseEventStore,
) -> None:
    from ledgerflow.projections import operations

    for n in range(30):
        await ledger.append(f"o-{n}", [Placed(f"c{n % 4}", n)])
    projection = orders_projection()
    runner = ProjectionRunner(ledger, [projection], batch_size=7)
    await runner.catch_up()
    model = ReadModel(ledger, projection)
    before = await model.select(ORDERS, limit=1000)
    planned = await operations.rebuild(ledger, "orders", reason="handler fix", actor="ops")
    assert planned.generation == 1
    (during,) = await operations.status(ledger, "orders")
    assert during.rebuild is not None
    assert during.rebuild.generation == 1
    # Writes go on while it rebuilds, batch by batch; queries read the old tables.
    for n in range(30, 45):
        await ledger.append(f"o-{n}", [Placed("late", n)])
        if n % 5 == 0:
            await ledger.append(f"o-{n - 30}", [Approved("zed")])
    # One batch at a time, by hand (the runner's own step).
    lease = await runner._claim(projection)
    assert lease is not None
    await runner._batch(projection, lease)
    assert await model.select(ORDERS, limit=1000) == before
    await runner.catch_up()
    row = await ledger.projection_row("orders")
    assert row is not None
    assert (row.generation, row.rebuild) == (1, None)
    assert row.position == await ledger.head_position()
    rebuilt = await model.select(ORDERS, limit=1000)
    # The same as a projection built live from the start.
    fresh = orders_projection(name="fresh")
    await ProjectionRunner(ledger, [fresh]).catch_up()
    assert rebuilt == await ReadModel(ledger, fresh).select(ORDERS, limit=1000)
    assert len(rebuilt) == 45
    record = [type(e.data).__name__ for e in await ledger.read_stream("projection-orders")]
    assert record == ["ProjectionRebuildRequested"]


TOTALS = Table("orders", key="order_id", columns={"order_id": str, "amount": float})


def orders_in_units() -> Projection:
    """Version 2 of ``orders``: amounts in whole currency units, in a table of its
    own shape."""
    v2 = Projection("orders", tables=[TOTALS], version=2)

    @v2.on(Placed)
    def placed(event: lf.RecordedEvent, view: View) -> None:
        view.put(TOTALS, {"order_id": event.stream_id, "amount": event.data.amount_cents / 100})

    return v2


async def test_a_new_version_of_a_projection_is_rebuilt_and_swapped_in(
    ledger: BaseEventStore,
) -> None:
    await ledger.append("o-1", [Placed("acme", 500)])
    await ProjectionRunner(ledger, [orders_projection()]).catch_up()
    v2 = orders_in_units()
    await ProjectionRunner(ledger, [v2]).catch_up()
    row = await ledger.projection_row("orders")
    assert row is not None
    assert (row.generation, row.version, row.rebuild) == (1, 2, None)
    assert await ReadModel(ledger, v2).select(TOTALS) == [{"order_id": "o-1", "amount": 5.0}]


async def test_an_older_versions_runner_leaves_a_newer_versions_tables_alone(
    ledger: BaseEventStore,
) -> None:
    """In a rolling deploy an old runner took the lease from a new one mid-rebuild:
    it filled the new version's generation with its own handlers and swapped that
    mixed read model in as the new version, then rebuilt back to its own. Now it
    steps back, writing nothing, whether the new version's rebuild is under way or
    done."""
    await ledger.append("o-1", [Placed("acme", 500)])
    await ProjectionRunner(ledger, [orders_projection()]).catch_up()
    await ledger.begin_rebuild("orders", version=2)  # a v2 runner began, then died
    await ledger.append("o-2", [Placed("acme", 700)])
    with pytest.raises(lf.ProjectionLeaseLostError, match="version 2 of it runs here"):
        await ProjectionRunner(ledger, [orders_projection()]).catch_up()
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.rebuild is not None
    assert (row.version, row.position, row.rebuild.version, row.rebuild.position) == (1, 1, 2, 0)
    assert row.owner is None  # the lease went back at once

    v2 = orders_in_units()
    await ProjectionRunner(ledger, [v2]).catch_up()
    with pytest.raises(lf.ProjectionLeaseLostError, match="left to runners of the newer code"):
        await ProjectionRunner(ledger, [orders_projection()]).catch_up()  # no rebuild back
    row = await ledger.projection_row("orders")
    assert row is not None
    assert (row.version, row.rebuild) == (2, None)
    assert await ReadModel(ledger, v2).select(TOTALS) == [
        {"order_id": "o-1", "amount": 5.0},
        {"order_id": "o-2", "amount": 7.0},
    ]


async def test_handlers_read_the_generation_being_rebuilt_not_the_live_one(
    ledger: BaseEventStore,
) -> None:
    counts = Table("counts", key="order_id", columns={"order_id": str, "seen": int})

    def counting(version: int) -> Projection:
        p = Projection("counting", tables=[counts], version=version)

        @p.on(Placed)
        async def placed(event: lf.RecordedEvent, view: View) -> None:
            row = await view.get(counts, event.stream_id)
            view.put(
                counts, {"order_id": event.stream_id, "seen": (row or {"seen": 0})["seen"] + 1}
            )

        return p

    for n in range(5):
        await ledger.append(f"o-{n}", [Placed("acme", n)])
    await ProjectionRunner(ledger, [counting(1)]).catch_up()
    await ProjectionRunner(ledger, [counting(2)]).catch_up()  # a rebuild, reading as it goes
    rows = await ReadModel(ledger, counting(2)).select(counts)
    assert [r["seen"] for r in rows] == [1] * 5  # read from the new generation: not 2


async def test_a_view_reads_its_own_writes_and_forgets_undone_ones() -> None:
    stored = {"o-9": {"order_id": "o-9", "status": "old", "customer": "c", "amount_cents": 1,
                      "approver": None, "notes": {}}}  # fmt: skip

    async def read(table: str, key: Any) -> dict[str, Any] | None:
        row = stored.get(key)
        return None if row is None else dict(row)

    view = View(orders_projection(), read)
    view.update(ORDERS, "o-9", status="patched")  # before any read of it
    view.put(ORDERS, {"order_id": "a", "status": "new", "customer": "c", "amount_cents": 5,
                      "notes": {}})  # fmt: skip
    view.update(ORDERS, "a", status="approved")
    mark = view.mark()
    view.put(ORDERS, {"order_id": "b", "status": "new", "customer": "c", "amount_cents": 7,
                      "notes": {}})  # fmt: skip
    view.update(ORDERS, "a", status="shipped")
    view.delete(ORDERS, "o-9")
    view.undo(mark)  # the failed handler's writes are gone
    assert (await view.get(ORDERS, "a") or {})["status"] == "approved"
    assert await view.get(ORDERS, "b") is None
    assert (await view.get(ORDERS, "o-9") or {})["status"] == "patched"
    assert len(view.writes) == 3


async def test_a_read_that_races_a_rebuilds_swap_looks_again(
    ledger: BaseEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ledger.backend == "memory":
        pytest.skip("the memory store swaps in one step: no table goes missing under a read")
    from ledgerflow.projections import operations

    await ledger.append("o-1", [Placed("acme", 500)])
    projection = orders_projection()
    await ProjectionRunner(ledger, [projection]).catch_up()
    await operations.rebuild(ledger, "orders", reason="test")
    await ProjectionRunner(ledger, [projection]).catch_up()  # generation 1 is live now
    looked = iter([0, 1])  # the first look still finds generation 0, dropped since
    real = ledger._generation

    async def stale(projection: str, generation: int | None) -> int:
        return next(looked, await real(projection, generation))

    monkeypatch.setattr(ledger, "_generation", stale)
    row = await ReadModel(ledger, projection).get(ORDERS, "o-1")
    assert row is not None
    assert row["customer"] == "acme"


@lf.workflow(name="proj.greet", version=1)
async def greet(ctx: lf.WorkflowContext, name: str) -> str:
    return f"hello {name}"


async def test_a_runner_on_a_store_opened_alone_reads_workflow_events_as_classes(
    engine: Any, store_url: str
) -> None:
    """docs/projections.md runs a projection on a store opened alone (tests,
    scripts): workflow events read there as plain dicts, and handlers written as
    for an engine's projections failed on them ('dict' has no attribute 'status')."""
    ends = Table("ends", key="workflow_id", columns={"workflow_id": str, "status": str})
    view_of_ends = Projection("ends", tables=[ends])

    @view_of_ends.on("wf.finished")
    def ended(event: lf.RecordedEvent, view: View) -> None:
        view.put(ends, {"workflow_id": event.stream_id, "status": str(event.data.status)})

    async with engine(greet) as e:
        await (await e.start(greet, "ada", id="g-1")).result(timeout=20)
        store = e.store if store_url.startswith("memory") else None
    async with open_adapter(store_url) if store is None else _as_is(store) as alone:
        await ProjectionRunner(alone, [view_of_ends]).catch_up()
        rows = await ReadModel(alone, view_of_ends).select(ends)
    assert rows == [{"workflow_id": "wf-g-1", "status": "completed"}]


class _as_is:
    def __init__(self, store: Any) -> None:
        self.store = store

    async def __aenter__(self) -> Any:
        return self.store

    async def __aexit__(self, *_: object) -> None:
        return None


async def test_a_nul_character_stops_the_projection_at_its_event_on_every_backend(
    ledger: BaseEventStore,
) -> None:
    """PostgreSQL refuses NUL in text and jsonb: the batch rolled back whole (the
    good event before it too) and the runner started again for ever, shown running
    with no failure; SQLite stored it. Now no backend takes it: the projection stops
    at that event, visibly, with what came before committed."""
    await ledger.append("o-1", [Placed("acme", 500)])
    await ledger.append("o-2", [Placed("ac\x00me", 70)])
    await ledger.append("o-3", [Placed("bob", 5)])
    projection = orders_projection()
    runner = ProjectionRunner(ledger, [projection])
    assert await runner.catch_up() == 1
    row = await ledger.projection_row("orders")
    assert row is not None
    assert row.position == 1
    assert row.failure is not None
    assert row.failure.position == 2
    assert "NUL character" in row.failure.message
    nested = Table("notes", key="id", columns={"id": str, "notes": dict})
    with pytest.raises(lf.ConfigurationError, match="NUL"):
        nested.check_row({"id": "n", "notes": {"deep": ["x\x00"]}})
    with pytest.raises(lf.ConfigurationError, match="NUL"):
        nested.check_row({"id": "n", "notes": {"k\x00": 1}})
    assert nested.check_row({"id": "n", "notes": {"k": "\\u0000"}})["notes"] == {"k": "\\u0000"}
    # Asked for, on any backend: the same typed refusal (PostgreSQL's was a StoreError,
    # SQLite's an empty answer; a huge offset an OverflowError on SQLite).
    model = ReadModel(ledger, projection)
    with pytest.raises(lf.ConfigurationError, match="NUL"):
        await model.select(ORDERS, where={"customer": "ac\x00me"})
    with pytest.raises(lf.ConfigurationError, match="NUL"):
        await model.get(ORDERS, "o\x00")
    with pytest.raises(lf.ConfigurationError, match="offset"):
        await model.select(ORDERS, offset=2**63)
