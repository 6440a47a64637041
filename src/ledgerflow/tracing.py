"""OpenTelemetry spans of the engine, in the trace of the call that started the
workflow: its W3C ``traceparent`` is recorded with the start (and with every later
append made inside a span), read back by every pass in any process, carried in a
task queue's payload and in the headers of the messages the relay publishes; so an
order is one trace from the HTTP request to its last step, across services.

Spans: ``start <workflow>`` (producer), ``workflow <workflow>`` per pass (consumer),
``step <name>`` / ``compensation <name>`` per attempt (consumer when a task queue's
worker runs it), ``timer fired`` (its duration is how late it fired), ``signal
<name>`` when sent (producer) and ``signal <name> taken`` (linked to the sender's),
``projection <name>`` per batch, ``publish <subject>`` per relayed message
(producer) and ``process <subject>`` per delivery (consumer).

Only the OpenTelemetry API is a dependency: without an SDK installed and configured
by the application, every span is a no-op that costs about a microsecond. With
one, a span costs what the SDK makes it cost (about 15 µs each, recorded); the
usual ``ParentBased(TraceIdRatioBased(r))`` sampler keeps a whole workflow in or out
of the sample, since its passes all join the start's sampled flag.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

__all__ = [
    "SpanKind",
    "active",
    "captured",
    "current_traceparent",
    "enable",
    "fail",
    "finished_span",
    "inject",
    "joined",
    "link",
    "rejoin",
    "rooted",
    "span",
]

_tracer = trace.get_tracer("ledgerflow")
_on = True
_last: tuple[object, str] = (None, "")
"""The span context last formatted as a traceparent, and that traceparent."""
_drops: tuple[object, bool] | None = None
"""The tracer provider last looked at, and whether its sampler drops every child of
an unsampled parent (``_unsampled_children_dropped``)."""


def enable(on: bool) -> None:
    """Make spans (True, the default) or not: for a process (a benchmark) that
    compares the two. Nothing is recorded either way without an SDK installed."""
    global _on
    _on = on


def current_traceparent() -> str | None:
    """The W3C traceparent of the span active now, to record with an append; None
    outside any valid span (no SDK, or no span), so nothing is recorded then."""
    global _last
    if not _on:
        return None
    found = trace.get_current_span().get_span_context()
    if not found.is_valid:
        return None
    if _last[0] is found:  # a pass's appends share its span: formatted once
        return _last[1]
    made = f"00-{found.trace_id:032x}-{found.span_id:016x}-{int(found.trace_flags):02x}"
    _last = (found, made)
    return made


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Put the active span's context in ``headers`` (``traceparent``, and
    ``tracestate`` if any), as the configured propagator writes it."""
    if _on:
        propagate.inject(headers)
    return headers


def active() -> bool:
    """Whether a valid span is active now (the caller's, to make a child of)."""
    return _on and trace.get_current_span().get_span_context().is_valid


_extracted: dict[str, context.Context] = {}
"""Contexts of recent traceparents: every pass of an instance joins the same one, and
parsing it is a third of what joining costs."""


@contextmanager
def joined(carrier: str | Mapping[str, str] | None) -> Iterator[None]:
    """Run the block in the trace a ``traceparent`` (or message headers holding
    one) names; no change without one."""
    if not carrier or not _on:
        yield
        return
    if isinstance(carrier, str):
        found = _extracted.get(carrier)
        if found is None:
            if len(_extracted) >= 4096:
                _extracted.clear()
            found = _extracted[carrier] = propagate.extract({"traceparent": carrier})
    else:
        found = propagate.extract(carrier)
    token = context.attach(found)
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def rooted() -> Iterator[None]:
    """Run the block outside any trace: what it makes starts a trace of its own
    (an event recorded outside any span, published in a loop over others)."""
    if not _on:
        yield
        return
    token = context.attach(context.Context())
    try:
        yield
    finally:
        context.detach(token)


def captured() -> context.Context:
    """The trace context active now, to ``rejoin`` from another task."""
    return context.get_current()


def rejoin(found: context.Context) -> None:
    """Make ``found`` the active trace context of this task from now on: a kept
    workflow body going on in a later pass joins that pass's span."""
    if _on:
        context.attach(found)


def link(traceparent: str | None) -> Link | None:
    """A link to the span a recorded traceparent names (a signal's sender)."""
    if not traceparent or not _on:
        return None
    found = trace.get_current_span(propagate.extract({"traceparent": traceparent}))
    spanned = found.get_span_context()
    return Link(spanned) if spanned.is_valid else None


@contextmanager
def span(
    name: str,
    attributes: Attributes = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    links: Sequence[Link] = (),
    expected: tuple[type[BaseException], ...] = (),
) -> Iterator[trace.Span]:
    """A span of ledgerflow's tracer, the active one for the block; an exception
    leaving it is recorded on it and sets its status to error, unless it is one of
    ``expected`` (control flow the caller handles: an event on the span says so).

    ``start_span`` and an attach rather than ``start_as_current_span``: the same
    span for a fifth less of its cost, which is most of what tracing adds to a
    workflow (bench/observability.py)."""
    if not _on:
        yield trace.INVALID_SPAN
        return
    parent = trace.get_current_span()
    within = parent.get_span_context()
    if within.is_valid and not within.trace_flags.sampled and _unsampled_children_dropped():
        # The sampler would drop it (its trace is out of the sample): none is made,
        # and the unsampled context goes on as it is. Most workflows of a sampled
        # deployment pay this check instead of a span.
        yield parent
        return
    current = _tracer.start_span(name, kind=kind, links=links, attributes=attributes)
    token = context.attach(trace.set_span_in_context(current))
    try:
        yield current
    except expected as exc:
        current.add_event(type(exc).__name__, {"message": str(exc)})
        raise
    except BaseException as exc:
        if isinstance(exc, Exception):
            current.record_exception(exc)
            current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        context.detach(token)
        current.end()


def _unsampled_children_dropped() -> bool:
    """Whether the SDK's sampler never samples a child of an unsampled parent: the
    default ``ParentBased`` (children follow their parent) or a trace-id ratio (the
    same trace id, the same decision). Another sampler (one that may sample such a
    child) gets every span made, as without this shortcut."""
    global _drops
    provider = trace.get_tracer_provider()
    if _drops is not None and _drops[0] is provider:
        return _drops[1]
    drops = False
    try:
        from opentelemetry.sdk.trace.sampling import (
            ALWAYS_OFF,
            ParentBased,
            TraceIdRatioBased,
        )
    except ImportError:  # no SDK: no sampler, and nothing is recorded anyway
        pass
    else:
        sampler = getattr(provider, "sampler", None)
        if isinstance(sampler, ParentBased):
            drops = all(
                getattr(sampler, which, None) is ALWAYS_OFF
                for which in ("_remote_parent_not_sampled", "_local_parent_not_sampled")
            )
        elif isinstance(sampler, TraceIdRatioBased):
            drops = True
    _drops = (provider, drops)
    return drops


def fail(current: trace.Span, error_type: str, message: str) -> None:
    """Mark a span failed by an error that was handled, not raised (a step attempt
    that failed: its outcome is recorded, the pass goes on)."""
    if current.is_recording():
        current.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


def finished_span(name: str, start_ns: int, end_ns: int, attributes: Attributes = None) -> None:
    """A span already over (a timer, from when it was due to when it fired), in
    the active trace."""
    if _on:
        _tracer.start_span(name, start_time=start_ns, attributes=attributes).end(end_ns)
