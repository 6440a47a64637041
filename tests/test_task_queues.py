"""Steps on task queues, end to end on every backend (issue 12).

``ctx.step(fn, queue="erp")`` sends the step to the ``erp`` queue; an engine serving
that queue (``Engine(queues=["erp"], steps=[...])``) runs it and records its outcome
in the workflow's history. Engines here run in one process on one store; the
two-services test with real worker processes is in ``test_two_services.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import ledgerflow
from ledgerflow import RetryPolicy, StepFailedError, WorkflowContext
from ledgerflow.store import WorkflowStore
from ledgerflow.store.runtime import WorkerRow
from ledgerflow.workflow.history import (
    CompensationDone,
    CompensationScheduled,
    StepAttemptFailed,
    StepDone,
    StepScheduled,
)

from ._engines import WAIT, EngineFactory

REAL = ledgerflow.SystemClock()
FAST = RetryPolicy(max_attempts=3, initial_interval=0.05)

calls: Counter[str] = Counter()
keys: list[str] = []


async def until_queued(store: WorkflowStore) -> None:
    """Return once a task is in the queue (its workflow sent it)."""
    for _ in range(int(WAIT / 0.01)):
        if await store.list_tasks():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no task was queued")


@dataclass(frozen=True)
class Order:
    id: str
    amount: int


@ledgerflow.step(name="erp.reserve", queue="erp")
def reserve(order: Order) -> str:
    calls["reserve"] += 1
    keys.append(ledgerflow.current_step().idempotency_key)
    return f"R-{order.id}-{order.amount}"


@ledgerflow.step(name="erp.release")
def release(order: Order, result: str) -> None:
    calls[f"release {result}"] += 1


class Flaky(Exception):
    pass


class Refused(Exception):
    pass


@ledgerflow.step(name="erp.flaky")
async def flaky(n: int) -> int:
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise Flaky(f"try {calls['flaky']}")
    return n * 2


@ledgerflow.step(name="erp.refuse")
def refuse(n: int) -> int:
    calls["refuse"] += 1
    raise Refused("no credit")


def local_charge(order: Order) -> int:
    raise RuntimeError("card declined")


@ledgerflow.workflow(name="tq.order")
async def order_flow(ctx: WorkflowContext, order: Order) -> str:
    return await ctx.step(reserve, order)


@ledgerflow.workflow(name="tq.retry")
async def retry_flow(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(flaky, n, queue="erp", retry=FAST)


@ledgerflow.workflow(name="tq.refuse")
async def refuse_flow(ctx: WorkflowContext, n: int) -> str:
    policy = RetryPolicy(max_attempts=5, initial_interval=0.01, non_retryable=(Refused,))
    try:
        await ctx.step(refuse, n, queue="erp", retry=policy)
    except StepFailedError as exc:
        return f"{exc.error_type}: {exc.message}"
    return "?"


@ledgerflow.workflow(name="tq.saga")
async def saga_flow(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(reserve, order, compensate=release)
    await ctx.step(local_charge, order, retry=RetryPolicy.none())
    return "unreachable"


@ledgerflow.workflow(name="tq.fanout")
async def fanout_flow(ctx: WorkflowContext, n: int) -> list[str]:
    orders = [Order(f"o{i}", i) for i in range(n)]
    return list(await asyncio.gather(*(ctx.step(reserve, o) for o in orders)))


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    keys.clear()


async def types_of(store: WorkflowStore, workflow_id: str) -> list[type]:
    return [type(e.data) for e in await store.read_stream(f"wf-{workflow_id}")]


async def test_a_step_on_a_queue_runs_on_an_engine_serving_it(engine: EngineFactory) -> None:
    async with (
        engine(order_flow, clock=REAL) as orders,
        engine(clock=REAL, queues=["erp"], steps=[reserve]) as erp,
    ):
        handle = await orders.start(order_flow, Order("a", 5), id="q-1")
        assert await handle.result(timeout=WAIT) == "R-a-5"
        history = await orders.store.read_stream("wf-q-1")
        kinds = [type(e.data) for e in history]
        assert StepScheduled in kinds
        assert StepDone in kinds
        scheduled = next(e.data for e in history if isinstance(e.data, StepScheduled))
        assert (scheduled.name, scheduled.queue) == ("erp.reserve", "erp")
        assert calls["reserve"] == 1
        assert keys == ["q-1/1"]
        assert await erp.store.list_tasks() == []
        # The step's worker ran it, not the workflow's engine.
        (step_worker,) = [w for w in await orders.workers() if "erp" in w.queues]
        assert step_worker.worker_id == erp.owner


async def test_steps_wait_for_a_worker_of_their_queue(engine: EngineFactory) -> None:
    async with engine(order_flow, clock=REAL) as orders:
        handle = await orders.start(order_flow, Order("b", 1), id="q-2")
        await asyncio.sleep(0.2)
        described = await handle.describe()
        assert described.status == "running"
        assert described.waiting_for == "step 'erp.reserve' on task queue 'erp'"
        (task,) = await orders.store.list_tasks()
        assert (task.queue, task.name, task.attempt) == ("erp", "erp.reserve", 0)
        (queue,) = await orders.store.list_queues(await orders.store.database_now_us())
        assert (queue.queue, queue.ready, queue.running) == ("erp", 1, 0)
        async with engine(clock=REAL, queues=["erp"], steps=[reserve]):
            assert await handle.result(timeout=WAIT) == "R-b-1"


async def test_failed_attempts_are_recorded_and_retried_after_a_durable_backoff(
    engine: EngineFactory,
) -> None:
    async with engine(retry_flow, clock=REAL, queues=["erp"], steps=[flaky]) as both:
        handle = await both.start(retry_flow, 21, id="q-3")
        assert await handle.result(timeout=WAIT) == 42
        attempts = [
            e.data
            for e in await both.store.read_stream("wf-q-3")
            if isinstance(e.data, StepAttemptFailed)
        ]
        assert [(a.attempt, a.error_type, a.message) for a in attempts] == [
            (1, "Flaky", "try 1"),
            (2, "Flaky", "try 2"),
        ]
        assert calls["flaky"] == 3


async def test_a_non_retryable_error_fails_the_step_at_once(engine: EngineFactory) -> None:
    async with engine(refuse_flow, clock=REAL, queues=["erp"], steps=[refuse]) as both:
        handle = await both.start(refuse_flow, 1, id="q-4")
        assert await handle.result(timeout=WAIT) == "Refused: no credit"
        assert calls["refuse"] == 1


@ledgerflow.step(name="erp.misfit")
def misfit(n: int) -> int:
    calls["misfit"] += 1
    return "twelve"  # type: ignore[return-value]


@ledgerflow.workflow(name="tq.misfit")
async def misfit_flow(ctx: WorkflowContext, n: int) -> str:
    try:
        await ctx.step(misfit, n, queue="erp")
    except StepFailedError as exc:
        return f"{exc.error_type}: {exc.message}"
    return "?"


async def test_a_result_of_another_type_than_declared_fails_the_step(
    engine: EngineFactory,
) -> None:
    """A worker used to record it, and the workflow's every replay then stopped at
    it (stuck for good): it fails the step now, as a result with no JSON form does."""
    async with engine(misfit_flow, clock=REAL, queues=["erp"], steps=[misfit]) as both:
        handle = await both.start(misfit_flow, 1, id="q-misfit")
        answer = await handle.result(timeout=WAIT)
        assert answer.startswith("UnrecordableValueError: its result cannot be recorded")
        assert "does not fit the step's return type int" in answer
        assert StepDone not in await types_of(both.store, "q-misfit")
        assert calls["misfit"] == 1


async def test_a_compensation_runs_on_its_steps_queue(engine: EngineFactory) -> None:
    async with (
        engine(saga_flow, clock=REAL) as orders,
        engine(clock=REAL, queues=["erp"], steps=[reserve, release]),
    ):
        handle = await orders.start(saga_flow, Order("c", 3), id="q-5")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        assert (await handle.describe()).status == "compensated"
        kinds = await types_of(orders.store, "q-5")
        assert CompensationScheduled in kinds
        assert CompensationDone in kinds
        assert calls["release R-c-3"] == 1


async def test_parallel_steps_are_all_sent_in_one_pass(engine: EngineFactory) -> None:
    async with engine(fanout_flow, clock=REAL) as orders:
        handle = await orders.start(fanout_flow, 4, id="q-6")
        for _ in range(100):
            if len(await orders.store.list_tasks()) == 4:
                break
            await asyncio.sleep(0.02)
        assert len(await orders.store.list_tasks()) == 4
        async with engine(clock=REAL, queues=["erp"], steps=[reserve]):
            assert await handle.result(timeout=WAIT) == [f"R-o{i}-{i}" for i in range(4)]


async def test_cancelling_a_workflow_drops_its_queued_steps(engine: EngineFactory) -> None:
    async with engine(order_flow, clock=REAL) as orders:
        handle = await orders.start(order_flow, Order("d", 1), id="q-7")
        for _ in range(100):
            if await orders.store.list_tasks():
                break
            await asyncio.sleep(0.02)
        await handle.cancel("changed my mind")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        assert (await handle.describe()).status == "cancelled"
        assert await orders.store.list_tasks() == []


async def test_cancelling_while_a_queued_step_runs_compensates_it(
    engine: EngineFactory,
) -> None:
    """The cancel came while a worker of the queue ran the step: the instance ended
    `cancelled` at once and dropped the running task, whose outcome then could not
    be recorded, so the step's effect stayed and its compensation never ran. As a
    step run in the workflow's own engine, it is waited for and compensated."""
    started = threading.Event()
    go_on = threading.Event()
    effects: list[str] = []

    @ledgerflow.step(name="erp.hold", queue="erp")
    def hold(sku: str) -> str:
        started.set()
        go_on.wait(WAIT)
        effects.append(f"reserved {sku}")
        return "R-1"

    @ledgerflow.step(name="erp.unhold", queue="erp")
    def unhold(sku: str, result: str) -> None:
        effects.append(f"released {sku} ({result})")

    @ledgerflow.workflow(name="tq.held")
    async def held(ctx: WorkflowContext, sku: str) -> str:
        await ctx.step(hold, sku, compensate=unhold)
        await ctx.sleep(timedelta(hours=1))
        return "done"

    async with (
        engine(held, clock=REAL) as orders,
        engine(clock=REAL, queues=["erp"], steps=[hold, unhold]),
    ):
        handle = await orders.start(held, "SKU-1", id="held-1")
        assert await asyncio.to_thread(started.wait, WAIT)
        await handle.cancel("customer withdrew")
        await asyncio.sleep(0.3)  # the pass that sees the cancel runs meanwhile
        go_on.set()
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        assert (await handle.describe()).status == "compensated"
    assert effects == ["reserved SKU-1", "released SKU-1 (R-1)"]


