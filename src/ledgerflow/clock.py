"""Time as a port, so tests can move it and replay stays deterministic."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Protocol

from .hashing import from_micros, to_micros

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""
        ...

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        """Return at ``when`` (never, if None), or as soon as ``wake`` is set."""
        ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        timeout = None if when is None else max(0.0, (when - self.now()).total_seconds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)


class ManualClock:
    """A clock that moves only when told to: ``advance()`` or ``set()``.

    Sleepers wake when the time they wait for is reached by an advance.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    def now_us(self) -> int:
        return to_micros(self._now)

    def set(self, moment: datetime) -> None:
        if moment < self._now:
            raise ValueError("a ManualClock does not go backwards")
        self._now = moment
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def advance(self, by: timedelta | float) -> None:
        self.set(self._now + (by if isinstance(by, timedelta) else timedelta(seconds=by)))

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        while not wake.is_set() and (when is None or self._now < when):
            moved = self._moved
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(moved.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()


def clock_micros(clock: Clock) -> int:
    return to_micros(clock.now())


def micros_to_datetime(us: int) -> datetime:
    return from_micros(us)
