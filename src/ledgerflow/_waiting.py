"""Waiting with a time limit, without losing a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from typing import Any

__all__ = ["cancel_and_wait", "wait_at_most"]


async def wait_at_most(awaitable: Awaitable[object], timeout: float | None) -> bool:
    """Await ``awaitable`` for at most ``timeout`` seconds (None: no limit); False if
    the time ran out first.

    Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that lands just as
    the awaited thing completes (CPython gh-86296), and the cancelled task then waits
    on as if nothing happened; a cancelled subscription kept polling for ever.
    ``asyncio.timeout`` counts cancellations and never swallows one.
    """
    try:
        async with asyncio.timeout(timeout):
            await awaitable
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and return once every one has ended, however it ends.

    A cancellation can still be lost inside a library we await (psycopg_pool waits
    for a pooled connection with ``asyncio.wait_for``, gh-86296 again): the task
    then goes on as if never cancelled, and a plain ``await`` after ``cancel()``
    waits for ever (an engine's close hung on its heartbeat, 1 run in ~6). So the
    cancellation is repeated until the task has ended.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
