"""OpenTelemetry spans, asserted with the SDK's in-memory exporter: each pass and
step attempt is a span in the trace of the call that started the workflow, across
engines (the start records the trace context) and over HTTP (the traceparent
header), through the fast path and the route alike."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ledgerflow
from ledgerflow.server import ServerSettings

from ._api_app import serve
from ._engines import waiting_for

EXPORTER = InMemorySpanExporter()


class _WhileTesting(SimpleSpanProcessor):
    """Keeps spans only during this module's tests: the global provider stays for the
    rest of the run, which must neither fill memory nor pay for recording."""

    active = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


_processor = _WhileTesting(EXPORTER)
_provider = TracerProvider()
_provider.add_span_processor(_processor)
trace.set_tracer_provider(_provider)
tracer = trace.get_tracer("tests")


@ledgerflow.step()
def pack(order: str) -> str:
    return f"packed {order}"


@ledgerflow.workflow(name="traced")
async def traced(ctx: ledgerflow.WorkflowContext, order: str) -> str:
    await ctx.wait_for_signal("go")
    return await ctx.step(pack, order)


@pytest.fixture(autouse=True)
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    _processor.active = True
    yield EXPORTER
    _processor.active = False
    EXPORTER.clear()


def of_workflow(workflow_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in EXPORTER.get_finished_spans()
        if (s.attributes or {}).get("ledgerflow.workflow_id") == workflow_id
    ]


async def test_passes_and_steps_join_the_starting_trace_across_engines(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:
        with tracer.start_as_current_span("checkout") as root:
            await engine.start(traced, "o-1", id="t-1")
        await waiting_for(engine, "t-1", "signal 'go'")
    # Another engine (another process, as far as the ledger knows) finishes it.
    async with ledgerflow.Engine(url, workflows=[traced]) as engine:
        await engine.signal("t-1", "go")
        assert await asyncio.wait_for(engine.handle("t-1").result(), 10) == "packed o-1"
    found = of_workflow("t-1")
    names = {s.name for s in found}
    assert {"workflow traced", "step pack"} <= names
    trace_id = root.get_span_context().trace_id
    assert {s.context.trace_id for s in found} == {trace_id}
    (step,) = [s for s in found if s.name == "step pack"]
    passes = {s.context.span_id for s in found if s.name == "workflow traced"}
    assert step.parent is not None
    assert step.parent.span_id in passes
    attributes = dict(step.attributes or {})
    assert (attributes["ledgerflow.outcome"], attributes["ledgerflow.attempt"]) == ("ok", 1)


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
