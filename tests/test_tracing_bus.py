"""Traces and metrics across the event bus, asserted with the SDK's in-memory
exporter and the Prometheus registry: an event a workflow's step records is
published by the relay in a ``publish`` span of the order's trace and consumed in a
``process`` span under it (in process and on a real NATS JetStream); a projection
batch is a span of its own and an observation of the batch metrics; a message a
step publishes carries the step's trace context."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

import ledgerflow as lf
from ledgerflow import tracing
from ledgerflow.bus import Delivery, EventBus, InProcessBus, JetStreamBus, Relay, Route
from ledgerflow.projections import Projection, ProjectionRunner, View

from ._spans import EXPORTER, named, tracer

pytestmark = pytest.mark.usefixtures("spans")

WAIT = 20.0
"""A hang guard, never a speed bound."""

LEDGER: dict[str, lf.store.WorkflowStore] = {}
"""The store of the engine running the test's workflow: where its step records."""


@lf.step(name="traced-place")
async def place(order: str) -> None:
    # Recorded inside the step's span: the store stamps its trace context.
    await LEDGER["store"].append(f"order-{order}", [lf.NewEvent("shop.placed", {"order": order})])


@lf.workflow(name="traced-order")
async def traced_order(ctx: lf.WorkflowContext, order: str) -> None:
    await ctx.step(place, order)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _by_id() -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in EXPORTER.get_finished_spans()}


def _ancestors(span: ReadableSpan) -> list[ReadableSpan]:
    """The finished spans above ``span``, nearest first."""
    by_id = _by_id()
    found = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        found.append(span)
    return found


async def _order_over(bus: EventBus, root: str) -> tuple[int, list[Delivery]]:
    """Start a ``traced-order`` in a root span; once its step recorded the order's
    event, relay it to ``bus`` and consume it with a handler that fails the first
    delivery. The root's trace id, and the deliveries."""
    deliveries: list[Delivery] = []
    done = asyncio.Event()

    async def consume(delivery: Delivery) -> None:
        deliveries.append(delivery)
        if delivery.attempt == 1:
            raise ConnectionError("the warehouse is down")
        done.set()

    async with lf.Engine("memory://", workflows=[traced_order]) as engine:
        LEDGER["store"] = engine.store
        with tracer.start_as_current_span("checkout") as checkout:
            handle = await engine.start(traced_order, "o-1", id="to-1")
        await handle.result(timeout=WAIT)
        relay = Relay(
            engine.store,
            bus,
            [Route(subject=root + ".{category}.{type}", types={"shop.placed"})],
            name="traced",
        )
        assert await relay.catch_up() == 1
        subscription = await bus.subscribe(f"{root}.>", durable="warehouse", handler=consume)
        try:
            await asyncio.wait_for(done.wait(), WAIT)
        finally:
            await subscription.stop()
    return checkout.get_span_context().trace_id, deliveries


def _assert_one_trace(trace_id: int, deliveries: list[Delivery], subject: str) -> None:
    assert [d.attempt for d in deliveries] == [1, 2]
    (publish,) = named(f"publish {subject}")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.context.trace_id == trace_id
    attributes = dict(publish.attributes or {})
    assert attributes["messaging.destination.name"] == subject
    assert attributes["ledgerflow.stream"] == "order-o-1"
    body = deliveries[0].event()
    assert attributes["ledgerflow.event_id"] == body["id"]
    # The message names the publish span, whatever the bus did to its headers.
    traceparent = f"00-{trace_id:032x}-{publish.context.span_id:016x}-"
    assert deliveries[0].message.headers["traceparent"].startswith(traceparent)
    # Up from the publish: the step that recorded the event, its workflow pass, the
    # start, the caller's span.
    assert [s.name for s in _ancestors(publish)] == [
        "step traced-place",
        "workflow traced-order",
        "start traced-order",
        "checkout",
    ]
    # Linked to the relay's batch, a trace of its own.
    (batch,) = named("projection relay_traced")
    assert batch.context.trace_id != trace_id
    assert [link.context.span_id for link in publish.links] == [batch.context.span_id]
    assert dict(batch.attributes or {})["ledgerflow.messages"] == 1
    processed = sorted(named(f"process {subject}"), key=lambda s: s.start_time or 0)
    assert len(processed) == 2
    for attempt, span in enumerate(processed, start=1):
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == trace_id
        assert span.parent is not None
        assert span.parent.span_id == publish.context.span_id
        attributes = dict(span.attributes or {})
        assert attributes["ledgerflow.attempt"] == attempt
        assert attributes["messaging.message.id"] == body["id"]
        assert attributes["messaging.destination.name"] == subject
    failed, redelivered = processed
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ConnectionError: the warehouse is down"
    assert [e.name for e in failed.events] == ["exception"]
    assert redelivered.status.status_code is StatusCode.UNSET


