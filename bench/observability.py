"""What observability costs the engine, measured in one process: the 3-step workflow
of bench/workflows.py (bench/modes.py, plain ``def`` steps), started the way users
do, in batches that rotate through four arms so drift hits all alike:

- ``off``: no metrics, no spans;
- ``metrics``: Prometheus metrics only;
- ``traced``: metrics, and every span recorded (the OpenTelemetry SDK with a batch
  processor whose exporter drops the spans: what an application that exports them
  pays in-process);
- ``sampled``: metrics, and spans under ``ParentBased(TraceIdRatioBased(0.1))``, the
  usual production sampler (a tenth of the workflows recorded, whole).

    python bench/observability.py              # sqlite; one JSON line; ~50 s
    python bench/observability.py --backend postgres

Modes: ``sequential`` (start, then result, one after the other) and ``loop`` (starts
awaited in a loop, then all results). Each arm's workflows/s is its workflows over its
batches' time; an arm's ``overhead`` is 1 - arm / off (the issue's target for
tracing + metrics: at most 10 %). A fresh database each run, removed afterwards.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

import ledgerflow as lf
from ledgerflow import metrics, tracing
from modes import loop, sequential, three_def
from store import fresh_database, main, note


class _Dropped(SpanExporter):
    """Spans made, batched and handed over as to a collector, then dropped."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Switch(ParentBased):
    """``ParentBased`` (the SDK's default kind, children follow their parent) whose
    root sampler is the running arm's: a provider's sampler is fixed."""

    def __init__(self) -> None:
        super().__init__(ALWAYS_ON)

    def root(self, sampler: Sampler) -> None:
        self._root = sampler


SIZES = {"sequential": 100, "loop": 400}
ROUNDS = 8
"""Batches per arm and mode."""
ARMS = ("off", "metrics", "traced", "sampled")
_RATIO = TraceIdRatioBased(0.1)


def _arm(name: str, switch: _Switch) -> None:
    metrics.enable(name != "off")
    tracing.enable(name in ("traced", "sampled"))
    switch.root(_RATIO if name == "sampled" else ALWAYS_ON)


async def run_backend(backend: str) -> dict[str, Any]:
    switch = _Switch()
    provider = TracerProvider(sampler=switch)
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    trace.set_tracer_provider(provider)
    result: dict[str, Any] = {"benchmark": "observability", "backend": backend, "modes": {}}
    async with fresh_database(backend, "obs") as (url, _floor, settings):
        result["settings"] = {**settings, "sizes": SIZES, "rounds": ROUNDS}
        async with lf.Engine(url, workflows=[three_def]) as engine:
            await sequential(engine, three_def, "warm", 20)
            for mode, run in (("sequential", sequential), ("loop", loop)):
                n = SIZES[mode]
                spent = dict.fromkeys(ARMS, 0.0)
                for round_ in range(ROUNDS):
                    # Each round a rotation of the arms: none is always first or last.
                    order = ARMS[round_ % len(ARMS) :] + ARMS[: round_ % len(ARMS)]
                    for arm in order:
                        _arm(arm, switch)
                        began = time.perf_counter()
                        await run(engine, three_def, f"{mode}-{round_}-{arm}", n)
                        spent[arm] += time.perf_counter() - began
                        # Spans still queued are exported before the next arm, not
                        # during it (each arm pays for its own, not the one before).
                        provider.force_flush()
                    note(f"{backend} {mode} round {round_} done")
                _arm("traced", switch)
                rate = {arm: ROUNDS * n / spent[arm] for arm in ARMS}
                result["modes"][mode] = {
                    "workflows_per_s": {arm: round(rate[arm], 1) for arm in ARMS},
                    "overhead": {arm: round(1 - rate[arm] / rate["off"], 3) for arm in ARMS[1:]},
                }
    provider.shutdown()
    result["target_overhead"] = 0.10
    return result


if __name__ == "__main__":
    sys.exit(main(run_backend, __doc__))
