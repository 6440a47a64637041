"""The rules one step's attempts run under: its policy, made concrete.

A step gets them from, most specific first: ``retry=`` / ``timeout=`` given in code
(to ``ctx.step`` or ``@ledgerflow.step``), then the named policy it runs under
(``policy="erp"``, the version in force at each attempt), then the defaults
(``DEFAULT_STEP_RETRY``, no timeout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import CircuitOpenError
from ..resilience.book import PolicyVersion
from ..resilience.policy import OnExhausted, Retry, Timeouts
from ..resilience.retrying import is_retryable, jitter_source, retry_delay
from ..retry import RetryPolicy
from .steps import NO_LIMITS, Limits

__all__ = [
    "INLINE_BACKOFF_S",
    "StepRules",
    "attempt_limits",
    "inline_rules",
    "named_rules",
    "next_attempt_at",
    "retry_document",
]

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


def retry_document(policy: RetryPolicy) -> Retry:
    """A ``RetryPolicy`` given in code as a policy's ``Retry`` section (its exception
    types left out: they are matched by the ``RetryPolicy`` itself)."""
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
    return StepRules(retry_document(retry), start_to_close=timeout, code=retry)


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
        retry_document(code) if code is not None else policy.retry or retry_document(default),
        start_to_close=timeout if timeout is not None else limits.start_to_close,
        schedule_to_close=limits.schedule_to_close,
        heartbeat=limits.heartbeat,
        on_exhausted=policy.on_exhausted,
        policy=found.name,
        policy_version=found.version,
        code=code,
    )


def attempt_limits(rules: StepRules, first_at_us: int, now_us: int) -> Limits:
    """How long the next attempt may run: its own start-to-close, or what is left of
    the step's schedule-to-close if that is sooner (<= 0: nothing is left)."""
    timeout, kind, shown = rules.start_to_close, "start_to_close", rules.start_to_close
    budget = rules.schedule_to_close
    if budget is not None:
        left = (first_at_us + int(budget * 1_000_000) - now_us) / 1_000_000
        if timeout is None or left < timeout:
            timeout, kind, shown = left, "schedule_to_close", budget
    if timeout is None and rules.heartbeat is None:
        return NO_LIMITS
    return Limits(timeout, kind, rules.heartbeat, shown)


REFUSED_RECHECK_US = 60_000_000
"""A call an open breaker refused looks at it again at least this often."""


def next_attempt_at(
    rules: StepRules,
    error: BaseException,
    *,
    now_us: int,
    workflow_id: str,
    seq: int,
    attempt: int,
    first_at_us: int,
    refused: bool = False,
) -> tuple[int | None, str]:
    """When the attempt after failed attempt ``attempt`` may start (None: there is
    none), and, if none although the error is retryable, why not. A refused call used
    up no attempt: it is tried again (not before the breaker half-opens), deadlines
    permitting."""
    if not refused and not rules.retries(error, attempt):
        return None, ""
    wait = int(rules.delay(workflow_id, seq, attempt) * 1_000_000)
    at = now_us + wait
    if isinstance(error, CircuitOpenError):
        # Spread by the backoff, so the calls it refused do not all come back at once;
        # and back within a minute while it stays open: a shorter open_for set since,
        # or another call's probe closing it, is seen then, not after the old span.
        at = max(at, min(error.until_us, now_us + REFUSED_RECHECK_US) + wait)
    deadline = rules.retry.deadline
    if deadline is not None and at >= first_at_us + int(deadline * 1_000_000):
        return None, f"no retry: the step's retry deadline of {deadline}s would pass"
    budget = rules.schedule_to_close
    if budget is not None and at >= first_at_us + int(budget * 1_000_000):
        return None, f"no retry: the step's schedule_to_close of {budget}s would pass"
    return at, ""
