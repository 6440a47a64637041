"""Testing workflows: time that moves only when told, and running until idle.

A workflow that waits three days for an approval should not take three days to
test. ``workflow_environment`` opens an engine on a ``ManualClock`` (and, by default,
an in-memory store); ``run_until_idle`` lets every instance run until none has work
left at the current time; ``advance`` moves the clock and does the same, so durable
timers and signal timeouts fire at once::

    from ledgerflow.testing import workflow_environment

    async def test_unanswered_orders_are_rejected_after_three_days() -> None:
        async with workflow_environment(order) as env:
            handle = await env.engine.start(order, Order("SKU-1", 100), id="o-1")
            await env.run_until_idle()
            assert (await handle.describe()).waiting_for == "signal 'approval'"
            await env.advance(timedelta(days=3))
            assert await handle.result() == "rejected"

Retry backoffs inside a pass are real (short) sleeps; give steps retry policies with
small intervals in tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .clock import ManualClock
from .hashing import from_micros, to_micros
from .store import open_store
from .workflow.engine import Engine
from .workflow.executors import Definition

__all__ = ["ManualClock", "WorkflowEnvironment", "workflow_environment"]

_QUIET_LOOKS = 3
"""Looks in a row that must find nothing running and nothing due: a pass that just
ended may have nudged another instance that the scheduler has not claimed yet."""


@dataclass
class WorkflowEnvironment:
    """An engine on a manual clock, and ways to let it run."""

    engine: Engine
    clock: ManualClock

    async def run_until_idle(self, *, skip_timers: bool = False, timeout: float = 30.0) -> None:
        """Return once no instance is running and none is due at the clock's time.

        With ``skip_timers`` the clock jumps to each next wake-up (timers, signal
        timeouts) in turn, until only instances waiting for signals (or nothing) are
        left. Raises ``TimeoutError`` after ``timeout`` real seconds.
        """
        engine = self.engine
        quiet = 0
        async with asyncio.timeout(timeout):
            while True:
                due = await engine.store.next_wakeup()
                now = to_micros(self.clock.now())
                if engine._active or (due is not None and due <= now):
                    quiet = 0
                    engine._wake.set()
                    await asyncio.sleep(0.001)
                    continue
                quiet += 1
                if quiet < _QUIET_LOOKS:
                    await asyncio.sleep(0.001)
                    continue
                if skip_timers and due is not None:
                    self.clock.set(from_micros(due))
                    quiet = 0
                    continue
                return

    async def advance(self, by: timedelta | float, *, timeout: float = 30.0) -> None:
        """Move the clock forward by ``by``, then run until idle."""
        self.clock.advance(by)
        await self.run_until_idle(timeout=timeout)


@asynccontextmanager
async def workflow_environment(
    *workflows: Definition,
    store: str = "memory://",
    start: datetime | None = None,
    **engine_options: Any,
) -> AsyncIterator[WorkflowEnvironment]:
    """An engine running ``workflows`` (and state machines) on a ``ManualClock``
    starting at ``start`` (default 2030-01-01 UTC), on ``store`` (default: in
    memory); closed on exit.

    ``engine_options`` go to ``Engine`` (``concurrency``, ``step_threads``...).
    """
    clock = ManualClock(start or datetime(2030, 1, 1, tzinfo=UTC))
    engine_options.setdefault("poll_interval", 0.05)
    opened = open_store(store, clock=clock.now) if store.startswith("memory") else store
    async with Engine(opened, workflows=workflows, clock=clock, **engine_options) as engine:
        try:
            yield WorkflowEnvironment(engine, clock)
        finally:
            if not isinstance(opened, str):
                await engine.close()
                await opened.close()
