"""What observability costs the engine, measured in one process: the 3-step workflow
of bench/modes.py (plain ``def`` steps), started the way users do, with metrics and
tracing on and off in alternating batches (on, off, off, on, ... so drift hits both
alike). Tracing "on" has the OpenTelemetry SDK installed with a batch processor
whose exporter drops the spans: what an application that exports them pays here.

    python bench/observability.py              # sqlite; one JSON line; ~40 s
    python bench/observability.py --backend postgres

Modes: ``sequential`` (start, then result, one after the other) and ``loop`` (starts
awaited in a loop, then all results). Each arm's workflows/s is its workflows over its
batches' time; ``overhead`` is 1 - on / off (the issue's target: at most 10 %). A
fresh database each run, removed afterwards.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import ledgerflow as lf
from ledgerflow import metrics, tracing
from modes import loop, sequential, three_def
from store import fresh_database, main, note


class _Dropped(SpanExporter):
    """Spans made, batched and handed over as to a collector, then dropped: the cost
    an application with tracing on pays in-process."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


SIZES = {"sequential": 120, "loop": 400}
ROUNDS = 4
"""Batches per arm and mode, in the order on, off, off, on, ..."""


def _observe(on: bool) -> None:
    metrics.enable(on)
    tracing.enable(on)


async def run_backend(backend: str) -> dict[str, Any]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    trace.set_tracer_provider(provider)
    result: dict[str, Any] = {"benchmark": "observability", "backend": backend, "modes": {}}
    async with fresh_database(backend, "obs") as (url, _floor, settings):
        result["settings"] = {**settings, "sizes": SIZES, "rounds": ROUNDS}
        async with lf.Engine(url, workflows=[three_def]) as engine:
            await sequential(engine, three_def, "warm", 20)
            for mode, run in (("sequential", sequential), ("loop", loop)):
                n = SIZES[mode]
                spent = {True: 0.0, False: 0.0}
                for round_ in range(2 * ROUNDS):
                    on = round_ % 4 in (0, 3)
                    _observe(on)
                    began = time.perf_counter()
                    await run(engine, three_def, f"{mode}-{round_}", n)
                    spent[on] += time.perf_counter() - began
                    note(f"{backend} {mode} batch {round_}: observed {'on' if on else 'off'}")
                _observe(True)
                rate = {on: ROUNDS * n / spent[on] for on in spent}
                result["modes"][mode] = {
                    "workflows_per_s_with": round(rate[True], 1),
                    "workflows_per_s_without": round(rate[False], 1),
                    "overhead": round(1 - rate[True] / rate[False], 3),
                }
    result["target_overhead"] = 0.10
    return result


if __name__ == "__main__":
    sys.exit(main(run_backend, __doc__))
