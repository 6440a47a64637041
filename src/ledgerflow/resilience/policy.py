"""Policy documents: what a named resilience policy says, and how it is checked.

A policy is data, not code: the same document is kept in the ledger, shown by the
CLI, changed at run time and read back by every worker. Each section is optional;
a missing section means "no such protection" (no breaker, no rate limit...), except
``retry``, whose absence means the engine's default step retry. All durations are in
seconds.

Documents are checked before anything is recorded (``check_policy``): unknown keys,
wrong types and impossible values (a negative interval, ``max_interval`` below
``initial_interval``) are an ``InvalidPolicyError`` naming the field.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import msgspec

from ..errors import InvalidPolicyError

__all__ = [
    "Breaker",
    "Bulkhead",
    "OnExhausted",
    "Policy",
    "RateLimit",
    "Retry",
    "Timeouts",
    "check_policy",
    "check_policy_name",
    "policy_changes",
    "policy_document",
    "with_settings",
]

OnExhausted = Literal["fail", "park"]


class Retry(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Attempts of a failing step, and the waits between them.

    The wait after failed attempt ``n`` is ``min(max_interval, initial_interval *
    multiplier ** (n - 1))`` plus up to ``jitter`` of it, drawn from a source derived
    from (instance, step, attempt), so replay and every worker agree on it. No new
    attempt starts once ``deadline`` seconds have passed since the step's first
    attempt began. An error whose type (or a base) is named in ``non_retryable``
    (``"ValueError"`` or ``"myapp.errors.Rejected"``) fails the step at once.
    """

    max_attempts: int = 3
    initial_interval: float = 0.1
    multiplier: float = 2.0
    max_interval: float = 30.0
    jitter: float = 0.1
    deadline: float | None = None
    non_retryable: list[str] = msgspec.field(default_factory=list)


