"""Steps sent to a task queue under a named policy: the queue's worker resolves the
policy at each attempt (retry, timeouts, guards, parking), on every backend."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import ledgerflow as lf
from ledgerflow import ManualClock, WorkflowContext
from ledgerflow.resilience import PolicyBook
from ledgerflow.workflow.history import StepAttemptFailed, StepDone, StepFailed, StepParked

from ._engines import WAIT, EngineFactory, waiting_for

calls: Counter[str] = Counter()
erp = {"healthy": False}


@pytest.fixture(autouse=True)
def fresh() -> None:
    calls.clear()
    erp["healthy"] = False


@lf.step(name="erp.create_po", queue="erp", policy="erp")
def create_po(n: int) -> str:
    calls["erp"] += 1
    if not erp["healthy"]:
        raise ConnectionError(f"ERP unreachable ({calls['erp']})")
    return f"po-{n}"


@lf.workflow(name="queued", version=1)
async def queued(ctx: WorkflowContext, n: int) -> str:
    return await ctx.step(create_po, n)


async def outcomes(e: lf.Engine, workflow_id: str) -> list[object]:
    return [
        ev.data
        for ev in await e.history(workflow_id)
        if isinstance(ev.data, StepDone | StepFailed | StepAttemptFailed | StepParked)
    ]


async def test_the_queues_worker_runs_the_step_under_the_policy_in_force(
    engine: EngineFactory, clock: ManualClock
) -> None:
    slow = lf.Policy(retry=lf.Retry(max_attempts=5, initial_interval=60, max_interval=60, jitter=0))
    async with engine(queued, queues=["erp"], steps=[create_po], policies={"erp": slow}) as e:
        await e.start(queued, 1, id="q-1")
        await waiting_for(e, "q-1", "retry of step 'erp.create_po' on task queue 'erp' at ")
        # Another process lowers the attempts while the task waits out its backoff.
        await PolicyBook(e.store).update("erp", {"retry.max_attempts": 2}, reason="enough")
        await asyncio.sleep(0.6)  # past the worker's policy refresh
        clock.advance(61)
        with pytest.raises(lf.WorkflowFailedError, match=r"ERP unreachable \(2\)"):
            await e.handle("q-1").result(timeout=WAIT)
        first, last = await outcomes(e, "q-1")
    assert calls["erp"] == 2
    assert isinstance(first, StepAttemptFailed)
    assert (first.policy, first.policy_version) == ("erp", 1)
    assert isinstance(last, StepFailed)
    assert (last.policy, last.policy_version) == ("erp", 2)


BREAKER = lf.Policy(
    retry=lf.Retry(max_attempts=2, initial_interval=0.01, jitter=0),
    breaker=lf.Breaker(consecutive_failures=2, open_for=30),
)


async def test_an_open_breaker_refuses_queued_calls_without_using_their_attempts(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(queued, queues=["erp"], steps=[create_po], policies={"erp": BREAKER}) as e:
        failing = await e.start(queued, 1, id="q-2")
        await waiting_for(e, "q-2", "retry of step 'erp.create_po' on task queue 'erp' at ")
        clock.advance(1)  # the task's retry is a durable timer, on this clock
        with pytest.raises(lf.WorkflowFailedError, match="ERP unreachable"):
            await failing.result(timeout=WAIT)  # two failures in a row: open
        erp["healthy"] = True
        handle = await e.start(queued, 2, id="q-3")
        await waiting_for(e, "q-3", "retry of step 'erp.create_po' on task queue 'erp' at ")
        (refused,) = await outcomes(e, "q-3")
        assert isinstance(refused, StepAttemptFailed)
        assert refused.refused
        assert refused.error_type == "CircuitOpenError"
        assert calls["erp"] == 2
        clock.advance(31)  # half-open: the probe succeeds
        assert await handle.result(timeout=WAIT) == "po-2"
        assert await e.store.list_tasks(workflow_id="q-3") == []  # done and dropped
        moves = [ev.data.state for ev in await e.store.read_stream("breaker-erp")]
    assert moves == ["open", "half_open", "closed"]
    assert calls["erp"] == 3


PARKS = lf.Policy(retry=lf.Retry(max_attempts=2, initial_interval=0.01), on_exhausted="park")


async def test_a_parked_queued_step_is_sent_again_when_an_operator_retries(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(queued, queues=["erp"], steps=[create_po], policies={"erp": PARKS}) as e:
        handle = await e.start(queued, 4, id="q-4")
        await waiting_for(e, "q-4", "retry of step 'erp.create_po' on task queue 'erp' at ")
        clock.advance(1)  # the task's retry is a durable timer, on this clock
        await waiting_for(e, "q-4", "operator: step 'erp.create_po' failed 2 time(s)")
        assert (await e.describe("q-4")).status == "needs_attention"
        assert await e.store.list_tasks(workflow_id="q-4") == []
        # The queue's worker recorded the step's return type with the park.
        (park,) = [ev.data for ev in await e.history("q-4") if isinstance(ev.data, StepParked)]
        assert park.result_schema == {"type": "string"}
        erp["healthy"] = True
        await e.retry_step("q-4", reason="ERP back", actor="ops")
        assert await handle.result(timeout=WAIT) == "po-4"
    assert calls["erp"] == 3


async def test_a_retried_queued_step_is_described_by_its_new_attempts(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(queued, queues=["erp"], steps=[create_po], policies={"erp": PARKS}) as e:
        await e.start(queued, 5, id="q-5")
        await waiting_for(e, "q-5", "retry of step 'erp.create_po' on task queue 'erp' at ")
        clock.advance(1)
        await waiting_for(e, "q-5", "operator: step 'erp.create_po'")
        await e.retry_step("q-5", reason="try once more")
        # Sent again and waiting for the queue: no longer described as parked.
        await waiting_for(e, "q-5", "retry of step 'erp.create_po' on task queue 'erp' at ")
        described = await e.describe("q-5")
        assert described.status == "running"
        assert "after attempt 1 failed" in (described.waiting_for or "")