async def test_a_queue_limit_holds_across_engines(engine: EngineFactory) -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    @ledgerflow.step(name="erp.slow")
    def slow(n: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.05)
        with lock:
            running -= 1
        return n

    @ledgerflow.workflow(name="tq.slow")
    async def slow_flow(ctx: WorkflowContext, n: int) -> int:
        return await ctx.step(slow, n, queue="erp")

    async with engine(slow_flow, clock=REAL) as orders:
        await orders.store.set_queue_limit("erp", 3)
        handles = [await orders.start(slow_flow, i, id=f"s-{i}") for i in range(12)]
        async with (
            engine(clock=REAL, queues=["erp"], steps=[slow], task_concurrency=8),
            engine(clock=REAL, queues=["erp"], steps=[slow], task_concurrency=8),
        ):
            results = [await h.result(timeout=WAIT) for h in handles]
        assert results == list(range(12))
        assert 1 <= most <= 3


def test_an_engine_serving_queues_needs_steps() -> None:
    with pytest.raises(ledgerflow.ConfigurationError, match="no steps"):
        ledgerflow.Engine("memory://", queues=["erp"])

    @ledgerflow.step(name="erp.reserve")
    def other(order: Order) -> str:
        return ""

    with pytest.raises(ledgerflow.ConfigurationError, match="two steps are named"):
        ledgerflow.Engine("memory://", queues=["erp"], steps=[reserve, other])


