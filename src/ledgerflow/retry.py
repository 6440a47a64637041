"""Retry policies: pure values and pure arithmetic; the caller does the waiting."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta

from .errors import ConfigurationError
from .resilience.retrying import is_retryable

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a failing step or compensation.

    All intervals are in seconds. ``max_attempts`` counts the first try: 1 means no
    retry. Exceptions that are instances of ``non_retryable`` fail at once, and so do
    those that say they are not retryable (``ledgerflow.classify``, or a
    ``retryable = False`` attribute).
    """

    max_attempts: int = 3
    initial_interval: float = 0.1
    backoff: float = 2.0
    max_interval: float = 30.0
    jitter: float = 0.1
    """Fraction of each delay added at random, so retries of many instances spread."""
    non_retryable: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be >= 1")
        if self.initial_interval < 0 or self.max_interval < 0 or self.backoff < 1:
            raise ConfigurationError("RetryPolicy intervals must be >= 0 and backoff >= 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1))
        spread = (rng or random).random() * self.jitter * base
        return base + spread

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt ``attempt`` (1-based) failing with ``error`` is tried again:
        attempts are left and the error is retryable (see ``ledgerflow.classify``)."""
        return attempt < self.max_attempts and is_retryable(error, (), self.non_retryable)

    @classmethod
    def none(cls) -> RetryPolicy:
        return cls(max_attempts=1)


def as_seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
