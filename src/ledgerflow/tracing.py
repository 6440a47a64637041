"""OpenTelemetry spans of the engine: one per workflow pass and one per step
attempt, in the trace of the call that started the workflow (its W3C
``traceparent`` is recorded with the start, and read back by every pass, in any
process), so an order is one trace from the HTTP request to its last step.

Only the OpenTelemetry API is a dependency: without an SDK installed and configured
by the application, every span is a no-op that costs about a microsecond.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, propagate, trace

__all__ = ["current_traceparent", "enable", "joined", "span"]

_tracer = trace.get_tracer("ledgerflow")
_on = True


def enable(on: bool) -> None:
    """Make spans (True, the default) or not: for a process (a benchmark) that
    compares the two. Nothing is recorded either way without an SDK installed."""
    global _on
    _on = on


def current_traceparent() -> str | None:
    """The W3C traceparent of the span active now, to record with a start."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def joined(traceparent: str | None) -> Iterator[None]:
    """Run the block in the trace ``traceparent`` names (no change without one)."""
    if not traceparent or not _on:
        yield
        return
    token = context.attach(propagate.extract({"traceparent": traceparent}))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[trace.Span]:
    """A span of ledgerflow's tracer, as the active one for the block."""
    if not _on:
        yield trace.INVALID_SPAN
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current
