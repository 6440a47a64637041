"""The store's gauges (ledgerflow.gauges), on every backend: queue depth, breaker
state, projection and relay lag, instances not ended by status and the ledger's
head, read from what the store holds; values that disappear are dropped."""

from __future__ import annotations

from prometheus_client import REGISTRY

import ledgerflow as lf
from ledgerflow.gauges import StoreGauges
from ledgerflow.projections import Projection, ProjectionRunner
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store.runtime import (
    DropTask,
    InstanceRow,
    MoveBreaker,
    PutInstance,
    PutTask,
    TaskRow,
)


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def task(seq: int, queue: str, due_at_us: int) -> TaskRow:
    return TaskRow(f"w-1/{seq}", "w-1", seq, "step", "erp.book", queue, "{}", due_at_us)


failing = Projection("gauged")


@failing.on("gauge.bad")
def refuse(event: lf.RecordedEvent, view: object) -> None:
    raise ValueError("cannot project a bad event")


@failing.on("gauge.good")
def accept(event: lf.RecordedEvent, view: object) -> None:
    return None


async def test_the_gauges_say_what_the_store_holds(store: BaseEventStore) -> None:
    now = await store.database_now_us()
    instances = [
        PutInstance(InstanceRow(f"i-{n}", "order", 1, status, None, now, now))
        for n, status in enumerate(["running", "running", "stuck", "completed"])
    ]
    await store.append(
        "setup",
        [lf.NewEvent("gauge.good")],
        runtime=[
            *instances,
            PutTask(task(1, "erp", now - 1_000_000)),
            PutTask(task(2, "erp", now - 1_000_000)),
            PutTask(task(3, "erp", now + 3_600_000_000)),
        ],
    )
    await store.append(
        "breaker-erp",
        [lf.NewEvent("breaker.moved", {"state": "open"})],
        lf.NO_STREAM,
        runtime=[MoveBreaker("erp", "open", now, 1)],
    )
    await store.append("o-1", [lf.NewEvent("gauge.bad")])
    await store.append("o-2", [lf.NewEvent("gauge.good")])
    await ProjectionRunner(store, [failing]).catch_up()  # stops at the bad event

    gauges = StoreGauges(store)
    await gauges.sample()
    assert sample("ledgerflow_queue_tasks", queue="erp", state="ready") == 2
    assert sample("ledgerflow_queue_tasks", queue="erp", state="scheduled") == 1
    assert sample("ledgerflow_queue_tasks", queue="erp", state="running") == 0
    assert sample("ledgerflow_breaker_state", resource="erp") == 2
    assert sample("ledgerflow_breaker_changed_timestamp_seconds", resource="erp") == now / 1e6
    assert sample("ledgerflow_instances", status="running") == 2
    assert sample("ledgerflow_instances", status="stuck") == 1
    assert sample("ledgerflow_instances", status="needs_attention") == 0
    head = await store.head_position()
    assert sample("ledgerflow_ledger_head_position", backend=store.backend) == head
    row = await store.projection_row("gauged")
    assert row is not None
    assert row.failure is not None
    assert sample("ledgerflow_projection_lag_events", projection="gauged") == head - row.position
    assert sample("ledgerflow_projection_failed", projection="gauged") == 1
    lag = sample("ledgerflow_projection_lag_seconds", projection="gauged")
    assert lag is not None
    assert 0 <= lag < 60

    # The queue emptied: its series go rather than stay at their last values.
    await store.append(
        "cleanup",
        [lf.NewEvent("gauge.good")],
        runtime=[DropTask("w-1/1"), DropTask("w-1/2"), DropTask("w-1/3")],
    )
    await gauges.sample()
    assert sample("ledgerflow_queue_tasks", queue="erp", state="ready") is None


async def test_a_caught_up_projection_has_no_lag(store: BaseEventStore) -> None:
    caught_up = Projection("gauged_ok")

    @caught_up.on("gauge.good")
    def ok(event: lf.RecordedEvent, view: object) -> None:
        return None

    await store.append("o-1", [lf.NewEvent("gauge.good")])
    await ProjectionRunner(store, [caught_up]).catch_up()
    await StoreGauges(store).sample()
    assert sample("ledgerflow_projection_lag_events", projection="gauged_ok") == 0
    assert sample("ledgerflow_projection_lag_seconds", projection="gauged_ok") == 0
    assert sample("ledgerflow_projection_failed", projection="gauged_ok") == 0
