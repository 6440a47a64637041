"""Whether a failed attempt is tried again, and after how long: pure functions.

Retryability is data. In order, the first that speaks decides:

1. the policy's ``non_retryable`` names the error's type or one of its bases
   (``"ValueError"``, or qualified: ``"myapp.errors.Rejected"``): not retried;
2. the type (or a base) was classified with ``ledgerflow.classify(...)``;
3. the error has a ``retryable`` attribute (every ``LedgerflowError`` has one; a
   user's own error class may too): its value;
4. otherwise it is retried: most failures of external calls are transient.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .policy import Retry

__all__ = ["classify", "is_retryable", "jitter_source", "retry_delay"]

_CLASSIFIED: dict[type[BaseException], bool] = {}


def classify(*types: type[BaseException], retryable: bool) -> None:
    """Say once, for the whole process, whether failures of these exception types
    (and their subclasses) are worth retrying: ``classify(PaymentDeclined,
    retryable=False)`` for a business-rule violation; ``classify(ERPBusy,
    retryable=True)`` to retry an error whose class says otherwise."""
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"classify() takes exception types, not {t!r}")
        _CLASSIFIED[t] = retryable


def is_retryable(
    error: BaseException,
    non_retryable: Iterable[str] = (),
    non_retryable_types: tuple[type[BaseException], ...] = (),
) -> bool:
    """Whether ``error`` is worth another attempt (see the module docstring)."""
    mro = type(error).__mro__
    names = set(non_retryable)
    if names or non_retryable_types:
        if isinstance(error, non_retryable_types):
            return False
        for t in mro:
            if t.__qualname__ in names or f"{t.__module__}.{t.__qualname__}" in names:
                return False
    if _CLASSIFIED:
        for t in mro:
            said = _CLASSIFIED.get(t)
            if said is not None:
                return said
    said = getattr(error, "retryable", None)
    return said if isinstance(said, bool) else True


def jitter_source(workflow_id: str, seq: int, attempt: int) -> random.Random:
    """A source for retry jitter of its own, derived from (instance, command,
    attempt): the same on every worker and every replay, and never the workflow's
    own random stream."""
    return random.Random(f"{workflow_id}/{seq}/{attempt}")


def retry_delay(retry: Retry, attempt: int, source: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based):
    ``min(max_interval, initial_interval * multiplier ** (attempt - 1))`` plus up to
    ``jitter`` of that."""
    try:
        grown = retry.initial_interval * retry.multiplier ** (attempt - 1)
    except OverflowError:
        grown = retry.max_interval
    base = min(retry.max_interval, grown)
    return base + source.random() * retry.jitter * base
