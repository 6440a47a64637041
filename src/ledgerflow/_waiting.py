"""Waiting with a time limit, without losing a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

__all__ = ["wait_at_most"]


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