@ledgerflow.step(name="erp.hang")
def hang(n: int) -> int:
    step = ledgerflow.current_step()
    calls["hang"] += 1
    for _ in range(200):  # a long sync step that looks at its flag
        if step.cancelled:
            raise ledgerflow.StepCancelledError("gave up")
        threading.Event().wait(0.01)
    return n


@ledgerflow.workflow(name="tq.timeout")
async def timeout_flow(ctx: WorkflowContext, n: int) -> str:
    try:
        await ctx.step(hang, n, queue="erp", timeout=0.1, retry=RetryPolicy.none())
    except StepFailedError as exc:
        return exc.error_type
    return "done"


async def test_the_attempt_timeout_is_enforced_by_the_step_worker(engine: EngineFactory) -> None:
    async with engine(timeout_flow, clock=REAL, queues=["erp"], steps=[hang]) as both:
        handle = await both.start(timeout_flow, 1, id="q-8")
        assert await handle.result(timeout=WAIT) == "StepTimeoutError"
        assert calls["hang"] == 1


async def test_attempts_lost_with_their_workers_count(engine: EngineFactory) -> None:
    @ledgerflow.workflow(name="tq.lost")
    async def lost_flow(ctx: WorkflowContext, n: int) -> str:
        try:
            await ctx.step(reserve, Order("x", n), retry=RetryPolicy(max_attempts=2))
        except StepFailedError as exc:
            return f"{exc.error_type}: {exc.message}"
        return "done"

    async with engine(lost_flow, clock=REAL) as orders:
        handle = await orders.start(lost_flow, 1, id="q-9")
        await until_queued(orders.store)
        # Two workers claimed it and died in the attempt (their leases ran out).
        now = await orders.store.database_now_us()
        for ghost in ("ghost-1", "ghost-2"):
            (row,) = await orders.store.claim_tasks(
                ghost, queues=["erp"], now_us=now, lease_until_us=now + 1, limit=1
            )
            now += 2
        assert row.attempt == 2
        async with engine(clock=REAL, queues=["erp"], steps=[reserve]):
            outcome = await handle.result(timeout=WAIT)
        assert outcome.startswith("TaskLostError: attempt 2 was lost with its worker")
        assert calls["reserve"] == 0
        # Each lost attempt is in the history, before the failure it led to.
        history = [e.data for e in await orders.history("q-9")]
        lost = [e for e in history if isinstance(e, StepAttemptFailed)]
        assert [(e.attempt, e.error_type) for e in lost] == [
            (1, "AttemptLost"),
            (2, "AttemptLost"),
        ]
        assert "the step may have run" in lost[0].message


