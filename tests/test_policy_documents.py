"""Policy documents and the pure rules of retrying: checked with examples and hypothesis."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ledgerflow as lf
from ledgerflow.resilience import (
    check_policy,
    is_retryable,
    policy_changes,
    policy_document,
    retry_delay,
    with_settings,
)
from ledgerflow.resilience import retrying as retrying_module
from ledgerflow.resilience.retrying import jitter_source

# -- invalid documents name their field ----------------------------------------------


@pytest.mark.parametrize(
    ("document", "field", "problem"),
    [
        ({"retry": {"max_attempts": "x"}}, "retry.max_attempts", "Expected `int`, got `str`"),
        ({"retry": {"max_atempts": 3}}, "retry.max_atempts", "unknown field; known: max_attempts"),
        ({"retri": {}}, "retri", "unknown field; known: retry, timeout"),
        ({"retry": {"initial_interval": -1}}, "retry.initial_interval", "must be >= 0"),
        (
            {"retry": {"initial_interval": 5, "max_interval": 1}},
            "retry.max_interval",
            "must be >= retry.initial_interval (5.0), not 1.0",
        ),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts", "must be >= 1"),
        ({"retry": {"multiplier": 0.5}}, "retry.multiplier", "must be >= 1"),
        ({"retry": {"jitter": 2}}, "retry.jitter", "0 to 1"),
        ({"retry": {"deadline": 0}}, "retry.deadline", "must be > 0"),
        ({"retry": {"jitter": float("inf")}}, "retry.jitter", "finite"),
        ({"retry": {"non_retryable": ["no such"]}}, "retry.non_retryable[0]", "not an exception"),
        ({"retry": {"max_attempts": True}}, "retry.max_attempts", "got `bool`"),
        ({"timeout": {"start_to_close": 0}}, "timeout.start_to_close", "must be > 0"),
        ({"timeout": {"heartbeat": -2}}, "timeout.heartbeat", "must be > 0"),
        ({"breaker": {"consecutive_failures": None}}, "breaker", "needs consecutive_failures"),
        ({"breaker": {"failure_rate": 1.5}}, "breaker.failure_rate", "0 to 1"),
        ({"breaker": {"half_open_probes": 0}}, "breaker.half_open_probes", "must be >= 1"),
        ({"bulkhead": {}}, "bulkhead", "missing required field `max_concurrent`"),
        ({"bulkhead": {"max_concurrent": 0}}, "bulkhead.max_concurrent", "must be >= 1"),
        ({"rate_limit": {"rate": 0}}, "rate_limit.rate", "must be > 0"),
        ({"rate_limit": {"rate": 5, "burst": 0}}, "rate_limit.burst", "must be >= 1"),
        ({"on_exhausted": "explode"}, "on_exhausted", "Invalid enum value 'explode'"),
        # Too large: accepted before, then failing instances at run time (a permit
        # count or a due time no store keeps).
        ({"bulkhead": {"max_concurrent": 2**40}}, "bulkhead.max_concurrent", "<= 2,147,483,647"),
        ({"retry": {"max_attempts": 10**30}}, "retry.max_attempts", "<= 2,147,483,647"),
        ({"retry": {"max_interval": 1e300}}, "retry.max_interval", "<= 315,360,000 s"),
        ({"breaker": {"consecutive_failures": 2, "open_for": 1e300}}, "breaker.open_for", "<="),
        ({"timeout": {"heartbeat": 1e20}}, "timeout.heartbeat", "<= 315,360,000 s"),
        ({"rate_limit": {"rate": 1e300}}, "rate_limit.rate", "<= 1,000,000,000 a second"),
        ({"rate_limit": {"rate": 1e-12}}, "rate_limit.rate", "one call in 10 years"),
    ],
)
def test_an_invalid_document_is_refused_naming_its_field(
    document: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(lf.InvalidPolicyError) as caught:
        check_policy("erp", document)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert f"policy 'erp' field {field!r}" in str(caught.value)


def test_a_policy_built_in_python_is_checked_too() -> None:
    """Structs do not check their field types when built: the book does."""
    with pytest.raises(lf.InvalidPolicyError, match=r"retry\.max_attempts"):
        check_policy("erp", lf.Policy(retry=lf.Retry(max_attempts="3")))  # type: ignore[arg-type]
    assert check_policy("erp", lf.Policy(retry=lf.Retry(initial_interval=1))).retry == lf.Retry(
        initial_interval=1.0
    )


def test_settings_change_fields_by_dotted_name() -> None:
    base = check_policy("erp", {"retry": {"max_attempts": 5}, "breaker": {}})
    changed = with_settings(
        "erp",
        base,
        {"retry.max_attempts": 10, "rate_limit.rate": 5, "breaker": None, "on_exhausted": "park"},
    )
    assert changed.retry == lf.Retry(max_attempts=10)
    assert changed.rate_limit == lf.RateLimit(rate=5.0)
    assert changed.breaker is None
    assert changed.on_exhausted == "park"
    assert policy_changes(base, changed) == [
        "retry.max_attempts: 5 -> 10",
        "breaker: removed",
        'rate_limit: added {"rate":5.0,"burst":null}',
        'on_exhausted: "fail" -> "park"',
    ]
    # null for a field is null, not its default: open by failure rate only.
    by_rate = with_settings(
        "erp",
        changed,
        {"breaker.consecutive_failures": None, "breaker.failure_rate": 0.5},
    )
    assert by_rate.breaker == lf.Breaker(consecutive_failures=None, failure_rate=0.5)
    with pytest.raises(lf.InvalidPolicyError, match="needs consecutive_failures or failure_rate"):
        with_settings("erp", changed, {"breaker.consecutive_failures": None})
    with pytest.raises(lf.InvalidPolicyError, match=r"field 'retry\.max_attempts'"):
        with_settings("erp", changed, {"retry.max_attempts": None})
    with pytest.raises(lf.InvalidPolicyError, match=r"field 'retry\.max'") as caught:
        with_settings("erp", base, {"retry.max": 1})
    assert "known: max_attempts" in caught.value.problem
    with pytest.raises(lf.InvalidPolicyError, match=r"field 'retry\.max_interval'"):
        with_settings("erp", base, {"retry.max_interval": 0.01, "retry.initial_interval": 1})


# -- documents round-trip ----------------------------------------------------------

seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
retries = st.builds(
    lambda attempts, initial, grow, spread, jitter, deadline, names: lf.Retry(
        max_attempts=attempts,
        initial_interval=initial,
        multiplier=grow,
        max_interval=initial * spread,
        jitter=jitter,
        deadline=deadline,
        non_retryable=names,
    ),
    st.integers(1, 100),
    seconds,
    st.floats(1, 10),
    st.floats(1, 100),
    st.floats(0, 1),
    st.none() | seconds,
    st.lists(st.sampled_from(["ValueError", "myapp.errors.Rejected", "KeyError"])),
)
policies = st.builds(
    lf.Policy,
    retry=st.none() | retries,
    timeout=st.none()
    | st.builds(
        lf.Timeouts,
        start_to_close=st.none() | seconds,
        schedule_to_close=st.none() | seconds,
        heartbeat=st.none() | seconds,
    ),
    breaker=st.none()
    | st.builds(
        lf.Breaker,
        consecutive_failures=st.integers(1, 50),
        failure_rate=st.none() | st.floats(0.01, 1),
        window=seconds,
        min_calls=st.integers(1, 100),
        open_for=seconds,
        half_open_probes=st.integers(1, 10),
    ),
    bulkhead=st.none()
    | st.builds(lf.Bulkhead, max_concurrent=st.integers(1, 1000), max_wait=st.floats(0, 60)),
    rate_limit=st.none()
    | st.builds(lf.RateLimit, rate=seconds, burst=st.none() | st.integers(1, 1000)),
    on_exhausted=st.sampled_from(["fail", "park"]),
)


@given(policies)
def test_a_valid_document_survives_the_ledgers_encoding(policy: lf.Policy) -> None:
    checked = check_policy("p", policy)
    assert checked == policy
    stored = msgspec.json.decode(msgspec.json.encode(policy_document(checked)))
    assert check_policy("p", stored) == policy
    assert check_policy("p", policy_document(checked, full=True)) == policy
    assert policy_changes(checked, checked) == []


@given(policies, policies)
def test_changes_list_exactly_what_differs(old: lf.Policy, new: lf.Policy) -> None:
    listed = policy_changes(old, new)
    assert (listed == []) == (old == new)


# -- retry arithmetic -----------------------------------------------------------------


@given(retries, st.integers(1, 200), st.text(max_size=8), st.integers(1, 50))
def test_the_wait_grows_to_its_cap_and_its_jitter_is_bounded(
    retry: lf.Retry, attempt: int, workflow_id: str, seq: int
) -> None:
    wait = retry_delay(retry, attempt, jitter_source(workflow_id, seq, attempt))
    base = min(retry.max_interval, retry.initial_interval * retry.multiplier ** (attempt - 1))
    assert base <= wait <= base * (1 + retry.jitter) * (1 + 1e-12)
    assert wait <= retry.max_interval * (1 + retry.jitter) * (1 + 1e-12)
    # The same (instance, step, attempt) draws the same wait, on any worker.
    assert wait == retry_delay(retry, attempt, jitter_source(workflow_id, seq, attempt))
    if attempt > 1:
        earlier = min(
            retry.max_interval, retry.initial_interval * retry.multiplier ** (attempt - 2)
        )
        assert earlier <= base


def test_a_huge_attempt_number_waits_the_cap() -> None:
    retry = lf.Retry(initial_interval=1, multiplier=10, max_interval=60, jitter=0)
    assert retry_delay(retry, 10_000, random.Random(1)) == 60


class Declined(Exception):
    retryable = False


class Busy(Declined):
    pass


class Plain(Exception):
    pass


def test_retryability_is_data_in_order() -> None:
    # 1. named by the policy, bare or qualified, the type or a base
    assert not is_retryable(ValueError("x"), ["ValueError"])
    assert not is_retryable(Plain(), [f"{__name__}.Plain"])
    assert not is_retryable(KeyError("x"), ["LookupError"])
    assert is_retryable(Plain(), ["ValueError"])
    # 3. the error's own attribute (every LedgerflowError has one)
    assert not is_retryable(Declined())
    assert is_retryable(lf.StoreUnavailableError("x", "down"))
    assert not is_retryable(lf.ConfigurationError("bad"))
    # 4. otherwise retried
    assert is_retryable(Plain())


def test_classify_overrides_the_attribute_by_the_most_specific_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retrying_module, "_CLASSIFIED", {})
    lf.classify(Busy, retryable=True)
    lf.classify(Plain, retryable=False)
    assert is_retryable(Busy())  # classified, despite Declined.retryable
    assert not is_retryable(Declined())
    assert not is_retryable(Plain())
    assert not is_retryable(Busy(), ["Busy"])  # the policy's names come first
    with pytest.raises(TypeError):
        lf.classify("Plain", retryable=False)  # type: ignore[arg-type]


def test_a_retry_policy_in_code_honours_retryability_too() -> None:
    policy = lf.RetryPolicy(max_attempts=3)
    assert policy.retries(Plain(), 1)
    assert not policy.retries(Declined(), 1)
    assert not policy.retries(Plain(), 3)
