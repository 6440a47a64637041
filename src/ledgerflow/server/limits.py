"""A token bucket per principal: each key (or token subject) may make ``rate``
requests a second on average, ``burst`` at once. In the server's memory: each
server process limits on its own (behind N servers a caller gets up to N times
the rate; a shared limit is the guarded resources' rate limit in the database)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from .problems import Problem

__all__ = ["RateLimiter", "too_many"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    MAX_BUCKETS = 100_000
    """Buckets kept (least recently used dropped first): a dropped bucket is full,
    which only ever lets a caller in."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, who: str, now: float | None = None) -> float:
        """Take one token for ``who``: 0.0 if granted, else the seconds until one is."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(who, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        self._buckets[who] = bucket
        if len(self._buckets) > self.MAX_BUCKETS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate


def too_many(wait: float, detail: str) -> Problem:
    """429 for a caller over a limit, told when to come back (whole seconds, at
    least one: ``Retry-After`` takes no fraction)."""
    return Problem(
        429, "Too many requests", detail, headers={"Retry-After": str(max(1, round(wait + 0.5)))}
    )
