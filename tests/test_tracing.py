"""OpenTelemetry spans, asserted with the SDK's in-memory exporter: each pass and
step attempt is a span in the trace of the call that started the workflow, across
engines (the start records the trace context) and over HTTP (the traceparent
header), through the fast path and the route alike."""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import UUID

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import ledgerflow
from ledgerflow import tracing
from ledgerflow.events import AlreadyAppended, NewEvent
from ledgerflow.server import ServerSettings
from ledgerflow.workflow.history import History, Started

from ._api_app import serve
from ._engines import waiting_for
from ._spans import named, of_workflow, tracer


@ledgerflow.step()
def pack(order: str) -> str:
    return f"packed {order}"


@ledgerflow.workflow(name="traced")
async def traced(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.wait_for_signal("go")
    return await ctx.step(pack, order)


pytestmark = pytest.mark.usefixtures("spans")


async def test_passes_and_steps_join_the_starting_trace_across_engines(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:
        with tracer.start_as_current_span("checkout") as root:
            await engine.start(traced, "o-1", id="t-1")
        await waiting_for(engine, "t-1", "signal 'go'")
    # Another engine (another process, as far as the ledger knows) finishes it,
    # on a signal sent in another trace (an approval, later).
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:
        with tracer.start_as_current_span("approve") as approval:
            await engine.signal("t-1", "go")
        assert await asyncio.wait_for(engine.handle("t-1").result(), 10) == "packed o-1"
    trace_id = root.get_span_context().trace_id
    found = [s for s in of_workflow("t-1") if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in found}
    assert {"start traced", "workflow traced", "step pack", "signal go taken"} <= set(by_name)
    (start,) = named("start traced")
    assert start.parent is not None
    assert start.parent.span_id == root.get_span_context().span_id
    assert start.kind is SpanKind.PRODUCER
    passes = [s for s in found if s.name == "workflow traced"]
    assert len(passes) >= 2  # one per engine at least
    assert all(p.parent is not None and p.parent.span_id == start.context.span_id for p in passes)
    step = by_name["step pack"]
    assert step.parent is not None
    assert step.parent.span_id in {p.context.span_id for p in passes}
    assert step.status.status_code is StatusCode.UNSET
    assert dict(step.attributes or {})["ledgerflow.attempt"] == 1
    # The signal's sender is in the approval's trace; the pass that took it links to it.
    (sent,) = named("signal go")
    assert sent.context.trace_id == approval.get_span_context().trace_id
    taken = by_name["signal go taken"]
    assert [link.context.span_id for link in taken.links] == [sent.context.span_id]


async def test_a_workflow_started_outside_any_trace_is_rooted_at_its_first_pass(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:
        await engine.start(traced, "o-5", id="t-5")  # no span active: no start span
        await waiting_for(engine, "t-5", "signal 'go'")
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:  # from the store
        await engine.signal("t-5", "go")
        assert await asyncio.wait_for(engine.handle("t-5").result(), 10) == "packed o-5"
    assert not named("start traced")
    passes = sorted(named("workflow traced"), key=lambda s: s.start_time or 0)
    first, *later = passes
    assert first.parent is None
    assert later
    for span in later:
        assert span.context.trace_id == first.context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == first.context.span_id
    (step,) = named("step pack")
    assert step.context.trace_id == first.context.trace_id


async def test_a_step_after_a_wait_is_in_the_span_of_the_pass_that_went_on(
    tmp_path: Path,
) -> None:
    """The same engine keeps the body while it waits and goes on from the wait in a
    later pass (ADR 026): the step after the wait belongs to that later pass, not to
    the pass, long over, in which the body began to wait."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:
        await engine.start(traced, "o-6", id="t-6")
        await waiting_for(engine, "t-6", "signal 'go'")
        await engine.signal("t-6", "go")
        assert await asyncio.wait_for(engine.handle("t-6").result(), 10) == "packed o-6"
    _first, *later = sorted(named("workflow traced"), key=lambda s: s.start_time or 0)
    assert later
    (step,) = named("step pack")
    assert step.parent is not None
    assert step.parent.span_id in {p.context.span_id for p in later}


async def test_every_append_made_in_a_span_records_its_trace(tmp_path: Path) -> None:
    async with ledgerflow.open_store(f"sqlite:///{tmp_path / 'l.db'}") as store:
        with tracer.start_as_current_span("command") as command:
            await store.append("order-1", [NewEvent("placed", {"n": 1}, id=UUID(int=1))])
        (event,) = await store.read_stream("order-1")
        context = command.get_span_context()
        flags = int(context.trace_flags)
        assert event.metadata.traceparent == (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
        )
        # Retried in another span (a client's retry): the same append, not a conflict.
        with tracer.start_as_current_span("retry"):
            again = await store.append("order-1", [NewEvent("placed", {"n": 1}, id=UUID(int=1))])
        assert isinstance(again, AlreadyAppended)
        # Outside any span: nothing recorded.
        await store.append("order-2", [NewEvent("placed", {"n": 2})])
        (plain,) = await store.read_stream("order-2")
        assert plain.metadata.traceparent is None


@ledgerflow.step()
def charge(order: str) -> str:
    raise ValueError(f"card declined for {order}")


@ledgerflow.step()
def reserve(order: str) -> str:
    return f"R-{order}"


@ledgerflow.step()
def release(order: str) -> None:
    return None


@ledgerflow.workflow(name="traced-saga")
async def traced_saga(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.sleep(0.01)
    await ctx.step(reserve, order, compensate=release)
    return await ctx.step(charge, order, retry=ledgerflow.RetryPolicy(max_attempts=1))


async def test_timers_failed_attempts_and_compensations_are_spans(tmp_path: Path) -> None:
    async with ledgerflow.Engine(f"sqlite:///{tmp_path / 'l.db'}", workflows=[traced_saga]) as e:
        with tracer.start_as_current_span("checkout") as root:
            handle = await e.start(traced_saga, "o-2", id="s-1")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await asyncio.wait_for(handle.result(), 10)
    trace_id = root.get_span_context().trace_id
    found = {s.name: s for s in of_workflow("s-1")}
    assert {s.context.trace_id for s in found.values()} == {trace_id}
    timer = found["timer fired"]
    assert timer.end_time is not None
    assert timer.start_time is not None
    assert timer.end_time >= timer.start_time
    failed = found["step charge"]
    assert failed.status.status_code is StatusCode.ERROR
    assert "card declined for o-2" in (failed.status.description or "")
    undo = found["compensate reserve"]  # named for the step it undoes
    assert undo.status.status_code is StatusCode.UNSET


@ledgerflow.step(name="erp.book", queue="erp")
def book(order: str) -> str:
    return f"booked {order}"


@ledgerflow.workflow(name="traced-remote")
async def traced_remote(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    return await ctx.step(book, order)


async def test_a_step_run_by_another_services_worker_is_in_the_workflows_trace(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with (
        ledgerflow.Engine(url, workflows=[traced_remote]) as orders,
        ledgerflow.Engine(url, queues=["erp"], steps=[book]),
    ):
        with tracer.start_as_current_span("checkout") as root:
            handle = await orders.start(traced_remote, "o-3", id="r-1")
        assert await asyncio.wait_for(handle.result(), 10) == "booked o-3"
        history = await orders.history("r-1")
    # What the worker recorded is in the order's trace too (the relay carries it on):
    # it once had none, and its messages fell out of the trace.
    done = [e for e in history if e.type == "wf.step_done"]
    assert done
    trace_id = f"{root.get_span_context().trace_id:032x}"
    assert all((e.metadata.traceparent or "").split("-")[1:2] == [trace_id] for e in done)
    (remote,) = named("step erp.book")
    assert remote.context.trace_id == root.get_span_context().trace_id
    assert remote.kind is SpanKind.CONSUMER
    sender = {s.context.span_id for s in named("workflow traced-remote")}
    assert remote.parent is not None
    assert remote.parent.span_id in sender


async def test_a_workflow_out_of_the_sample_makes_no_spans_and_carries_the_decision(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """Started in a trace the caller's sampler left out (flags 00): with the SDK's
    ParentBased sampler no span of it would be recorded, so none is made (the cost
    of tracing for most workflows of a sampled deployment), and the unsampled
    decision is what its events carry on to other services."""
    unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[traced_saga]) as engine:
        with tracing.joined(unsampled):
            handle = await engine.start(traced_saga, "o-9", id="u-1")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await asyncio.wait_for(handle.result(), 10)
        history = await engine.history("u-1")
    assert of_workflow("u-1") == []
    assert spans.get_finished_spans() == ()
    carried = {e.metadata.traceparent for e in history if e.metadata.traceparent}
    assert carried == {unsampled}


def test_an_expected_exception_ends_a_span_without_failing_it(
    spans: InMemorySpanExporter,
) -> None:
    """A pass that looks again (someone wrote meanwhile) or steps back ends with an
    exception the engine handles: its span must not read as a failed pass."""
    handled_here = (ledgerflow.ConcurrencyError,)
    with (
        pytest.raises(ledgerflow.ConcurrencyError),
        tracing.span("workflow w", expected=handled_here),
    ):
        raise ledgerflow.ConcurrencyError("wf-w", 2, 3)
    with pytest.raises(ValueError, match="boom"), tracing.span("workflow v"):
        raise ValueError("boom")
    (handled,) = named("workflow w")
    assert handled.status.status_code is StatusCode.UNSET
    assert [e.name for e in handled.events] == ["ConcurrencyError"]
    (failed,) = named("workflow v")
    assert failed.status.status_code is StatusCode.ERROR


def test_a_history_from_a_snapshot_keeps_its_trace() -> None:
    history = History("w", Started(name="w", version=1, input=None))
    history.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    history.signal_traces[3] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-01"
    again = History.from_snapshot(history.snapshot())
    assert again.traceparent == history.traceparent
    assert again.signal_traces == history.signal_traces


@pytest.mark.parametrize("fast", [True, False])
def test_a_start_over_http_joins_the_callers_trace(tmp_path: Path, fast: bool) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    header = f"00-{trace_id}-00f067aa0ba902b7-01"
    with serve(f"sqlite:///{tmp_path / 'l.db'}", ServerSettings(fast_start=fast)) as api:
        answer = api.post(
            "/api/v1/workflows",
            json={"workflow": "approval", "input": "o-9", "id": "h-1"},
            headers={"traceparent": header},
        )
        assert answer.status_code == 201, answer.text
        api.until("/api/v1/workflows/h-1", lambda d: d["waiting_for"] is not None)
    found = of_workflow("acme/h-1")
    assert found
    assert {format(s.context.trace_id, "032x") for s in found} == {trace_id}
