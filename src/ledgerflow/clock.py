"""Time as a port, so tests can move it and replay stays deterministic."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from ._waiting import wait_at_most
from .hashing import from_micros, to_micros

__all__ = ["Clock", "DatabaseClock", "ManualClock", "SystemClock"]


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
        await wait_at_most(wake.wait(), timeout)


class DatabaseClock:
    """Wall-clock time as the database tells it: this machine's clock plus an offset
    measured against the database's (``sync``), so that workers on hosts whose clocks
    disagree still agree on leases and due times. Engines use it unless given a clock,
    and measure again on every heartbeat.

    ``local`` is this machine's clock (a parameter so tests can skew it).
    """

    def __init__(self, local: Callable[[], datetime] | None = None) -> None:
        self._local = local or (lambda: datetime.now(UTC))
        self._offset = timedelta(0)
        self._best_rtt: float | None = None

    @property
    def offset(self) -> timedelta:
        """How far the database's clock is ahead of this machine's."""
        return self._offset

    def now(self) -> datetime:
        return self._local() + self._offset

    async def sync(self, database_now_us: Callable[[], Awaitable[int]]) -> None:
        """Measure the offset: the database's time against the middle of the round
        trip that read it. A reading over a slower round trip than the best seen
        (by more than half again) is less exact, and is kept only if the offset moved
        by more than that round trip (the clock was stepped)."""
        before = self._local()
        remote = from_micros(await database_now_us())
        after = self._local()
        rtt = (after - before).total_seconds()
        offset = remote - (before + (after - before) / 2)
        best = self._best_rtt
        moved = abs((offset - self._offset).total_seconds())
        if best is None or rtt <= best * 1.5 or moved > rtt:
            self._offset = offset
            self._best_rtt = rtt if best is None else min(best, rtt)

    async def sleep_until(self, when: datetime | None, wake: asyncio.Event) -> None:
        timeout = None if when is None else max(0.0, (when - self.now()).total_seconds())
        await wait_at_most(wake.wait(), timeout)


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
