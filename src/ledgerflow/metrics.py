"""Prometheus metrics of the engine and the store, in ``prometheus_client``'s default
registry (alongside the application's own): ``ledgerflow worker --metrics-port``
and the HTTP server's ``/metrics`` serve them.

``LEDGERFLOW_METRICS=0`` turns recording off (to measure what it costs). Label
values are workflow and step names (a program has a handful), never instance
ids. Each labelled child is looked up once and kept: the hot path pays one
``inc``/``observe`` (about a microsecond), not a label lookup.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import Counter, Histogram

__all__ = [
    "append_seconds",
    "enable",
    "pass_seconds",
    "step_attempt",
    "workflow_finished",
    "workflow_started",
    "workflow_stuck",
]

_ON = os.environ.get("LEDGERFLOW_METRICS", "1") != "0"

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_STARTED = Counter(
    "ledgerflow_workflows_started_total", "Workflow instances started.", ["workflow"]
)
_FINISHED = Counter(
    "ledgerflow_workflows_finished_total",
    "Workflow instances ended, by how (completed, failed, compensated, cancelled...).",
    ["workflow", "status"],
)
_STUCK = Counter(
    "ledgerflow_workflows_stuck_total",
    "Instances parked as stuck (their history cannot be replayed, or it asked to park).",
    ["workflow"],
)
_PASS = Histogram(
    "ledgerflow_pass_seconds",
    "One pass over an instance: replay, the commands it acts on, its append.",
    ["workflow"],
    buckets=_LATENCY,
)
_STEP = Histogram(
    "ledgerflow_step_attempt_seconds",
    "One attempt of a step (or compensation), by outcome (ok, error).",
    ["step", "outcome"],
    buckets=_LATENCY,
)
_APPEND = Histogram(
    "ledgerflow_append_seconds",
    "An append, from the call to its commit (group commit included), by backend.",
    ["backend"],
    buckets=_LATENCY,
)

K = TypeVar("K")
C = TypeVar("C")


def _kept(make: Callable[[K], C]) -> Callable[[K], C]:
    children: dict[K, C] = {}

    def child(key: K) -> C:
        found = children.get(key)
        if found is None:
            found = children[key] = make(key)
        return found

    return child


_started: Callable[[str], Counter] = _kept(_STARTED.labels)
_finished: Callable[[tuple[str, str]], Counter] = _kept(lambda key: _FINISHED.labels(*key))
_stuck: Callable[[str], Counter] = _kept(_STUCK.labels)
_pass: Callable[[str], Histogram] = _kept(_PASS.labels)
_step: Callable[[tuple[str, str]], Histogram] = _kept(lambda key: _STEP.labels(*key))
_append: Callable[[str], Histogram] = _kept(_APPEND.labels)


def enable(on: bool) -> None:
    """Record (True) or not: what ``LEDGERFLOW_METRICS`` sets at import, for a process
    (a benchmark) that compares the two."""
    global _ON
    _ON = on


def workflow_started(name: str) -> None:
    if _ON:
        _started(name).inc()


def workflow_finished(name: str, status: str) -> None:
    if _ON:
        _finished((name, status)).inc()


def workflow_stuck(name: str) -> None:
    if _ON:
        _stuck(name).inc()


def pass_seconds(name: str, seconds: float) -> None:
    if _ON:
        _pass(name).observe(seconds)


def step_attempt(name: str, ok: bool, seconds: float) -> None:
    if _ON:
        _step((name, "ok" if ok else "error")).observe(seconds)


def append_seconds(backend: str, seconds: float) -> None:
    if _ON:
        _append(backend).observe(seconds)
