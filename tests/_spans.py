"""The OpenTelemetry SDK set up once for the whole test run (a process has one
global tracer provider), keeping spans only while a test asks for them with the
``spans`` fixture: the rest of the run neither fills memory nor pays for
recording."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()


class _WhileTesting(SimpleSpanProcessor):
    active = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


_processor = _WhileTesting(EXPORTER)
_provider = TracerProvider()
_provider.add_span_processor(_processor)
trace.set_tracer_provider(_provider)
tracer = trace.get_tracer("tests")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans finished during the test, in the SDK's in-memory exporter."""
    EXPORTER.clear()
    _processor.active = True
    yield EXPORTER
    _processor.active = False
    EXPORTER.clear()


def named(name: str) -> list[ReadableSpan]:
    return [s for s in EXPORTER.get_finished_spans() if s.name == name]


def of_workflow(workflow_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in EXPORTER.get_finished_spans()
        if (s.attributes or {}).get("ledgerflow.workflow_id") == workflow_id
    ]