@pytest.mark.parametrize("recorded_by", [None, "an older worker"])
async def test_an_attempt_lost_before_one_that_succeeds_is_in_the_history(
    engine: EngineFactory, recorded_by: str | None
) -> None:
    """The step may have run twice: the history says so, once, with the attempt the
    worker that died was running. A failure an older release's worker recorded
    (it kept no count of recorded attempts in the task's row) is not taken for a
    loss: the history decides."""

    @ledgerflow.workflow(name="tq.lost_once")
    async def lost_once(ctx: WorkflowContext, n: int) -> str:
        return await ctx.step(reserve, Order("x", n), retry=RetryPolicy(max_attempts=5))

    async with engine(lost_once, clock=REAL) as orders:
        handle = await orders.start(lost_once, 1, id="q-10")
        await until_queued(orders.store)
        now = await orders.store.database_now_us()
        await orders.store.claim_tasks(
            "ghost", queues=["erp"], now_us=now, lease_until_us=now + 1, limit=1
        )
        if recorded_by is not None:
            failed = StepAttemptFailed(
                seq=1, name="erp.reserve", attempt=1, error_type="Boom", message="503"
            )
            await orders.store.append(orders.stream_id("q-10"), [failed])
        async with engine(clock=REAL, queues=["erp"], steps=[reserve]) as worker:
            assert await handle.result(timeout=WAIT) == "R-x-1"
            history = [e.data for e in await worker.history("q-10")]
        failed_attempts = [e for e in history if isinstance(e, StepAttemptFailed)]
        expected = (1, "AttemptLost") if recorded_by is None else (1, "Boom")
        assert [(e.attempt, e.error_type) for e in failed_attempts] == [expected]
        assert calls["reserve"] == 1


