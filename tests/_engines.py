"""Helpers for tests that run engines: the engine factory type and waiting helpers.

The ``engine`` and ``clock`` fixtures live in ``conftest.py``; these are the plain
functions and names the test modules import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import ledgerflow

WAIT = 20.0
"""Guard against a hang, never an assertion about speed."""

EngineFactory = Callable[..., AbstractAsyncContextManager[ledgerflow.Engine]]


async def waiting_for(engine: ledgerflow.Engine, workflow_id: str, what: str) -> None:
    """Return once the instance is suspended waiting for ``what`` (a prefix of its
    description's ``waiting_for``, e.g. "timer" or "signal 'go'")."""
    async with asyncio.timeout(WAIT):
        # The engine runs the instance in another task; the store is where we see it.
        while True:
            try:
                described = await engine.describe(workflow_id)
            except ledgerflow.WorkflowNotFoundError:  # a child not started yet
                described = None
            if described is not None and (described.waiting_for or "").startswith(what):
                return
            await asyncio.sleep(0.01)


async def until_status(engine: ledgerflow.Engine, workflow_id: str, status: str) -> None:
    """Return once the instance's status is ``status`` (e.g. "stuck")."""
    async with asyncio.timeout(WAIT):
        while True:
            if (await engine.describe(workflow_id)).status == status:
                return
            await asyncio.sleep(0.01)
