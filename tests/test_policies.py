"""Named policies in the ledger (``PolicyBook``), and steps running under them, on
every backend."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow import ManualClock, WorkflowContext
from ledgerflow.resilience import PolicyBook
from ledgerflow.store._base import BaseEventStore
from ledgerflow.workflow.history import StepAttemptFailed, StepDone, StepFailed

from ._engines import WAIT, EngineFactory, waiting_for

REAL = lf.SystemClock()
calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def fresh_calls() -> None:
    calls.clear()


@pytest.fixture
def book(store: BaseEventStore) -> PolicyBook:
    return PolicyBook(store)


# -- the book ------------------------------------------------------------------------


async def test_each_change_is_a_version_with_who_and_why(
    book: PolicyBook, store: BaseEventStore
) -> None:
    first = await book.set(
        "erp", lf.Policy(retry=lf.Retry(max_attempts=5)), reason="go live", actor="alice"
    )
    assert (first.version, first.actor, first.reason) == (1, "alice", "go live")
    second = await book.update(
        "erp", {"retry.max_attempts": 10}, reason="ERP slow today", actor="bob"
    )
    assert second.version == 2
    assert second.policy.retry == lf.Retry(max_attempts=10)
    assert second.changes == ("retry.max_attempts: 5 -> 10",)
    assert [(v.version, v.actor) for v in await book.history("erp")] == [(1, "alice"), (2, "bob")]
    assert (await book.get("erp")).policy == second.policy
    recorded = await store.read_stream("policy-erp")
    assert recorded[1].metadata.actor == "bob"
    assert recorded[1].metadata.reason == "ERP slow today"
    assert recorded[1].type == "ledgerflow.policy_changed"


async def test_an_invalid_change_records_nothing_and_the_version_in_force_stays(
    book: PolicyBook,
) -> None:
    await book.set("erp", {"retry": {"max_attempts": 5}}, reason="go live")
    with pytest.raises(lf.InvalidPolicyError) as caught:
        await book.update("erp", {"retry.initial_interval": -1}, reason="oops")
    assert caught.value.field == "retry.initial_interval"
    with pytest.raises(lf.InvalidPolicyError, match=r"field 'retry\.maximum'"):
        await book.update("erp", {"retry.maximum": 1}, reason="typo")
    with pytest.raises(lf.InvalidPolicyError, match=r"field 'retry\.max_attempts'"):
        await book.set("erp", {"retry": {"max_attempts": "ten"}}, reason="wrong type")
    with pytest.raises(lf.InvalidPolicyError, match="needs a reason"):
        await book.update("erp", {"retry.max_attempts": 6}, reason=" ")
    with pytest.raises(lf.InvalidPolicyError, match="policy name"):
        await book.set("no spaces", lf.Policy(), reason="x")
    assert [v.version for v in await book.history("erp")] == [1]
    assert (await book.get("erp")).policy.retry == lf.Retry(max_attempts=5)


async def test_the_same_document_again_records_no_new_version(book: PolicyBook) -> None:
    await book.set("erp", lf.Policy(retry=lf.Retry(max_attempts=5)), reason="go live")
    again = await book.set("erp", {"retry": {"max_attempts": 5}}, reason="deploy")
    assert again.version == 1
    assert (await book.update("erp", {"retry.max_attempts": 5}, reason="same")).version == 1


async def test_a_stale_expected_version_is_a_concurrency_error(book: PolicyBook) -> None:
    await book.set("erp", lf.Policy(), reason="go live")
    await book.update("erp", {"on_exhausted": "park"}, reason="ops")
    with pytest.raises(lf.ConcurrencyError):
        await book.set("erp", lf.Policy(), reason="from an old screen", expected_version=1)


async def test_racing_updates_from_two_processes_both_land(
    book: PolicyBook, store: BaseEventStore
) -> None:
    other = PolicyBook(store)  # another process's book on the same ledger
    await book.set("erp", lf.Policy(), reason="go live")
    await asyncio.gather(
        book.update("erp", {"retry.max_attempts": 9}, reason="a"),
        other.update("erp", {"bulkhead.max_concurrent": 3}, reason="b"),
    )
    now = await book.get("erp")
    assert now.version == 3
    assert now.policy.retry == lf.Retry(max_attempts=9)
    assert now.policy.bulkhead == lf.Bulkhead(max_concurrent=3)


async def test_list_shows_the_policies_and_nothing_else(
    book: PolicyBook, store: BaseEventStore
) -> None:
    await store.append("order-1", [lf.NewEvent("order.created")])
    await store.append("zeta", [lf.NewEvent("other")])
    await book.set("erp", lf.Policy(), reason="go live")
    await book.set("bank", lf.Policy(on_exhausted="park"), reason="go live")
    await book.update("erp", {"retry.max_attempts": 4}, reason="tune")
    assert [(v.name, v.version) for v in await book.list()] == [("bank", 1), ("erp", 2)]
    with pytest.raises(lf.PolicyNotFoundError, match="no policy named 'nope'"):
        await book.get("nope")
    with pytest.raises(lf.PolicyNotFoundError):
        await book.history("nope")
    with pytest.raises(lf.PolicyNotFoundError):
        await book.update("nope", {"retry.max_attempts": 2}, reason="x")
    created = await book.update("nope", {"retry.max_attempts": 2}, reason="x", create=True)
    assert created.version == 1


async def test_declared_policies_do_not_undo_changes_made_at_run_time(book: PolicyBook) -> None:
    shipped = {"erp": lf.Policy(retry=lf.Retry(max_attempts=3))}
    await book.declare(shipped, actor="engine a")
    await book.update("erp", {"retry.max_attempts": 7}, reason="ops")
    await book.declare(shipped, actor="engine b")  # the next deploy
    now = await book.get("erp")
    assert (now.version, now.policy.retry) == (2, lf.Retry(max_attempts=7))
    assert (await book.history("erp"))[0].reason == "declared by the application"


async def test_a_worker_sees_a_change_once_its_copy_is_older_than_the_refresh(
    store: BaseEventStore,
) -> None:
    """The cached version serves until it is ``refresh_s`` old, then the next read
    looks at the ledger (the book's monotonic clock is moved by hand here)."""
    now = [1000.0]
    worker = PolicyBook(store, refresh_s=0.5, monotonic=lambda: now[0])
    operator = PolicyBook(store)
    await operator.set("erp", lf.Policy(retry=lf.Retry(max_attempts=3)), reason="go live")
    assert (await worker.current("erp")).version == 1
    await operator.update("erp", {"retry.max_attempts": 8}, reason="ops")
    now[0] += 0.4
    assert (await worker.current("erp")).version == 1  # still within its refresh
    assert worker.fresh("erp") is not None
    now[0] += 0.2
    assert worker.fresh("erp") is None
    changed = await worker.current("erp")
    assert changed.version == 2
    assert changed.policy.retry == lf.Retry(max_attempts=8)


# -- steps under a named policy -----------------------------------------------------


def flaky(n: int) -> int:
    calls["flaky"] += 1
    if calls["flaky"] == 1:
        raise RuntimeError("ERP busy")
    return n * 2


def always_fails(n: int) -> int:
    calls["always"] += 1
    raise RuntimeError(f"ERP down ({calls['always']})")


def rejects(n: int) -> int:
    calls["rejects"] += 1
    raise ValueError("order over the credit limit")


@lf.step(policy="erp")
def via_erp(n: int) -> int:
    return flaky(n)


@lf.workflow(name="erp_flow", version=1)
async def erp_flow(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(via_erp, n)


@lf.workflow(name="erp_down", version=1)
async def erp_down(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(always_fails, n, policy="erp")


@lf.workflow(name="erp_rejects", version=1)
async def erp_rejects(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(rejects, n, policy="erp")


async def step_events(e: lf.Engine, workflow_id: str) -> list[Any]:
    return [
        ev.data
        for ev in await e.history(workflow_id)
        if isinstance(ev.data, StepDone | StepFailed | StepAttemptFailed)
    ]


QUICK = lf.Policy(retry=lf.Retry(max_attempts=3, initial_interval=0.01))


async def test_each_attempt_records_the_policy_and_version_it_ran_under(
    engine: EngineFactory,
) -> None:
    async with engine(erp_flow, policies={"erp": QUICK}) as e:
        assert await (await e.start(erp_flow, 21, id="p-1")).result(timeout=WAIT) == 42
        failed, done = await step_events(e, "p-1")
    assert isinstance(failed, StepAttemptFailed)
    assert (failed.policy, failed.policy_version, failed.attempt) == ("erp", 1, 1)
    assert failed.first_at_us is not None
    assert failed.retry_at_us is not None
    assert failed.retry_at_us > failed.first_at_us
    assert isinstance(done, StepDone)
    assert (done.policy, done.policy_version) == ("erp", 1)


async def test_a_policy_change_mid_run_applies_from_the_next_attempt(
    engine: EngineFactory, clock: ManualClock
) -> None:
    slow = lf.Policy(
        retry=lf.Retry(max_attempts=5, initial_interval=60, max_interval=600, jitter=0)
    )
    async with engine(erp_down, policies={"erp": slow}, policy_refresh=0) as e:
        await e.start(erp_down, 1, id="p-2")
        await waiting_for(e, "p-2", "retry of step 'always_fails' at ")
        # Another process (the CLI, an operator's script) changes the policy.
        await PolicyBook(e.store).update(
            "erp", {"retry.max_attempts": 2}, reason="stop hammering the ERP", actor="ops"
        )
        clock.advance(61)
        with pytest.raises(lf.WorkflowFailedError, match=r"ERP down \(2\)"):
            await e.handle("p-2").result(timeout=WAIT)
        first, last = await step_events(e, "p-2")
    assert calls["always"] == 2
    assert isinstance(first, StepAttemptFailed)
    assert first.policy_version == 1
    assert isinstance(last, StepFailed)
    assert last.policy_version == 2


async def test_a_policy_lowered_during_a_backoff_starts_no_attempt_it_no_longer_allows(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """The next attempt ran anyway (one more call to the ERP), and only its failure
    stopped the step."""
    slow = lf.Policy(
        retry=lf.Retry(max_attempts=5, initial_interval=60, max_interval=600, jitter=0)
    )
    async with engine(erp_down, policies={"erp": slow}, policy_refresh=0) as e:
        await e.start(erp_down, 1, id="p-low")
        await waiting_for(e, "p-low", "retry of step 'always_fails' at ")
        await PolicyBook(e.store).update(
            "erp", {"retry.max_attempts": 1}, reason="stop calling the ERP", actor="ops"
        )
        clock.advance(61)
        with pytest.raises(lf.WorkflowFailedError, match=r"ERP down \(1\)") as ended:
            await e.handle("p-low").result(timeout=WAIT)
        _, last = await step_events(e, "p-low")
    assert calls["always"] == 1
    assert "policy 'erp' v2 allows 1 attempts now" in ended.value.message
    assert isinstance(last, StepFailed)
    assert last.policy_version == 2


async def test_a_long_backoff_holds_no_lease_and_no_thread(
    engine: EngineFactory, clock: ManualClock
) -> None:
    slow = lf.Policy(retry=lf.Retry(max_attempts=2, initial_interval=30, jitter=0))
    async with engine(erp_flow, policies={"erp": slow}) as e:
        handle = await e.start(erp_flow, 5, id="p-3")
        await waiting_for(e, "p-3", "retry of step 'via_erp' at ")
        async with asyncio.timeout(WAIT):
            while "p-3" in e._active:  # noqa: ASYNC110 - the pass ends; a timer wakes it
                await asyncio.sleep(0.01)
        assert e.step_threads.in_use == 0
        wakeup = await e.store.get_wakeup("p-3")
        assert wakeup is not None
        assert wakeup.lease_owner is None
        assert calls["flaky"] == 1
        clock.advance(31)
        assert await handle.result(timeout=WAIT) == 10
    assert calls["flaky"] == 2


async def test_a_policys_non_retryable_types_fail_the_step_at_once(
    engine: EngineFactory,
) -> None:
    strict = lf.Policy(
        retry=lf.Retry(max_attempts=5, initial_interval=0.01, non_retryable=["ValueError"])
    )
    async with engine(erp_rejects, policies={"erp": strict}) as e:
        with pytest.raises(lf.WorkflowFailedError, match="credit limit"):
            await (await e.start(erp_rejects, 1, id="p-4")).result(timeout=WAIT)
    assert calls["rejects"] == 1


async def test_retry_and_timeout_given_in_code_win_over_the_policy(
    engine: EngineFactory,
) -> None:
    @lf.workflow(name="code_wins", version=1)
    async def code_wins(ctx: WorkflowContext, n: int) -> int:
        return await ctx.step(always_fails, n, policy="erp", retry=lf.RetryPolicy.none())

    async with engine(code_wins, policies={"erp": QUICK}) as e:
        with pytest.raises(lf.WorkflowFailedError):
            await (await e.start(code_wins, 1, id="p-5")).result(timeout=WAIT)
        (failed,) = await step_events(e, "p-5")
    assert calls["always"] == 1
    assert isinstance(failed, StepFailed)
    assert failed.policy == "erp"


async def test_a_step_naming_a_missing_policy_fails_saying_so(engine: EngineFactory) -> None:
    async with engine(erp_down) as e:
        with pytest.raises(lf.WorkflowFailedError, match="PolicyNotFoundError") as caught:
            await (await e.start(erp_down, 1, id="p-6")).result(timeout=WAIT)
        # Its attempts were tried again under the default retry (a policy set
        # meanwhile would have been picked up): it failed for good at once before.
        attempts = [ev for ev in await step_events(e, "p-6") if isinstance(ev, StepAttemptFailed)]
        assert [a.error_type for a in attempts] == ["PolicyNotFoundError"] * 2
    assert "no policy named 'erp'" in str(caught.value)
    assert calls["always"] == 0  # the body never ran


async def test_the_retry_deadline_stops_further_attempts(engine: EngineFactory) -> None:
    bounded = lf.Policy(
        retry=lf.Retry(max_attempts=1000, initial_interval=0.02, multiplier=1, deadline=0.3)
    )
    async with engine(erp_down, policies={"erp": bounded}, clock=REAL) as e:
        with pytest.raises(lf.WorkflowFailedError, match=r"retry deadline of 0\.3s") as caught:
            await (await e.start(erp_down, 1, id="p-7")).result(timeout=WAIT)
    assert "ERP down" in str(caught.value)
    assert 2 <= calls["always"] < 1000


async def hangs(n: int) -> int:
    calls["hangs"] += 1
    await asyncio.sleep(WAIT * 2)
    return n


async def test_schedule_to_close_bounds_the_step_retries_included(engine: EngineFactory) -> None:
    budget = lf.Policy(
        retry=lf.Retry(max_attempts=1000, initial_interval=0.01),
        timeout=lf.Timeouts(start_to_close=0.15, schedule_to_close=0.5),
    )

    @lf.workflow(name="budgeted", version=1)
    async def budgeted(ctx: WorkflowContext, n: int) -> int:
        return await ctx.step(hangs, n, policy="erp")

    async with engine(budgeted, policies={"erp": budget}, clock=REAL) as e:
        with pytest.raises(lf.WorkflowFailedError, match="StepTimeoutError") as caught:
            await (await e.start(budgeted, 1, id="p-8")).result(timeout=WAIT)
        events = await step_events(e, "p-8")
    assert "start_to_close" in str(events[0].message)
    assert "schedule_to_close" in str(caught.value)
    assert 2 <= calls["hangs"] <= 5


def beats_then_stops(beats: int) -> str:
    info = lf.current_step()
    for _ in range(beats):
        time.sleep(0.05)
        info.heartbeat()
    if info.attempt == 1 and beats < 20:
        while not info.cancelled:  # stops beating: a stuck call
            time.sleep(0.01)
        return "gave up"
    return f"done after {beats} beats"


async def beats_async(beats: int) -> str:
    info = lf.current_step()
    for _ in range(beats):
        await asyncio.sleep(0.05)
        info.heartbeat()
    if info.attempt == 1:
        await asyncio.sleep(WAIT * 2)
    return f"done after {beats} beats"


@pytest.mark.parametrize("body", [beats_then_stops, beats_async])
async def test_an_attempt_that_stops_heartbeating_times_out(
    engine: EngineFactory, body: Any
) -> None:
    watched = lf.Policy(
        retry=lf.Retry(max_attempts=2, initial_interval=0.01),
        timeout=lf.Timeouts(heartbeat=0.3),
    )

    @lf.workflow(name="beating", version=1)
    async def beating(ctx: WorkflowContext, n: int) -> str:
        return await ctx.step(body, n, policy="erp")

    async with engine(beating, policies={"erp": watched}, clock=REAL) as e:
        # 12 beats of 0.05 s: 0.6 s in all, longer than the heartbeat timeout.
        assert await (await e.start(beating, 12, id="p-9")).result(timeout=WAIT) == (
            "done after 12 beats"
        )
        (failed, _done) = await step_events(e, "p-9")
    assert isinstance(failed, StepAttemptFailed)
    assert failed.error_type == "StepTimeoutError"
    assert "heartbeat" in failed.message


async def test_a_policy_created_between_the_stores_two_reads_is_not_a_crash(
    store: BaseEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_stream reads rows, then (finding none) the stream's head: a stream another
    process creates in between comes back as [] (found by a multi-process test,
    where an engine starting beside another crashed with IndexError)."""

    async def nothing_yet(*args: Any, **kwargs: Any) -> list[Any]:
        return []

    monkeypatch.setattr(store, "read_stream", nothing_yet)
    book = PolicyBook(store)
    with pytest.raises(lf.PolicyNotFoundError):
        await book.get("erp")
    with pytest.raises(lf.PolicyNotFoundError):
        await book.history("erp")


# -- retries never swallow cancellation -------------------------------------------------


def undo(n: int) -> None:
    calls["undo"] += 1


@lf.workflow(name="cancel_in_backoff", version=1)
async def cancel_in_backoff(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(flaky, n, compensate=undo)  # succeeds on its second call
    return await ctx.step(always_fails, n, policy="erp")


async def test_a_cancelled_instance_stops_retrying_and_compensates(
    engine: EngineFactory,
) -> None:
    calls["flaky"] = 1  # the first step succeeds at once
    slow = lf.Policy(retry=lf.Retry(max_attempts=5, initial_interval=600, max_interval=600))
    async with engine(cancel_in_backoff, policies={"erp": slow}) as e:
        await e.start(cancel_in_backoff, 1, id="c-1")
        await waiting_for(e, "c-1", "retry of step 'always_fails' at ")
        await e.cancel("c-1", "customer withdrew")
        with pytest.raises(lf.WorkflowFailedError, match="WorkflowCancelled: customer withdrew"):
            await e.handle("c-1").result(timeout=WAIT)
    assert calls["always"] == 1  # no attempt after the cancellation
    assert calls["undo"] == 1


async def test_an_engine_stopping_mid_backoff_records_no_failure_and_resumes_later(
    engine: EngineFactory,
) -> None:
    """The in-pass wait is cancelled with the pass (nothing recorded for it), and the
    next engine waits out the recorded rest and goes on with the attempts left."""
    short = lf.Policy(retry=lf.Retry(max_attempts=3, initial_interval=0.6, jitter=0))
    async with engine(erp_down, policies={"erp": short}, clock=REAL) as e:
        await e.start(erp_down, 1, id="c-2")
        await waiting_for(e, "c-2", "retry of step 'always_fails' at ")
        await e.close(grace=0.05)  # during the 0.6 s in-pass wait
    assert calls["always"] == 1
    async with engine(erp_down, policies={"erp": short}, clock=REAL) as e:
        failed = await step_events(e, "c-2")
        assert [type(ev).__name__ for ev in failed] == ["StepAttemptFailed"]
        with pytest.raises(lf.WorkflowFailedError, match=r"ERP down \(3\)"):
            await e.handle("c-2").result(timeout=WAIT)
        events = await step_events(e, "c-2")
    assert calls["always"] == 3
    assert [type(ev).__name__ for ev in events] == [
        "StepAttemptFailed",
        "StepAttemptFailed",
        "StepFailed",
    ]