class Booking:
    """A step as an object: ``execute`` books, ``compensate`` cancels."""

    def execute(self, n: int) -> str:
        calls["book"] += 1
        return f"B{n}"

    def compensate(self, n: int) -> None:
        calls["unbook"] += 1


@ledgerflow.workflow(name="tq.booking")
async def booking_flow(ctx: WorkflowContext, n: int) -> str:
    booked = await ctx.step(Booking(), n, queue="erp")
    if n < 0:
        await ctx.step(local_charge, Order("x", n), retry=RetryPolicy.none())
    return booked


async def test_a_step_object_runs_and_compensates_on_its_queue(engine: EngineFactory) -> None:
    async with engine(booking_flow, clock=REAL, queues=["erp"], steps=[Booking()]) as both:
        assert await (await both.start(booking_flow, 2, id="q-10")).result(timeout=WAIT) == "B2"
        handle = await both.start(booking_flow, -1, id="q-11")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        assert (await handle.describe()).status == "compensated"
    assert (calls["book"], calls["unbook"]) == (2, 1)


@ledgerflow.workflow(name="tq.bad_queue")
async def bad_queue_flow(ctx: WorkflowContext, n: int) -> str:
    return await ctx.step(reserve, Order("x", n), queue="")


async def test_an_empty_queue_name_fails_the_workflow_saying_so(engine: EngineFactory) -> None:
    async with engine(bad_queue_flow, clock=REAL) as e:
        handle = await e.start(bad_queue_flow, 1, id="q-12")
        with pytest.raises(ledgerflow.WorkflowFailedError, match="non-empty str"):
            await handle.result(timeout=WAIT)
    assert calls["reserve"] == 0


