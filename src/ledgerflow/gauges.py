"""What the database holds for every process, read every few seconds into
Prometheus gauges (``ledgerflow.metrics``): task queue depth, circuit breaker
states, projection and relay lag, instances not ended by status, the ledger's head.

A process counts what it does itself as it happens; these are shared facts, so
each process that serves metrics (a worker with ``--metrics-port``, the HTTP
server) samples them, and dashboards take ``max`` across processes. A sample is a
handful of indexed reads; a failed one is logged and the gauges keep their last
values until the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import metrics
from ._waiting import cancel_and_wait
from .errors import LedgerflowError
from .hashing import to_micros
from .store import WorkflowStore
from .workflow.history import WorkflowStatus

__all__ = ["StoreGauges"]

log = logging.getLogger("ledgerflow.metrics")

_BREAKER = {"closed": 0, "half_open": 1, "open": 2}
_LIVE = (WorkflowStatus.RUNNING, WorkflowStatus.NEEDS_ATTENTION, WorkflowStatus.STUCK)


class StoreGauges:
    """Samples ``store`` into the gauges every ``every`` seconds once started
    (``start``/``stop``, or ``async with``); ``sample()`` reads once."""

    def __init__(self, store: WorkflowStore, *, every: float = 15.0) -> None:
        if every <= 0:
            raise ValueError(f"every must be a positive number of seconds, not {every!r}")
        self.store = store
        self.every = every
        self._task: asyncio.Task[None] | None = None
        # Label values reported before: one that disappears (a queue emptied and
        # gone, a projection dropped) is set to 0, not left at its last value.
        self._queues: set[str] = set()
        self._projections: set[str] = set()

    async def __aenter__(self) -> StoreGauges:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ledgerflow:gauges")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                if metrics.enabled():  # LEDGERFLOW_METRICS=0: nothing read either
                    await self.sample()
            except LedgerflowError as exc:
                log.warning("metrics: cannot read the store's gauges (%s)", exc)
            except Exception:  # a bug here must not end the sampling for good
                log.exception("metrics: reading the store's gauges failed")
            await asyncio.sleep(self.every)

    async def sample(self) -> None:
        # The database's clock: the one leases, due times and recorded_at follow.
        now_us = await self.store.database_now_us()
        await self._queue_depth(now_us)
        await self._breakers(now_us)
        await self._lag(now_us)
        counted = await self.store.count_instances([str(s) for s in _LIVE])
        for status, n in counted.items():
            metrics.INSTANCES.labels(status).set(n)

    async def _queue_depth(self, now_us: int) -> None:
        seen = set()
        for row in await self.store.list_queues(now_us):
            seen.add(row.queue)
            metrics.QUEUE_TASKS.labels(row.queue, "ready").set(row.ready)
            metrics.QUEUE_TASKS.labels(row.queue, "scheduled").set(row.scheduled)
            metrics.QUEUE_TASKS.labels(row.queue, "running").set(row.running)
        for gone in self._queues - seen:
            for state in ("ready", "scheduled", "running"):
                with contextlib.suppress(KeyError):
                    metrics.QUEUE_TASKS.remove(gone, state)
        self._queues = seen

    async def _breakers(self, now_us: int) -> None:
        for row in await self.store.list_resources(now_us=now_us):
            metrics.BREAKER_STATE.labels(row.resource).set(_BREAKER.get(row.state, 0))
            metrics.BREAKER_CHANGED.labels(row.resource).set(row.changed_at_us / 1_000_000)

    async def _lag(self, now_us: int) -> None:
        head = await self.store.head_position()
        metrics.HEAD_POSITION.labels(self.store.backend).set(head)
        seen = set()
        for row in await self.store.list_projections():
            seen.add(row.name)
            behind = max(0, head - row.position)
            age = 0.0
            if behind:
                oldest = await self.store.read_all(from_position=row.position + 1, limit=1)
                if oldest:
                    age = max(0.0, (now_us - to_micros(oldest[0].recorded_at)) / 1_000_000)
            metrics.PROJECTION_LAG_EVENTS.labels(row.name).set(behind)
            metrics.PROJECTION_LAG_SECONDS.labels(row.name).set(age)
            metrics.PROJECTION_FAILED.labels(row.name).set(int(row.failure is not None))
        for gone in self._projections - seen:
            for gauge in (
                metrics.PROJECTION_LAG_EVENTS,
                metrics.PROJECTION_LAG_SECONDS,
                metrics.PROJECTION_FAILED,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._projections = seen