class Timeouts(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """``start_to_close`` bounds one attempt; ``schedule_to_close`` the step as a
    whole, from its first attempt to its end, retries included; ``heartbeat`` is how
    long an attempt may go without calling ``current_step().heartbeat()`` before it
    counts as timed out (for long steps)."""

    start_to_close: float | None = None
    schedule_to_close: float | None = None
    heartbeat: float | None = None


class Breaker(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A circuit breaker shared by every worker on the store.

    It opens after ``consecutive_failures`` failures in a row, or when at least
    ``min_calls`` calls in the last ``window`` seconds failed at ``failure_rate`` or
    more; stays open ``open_for`` seconds (calls are refused at once); then lets
    ``half_open_probes`` calls through, however many workers ask: a probe that
    succeeds closes it, one that fails opens it again.
    """

    consecutive_failures: int | None = 5
    failure_rate: float | None = None
    window: float = 60.0
    min_calls: int = 10
    open_for: float = 30.0
    half_open_probes: int = 1


class Bulkhead(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """At most ``max_concurrent`` calls at once across all workers; a call waits up to
    ``max_wait`` seconds for room, then fails (retryably)."""

    max_concurrent: int
    max_wait: float = 0.0


class RateLimit(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A token bucket across all workers: ``rate`` calls per second on average,
    ``burst`` at once after a quiet spell (default: ``rate`` rounded up)."""

    rate: float
    burst: int | None = None


class Policy(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """A named resilience policy for steps, and for the external resource they call.

    ``on_exhausted``: what a step that has used up its retries does to its instance:
    ``"fail"`` (the step raises ``StepFailedError`` in the workflow, which compensates
    if it does not catch it) or ``"park"`` (the instance waits as ``needs_attention``
    for an operator to retry, skip or compensate).
    """

    retry: Retry | None = None
    timeout: Timeouts | None = None
    breaker: Breaker | None = None
    bulkhead: Bulkhead | None = None
    rate_limit: RateLimit | None = None
    on_exhausted: OnExhausted = "fail"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def check_policy_name(name: object) -> str:
    """``name`` if it can name a policy (and its stream, ``policy-<name>``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidPolicyError(
            str(name),
            "",
            "a policy name is 1-100 letters, digits and _ . : - (starting with a letter or digit)",
        )
    return name


def policy_document(policy: Policy, *, full: bool = False) -> dict[str, Any]:
    """The document as plain data: as recorded (fields at their defaults left out),
    or ``full`` (every field of every section present, as the CLI shows it)."""
    document: dict[str, Any] = _full(policy) if full else msgspec.to_builtins(policy)
    return document


def _full(value: Any) -> Any:  # the document with every field, defaults included
    if isinstance(value, msgspec.Struct):
        return {f: _full(getattr(value, f)) for f in type(value).__struct_fields__}
    if isinstance(value, list):
        return [_full(v) for v in value]
    return value


def check_policy(name: str, document: Policy | dict[str, Any]) -> Policy:
    """A valid ``Policy`` from ``document`` (a ``Policy`` built in Python, whose field
    types nothing has checked yet, or plain data); ``InvalidPolicyError`` naming the
    first wrong field otherwise."""
    data = policy_document(document) if isinstance(document, Policy) else document
    if not isinstance(data, dict):
        raise InvalidPolicyError(name, "", f"a policy is a mapping, not {type(data).__name__}")
    try:
        policy = msgspec.convert(data, Policy)
    except msgspec.ValidationError as exc:
        field, problem = _located(str(exc))
        raise InvalidPolicyError(name, field, problem) from None
    for field, problem in _problems(policy):
        raise InvalidPolicyError(name, field, problem)
    return policy


def with_settings(name: str, policy: Policy | None, settings: dict[str, Any]) -> Policy:
    """``policy`` (or an empty one) with ``settings`` applied: dotted keys such as
    ``retry.max_attempts`` to values (``None`` removes a whole section, and sets a field
    to null: ``breaker.consecutive_failures=None`` to open by failure rate only),
    checked as a whole."""
    data = policy_document(policy) if policy is not None else {}
    for key, value in settings.items():
        path = key.split(".")
        if not all(path):
            raise InvalidPolicyError(name, key, "not a field name")
        if path[0] not in Policy.__struct_fields__:
            raise InvalidPolicyError(name, key, f"unknown field; known: {_known(Policy)}")
        target = data
        for part in path[:-1]:
            inner = target.get(part)
            if inner is None:
                inner = target[part] = {}
            if not isinstance(inner, dict):
                raise InvalidPolicyError(name, key, f"{part!r} is not a section")
            target = inner
        if value is None and len(path) == 1 and path[0] != "on_exhausted":
            target.pop(path[-1], None)  # the section goes: no such protection
        else:
            target[path[-1]] = value  # None for a field is null (no deadline, ...)
    return check_policy(name, data)


def policy_changes(old: Policy | None, new: Policy) -> list[str]:
    """What differs between two versions, for people reading history:
    ``retry.max_attempts: 3 -> 10``, ``rate_limit: added {...}``, ``breaker: removed``."""
    if old is None:
        return [f"created: {_shown(policy_document(new))}"]
    before = policy_document(old, full=True)
    after = policy_document(new, full=True)
    changes: list[str] = []
    for key in Policy.__struct_fields__:
        was, now = before.get(key), after.get(key)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            changes.extend(
                f"{key}.{field}: {_shown(was[field])} -> {_shown(now[field])}"
                for field in now
                if was[field] != now[field]
            )
        elif now is None:
            changes.append(f"{key}: removed")
        elif isinstance(now, dict):
            changes.append(f"{key}: added {_shown(now)}")
        else:
            changes.append(f"{key}: {_shown(was)} -> {_shown(now)}")
    return changes


# -- checks -------------------------------------------------------------------------

_LOCATION = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _located(message: str) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.retry.max_attempts`" as
    (field, problem); an unknown field is named by its own path."""
    match = _LOCATION.match(message)
    assert match is not None
    problem = match["problem"]
    path = (match["path"] or "").lstrip(".")
    unknown = re.match(r"Object contains unknown field `([^`]*)`", problem)
    if unknown:
        path = f"{path}.{unknown[1]}" if path else unknown[1]
        section = _section(path.rsplit(".", 1)[0]) if "." in path else Policy
        problem = "unknown field" + (f"; known: {_known(section)}" if section else "")
    return path, problem


def _section(path: str) -> type[msgspec.Struct] | None:
    sections: dict[str, type[msgspec.Struct]] = {
        "retry": Retry,
        "timeout": Timeouts,
        "breaker": Breaker,
        "bulkhead": Bulkhead,
        "rate_limit": RateLimit,
    }
    return sections.get(path)


def _known(cls: type[msgspec.Struct]) -> str:
    return ", ".join(cls.__struct_fields__)


MAX_SECONDS = 10 * 365 * 86_400
"""The longest duration a policy may name (ten years: anything longer is a typo)."""
MAX_COUNT = 2**31 - 1
"""The largest count a policy may name (what the stores keep of one)."""


def _problems(policy: Policy) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []

    def finite(field: str, value: float | None, *, positive: bool = False) -> None:
        if value is None:
            return
        if not math.isfinite(value):
            problems.append((field, f"must be a finite number, not {value}"))
        elif positive and value <= 0:
            problems.append((field, f"must be > 0, not {value}"))
        elif value < 0:
            problems.append((field, f"must be >= 0, not {value}"))

    def at_least(field: str, value: int | float | None, low: float) -> None:
        if value is not None and value < low:
            problems.append((field, f"must be >= {low}, not {value}"))

    def at_most(field: str, value: int | float | None, high: float, unit: str = "") -> None:
        # Upper bounds too: 2**40 permits, or a 1e300 s backoff, were accepted and
        # then failed instances at run time (a due time no store can keep).
        if value is not None and math.isfinite(value) and value > high:
            problems.append((field, f"must be <= {_number(high)}{unit}, not {_number(value)}"))

    counts = (
        "retry.max_attempts",
        "breaker.consecutive_failures",
        "breaker.min_calls",
        "breaker.half_open_probes",
        "bulkhead.max_concurrent",
        "rate_limit.burst",
    )
    for field in counts:
        at_most(field, _field(policy, field), MAX_COUNT)
    durations = (
        "retry.initial_interval",
        "retry.max_interval",
        "retry.deadline",
        "timeout.start_to_close",
        "timeout.schedule_to_close",
        "timeout.heartbeat",
        "breaker.window",
        "breaker.open_for",
        "bulkhead.max_wait",
    )
    for field in durations:
        at_most(field, _field(policy, field), MAX_SECONDS, " s")
    at_most("retry.multiplier", _field(policy, "retry.multiplier"), 1000)
    rate = _field(policy, "rate_limit.rate")
    at_most("rate_limit.rate", rate, 1e9, " a second")
    if rate is not None and 0 < rate < 1 / MAX_SECONDS:
        problems.append(
            ("rate_limit.rate", f"must be >= {1 / MAX_SECONDS:g} a second (one call in 10 years)")
        )
    if (r := policy.retry) is not None:
        at_least("retry.max_attempts", r.max_attempts, 1)
        finite("retry.initial_interval", r.initial_interval)
        finite("retry.multiplier", r.multiplier)
        at_least("retry.multiplier", r.multiplier, 1)
        finite("retry.max_interval", r.max_interval)
        if r.max_interval < r.initial_interval:
            problems.append(
                (
                    "retry.max_interval",
                    f"must be >= retry.initial_interval ({r.initial_interval}), "
                    f"not {r.max_interval}",
                )
            )
        finite("retry.jitter", r.jitter)
        if r.jitter > 1:
            problems.append(("retry.jitter", f"is a fraction of the wait: 0 to 1, not {r.jitter}"))
        finite("retry.deadline", r.deadline, positive=True)
        for i, type_name in enumerate(r.non_retryable):
            if not type_name or not all(p.isidentifier() for p in type_name.split(".")):
                problems.append(
                    (f"retry.non_retryable[{i}]", f"not an exception type name: {type_name!r}")
                )
    if (t := policy.timeout) is not None:
        finite("timeout.start_to_close", t.start_to_close, positive=True)
        finite("timeout.schedule_to_close", t.schedule_to_close, positive=True)
        finite("timeout.heartbeat", t.heartbeat, positive=True)
    if (b := policy.breaker) is not None:
        if b.consecutive_failures is None and b.failure_rate is None:
            problems.append(
                ("breaker", "needs consecutive_failures or failure_rate (or both) to ever open")
            )
        at_least("breaker.consecutive_failures", b.consecutive_failures, 1)
        finite("breaker.failure_rate", b.failure_rate, positive=True)
        if b.failure_rate is not None and b.failure_rate > 1:
            problems.append(
                ("breaker.failure_rate", f"is a fraction: 0 to 1, not {b.failure_rate}")
            )
        finite("breaker.window", b.window, positive=True)
        at_least("breaker.min_calls", b.min_calls, 1)
        finite("breaker.open_for", b.open_for, positive=True)
        at_least("breaker.half_open_probes", b.half_open_probes, 1)
    if (h := policy.bulkhead) is not None:
        at_least("bulkhead.max_concurrent", h.max_concurrent, 1)
        finite("bulkhead.max_wait", h.max_wait)
    if (q := policy.rate_limit) is not None:
        finite("rate_limit.rate", q.rate, positive=True)
        at_least("rate_limit.burst", q.burst, 1)
    return problems


def _number(value: float) -> str:
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:g}"


def _field(policy: Policy, path: str) -> Any:
    """The value at ``section.name`` of ``policy``; None if the section is absent."""
    section, name = path.split(".")
    found = getattr(policy, section)
    return None if found is None else getattr(found, name)


def _shown(value: Any) -> str:
    return msgspec.json.encode(value).decode()