def test_a_worker_app_names_its_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ledgerflow.workflow.worker import load_app, load_workflows

    (tmp_path / "svc_app.py").write_text(
        "import ledgerflow as lf\n\n"
        "@lf.step(name='svc.one')\ndef one(x: int) -> int:\n    return x\n\n"
        "def plain(x: int) -> int:\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = load_app("svc_app")  # marked steps only: a module holds other functions
    assert ([f.__name__ for f in found.steps], found.workflows) == (["one"], [])
    named = load_app("svc_app:plain")  # named explicitly, a plain function is a step
    assert [f.__name__ for f in named.steps] == ["plain"]
    with pytest.raises(ledgerflow.ConfigurationError, match="no workflows found"):
        load_workflows("svc_app")


@ledgerflow.step(name="erp.long")
def long_step(n: int) -> int:
    calls["long"] += 1
    threading.Event().wait(1.0)
    return n


@ledgerflow.workflow(name="tq.long")
async def long_flow(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(long_step, n, queue="erp")


async def test_a_step_longer_than_its_lease_keeps_it_while_it_runs(
    engine: EngineFactory,
) -> None:
    """The heartbeat renews the task's lease: a second worker of the queue never
    takes it over, so the step runs once."""
    lease = timedelta(seconds=0.3)
    async with (
        engine(long_flow, clock=REAL, lease=lease) as orders,
        engine(clock=REAL, queues=["erp"], steps=[long_step], lease=lease),
    ):
        handle = await orders.start(long_flow, 5, id="q-13")
        for _ in range(500):
            if calls["long"]:
                break
            await asyncio.sleep(0.01)
        async with engine(clock=REAL, queues=["erp"], steps=[long_step], lease=lease):
            assert await handle.result(timeout=WAIT) == 5
    assert calls["long"] == 1


@ledgerflow.step(name="erp.long_async")
async def long_async_step(n: int) -> int:
    calls["long"] += 1
    await asyncio.sleep(1.0)
    return n


@ledgerflow.workflow(name="tq.long_async")
async def long_async_flow(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(long_async_step, n, queue="erp")


async def test_a_stopping_worker_hands_its_tasks_back_at_once(engine: EngineFactory) -> None:
    """Closed with a short grace while an async step runs, a worker cancels it and
    gives the task back (its attempt not counted): another takes it at once, not
    after the 60 s lease. (A sync body cannot be cancelled: it is waited for and
    recorded, see test_a_graceful_stop_records_a_sync_step_that_outlives_its_grace.)"""
    lease = timedelta(seconds=60)
    async with engine(long_async_flow, clock=REAL, lease=lease) as orders:
        handle = await orders.start(long_async_flow, 7, id="q-14")
        steps = [long_async_step]
        async with engine(clock=REAL, queues=["erp"], steps=steps, lease=lease) as first:
            for _ in range(500):
                if calls["long"]:
                    break
                await asyncio.sleep(0.01)
            await first.close(grace=0.05)
        (task,) = await orders.store.list_tasks()
        assert (task.lease_owner, task.attempt) == (None, 0)
        async with engine(clock=REAL, queues=["erp"], steps=steps, lease=lease):
            assert await handle.result(timeout=10) == 7
    assert calls["long"] == 2  # at least once: the cut attempt ran again


def test_step_names_are_checked_when_registered() -> None:
    def nul() -> None:
        return None

    nul.__qualname__ = "bad\x00name"
    with pytest.raises(ledgerflow.ConfigurationError, match="without NUL"):
        ledgerflow.Engine("memory://", queues=["erp"], steps=[nul])


async def test_a_failing_claim_is_logged_and_the_queue_still_served(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine(order_flow, clock=REAL, queues=["erp"], steps=[reserve]) as both:
        real = both.store.claim_tasks
        failures = [RuntimeError("a bug")]

        async def claim_tasks(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real(*args, **kwargs)

        monkeypatch.setattr(both.store, "claim_tasks", claim_tasks)
        handle = await both.start(order_flow, Order("z", 1), id="q-15")
        assert await handle.result(timeout=WAIT) == "R-z-1"
    assert "claiming tasks failed" in caplog.text


@ledgerflow.step(name="erp.release_async")
async def release_async(order: Order, result: str) -> None:
    calls[f"async release {result}"] += 1


@ledgerflow.workflow(name="tq.saga_async")
async def saga_async_flow(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(reserve, order, compensate=release_async)
    await ctx.step(local_charge, order, retry=RetryPolicy.none())
    return "unreachable"


async def test_an_async_compensation_on_a_queue_gets_the_steps_result(
    engine: EngineFactory,
) -> None:
    async with (
        engine(saga_async_flow, clock=REAL) as orders,
        engine(clock=REAL, queues=["erp"], steps=[reserve, release_async]),
    ):
        handle = await orders.start(saga_async_flow, Order("d", 4), id="q-16")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        assert (await handle.describe()).status == "compensated"
    assert calls["async release R-d-4"] == 1


@pytest.mark.parametrize("lost", [True, False])
async def test_a_cancel_waits_for_a_step_a_worker_claimed_and_compensates_it(
    engine: EngineFactory, lost: bool
) -> None:
    """Cancelled while its step was queued: a step no worker ever claimed is
    withdrawn; one a worker claimed and died running (lost) may have acted, so the
    cancel waits for its outcome (it runs again once the lease runs out) and then
    compensates it. The instance used to end at once, dropping the task and leaving
    the step's effect in the ERP."""

    @ledgerflow.workflow(name="tq.cancel_lost")
    async def booking(ctx: WorkflowContext, n: int) -> str:
        await ctx.step(reserve, Order("c", n), compensate=release)
        await ctx.wait_for_signal("never")
        return "unreachable"

    async with engine(booking, clock=REAL) as orders:
        handle = await orders.start(booking, 1, id="q-cl")
        await until_queued(orders.store)
        if lost:
            # A worker claimed it, ran the step's body and died; it was judged dead
            # and reaped, which released its lease.
            now = await orders.store.database_now_us()
            stale = now - 10_000_000
            ghost = WorkerRow("ghost", "h", 1, ("erp",), (), "v", stale, stale, 1_000_000, 1)
            await orders.store.register_worker(ghost)
            await orders.store.claim_tasks(
                "ghost", queues=["erp"], now_us=now, lease_until_us=now + 1, limit=1
            )
            assert await orders.store.reap_workers(now + 2) == ["ghost"]
            assert (await orders.store.list_tasks())[0].lease_owner is None
        await orders.cancel("q-cl", "changed plans")
        if not lost:
            with pytest.raises(ledgerflow.WorkflowFailedError):
                await handle.result(timeout=WAIT)
            assert await orders.store.list_tasks() == []
            assert (await orders.describe("q-cl")).status == "cancelled"
            assert calls["reserve"] == 0
            return
        await asyncio.sleep(0.2)
        assert (await orders.describe("q-cl")).status == "running"  # waiting for the step
        async with engine(clock=REAL, queues=["erp"], steps=[reserve, release]):
            with pytest.raises(ledgerflow.WorkflowFailedError):
                await handle.result(timeout=WAIT)
        assert (await orders.describe("q-cl")).status == "compensated"
        assert calls["reserve"] == 1
        assert calls["release R-c-1"] == 1


slow_started = threading.Event()


@ledgerflow.step(name="erp.slow_invoice", queue="erp")
def slow_invoice(seconds: float) -> str:
    calls["slow"] += 1
    slow_started.set()
    threading.Event().wait(seconds)  # a body no one can stop
    return f"INV-{seconds}"


@ledgerflow.workflow(name="tq.slow")
async def slow_flow(ctx: WorkflowContext, seconds: float) -> str:
    return await ctx.step(slow_invoice, seconds)


@pytest.mark.parametrize(
    ("seconds", "lease"),
    [(0.5, 60), (1.6, 2)],  # within half its lease; past half of it, within the lease
    ids=["within half a lease", "within a lease"],
)
async def test_a_graceful_stop_records_a_sync_step_that_outlives_its_grace(
    engine: EngineFactory, seconds: float, lease: int
) -> None:
    """A worker told to stop waited for a sync body past its grace (it cannot be
    stopped), then handed its task back unrecorded: the step ran again on the next
    worker, a second ERP call on every deploy. Then it waited half a lease, and a
    body returning later had its outcome dropped all the same. It is recorded now."""
    slow_started.clear()
    async with engine(slow_flow, clock=REAL) as orders:
        handle = await orders.start(slow_flow, seconds, id="q-slow")
        async with engine(
            clock=REAL, queues=["erp"], steps=[slow_invoice], lease=timedelta(seconds=lease)
        ) as worker:
            assert await asyncio.to_thread(slow_started.wait, WAIT)
            await worker.close(grace=0.05)
        history = [e.data for e in await orders.history("q-slow")]
        assert any(isinstance(e, StepDone) for e in history), history
        assert await handle.result(timeout=WAIT) == f"INV-{seconds}"
        assert calls["slow"] == 1


spans: list[tuple[float, float]] = []


@ledgerflow.step(name="erp.slow")
def slow(n: int) -> int:
    began = time.monotonic()
    time.sleep(0.6)
    spans.append((began, time.monotonic()))
    return n


@ledgerflow.workflow(name="overrun_flow", version=1)
async def overrun_flow(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(
        slow, n, queue="erp", timeout=0.2, retry=ledgerflow.RetryPolicy(max_attempts=2)
    )


async def test_a_queued_attempt_past_its_timeout_is_not_retried_beside_its_still_running_body(
    engine: EngineFactory,
) -> None:
    """The timeout was recorded and the task given back at once: the retry ran while
    the first body still did, so bulkheads and queue limits no longer held."""
    spans.clear()
    async with engine(overrun_flow, clock=REAL, queues=["erp"], steps=[slow]) as both:
        handle = await both.start(overrun_flow, 1, id="q-slow")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
    assert len(spans) == 2
    (_, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end


@ledgerflow.step(name="erp.invoice_down")
def invoice_down(n: int) -> str:
    calls["invoice_down"] += 1
    raise Flaky("ERP down")


@ledgerflow.step(name="local.hold")
def hold(n: int) -> str:
    return f"H-{n}"


@ledgerflow.step(name="local.unhold")
def unhold(n: int, result: str) -> None:
    calls[f"unhold {result}"] += 1


@ledgerflow.workflow(name="tq.cancel_in_backoff")
async def backoff_flow(ctx: WorkflowContext, n: int) -> str:
    await ctx.step(hold, n, compensate=unhold)
    slow = RetryPolicy(max_attempts=5, initial_interval=30)
    return await ctx.step(invoice_down, n, queue="erp", retry=slow)


async def test_a_cancel_withdraws_a_step_waiting_out_its_retry(engine: EngineFactory) -> None:
    """Cancelled while its queued step waited out a retry's backoff (attempt 1
    failed, recorded; no attempt running): nothing is in doubt, so the task is
    withdrawn and the cancel takes effect, as for a local step in backoff. It used
    to wait for the task, which a worker claimed when due and ran again, calling
    the ERP until the attempts ran out."""
    async with (
        engine(backoff_flow, clock=REAL) as orders,
        engine(clock=REAL, queues=["erp"], steps=[invoice_down]),
    ):
        handle = await orders.start(backoff_flow, 7, id="q-backoff")
        for _ in range(int(WAIT / 0.01)):
            history = [e.data for e in await orders.history("q-backoff")]
            if any(isinstance(e, StepAttemptFailed) for e in history):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("attempt 1 never failed")
        await orders.cancel("q-backoff", "customer gave up")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await handle.result(timeout=WAIT)
        history = [e.data for e in await orders.history("q-backoff")]
        assert (await orders.describe("q-backoff")).status == "compensated", history
        assert await orders.store.list_tasks() == []
    assert calls["invoice_down"] == 1
    assert calls["unhold H-7"] == 1


def test_a_worker_app_module_registers_its_lists_of_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docs keep a machine's versions registered together in a module-level list
    (made by a function: no name of their own). ``--app module`` skipped the list:
    the worker said the module held no workflows, replay-check that the new code had
    no version 1."""
    from ledgerflow.workflow.worker import load_app

    (tmp_path / "doc_app.py").write_text(
        "import ledgerflow as lf\n\n"
        "def doc(version: int) -> lf.Machine:\n"
        "    m = lf.Machine('doc', version=version)\n"
        "    m.state('draft', initial=True)\n"
        "    m.state('done', terminal=True)\n"
        "    m.transition('draft', 'publish', 'done')\n"
        "    return m\n\n"
        "DOC = [doc(1), doc(2)]\n"
        "ALSO = DOC\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = load_app("doc_app")
    assert sorted((w.name, w.version) for w in found.workflows) == [("doc", 1), ("doc", 2)]
