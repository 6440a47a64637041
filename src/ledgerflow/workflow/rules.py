"""The rules one step's attempts run under: its policy, made concrete.

A step gets them from, most specific first: ``retry=`` / ``timeout=`` given in code
(to ``ctx.step`` or ``@ledgerflow.step``), then the named policy it runs under
(``policy="erp"``, the version in force at each attempt), then the defaults
(``DEFAULT_STEP_RETRY``, no timeout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..resilience.book import PolicyVersion
from ..resilience.policy import OnExhausted, Retry, Timeouts
from ..resilience.retrying import is_retryable, jitter_source, retry_delay
from ..retry import RetryPolicy

__all__ = ["INLINE_BACKOFF_S", "StepRules", "inline_rules", "named_rules"]

INLINE_BACKOFF_S = 1.0
"""Waits between attempts shorter than this are slept in the pass; longer ones end it
and wake the instance by a durable timer (no lease, no thread held meanwhile). Both
are recorded (``StepAttemptFailed.retry_at_us``): a restart waits out the rest."""


@dataclass(frozen=True, slots=True)
class StepRules:
    """How a step's attempts run and when they stop."""

    retry: Retry
    start_to_close: float | None = None
    schedule_to_close: float | None = None
    heartbeat: float | None = None
    on_exhausted: OnExhausted = "fail"
    policy: str | None = None
    policy_version: int | None = None
    code: RetryPolicy | None = None
    """The ``RetryPolicy`` given in code, if any: asked itself (a subclass may
    override ``delay`` or ``retries``)."""

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether another attempt follows failed attempt ``attempt`` (1-based)."""
        if self.code is not None:
            return self.code.retries(error, attempt)
        return attempt < self.retry.max_attempts and is_retryable(error, self.retry.non_retryable)

    def retryable(self, error: BaseException) -> bool:
        """Whether ``error`` is the kind worth trying again (attempts aside)."""
        return self.retries(error, 0)

    def delay(self, workflow_id: str, seq: int, attempt: int) -> float:
        """Seconds before the attempt after failed attempt ``attempt``."""
        source = jitter_source(workflow_id, seq, attempt)
        if self.code is not None:
            return self.code.delay(attempt, source)
        return retry_delay(self.retry, attempt, source)


_NO_TIMEOUTS = Timeouts()


def _retry_of(policy: RetryPolicy) -> Retry:
    return Retry(
        max_attempts=policy.max_attempts,
        initial_interval=policy.initial_interval,
        multiplier=policy.backoff,
        max_interval=policy.max_interval,
        jitter=policy.jitter,
    )


@functools.lru_cache(maxsize=256)
def inline_rules(retry: RetryPolicy, timeout: float | None) -> StepRules:
    """Rules of a step with no named policy (one object per distinct pair)."""
    return StepRules(_retry_of(retry), start_to_close=timeout, code=retry)


def named_rules(
    found: PolicyVersion, retry: RetryPolicy | None, timeout: float | None, default: RetryPolicy
) -> StepRules:
    """Rules of a step under a named policy; ``retry``/``timeout`` from code win. One
    object per (policy version, retry, timeout): every attempt asks."""
    key = (id(found), retry, timeout, default)
    kept = _NAMED.get(key)
    if kept is not None and kept[0] is found:
        return kept[1]
    if len(_NAMED) >= _NAMED_SIZE:
        _NAMED.clear()
    made = _named_rules(found, retry, timeout, default)
    # The entry holds ``found`` itself: its id cannot be reused while it is here.
    _NAMED[key] = (found, made)
    return made


_NAMED: dict[tuple[object, ...], tuple[PolicyVersion, StepRules]] = {}
_NAMED_SIZE = 1024


def _named_rules(
    found: PolicyVersion, retry: RetryPolicy | None, timeout: float | None, default: RetryPolicy
) -> StepRules:
    policy = found.policy
    code = retry if retry is not None else (default if policy.retry is None else None)
    limits = policy.timeout or _NO_TIMEOUTS
    return StepRules(
        _retry_of(code) if code is not None else policy.retry or _retry_of(default),
        start_to_close=timeout if timeout is not None else limits.start_to_close,
        schedule_to_close=limits.schedule_to_close,
        heartbeat=limits.heartbeat,
        on_exhausted=policy.on_exhausted,
        policy=found.name,
        policy_version=found.version,
        code=code,
    )
