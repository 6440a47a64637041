"""``wait_at_most``: a time-limited wait that never swallows a cancellation; and
``cancel_and_wait``, which ends a task even where a library lost one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from ledgerflow._waiting import cancel_and_wait, wait_at_most


async def _wait_for(awaitable: Awaitable[object], timeout: float | None) -> bool:
    """What the code did before: asyncio.wait_for, a timeout meaning False."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, timeout)
        return True
    return False


async def _cancelled_as_it_fires(
    wait: Callable[[Awaitable[object], float], Coroutine[Any, Any, bool]],
) -> bool:
    """Whether a waiter cancelled in the same turn as its event is set ends cancelled
    (a subscription or a scheduler told to stop just as a commit lands)."""
    event = asyncio.Event()
    waiter = asyncio.create_task(wait(event.wait(), 10.0))
    await asyncio.sleep(0)  # the waiter is waiting
    event.set()
    waiter.cancel()
    try:
        await waiter
    except asyncio.CancelledError:
        return True
    return False


async def test_a_cancellation_that_lands_as_the_event_fires_is_kept() -> None:
    for _ in range(20):
        assert await _cancelled_as_it_fires(wait_at_most)


async def test_the_race_is_real_with_wait_for_on_this_python() -> None:
    """The test above would catch the old code: asyncio.wait_for loses this
    cancellation on Python 3.11 (CPython gh-86296; fixed in 3.12)."""
    import sys

    if sys.version_info >= (3, 12):
        pytest.skip("asyncio.wait_for keeps the cancellation from Python 3.12 on")
    lost = [not await _cancelled_as_it_fires(_wait_for) for _ in range(20)]
    assert any(lost)


async def test_times_out_and_returns() -> None:
    assert not await wait_at_most(asyncio.Event().wait(), 0.01)
    done = asyncio.Event()
    done.set()
    assert await wait_at_most(done.wait(), None)


async def test_cancel_and_wait_ends_a_task_that_lost_a_cancellation() -> None:
    """A library that loses a cancellation (psycopg_pool's ``wait_for`` on 3.11) lets
    the task go on; cancelling once and awaiting it would wait for ever."""
    lost = 0

    async def heartbeat() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost == 0:
                    lost += 1  # swallowed, as the library did
                    continue
                raise

    task = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.03)
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert task.cancelled()
    assert lost == 1
