"""Prometheus metrics of the engine and the store, in ``prometheus_client``'s default
registry (alongside the application's own): ``ledgerflow worker --metrics-port``
and the HTTP server's ``/metrics`` serve them.

Two kinds. What a process does is counted as it happens (starts, ends, passes, step
attempts and retries, appends and group commits, claims and how late they were,
leases lost, workers reaped, projection batches, relayed messages). What the
database holds for everyone (queue depth, breaker state, projection and relay lag,
live instances by status) is read by ``StoreGauges`` every few seconds: each
process that serves metrics reports the same values, so dashboards take ``max``
of them (docs/observability.md).

``LEDGERFLOW_METRICS=0`` turns recording off (to measure what it costs). Label
values are workflow, step, queue, resource and projection names (a program has a
handful), never instance ids. Each labelled child is looked up once and kept: the
hot path pays one ``inc``/``observe`` (about a microsecond), not a label lookup.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "append_seconds",
    "claimed",
    "commit",
    "enable",
    "enabled",
    "lease_lost",
    "pass_seconds",
    "projection_batch",
    "relayed",
    "step_attempt",
    "step_retry",
    "workers_reaped",
    "workflow_finished",
    "workflow_started",
    "workflow_stuck",
]

_ON = os.environ.get("LEDGERFLOW_METRICS", "1") != "0"

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DELAY = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

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
_RETRIES = Counter(
    "ledgerflow_step_retries_total",
    "Failed step attempts that are tried again (after their backoff).",
    ["step"],
)
_APPEND = Histogram(
    "ledgerflow_append_seconds",
    "An append, from the call to its commit (group commit included), by backend.",
    ["backend"],
    buckets=_LATENCY,
)
_COMMIT = Histogram(
    "ledgerflow_commit_seconds",
    "One group commit: the transaction that writes a batch of appends, by backend.",
    ["backend"],
    buckets=_LATENCY,
)
_BATCH = Histogram(
    "ledgerflow_commit_batch_appends",
    "Appends written by one group commit, by backend.",
    ["backend"],
    buckets=_SIZES,
)
_CLAIM_DELAY = Histogram(
    "ledgerflow_claim_delay_seconds",
    "From when work was due (a wake-up, a task) to when a runner claimed it, by kind.",
    ["kind"],
    buckets=_DELAY,
)
_LEASES_LOST = Counter(
    "ledgerflow_leases_lost_total",
    "Leases this process held that another runner took over (it stepped back), by kind.",
    ["kind"],
)
_REAPED = Counter(
    "ledgerflow_workers_reaped_total",
    "Workers this process found dead (heartbeat older than their lease): their "
    "leases were released for others to take over.",
)
_PROJECTED = Histogram(
    "ledgerflow_projection_batch_events",
    "Events read by one projection (or relay) batch.",
    ["projection"],
    buckets=_SIZES,
)
_PROJECTION_SECONDS = Histogram(
    "ledgerflow_projection_batch_seconds",
    "One projection (or relay) batch: read, apply or publish, checkpoint.",
    ["projection"],
    buckets=_LATENCY,
)
_RELAYED = Counter(
    "ledgerflow_relay_messages_total",
    "Messages a relay published (duplicates the broker dropped included).",
    ["relay"],
)

QUEUE_TASKS = Gauge(
    "ledgerflow_queue_tasks",
    "Tasks in a task queue: ready (due, not running), scheduled (due later), running.",
    ["queue", "state"],
)
BREAKER_STATE = Gauge(
    "ledgerflow_breaker_state",
    "A circuit breaker's state: 0 closed, 1 half-open, 2 open.",
    ["resource"],
)
BREAKER_CHANGED = Gauge(
    "ledgerflow_breaker_changed_timestamp_seconds",
    "When a circuit breaker last changed state (Unix time; 0: never).",
    ["resource"],
)
PROJECTION_LAG_EVENTS = Gauge(
    "ledgerflow_projection_lag_events",
    "Events in the ledger a projection (or relay, relay_<name>) has not processed yet.",
    ["projection"],
)
PROJECTION_LAG_SECONDS = Gauge(
    "ledgerflow_projection_lag_seconds",
    "Age of the oldest event a projection (or relay) has not processed (0: caught up).",
    ["projection"],
)
PROJECTION_FAILED = Gauge(
    "ledgerflow_projection_failed",
    "1 while a projection (or relay) is stopped on a failing event.",
    ["projection"],
)
INSTANCES = Gauge(
    "ledgerflow_instances",
    "Workflow instances not ended, by status (running, needs_attention, stuck).",
    ["status"],
)
HEAD_POSITION = Gauge(
    "ledgerflow_ledger_head_position",
    "The ledger's last global position, by backend (absent until first read: never a made-up 0).",
    ["backend"],
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
_retries: Callable[[str], Counter] = _kept(_RETRIES.labels)
_commit: Callable[[str], Histogram] = _kept(_COMMIT.labels)
_batch: Callable[[str], Histogram] = _kept(_BATCH.labels)
_claim_delay: Callable[[str], Histogram] = _kept(_CLAIM_DELAY.labels)
_leases_lost: Callable[[str], Counter] = _kept(_LEASES_LOST.labels)
_projected: Callable[[str], Histogram] = _kept(_PROJECTED.labels)
_projection_seconds: Callable[[str], Histogram] = _kept(_PROJECTION_SECONDS.labels)
_relayed: Callable[[str], Counter] = _kept(_RELAYED.labels)


def enable(on: bool) -> None:
    """Record (True) or not: what ``LEDGERFLOW_METRICS`` sets at import, for a process
    (a benchmark) that compares the two."""
    global _ON
    _ON = on


def enabled() -> bool:
    """Whether metrics are recorded (``LEDGERFLOW_METRICS``, ``enable``)."""
    return _ON


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


def step_retry(name: str) -> None:
    if _ON:
        _retries(name).inc()


def commit(backend: str, appends: int, seconds: float) -> None:
    if _ON:
        _commit(backend).observe(seconds)
        _batch(backend).observe(appends)


def claimed(kind: str, delays_us: list[int]) -> None:
    """Work of ``kind`` (workflow, task) claimed, each ``delays_us`` after it was due."""
    if _ON:
        observe = _claim_delay(kind).observe
        for delay in delays_us:
            observe(max(0, delay) / 1_000_000)


def lease_lost(kind: str) -> None:
    if _ON:
        _leases_lost(kind).inc()


def workers_reaped(count: int) -> None:
    if _ON and count:
        _REAPED.inc(count)


def projection_batch(name: str, events: int, seconds: float) -> None:
    if _ON:
        _projected(name).observe(events)
        _projection_seconds(name).observe(seconds)


def relayed(relay: str, messages: int) -> None:
    if _ON and messages:
        _relayed(relay).inc(messages)