async def test_a_relayed_event_is_consumed_in_the_trace_of_the_order() -> None:
    trace_id, deliveries = await _order_over(InProcessBus(redelivery_delay=0.01), "shop")
    _assert_one_trace(trace_id, deliveries, "shop.order.shop.placed")
    assert "messaging.system" not in dict(
        named("process shop.order.shop.placed")[0].attributes or {}
    )


@pytest.fixture
async def jetstream(nats_url: str) -> AsyncIterator[JetStreamBus]:
    """A JetStream bus on a stream of this test's own, deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    bus = JetStreamBus(nats_url, stream=f"LFTRACE_{tag}", subjects=[f"lftrace{tag}.>"], timeout=2.0)
    bus.redelivery_delay = 0.05
    await bus.open()
    try:
        yield bus
    finally:
        await bus.close()
        import nats

        nc = await nats.connect(nats_url)
        with contextlib.suppress(Exception):  # already gone
            await nc.jetstream().delete_stream(f"LFTRACE_{tag}")
        await nc.close()


async def test_the_order_stays_one_trace_over_jetstream(jetstream: JetStreamBus) -> None:
    root = jetstream.subjects[0].removesuffix(".>")
    trace_id, deliveries = await _order_over(jetstream, root)
    subject = f"{root}.order.shop.placed"
    _assert_one_trace(trace_id, deliveries, subject)
    for span in named(f"process {subject}"):
        assert dict(span.attributes or {})["messaging.system"] == "nats"


async def test_a_message_without_trace_context_starts_a_trace_of_its_own() -> None:
    bus = InProcessBus()
    done = asyncio.Event()

    async def consume(delivery: Delivery) -> None:
        done.set()

    # Subscribed inside a span: its consumer task inherits that context, which a
    # message naming no trace must not join.
    with tracer.start_as_current_span("setup"):
        subscription = await bus.subscribe("x.>", durable="d", handler=consume)
    await bus.publish([lf.bus.Message("x.y", "m-1", b"{}")])
    try:
        await asyncio.wait_for(done.wait(), WAIT)
    finally:
        await subscription.stop()
    (process,) = named("process x.y")
    assert process.parent is None
    (setup,) = named("setup")
    assert process.context.trace_id != setup.context.trace_id


# -- projection batches -------------------------------------------------------------------


def _counted(fail_on: str | None = None) -> Projection:
    projection = Projection("traced_counts")

    @projection.on("shop.placed")
    def placed(event: lf.RecordedEvent, view: View) -> None:
        if event.stream_id == fail_on:
            raise ValueError(f"cannot count {event.stream_id}")

    return projection


async def test_a_projection_batch_is_a_span_and_observed(tmp_path: Any) -> None:
    events = "ledgerflow_projection_batch_events"
    before = {
        "batches": sample(f"{events}_count", projection="traced_counts"),
        "events": sample(f"{events}_sum", projection="traced_counts"),
        "seconds": sample("ledgerflow_projection_batch_seconds_count", projection="traced_counts"),
        "relayed": sample("ledgerflow_relay_messages_total", relay="counted"),
        "relay batches": sample(f"{events}_count", projection="relay_counted"),
    }
    async with lf.open_store(f"sqlite:///{tmp_path / 'l.db'}") as store:
        await store.append("noise-1", [lf.NewEvent("shop.noise")])
        for n in range(3):
            await store.append(f"order-{n}", [lf.NewEvent("shop.placed", {"n": n})])
        runner = ProjectionRunner(store, [_counted()], batch_size=3)
        assert await runner.catch_up() == 3
        first, second = named("projection traced_counts")
        assert dict(first.attributes or {}) == {
            "ledgerflow.projection": "traced_counts",
            "ledgerflow.events": 3,
            "ledgerflow.from_position": 1,
            "ledgerflow.to_position": 3,
            "ledgerflow.applied": 2,
        }
        assert dict(second.attributes or {})["ledgerflow.from_position"] == 4
        assert dict(second.attributes or {})["ledgerflow.events"] == 1
        assert first.status.status_code is StatusCode.UNSET
        assert sample(f"{events}_count", projection="traced_counts") == before["batches"] + 2
        assert sample(f"{events}_sum", projection="traced_counts") == before["events"] + 4
        assert (
            sample("ledgerflow_projection_batch_seconds_count", projection="traced_counts")
            == before["seconds"] + 2
        )
        # Idle: nothing read, no span, no observation.
        assert await runner.catch_up() == 0
        assert len(named("projection traced_counts")) == 2
        assert sample(f"{events}_count", projection="traced_counts") == before["batches"] + 2

        # A handler that fails stops the projection there: its batch span says so.
        await store.append("order-bad", [lf.NewEvent("shop.placed", {"n": 9})])
        failing = ProjectionRunner(store, [_counted(fail_on="order-bad")])
        await failing.catch_up()
        stopped = named("projection traced_counts")[-1]
        assert stopped.status.status_code is StatusCode.ERROR
        assert stopped.status.description == "ValueError: cannot count order-bad"
        assert dict(stopped.attributes or {})["ledgerflow.failed_position"] == 5

        relay = Relay(
            store, InProcessBus(), [Route(types={"shop.placed"})], name="counted", batch_size=10
        )
        assert await relay.catch_up() == 4
        assert sample("ledgerflow_relay_messages_total", relay="counted") == before["relayed"] + 4
        assert sample(f"{events}_count", projection="relay_counted") == before["relay batches"] + 1
        (batch,) = named("projection relay_counted")
        assert dict(batch.attributes or {})["ledgerflow.events"] == 5
        assert dict(batch.attributes or {})["ledgerflow.messages"] == 4
        # The events were recorded outside any span: published in the batch's trace.
        published = [s for s in EXPORTER.get_finished_spans() if s.name.startswith("publish ")]
        assert len(published) == 4
        assert {s.parent.span_id for s in published if s.parent} == {batch.context.span_id}


async def test_a_relay_whose_broker_is_down_marks_its_publish_spans_failed(
    tmp_path: Any,
) -> None:
    before = sample("ledgerflow_relay_messages_total", relay="down")
    bus = InProcessBus()

    async def unreachable(messages: Any) -> list[bool]:
        raise lf.BusUnavailableError("nats://nowhere", "cannot connect")

    bus.publish = unreachable  # type: ignore[method-assign]
    async with lf.open_store(f"sqlite:///{tmp_path / 'l.db'}") as store:
        await store.append("order-1", [lf.NewEvent("shop.placed")])
        relay = Relay(store, bus, [Route(types={"shop.placed"})], name="down")
        with pytest.raises(lf.BusUnavailableError):
            await relay.catch_up()
    (publish,) = named("publish ledgerflow.order.shop.placed")
    assert publish.status.status_code is StatusCode.ERROR
    (batch,) = named("projection relay_down")
    assert batch.status.status_code is StatusCode.ERROR
    assert sample("ledgerflow_relay_messages_total", relay="down") == before


async def test_an_event_recorded_outside_any_trace_is_not_published_in_anothers(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay process without an SDK has no batch span: an event recorded outside
    any trace, published after one recorded inside an order's, went out in that
    order's trace (the context of the message before it was left active)."""
    bus = InProcessBus()
    async with lf.open_store(f"sqlite:///{tmp_path / 'l.db'}") as store:
        with tracer.start_as_current_span("checkout") as order:
            await store.append("order-1", [lf.NewEvent("shop.placed")])
        await store.append("order-2", [lf.NewEvent("shop.placed")])  # no trace
        relay = Relay(store, bus, [Route(types={"shop.placed"})], name="leak")
        real = tracing.current_traceparent
        # As in a process without an SDK: the batch has no trace to lend.
        monkeypatch.setattr(tracing, "current_traceparent", lambda: None)
        try:
            await relay.catch_up()
        finally:
            monkeypatch.setattr(tracing, "current_traceparent", real)
    first, second = (m.headers["traceparent"].split("-")[1] for m in bus.messages)
    ordered = f"{order.get_span_context().trace_id:032x}"
    assert first == ordered
    assert second != ordered


# -- a message a step publishes --------------------------------------------------------------


async def test_a_step_message_carries_the_steps_trace_context() -> None:
    bus = InProcessBus()

    @lf.step(name="notify-traced")
    async def notify(order: str) -> None:
        await bus.publish([lf.bus.step_message("warehouse.pick", {"order": order})])

    @lf.workflow(name="traced-notifying")
    async def notifying(ctx: lf.WorkflowContext, order: str) -> None:
        await ctx.step(notify, order)

    async with lf.Engine("memory://", workflows=[notifying]) as engine:
        with tracer.start_as_current_span("checkout") as checkout:
            handle = await engine.start(notifying, "o-1", id="tn-1")
        await handle.result(timeout=WAIT)
    (message,) = bus.messages
    (step,) = named("step notify-traced")
    trace_id = checkout.get_span_context().trace_id
    assert step.context.trace_id == trace_id
    assert message.headers["traceparent"] == (
        f"00-{trace_id:032x}-{step.context.span_id:016x}-{int(step.context.trace_flags):02x}"
    )
    assert message.headers["Ledgerflow-Step"] == message.id
