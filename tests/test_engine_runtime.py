"""The engine's own machinery: how many passes run at once, when the scheduler looks,
closing, store faults, takeover of dead workers' leases, parking and the end of a
child whose parent is gone.

These are the behaviours around the passes (``workflow/engine.py``) rather than the
workflow code inside them; each runs on every backend unless it is about a function.
Faults are injected by wrapping the store the engine holds. Back-off sleeps are
recorded rather than slept (``recorded_sleeps``), so the tests check the schedule of
retries without waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

import ledgerflow
from ledgerflow import ManualClock, WorkflowCancelled, WorkflowContext
from ledgerflow.errors import StoreUnavailableError
from ledgerflow.events import ANY
from ledgerflow.workflow import engine as engine_module
from ledgerflow.workflow.engine import MAX_PASS_RETRIES, Engine
from ledgerflow.workflow.history import (
    CancelRequested,
    ChildFinished,
    Finished,
    Resumed,
    SignalSent,
    StepDone,
    Stuck,
)

from ._engines import WAIT, EngineFactory, waiting_for
from ._passes import crashes, outcome, waiting
from ._passes import no_pass_crashed as no_pass_crashed  # autouse: applies here


class Tally:
    """Counts what steps did; steps run in threads (sync) or on the loop (async)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.running = 0
        self.most_at_once = 0

    def did(self, what: str) -> None:
        with self.lock:
            self.log.append(what)

    def count(self, what: str) -> int:
        with self.lock:
            return self.log.count(what)

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


tally = Tally()
gate = asyncio.Event()


@pytest.fixture(autouse=True)
def fresh_tally() -> None:
    global tally, gate
    tally = Tally()
    gate = asyncio.Event()


def recorded_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the engine's own back-off sleeps ask for, in order; they return at
    once. Only ``engine.py``'s sleeps: the rest of asyncio is left as it is."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        if delay > 5.0:  # not a back-off (they stop at 5 s): the lease heartbeat
            return await real_sleep(delay, result)
        asked.append(delay)
        return await real_sleep(0, result)

    shim = SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio)})
    shim.sleep = sleep
    monkeypatch.setattr(engine_module, "asyncio", shim)
    return asked


async def until(condition: Callable[[], bool], poke: Engine | None = None) -> None:
    """Wait for ``condition`` (a hang guard, not a speed check), waking ``poke``'s
    scheduler meanwhile (the manual clock does not move, so it would sleep on)."""
    async with asyncio.timeout(WAIT):
        while not condition():
            if poke is not None:
                poke._wake.set()
            await asyncio.sleep(0.005)


async def until_no_wakeup(e: Engine, workflow_id: str) -> None:
    """Wait until the instance's wake-up row is gone, waking the scheduler meanwhile."""
    async with asyncio.timeout(WAIT):
        while await e.store.get_wakeup(workflow_id) is not None:
            assert crashes == []
            e._wake.set()
            await asyncio.sleep(0.01)


def unavailable(e: Engine) -> StoreUnavailableError:
    return StoreUnavailableError(e.store.backend, "connection dropped (injected)")


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ledgerflow.engine" and r.levelno == level
    ]


# -- workflows --------------------------------------------------------------------


async def held(n: int) -> int:
    """An async step that counts itself running until the test opens the gate."""
    tally.enter()
    try:
        await gate.wait()
    finally:
        tally.leave()
    tally.did(f"held {n}")
    return n


@ledgerflow.workflow(name="holding", version=1)
async def holding(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(held, n)


def work(n: int) -> int:
    tally.did("work")
    return n * 10


@ledgerflow.workflow(name="single", version=1)
async def single(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(work, n)


@ledgerflow.workflow(name="dozing", version=1)
async def dozing(ctx: WorkflowContext, seconds: int) -> str:
    await ctx.sleep(seconds)
    return "rested"


def first_half(n: int) -> int:
    tally.did("first")
    return n + 1


async def second_half(n: int) -> int:
    tally.did("second started")
    try:
        await gate.wait()
    except asyncio.CancelledError:
        tally.did("second cancelled")
        raise
    tally.did("second done")
    return n * 2


@ledgerflow.workflow(name="halves", version=1)
async def halves(ctx: WorkflowContext, n: int) -> int:
    m = await ctx.step(first_half, n)
    return await ctx.step(second_half, m)


# -- concurrency --------------------------------------------------------------------


async def test_a_full_engine_claims_no_more_than_its_free_slots(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """Five instances due at once on an engine of two slots: two run, the other three
    wait for a slot, and a pass that ends wakes the scheduler for the next (the
    manual clock never moves meanwhile, so nothing else would)."""
    async with engine(holding, concurrency=2) as e:
        # Started by a client: nothing runs them until the engine claims them.
        client = ledgerflow.WorkflowClient(e.store, workflows=[holding])
        for n in range(5):
            await client.start(holding, n, id=f"h-{n}")
        await until(lambda: tally.running == 2, poke=e)
        for _ in range(3):  # more looks, each a chance to claim too much
            e._wake.set()
            await asyncio.sleep(0.02)
        assert tally.running == 2
        gate.set()
        results = [await outcome(e, f"h-{n}") for n in range(5)]
    assert results == [0, 1, 2, 3, 4]
    assert tally.most_at_once == 2


async def test_instances_started_on_a_full_engine_wait_for_a_slot(
    engine: EngineFactory,
) -> None:
    """Starting on the engine runs the instance at once only while a slot is free;
    the rest are left to the scheduler, which claims them as slots free up."""
    async with engine(holding, concurrency=1) as e:
        handles = [await e.start(holding, n, id=f"s-{n}") for n in range(3)]
        await until(lambda: tally.running >= 1)
        await asyncio.sleep(0.05)
        assert tally.most_at_once == 1
        gate.set()
        assert [await outcome(e, h) for h in handles] == [0, 1, 2]
    assert tally.most_at_once == 1


async def test_a_claim_in_flight_holds_its_slots_from_starts_meanwhile(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that counted one free slot is held in flight while two instances are
    started on the engine: the starts must not run one in that slot too, or the
    claim's lease makes two passes on an engine of one (a CI failure on
    PostgreSQL, whose claim round trip leaves room for it)."""
    async with engine(holding, concurrency=1) as e:
        real_claim = e.store.claim_wakeups
        reached = asyncio.Event()
        go_on = asyncio.Event()
        held_once = [False]

        async def claim_wakeups(*args: Any, **kwargs: Any) -> Any:
            if not held_once[0]:
                held_once[0] = True
                reached.set()
                await go_on.wait()
            return await real_claim(*args, **kwargs)

        monkeypatch.setattr(e.store, "claim_wakeups", claim_wakeups)
        await until(reached.is_set, poke=e)
        handles = [await e.start(holding, n, id=f"c-{n}") for n in range(2)]
        go_on.set()
        await until(lambda: tally.running >= 1, poke=e)
        for _ in range(3):  # more looks, each a chance to claim too much
            e._wake.set()
            await asyncio.sleep(0.02)
        assert tally.most_at_once == 1
        gate.set()
        assert sorted([await outcome(e, h) for h in handles]) == [0, 1]
    assert tally.most_at_once == 1


def test_an_engine_needs_at_least_one_slot() -> None:
    with pytest.raises(ledgerflow.ConfigurationError, match=r"^Engine concurrency must be >= 1$"):
        Engine("memory://", concurrency=0)
    assert Engine("memory://", concurrency=1).concurrency == 1
    with pytest.raises(ledgerflow.ConfigurationError, match=r"^Engine step_threads must be >= 1$"):
        Engine("memory://", step_threads=0)


# -- when the scheduler looks -------------------------------------------------------


async def test_a_timer_due_before_the_schedulers_next_look_wakes_it(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """The scheduler sleeps until its next look (an hour away here); a timer set
    meanwhile for sooner must shorten that sleep, or it fires an hour late."""
    async with engine(dozing, poll_interval=3600) as e:
        handle = await e.start(dozing, 10, id="doze-1")
        await waiting(e, "doze-1", "timer")
        clock.advance(10)
        assert await outcome(e, handle) == "rested"


async def test_work_another_process_adds_is_seen_at_the_next_poll(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """Work nobody announces (another process's start on SQLite, a notification lost
    in a reconnection) is found when the scheduler next looks, ``poll_interval``
    after its last look, even though a timer due much later is what the store has
    next."""
    async with engine(dozing, single, poll_interval=30) as e:
        assert e._unwatch is not None
        e._unwatch()  # this engine hears of no one's work now
        await e.start(dozing, 86_400, id="late-timer")
        await waiting(e, "late-timer", "timer")
        looked = asyncio.Event()
        real_next = e.store.next_wakeup

        async def next_wakeup(*args: Any, **kwargs: Any) -> int | None:
            due = await real_next(*args, **kwargs)
            looked.set()  # the scheduler goes to sleep from here, before we run
            return due

        e.store.next_wakeup = next_wakeup  # type: ignore[method-assign]
        e._wake.set()  # one more look, so that it sleeps from the time we know
        await asyncio.wait_for(looked.wait(), WAIT)
        client = ledgerflow.WorkflowClient(e.store, workflows=[single])
        await client.start(single, 4, id="from-outside")
        clock.advance(29.9)
        await asyncio.sleep(0.05)
        assert tally.count("work") == 0  # not looked yet
        clock.advance(0.1)  # exactly poll_interval after the last look
        assert await outcome(e, "from-outside") == 40
        assert (await e.describe("late-timer")).status == "running"


async def test_work_a_client_adds_wakes_the_engine_at_once(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """A client's start on the engine's store wakes the sleeping scheduler: the
    instance runs with the clock standing still, long before the next poll."""
    async with engine(dozing, single, poll_interval=30) as e:
        await e.start(dozing, 86_400, id="late-timer")
        await waiting(e, "late-timer", "timer")
        await asyncio.sleep(0.05)  # the scheduler sleeps until its next poll
        client = ledgerflow.WorkflowClient(e.store, workflows=[single])
        await client.start(single, 4, id="from-outside")
        assert await outcome(e, "from-outside") == 40


# -- closing ------------------------------------------------------------------------


async def test_close_lets_a_running_pass_finish_within_its_grace(
    engine: EngineFactory,
) -> None:
    async with engine(halves) as e:
        await e.start(halves, 1, id="half-1")
        await until(lambda: tally.count("second started") == 1)
        closing = asyncio.create_task(e.close(grace=WAIT))
        await asyncio.sleep(0.05)
        assert not closing.done()  # waiting for the pass
        gate.set()
        await asyncio.wait_for(closing, WAIT)
    async with engine(halves) as e:
        assert await outcome(e, "half-1") == 4
    assert tally.log == ["first", "second started", "second done"]


async def test_close_cancels_a_pass_past_its_grace_and_a_new_engine_finishes_it(
    engine: EngineFactory,
) -> None:
    """The pass still running when the grace ends is cancelled; what it recorded
    stands (the first step is not run again), its lease is given back, so the next
    engine runs the instance at once rather than when the lease would expire."""
    async with engine(halves) as e:
        await e.start(halves, 1, id="half-2")
        await until(lambda: tally.count("second started") == 1)
        await asyncio.wait_for(e.close(grace=0.05), WAIT)
        assert tally.count("second cancelled") == 1
    gate.set()
    async with engine(halves) as e:
        assert await outcome(e, "half-2") == 4
    assert tally.count("first") == 1
    assert tally.count("second started") == 2


async def test_closing_twice_is_harmless(engine: EngineFactory) -> None:
    async with engine(single) as e:
        assert await outcome(e, await e.start(single, 1)) == 10
        await e.close()
        await e.close()


# -- store faults -------------------------------------------------------------------


async def test_a_failing_claim_is_logged_and_retried_with_back_off(
    engine: EngineFactory,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The scheduler survives a store that cannot claim: it says so, waits longer
    after each failure in a row (from 0.2 s) and starts again from the shortest
    wait once a claim goes through."""
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(single) as e:
        sleeps = recorded_sleeps(monkeypatch)
        script = [True, True, False, True, True, True]  # True: the claim fails
        real_claim = e.store.claim_wakeups

        reached = asyncio.Event()
        go_on = asyncio.Event()

        async def claim_wakeups(*args: Any, **kwargs: Any) -> Any:
            if len(script) == 3:
                # Two failures, then a claim: hold the next claim until the test has
                # seen that (its pokes would otherwise run the script on meanwhile).
                reached.set()
                await go_on.wait()
            if script and script.pop(0):
                raise unavailable(e)
            return await real_claim(*args, **kwargs)

        monkeypatch.setattr(e.store, "claim_wakeups", claim_wakeups)
        await until(reached.is_set, poke=e)
        client = ledgerflow.WorkflowClient(e.store, workflows=[single])
        await client.start(single, 2, id="after-faults")  # claimed after three more
        go_on.set()
        assert await outcome(e, "after-faults", e._wake.set) == 20
    assert sleeps == [0.2, 0.4, 0.2, 0.4, 0.8]
    reason = f"{e.store.backend} store unavailable: connection dropped (injected)"
    assert (
        messages(caplog, logging.WARNING)
        == [f"ledgerflow engine: cannot claim work ({reason})"] * 5
    )


@pytest.mark.parametrize("fault", ["read-only", "a bug"])
async def test_the_scheduler_outlives_a_read_only_store_and_its_own_bugs(
    engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """A claim refused by a read-only store (an operator's setting, a failover under
    way) ended the scheduler task while the heartbeat went on: a worker that looked
    alive, that nobody reaped, and that ran nothing again. It backs off and goes on,
    as after an outage; an unexpected exception too, said with its traceback."""
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(single) as e:
        sleeps = recorded_sleeps(monkeypatch)
        failures = [1, 1]
        real_claim = e.store.claim_wakeups

        async def claim_wakeups(*args: Any, **kwargs: Any) -> Any:
            if failures:
                failures.pop()
                if fault == "read-only":
                    raise ledgerflow.StoreReadOnlyError("the ledger", "read-only (injected)")
                raise RuntimeError("a bug (injected)")
            return await real_claim(*args, **kwargs)

        monkeypatch.setattr(e.store, "claim_wakeups", claim_wakeups)
        e._wake.set()
        await until(lambda: not failures, poke=e)
        client = ledgerflow.WorkflowClient(e.store, workflows=[single])
        await client.start(single, 2, id="after-refusals")
        assert await outcome(e, "after-refusals", e._wake.set) == 20
    assert sleeps[:2] == [0.2, 0.4]
    if fault == "a bug":
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert logged
        assert logged[0].exc_info is not None


async def test_the_back_off_of_a_failing_claim_stops_growing_at_five_seconds(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine(single) as e:
        sleeps = recorded_sleeps(monkeypatch)
        left = [8]
        real_claim = e.store.claim_wakeups

        async def claim_wakeups(*args: Any, **kwargs: Any) -> Any:
            if left[0]:
                left[0] -= 1
                raise unavailable(e)
            return await real_claim(*args, **kwargs)

        monkeypatch.setattr(e.store, "claim_wakeups", claim_wakeups)
        await until(lambda: not left[0], poke=e)
        assert await outcome(e, await e.start(single, 3)) == 30
    assert sleeps == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def failing_step_results(e: Engine, monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the store refuse the next ``times`` appends that carry a step's result."""
    left = [times]
    real_append = e.store.append

    async def append(stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any) -> Any:
        if left[0] and any(isinstance(event, StepDone) for event in events):
            left[0] -= 1
            raise unavailable(e)
        return await real_append(stream_id, events, expected_version, **kw)

    monkeypatch.setattr(e.store, "append", append)
    return left


async def test_a_pass_recovers_from_as_many_store_faults_as_it_retries(
    engine: EngineFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each fault drops the pass and runs it again from what is recorded (the step
    whose result was lost runs again), after a back-off that doubles from 0.1 s up
    to 5 s; MAX_PASS_RETRIES faults in a row are still survived."""
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(single) as e:
        sleeps = recorded_sleeps(monkeypatch)
        failing_step_results(e, monkeypatch, MAX_PASS_RETRIES)
        assert await outcome(e, await e.start(single, 5, id="faulty")) == 50
    assert MAX_PASS_RETRIES == 8
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert tally.count("work") == MAX_PASS_RETRIES + 1
    reason = f"{e.store.backend} store unavailable: connection dropped (injected)"
    assert (
        messages(caplog, logging.WARNING)
        == [f"workflow faulty: pass abandoned, retrying: {reason}"] * MAX_PASS_RETRIES
    )
    assert messages(caplog, logging.ERROR) == []


async def test_after_too_many_store_faults_the_instance_is_left_to_its_lease(
    engine: EngineFactory,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One fault more than MAX_PASS_RETRIES: the engine stops retrying (it logs why)
    and keeps its lease, so the instance runs again when the lease expires, not
    before, and then finishes."""
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(single) as e:
        sleeps = recorded_sleeps(monkeypatch)
        left = failing_step_results(e, monkeypatch, MAX_PASS_RETRIES + 1)
        await e.start(single, 6, id="given-up")
        reason = f"{e.store.backend} store unavailable: connection dropped (injected)"
        given_up = (
            f"workflow given-up: store unavailable {MAX_PASS_RETRIES + 1} times in a row "
            f"({reason}); leaving it until its lease expires"
        )
        await until(lambda: given_up in messages(caplog, logging.ERROR))
        assert left == [0]
        assert len(sleeps) == MAX_PASS_RETRIES
        await asyncio.sleep(0.05)
        assert tally.count("work") == MAX_PASS_RETRIES + 1  # no more tries meanwhile
        assert (await e.describe("given-up")).status == "running"
        wakeup = await e.store.get_wakeup("given-up")
        assert wakeup is not None
        assert wakeup.lease_owner == e.owner
        clock.advance(e.lease_us / 1_000_000 + 1)
        assert await outcome(e, "given-up") == 60
    assert tally.count("work") == MAX_PASS_RETRIES + 2


# -- takeover -----------------------------------------------------------------------
# The registry itself (heartbeats, reaping, the PID-namespace case, kill -9) is
# tested in tests/test_workers_registry.py.


async def test_an_engine_owner_names_this_host_and_process(engine: EngineFactory) -> None:
    async with engine() as e, engine() as other:
        host, pid, tag = e.owner.split(":")
        assert (host, int(pid)) == (socket.gethostname(), os.getpid())
        assert len(tag) == 8
        assert other.owner != e.owner
        assert {w.worker_id for w in await e.store.list_workers()} == {e.owner, other.owner}


async def test_without_takeover_a_dead_workers_lease_is_left_alone(
    engine: EngineFactory, clock: ManualClock
) -> None:
    from ledgerflow.store.runtime import Schedule, WorkerRow

    dead = "elsewhere.example:1:dead"
    far = 2**60
    now = clock.now_us()
    async with engine() as e:
        # Its last heartbeat is two leases old: dead, for whoever reaps.
        await e.store.register_worker(
            WorkerRow(dead, "elsewhere.example", 1, (), (), "0.1.0", now, now - 2_000, 1_000, 0)
        )
        await e.store.append(
            "leases",
            [ledgerflow.NewEvent("setup")],
            runtime=[Schedule("wf-x", far, dead, far)],
        )
    async with engine(takeover=False) as e:
        row = await e.store.get_wakeup("wf-x")
        assert row is not None
        assert row.lease_owner == dead
        assert dead in {w.worker_id for w in await e.store.list_workers()}
    async with engine() as e:
        row = await e.store.get_wakeup("wf-x")
        assert row is not None
        assert row.lease_owner is None
        assert dead not in {w.worker_id for w in await e.store.list_workers()}


# -- parked instances ---------------------------------------------------------------


@ledgerflow.workflow(name="retyped", version=1)
async def retyped_before(ctx: WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("go")
    return await ctx.step(work, n)


@ledgerflow.workflow(name="retyped", version=1)
async def retyped_after(ctx: WorkflowContext, n: list[int]) -> int:
    return len(n)  # the recorded input (an int) no longer fits: the instance parks


@ledgerflow.workflow(name="retyped_too", version=1)
async def retyped_too_before(ctx: WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("go")
    return n


@ledgerflow.workflow(name="retyped_too", version=1)
async def retyped_too_after(ctx: WorkflowContext, n: list[int]) -> int:
    return len(n)


async def waiting_to_go(
    engine: EngineFactory, workflow: ledgerflow.WorkflowDefinition[int, int], *ids: str
) -> None:
    """Start instances that wait for the signal 'go', on an engine then closed."""
    async with engine(workflow) as e:
        for n, workflow_id in enumerate(ids):
            await e.start(workflow, n + 1, id=workflow_id)
            await waiting(e, workflow_id, "signal 'go'")


async def test_an_instance_code_cannot_go_on_with_parks_until_an_engine_resumes_it(
    engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Parked (``stuck``), it says why, in the log and in its description; an engine
    started with code that fits resumes it (``wf.resumed``, by that engine)."""
    await waiting_to_go(engine, retyped_before, "parks-0")
    async with engine(retyped_after) as e:
        await e.signal("parks-0", "go")
        with pytest.raises(ledgerflow.RecordedValueError) as caught:
            await outcome(e, "parks-0")
        assert messages(caplog, logging.ERROR) == [f"workflow parks-0 is stuck: {caught.value}"]
        described = await e.describe("parks-0")
        assert await e.store.get_wakeup("parks-0") is None  # nothing left due
    assert described.status == "stuck"
    assert described.error == f"RecordedValueError: {caught.value}"
    assert tally.count("work") == 0
    async with engine(retyped_before) as e:  # resumes parked instances it knows at start
        assert await outcome(e, "parks-0") == 10
        events = [event.data for event in await e.history("parks-0")]
        owner = e.owner
    assert [type(x) for x in events[-5:-3]] == [Stuck, Resumed]
    assert events[-4] == Resumed(by=owner)


async def test_an_operator_resumes_a_stuck_instance_with_a_reason(
    engine: EngineFactory,
) -> None:
    """``resume`` takes a stuck instance up at once (an engine would only at its
    start); with the code still broken it parks again. Who and why are recorded."""
    await waiting_to_go(engine, retyped_before, "parks-r", "waits-r")
    async with engine(retyped_after) as e:
        await e.signal("parks-r", "go", actor="ops", reason="customer called")
        with pytest.raises(ledgerflow.RecordedValueError):
            await outcome(e, "parks-r")
        with pytest.raises(ledgerflow.WorkflowInputError, match="reason"):
            await e.resume("parks-r", reason=" ")
        with pytest.raises(ledgerflow.WorkflowNotStuckError, match="running, not stuck"):
            await e.resume("waits-r", reason="why not")
        with pytest.raises(ledgerflow.WorkflowNotFoundError):
            await e.resume("nobody", reason="why not")

        await e.resume("parks-r", reason="fix deployed", actor="ana")
        async with asyncio.timeout(WAIT):
            while True:
                events = await e.history("parks-r")
                if sum(isinstance(ev.data, Stuck) for ev in events) == 2:
                    break
                await asyncio.sleep(0.01)
        assert (await e.describe("parks-r")).status == "stuck"
    signal = next(ev for ev in events if isinstance(ev.data, SignalSent))
    assert (signal.metadata.actor, signal.metadata.reason) == ("ops", "customer called")
    resumed = next(ev for ev in events if isinstance(ev.data, Resumed))
    assert resumed.data == Resumed(by="ana")
    assert (resumed.metadata.actor, resumed.metadata.reason) == ("ana", "resume: fix deployed")
    assert [type(ev.data) for ev in events[-3:]] == [Stuck, Resumed, Stuck]


async def test_resuming_skips_parked_instances_of_workflows_this_engine_lacks(
    engine: EngineFactory,
) -> None:
    """Parked instances are resumed in id order; one this engine cannot run stays
    parked and does not stop the others from resuming."""
    await waiting_to_go(engine, retyped_too_before, "a-parked")
    await waiting_to_go(engine, retyped_before, "b-parked")
    async with engine(retyped_after, retyped_too_after) as e:
        for workflow_id in ("a-parked", "b-parked"):
            await e.signal(workflow_id, "go")
            with pytest.raises(ledgerflow.RecordedValueError):
                await outcome(e, workflow_id)
    async with engine(retyped_before) as e:
        assert await outcome(e, "b-parked") == 10
        assert (await e.describe("a-parked")).status == "stuck"
        assert [r.workflow_id for r in await e.list_workflows(status="stuck")] == ["a-parked"]


async def test_a_signal_landing_as_the_instance_parks_is_kept(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parking is an append at the version the pass saw; a signal appended in
    between makes it fail. The signal is from outside, so parking goes on past it,
    and the signal is kept for when the instance resumes."""
    await waiting_to_go(engine, retyped_before, "parks-1")
    async with engine(retyped_after) as e:
        real_append = e.store.append
        raced: list[int] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if any(isinstance(event, Stuck) for event in events):
                raced.append(expected_version)
                if len(raced) == 1:
                    await e.signal("parks-1", "meanwhile", {"n": 1})
            return await real_append(stream_id, events, expected_version, **kw)

        def tried_at_most_twice() -> None:
            assert len(raced) <= 2, raced

        monkeypatch.setattr(e.store, "append", append)
        await e.signal("parks-1", "go")
        version = await e.store.stream_version(e.stream_id("parks-1"))
        with pytest.raises(ledgerflow.RecordedValueError):
            await outcome(e, "parks-1", tried_at_most_twice)
        described = await e.describe("parks-1")
        events = [event.data for event in await e.history("parks-1")]
    assert raced == [version, version + 1]  # again, past the signal
    assert described.status == "stuck"
    assert described.unconsumed_signals == ("go", "meanwhile")
    expected: list[type] = [SignalSent, Stuck]
    assert [type(x) for x in events[-2:]] == expected


async def test_a_parked_instance_runs_again_only_when_resumed_not_when_signalled(
    engine: EngineFactory,
) -> None:
    await waiting_to_go(engine, retyped_before, "parked-2")
    async with engine(retyped_after) as e:
        await e.signal("parked-2", "go")
        with pytest.raises(ledgerflow.RecordedValueError):
            await outcome(e, "parked-2")
        await e.signal("parked-2", "poke")
        assert await e.store.get_wakeup("parked-2") is None
        assert (await e.describe("parked-2")).status == "stuck"


# -- a parent that ends waits for its children -----------------------------------------


@ledgerflow.workflow(name="stubborn_kid", version=1)
async def stubborn_kid(ctx: WorkflowContext, n: int) -> int:
    # Shielded: a cancellation from its parent does not stop this wait.
    with ctx.cancellation_shield():
        await ctx.wait_for_signal("go")
    return n


@ledgerflow.workflow(name="patient_parent", version=1)
async def patient_parent(ctx: WorkflowContext, n: int) -> int:
    return await ctx.child(stubborn_kid, n)


async def test_a_cancelled_parent_ends_only_after_its_child_has(engine: EngineFactory) -> None:
    """The parent asks its child to stop, once, and waits for its end: a child that
    goes on (here shielded) keeps the parent running, waiting for it; its end, when
    it comes, is told to the parent, which then ends."""
    async with engine(patient_parent, stubborn_kid) as e:
        await e.start(patient_parent, 5, id="pp")
        await waiting(e, "pp.1", "signal 'go'")
        await e.cancel("pp", "no longer needed")
        await waiting(e, "pp", "child pp.1")
        await asyncio.sleep(0.2)  # passes woken meanwhile ask nothing more
        asked = [ev.data for ev in await e.history("pp.1") if isinstance(ev.data, CancelRequested)]
        assert asked == [CancelRequested(reason="parent cancelled: no longer needed")]
        assert (await e.describe("pp")).status == "running"
        await e.signal("pp.1", "go")
        # Cancelled while shielded, it returns: a cancellation is a request.
        assert await outcome(e, "pp.1") == 5
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(e, "pp")
        parent_events = [ev.data for ev in await e.history("pp")]
        assert [type(x) for x in parent_events[-2:]] == [ChildFinished, Finished]
        assert (await e.describe("pp")).status == "cancelled"
        await until_no_wakeup(e, "pp.1")
        assert await e.store.get_wakeup("pp") is None


saga_log: list[str] = []


def book_hotel(trip: str) -> str:
    saga_log.append(f"hotel {trip}")
    return f"hotel-{trip}"


async def cancel_hotel(trip: str) -> None:
    await asyncio.sleep(0.05)  # slower than the parent's own: an end not waited for shows
    saga_log.append(f"undo hotel {trip}")


def book_flight(trip: str) -> str:
    saga_log.append(f"flight {trip}")
    return f"flight-{trip}"


def cancel_flight(trip: str) -> None:
    saga_log.append(f"undo flight {trip}")


@ledgerflow.workflow(name="hotel_leg", version=1)
async def hotel_leg(ctx: WorkflowContext, trip: str) -> str:
    booked = await ctx.step(book_hotel, trip, compensate=cancel_hotel)
    await ctx.wait_for_signal("confirmed")
    return booked


@ledgerflow.workflow(name="trip_saga", version=1)
async def trip_saga(ctx: WorkflowContext, trip: str) -> list[str]:
    flight = await ctx.step(book_flight, trip, compensate=cancel_flight)
    hotel = await ctx.child(hotel_leg, trip)
    return [flight, hotel]


async def test_a_cancelled_parents_saga_is_undone_child_first_before_it_ends(
    engine: EngineFactory,
) -> None:
    """What the child did is undone before what the parent did before starting it,
    and the parent's end comes after both: its outcome means the whole saga is
    undone. The child's end, told after the cancel, does not let the parent's body
    go on past its wait."""
    saga_log.clear()
    async with engine(trip_saga, hotel_leg) as e:
        await e.start(trip_saga, "t1", id="trip")
        await waiting(e, "trip.2", "signal 'confirmed'")
        await e.cancel("trip", "plans changed")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(e, "trip")
        assert saga_log == ["flight t1", "hotel t1", "undo hotel t1", "undo flight t1"]
        assert (await e.describe("trip.2")).status == "compensated"
        assert (await e.describe("trip")).status == "compensated"
        asked = [
            ev.data for ev in await e.history("trip.2") if isinstance(ev.data, CancelRequested)
        ]
        assert asked == [CancelRequested(reason="parent cancelled: plans changed")]


@ledgerflow.workflow(name="kid_after_news", version=1)
async def kid_after_news(ctx: WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("go")
    return await ctx.step(work, n)


@ledgerflow.workflow(name="parent_of_news", version=1)
async def parent_of_news(ctx: WorkflowContext, n: int) -> int:
    return await ctx.child(kid_after_news, n) + 1


async def test_a_childs_news_is_delivered_even_if_the_parent_moves_on_meanwhile(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The news of a child's end is appended at the parent's version; a signal to
    the parent landing in between fails that append, and the news is appended again
    past it rather than dropped."""
    async with engine(parent_of_news, kid_after_news) as e:
        await e.start(parent_of_news, 2, id="pn")
        await waiting(e, "pn.1", "signal 'go'")
        real_version = e.store.stream_version
        raced: list[int] = []

        async def stream_version(stream_id: str) -> int:
            version = await real_version(stream_id)
            if stream_id == e.stream_id("pn") and not raced:
                raced.append(version)
                await e.signal("pn", "meanwhile")
            return version

        monkeypatch.setattr(e.store, "stream_version", stream_version)
        await e.signal("pn.1", "go")
        assert await outcome(e, "pn") == 21
        types = [type(ev.data) for ev in await e.history("pn")]
    assert raced
    assert types.count(ChildFinished) == 1
    assert types.index(SignalSent) < types.index(ChildFinished)


async def test_an_ended_instance_found_due_only_drops_its_wake_up(
    engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance whose end was recorded but whose wake-up is still there (the end
    was cut short) is claimed, and its pass only drops the wake-up: the workflow
    does not run again."""
    from ledgerflow.store.runtime import Schedule

    async with engine(single) as e:
        assert await outcome(e, await e.start(single, 1, id="ended")) == 10
        version = await e.store.stream_version(e.stream_id("ended"))
        await e.store.append(
            e.stream_id("ended"), [], version, runtime=[Schedule("ended", e._now_us())]
        )
        await until_no_wakeup(e, "ended")
        assert len(await e.history("ended")) == 3
    assert tally.count("work") == 1


async def test_the_first_pass_of_an_instance_started_here_reads_nothing_back(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting on an engine hands the pass the history just written: its first
    pass replays it without reading the stream again."""
    async with engine(single) as e:
        reads: list[str] = []
        real_read = e.store.read_stream

        async def read_stream(stream_id: str, *args: Any, **kwargs: Any) -> Any:
            reads.append(stream_id)
            return await real_read(stream_id, *args, **kwargs)

        monkeypatch.setattr(e.store, "read_stream", read_stream)
        handle = await e.start(single, 2, id="fresh")
        await until(lambda: tally.count("work") == 1)
        assert reads == []
        assert await outcome(e, handle) == 20


def test_an_engines_defaults_are_the_documented_ones() -> None:
    engine = Engine("memory://")
    assert engine.concurrency == 200
    assert engine.poll_interval == 1.0
    assert engine.lease_us == 60_000_000
    assert engine.takeover is True


@ledgerflow.workflow(name="held_then_dozing", version=1)
async def held_then_dozing(ctx: WorkflowContext, seconds: int) -> str:
    await ctx.step(held, seconds)
    await ctx.sleep(seconds)
    return "rested"


async def test_timers_set_while_the_engine_is_full_fire_on_time(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """With every slot busy the scheduler waits for a slot rather than for a due
    time; a pass that then sets a timer must still have it looked at."""
    async with engine(held_then_dozing, concurrency=1) as e:
        first = await e.start(held_then_dozing, 10, id="full-1")
        await until(lambda: tally.running == 1)
        second = await e.start(held_then_dozing, 20, id="full-2")  # left to the scheduler
        await asyncio.sleep(0.05)  # it finds no free slot, and waits for one
        gate.set()  # the first pass goes on to set its timer
        await waiting(e, "full-1", "timer")
        await waiting(e, "full-2", "timer")
        clock.advance(10)
        assert await outcome(e, first) == "rested"
        assert (await e.describe("full-2")).status == "running"
        clock.advance(10)
        assert await outcome(e, second) == "rested"


def counting_appends(e: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The streams of the store's appends (commits), in order."""
    streams: list[str] = []
    real_append = e.store.append

    async def append(stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any) -> Any:
        streams.append(stream_id)
        return await real_append(stream_id, events, expected_version, **kw)

    monkeypatch.setattr(e.store, "append", append)
    return streams


@ledgerflow.workflow(name="three_steps", version=1)
async def three_steps(ctx: WorkflowContext, n: int) -> int:
    for _ in range(3):
        n = await ctx.step(work, n)
    return n


async def test_a_three_step_workflow_costs_four_commits(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADR 005: each step's result rides with the next append (the next step's
    start, the end), so a three-step workflow is its start and three appends, and
    its end takes no further pass or write."""
    async with engine(three_steps) as e:
        streams = counting_appends(e, monkeypatch)
        assert await outcome(e, await e.start(three_steps, 1, id="three")) == 1000
        await asyncio.sleep(0.05)  # any further pass would run now
        assert streams == [e.stream_id("three")] * 4


async def test_a_step_result_another_runner_recorded_first_is_the_one_kept(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our pass's end meets a result of the same step recorded by another runner
    (an engine that took the instance over): ours is dropped, not appended on top,
    and the workflow goes on from the recorded one."""
    async with engine(single) as e:
        real_append = e.store.append
        intruded: list[int] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not intruded and any(isinstance(event, Finished) for event in events):
                intruded.append(expected_version)
                theirs = StepDone(seq=1, name="work", result=999)
                await real_append(stream_id, [theirs], expected_version)
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        await e.start(single, 4, id="other")
        assert await outcome(e, "other") == 999
        results = [ev.data for ev in await e.history("other") if isinstance(ev.data, StepDone)]
    assert results == [StepDone(seq=1, name="work", result=999)]
    assert tally.count("work") == 1


async def poke_self(workflow_id: str) -> str:
    tally.did("poke")
    # An outsider writes to the instance while its last step runs, so the final
    # append meets a newer version.
    await poking[0].signal(workflow_id, "noise")
    return "poked"


poking: list[Engine] = []


@ledgerflow.workflow(name="self_poking", version=1)
async def self_poking(ctx: WorkflowContext, workflow_id: str) -> str:
    return await ctx.step(poke_self, workflow_id)


async def test_the_result_is_told_only_once_the_end_is_recorded(engine: EngineFactory) -> None:
    """A signal landing during the last step fails the end's append; the step's
    result is appended past the signal and another pass records the end. Callers of
    ``result()`` learn the outcome once it is in the history, not before."""
    async with engine(self_poking) as e:
        poking[:] = [e]
        await e.start(self_poking, "sp", id="sp")
        assert await outcome(e, "sp") == "poked"
        types = [type(ev.data) for ev in await e.history("sp")]
    assert types[-1] is Finished
    assert types.count(StepDone) == 1
    assert tally.count("poke") == 1


async def test_passes_and_the_scheduler_are_named_tasks(engine: EngineFactory) -> None:
    """Task names say what a task is in a dump of the loop's tasks."""
    async with engine(holding) as e:
        await e.start(holding, 1, id="named")
        await until(lambda: tally.running == 1)
        names = {task.get_name() for task in asyncio.all_tasks()}
        gate.set()
        assert await outcome(e, "named") == 1
    assert {"wf:named", "ledgerflow-scheduler"} <= names


async def test_a_store_fault_in_the_pass_after_a_conflict_is_retried(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass whose end met a signal asks for another pass at once; a store fault
    in that next pass is retried like any other, counting from zero again."""
    sleeps = recorded_sleeps(monkeypatch)
    async with engine(self_poking) as e:
        poking[:] = [e]
        real_append = e.store.append
        ends: list[int] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if any(isinstance(event, Finished) for event in events):
                ends.append(expected_version)
                if len(ends) == 2:  # the second pass's end
                    raise unavailable(e)
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        await e.start(self_poking, "sf", id="sf")
        assert await outcome(e, "sf") == "poked"
    assert len(ends) == 3
    assert sleeps == [0.1]
    assert tally.count("poke") == 1


async def test_a_pass_failing_unexpectedly_is_logged_and_left_to_its_lease(
    engine: EngineFactory,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a store fault but a bug (here: the store raising something it never
    should): the engine logs it with its traceback and stops that pass; what was
    recorded stands, and the instance runs again once its lease has expired."""
    async with engine(single) as e:
        real_append = e.store.append
        broke: list[bool] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not broke and any(isinstance(event, Finished) for event in events):
                broke.append(True)
                raise RuntimeError("a bug (injected)")
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        await e.start(single, 5, id="buggy")
        await until(lambda: bool(crashes))
        assert crashes == ["workflow buggy: pass failed"]
        crashes.clear()  # expected here
        failed = [r for r in caplog.records if r.getMessage() == "workflow buggy: pass failed"]
        assert failed[0].exc_info is not None
        assert str(failed[0].exc_info[1]) == "a bug (injected)"
        assert (await e.describe("buggy")).status == "running"
        clock.advance(e.lease_us / 1_000_000 + 1)
        assert await outcome(e, "buggy", e._wake.set) == 50
    assert tally.count("work") == 2  # its result was never recorded


async def test_an_instance_claimed_again_while_its_pass_runs_gets_one_more_pass(
    engine: EngineFactory, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its lease ran out while a step was still running, and this engine claimed it
    again: one more pass follows the running one (here finding it ended, so it only
    drops the wake-up), then the instance rests."""
    async with engine(holding) as e:
        real_claim = e.store.claim_wakeups
        claimed: list[str] = []

        async def claim_wakeups(*args: Any, **kwargs: Any) -> Any:
            leases = await real_claim(*args, **kwargs)
            claimed.extend(lease.workflow_id for lease in leases)
            return leases

        monkeypatch.setattr(e.store, "claim_wakeups", claim_wakeups)
        await e.start(holding, 1, id="twice")
        await until(lambda: tally.running == 1)
        clock.advance(e.lease_us / 1_000_000 + 1)
        await until(lambda: "twice" in claimed, poke=e)
        streams = counting_appends(e, monkeypatch)
        gate.set()
        assert await outcome(e, "twice") == 1
        await until_no_wakeup(e, "twice")
        await asyncio.sleep(0.05)  # any further pass would run now
        assert streams == [e.stream_id("twice")] * 2  # the end, then the wake-up dropped
    assert tally.count("held 1") == 1


@ledgerflow.workflow(name="awaits_go", version=1)
async def awaits_go(ctx: WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("go")
    return n


async def test_a_wait_rewritten_under_a_new_signal_is_looked_at_again_at_once(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that finds nothing new to record only rewrites the wake-up, guarded by
    the version it saw. A signal landing in between fails that write; the pass runs
    again at once and takes the signal (its lease would hold off anyone else)."""
    async with engine(awaits_go) as e:
        await e.start(awaits_go, 3, id="rewait")
        await waiting(e, "rewait", "signal 'go'")
        real_append = e.store.append
        raced: list[int] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not events and stream_id == e.stream_id("rewait") and not raced:
                raced.append(expected_version)
                await e.signal("rewait", "go")
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        await e.signal("rewait", "unrelated")  # wakes it: nothing to do but wait on
        assert await outcome(e, "rewait") == 3
    assert raced


def test_an_engine_opening_its_store_uses_the_given_registry() -> None:
    """Application events registered by the caller can go in the same store: the
    registry given is the store's, with the workflow history types added to it."""
    registry = ledgerflow.EventRegistry()
    engine = Engine("memory://", registry=registry)
    assert engine.store.registry is registry
    assert registry.class_of("wf.started") is not None


def blocks_its_thread(n: int) -> int:
    tally.did("blocking")
    released.wait(WAIT)
    tally.did("unblocked")
    return n


released = threading.Event()


@ledgerflow.workflow(name="thread_blocker", version=1)
async def thread_blocker(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(blocks_its_thread, n)


async def test_close_does_not_wait_for_a_step_thread_that_keeps_running(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """A sync step cannot be stopped from outside: close() cancels the pass after
    the grace, waits for the body at most half a lease (while the lease surely
    holds), then returns, leaving the thread to end on its own and the lease to
    expire (given back, another worker would run the step beside it); its result
    is not recorded, the next engine runs the step again."""
    released.clear()
    # Should close() wait for the thread, this lets it go after a while, so the test
    # fails rather than hangs.
    watchdog = threading.Timer(3.0, released.set)
    watchdog.start()
    try:
        async with engine(thread_blocker, lease=timedelta(seconds=1)) as e:
            await e.start(thread_blocker, 1, id="blocker")
            await until(lambda: tally.count("blocking") == 1)
            await e.close(grace=0.05)
            assert tally.count("unblocked") == 0  # close returned, the thread still runs
    finally:
        watchdog.cancel()
        released.set()
    clock.advance(timedelta(seconds=2))  # the lease left to expire has
    async with engine(thread_blocker) as e:
        assert await outcome(e, "blocker") == 1
    assert tally.count("blocking") == 2


async def test_an_engine_never_opened_closes_quietly() -> None:
    engine = Engine("memory://")
    await engine.close()


def names_its_thread(n: int) -> str:
    return threading.current_thread().name


@ledgerflow.workflow(name="thread_namer", version=1)
async def thread_namer(ctx: WorkflowContext, n: int) -> str:
    return await ctx.step(names_its_thread, n)


async def test_sync_steps_run_in_the_engines_named_step_threads(engine: EngineFactory) -> None:
    async with engine(thread_namer) as e:
        name = await outcome(e, await e.start(thread_namer, 1))
    assert name.startswith("ledgerflow-step")


def waits_in_its_thread(n: int) -> int:
    tally.enter()
    try:
        released.wait(WAIT)
    finally:
        tally.leave()
    return n


@ledgerflow.workflow(name="thread_waiter", version=1)
async def thread_waiter(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(waits_in_its_thread, n)


async def test_by_default_sixty_four_sync_steps_run_at_once(engine: EngineFactory) -> None:
    """``step_threads`` defaults to 64: a sixty-fifth sync step waits for a slot."""
    released.clear()
    try:
        async with engine(thread_waiter) as e:
            for n in range(65):
                await e.start(thread_waiter, n, id=f"tw-{n}")
            await until(lambda: tally.running == 64)
            await asyncio.sleep(0.05)
            assert tally.running == 64
            released.set()
            assert [await outcome(e, f"tw-{n}") for n in range(65)] == list(range(65))
    finally:
        released.set()
    assert tally.most_at_once == 64


# -- bugs found ---------------------------------------------------------------------


@ledgerflow.workflow(name="loud_failure", version=1)
async def loud_failure(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(work, n)
    raise RuntimeError("x" * 1_100_000)  # a message over the 1 MiB an event may be


async def test_a_workflow_failing_with_an_oversized_message_still_ends(
    engine: EngineFactory,
) -> None:
    async with engine(loud_failure) as e:
        await e.start(loud_failure, 1, id="loud")
        try:
            async with asyncio.timeout(WAIT):
                while (await e.describe("loud")).status == "running":
                    if crashes:
                        break
                    await asyncio.sleep(0.005)
            seen = list(crashes)
        finally:
            crashes.clear()  # what crashed is asserted here, not by the fixture
        assert seen == []
        described = await e.describe("loud")
        # It ends failed (compensating nothing), its message cut to a recordable size.
        assert described.status == "failed"
        with pytest.raises(ledgerflow.WorkflowFailedError) as failed:
            await e.handle("loud").result(timeout=WAIT)
        assert failed.value.message.startswith("x" * 100)
        assert failed.value.message.endswith("… (1091808 more characters)")


@ledgerflow.workflow(name="late_approval", version=1)
async def late_approval(ctx: WorkflowContext, order: str) -> str:
    got = await ctx.wait_for_signal("approval", dict, timeout=timedelta(seconds=60))
    return "timed out" if got is None else f"approved by {got['by']}"


async def test_a_signal_recorded_after_a_waits_deadline_does_not_end_it(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """No engine ran at the wait's deadline (a deploy, an outage) and the approval
    was recorded after it: the wait timed out all the same. It took the late
    approval as if it had come in time, so the outcome hung on whether an engine
    happened to be up. The late signal stays for a later wait."""
    async with engine(late_approval) as e:
        await e.start(late_approval, "o-1", id="late-1")
        await e.start(late_approval, "o-2", id="in-time-1")
        await waiting_for(e, "late-1", "signal 'approval'")
        await waiting_for(e, "in-time-1", "signal 'approval'")
    async with engine() as e:  # records only: no workflow of theirs runs here
        clock.advance(59)
        await e.signal("in-time-1", "approval", {"by": "ana"})
        clock.advance(61)
        await e.signal("late-1", "approval", {"by": "larry"})
    async with engine(late_approval) as e:
        assert await asyncio.wait_for(e.result("in-time-1"), WAIT) == "approved by ana"
        assert await asyncio.wait_for(e.result("late-1"), WAIT) == "timed out"
        assert (await e.describe("late-1")).unconsumed_signals == ("approval",)


# -- a step whose pass was lost, then a cancel --------------------------------------------

doubt_log: list[str] = []
hotel_gate: list[asyncio.Event] = []
"""The event a room's hold waits on (made in each test: an event is its loop's)."""


room_held: list[asyncio.Event] = []


def reserve_seat(trip: str) -> str:
    doubt_log.append("seat")
    return f"seat-{trip}"


def release_seat(trip: str) -> None:
    doubt_log.append("undo seat")


async def hold_room(trip: str) -> str:
    doubt_log.append("room")  # acts at once (its idempotency key makes a rerun safe)...
    room_held[0].set()
    if not hotel_gate[0].is_set():
        await hotel_gate[0].wait()  # ...and its first pass is lost before it returns
    return f"room-{trip}"


async def release_room(trip: str) -> None:
    doubt_log.append("undo room")


def pay(trip: str) -> str:
    doubt_log.append("pay")
    return "paid"


@ledgerflow.workflow(name="doubt_saga", version=1)
async def doubt_saga(ctx: WorkflowContext, trip: str) -> str:
    await ctx.step(reserve_seat, trip, compensate=release_seat)
    await ctx.step(hold_room, trip, compensate=release_room)
    return await ctx.step(pay, trip)


async def test_a_step_its_lost_pass_may_have_run_is_compensated_on_cancel(
    engine: EngineFactory,
) -> None:
    """The pass running a step was lost (its engine stopped mid-step), then the
    instance was cancelled. The step may have acted, yet no result was recorded:
    the next pass raised the cancel at it and compensated only the steps before,
    leaving the room held. Now the step runs (it may have run: at least once, under
    its key), its result is recorded, and the cancel takes effect after it: both
    compensations run."""
    doubt_log.clear()
    hotel_gate[:] = [asyncio.Event()]
    room_held[:] = [asyncio.Event()]
    async with engine(doubt_saga) as first:
        await first.start(doubt_saga, "t9", id="doubt")
        async with asyncio.timeout(WAIT):
            await room_held[0].wait()
        # Cancelled while the room is being held; then this engine stops, and the
        # pass holding the room is lost with it (its step never returns here).
        await first.cancel("doubt", "plans changed")
    hotel_gate[0].set()
    async with engine(doubt_saga) as second:
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(second, "doubt", second._wake.set)
        assert (await second.describe("doubt")).status == "compensated"
    assert doubt_log == ["seat", "room", "room", "undo room", "undo seat"]


@ledgerflow.workflow(name="doubt_first", version=1)
async def doubt_first(ctx: WorkflowContext, trip: str) -> str:
    room = await ctx.step(hold_room, trip, compensate=release_room)
    await ctx.step(pay, trip)
    return room


async def test_a_first_step_its_lost_pass_may_have_run_is_compensated_on_cancel(
    engine: EngineFactory,
) -> None:
    """The same for the instance's first step: no command recorded before the cancel
    said a pass had gone into it, so it was taken for one never started. The instance
    ended ``cancelled`` with the room held, never released. An earlier lease on the
    instance now says a pass may have run it."""
    doubt_log.clear()
    hotel_gate[:] = [asyncio.Event()]
    room_held[:] = [asyncio.Event()]
    async with engine(doubt_first) as first:
        await first.start(doubt_first, "t11", id="doubt-first")
        async with asyncio.timeout(WAIT):
            await room_held[0].wait()
        await first.cancel("doubt-first", "plans changed")
    hotel_gate[0].set()
    async with engine(doubt_first) as second:
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(second, "doubt-first", second._wake.set)
        assert (await second.describe("doubt-first")).status == "compensated"
    assert doubt_log == ["room", "room", "undo room"]


async def test_an_instance_cancelled_before_any_engine_took_it_runs_no_step(
    engine: EngineFactory,
) -> None:
    doubt_log.clear()
    hotel_gate[:] = [asyncio.Event()]
    hotel_gate[0].set()
    room_held[:] = [asyncio.Event()]
    async with engine() as idle:  # runs nothing: the start waits for an engine
        client = ledgerflow.WorkflowClient(idle.store, workflows=[doubt_first])
        await client.start(doubt_first, "t12", id="never-ran")
        await client.cancel("never-ran", "changed my mind")
    async with engine(doubt_first) as e:
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(e, "never-ran", e._wake.set)
        assert (await e.describe("never-ran")).status == "cancelled"
    assert doubt_log == []


async def test_a_cancel_seen_before_a_step_still_keeps_it_from_starting(
    engine: EngineFactory,
) -> None:
    """The other side: a cancel the previous pass had seen (recorded before the
    step's predecessor's result) means the step never started; it does not run."""
    doubt_log.clear()
    hotel_gate[:] = [asyncio.Event()]
    hotel_gate[0].set()
    room_held[:] = [asyncio.Event()]
    async with engine(doubt_saga) as e:
        real = e.store.append
        cancelled = False

        async def append(stream: str, events: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal cancelled
            # Cancel just before the seat's result is appended: the append folds
            # the cancel in, and the room must not be held.
            if not cancelled and any(type(x).__name__ == "StepDone" for x in events):
                cancelled = True
                await real(stream, [CancelRequested(reason="early")], ANY)
            return await real(stream, events, *args, **kwargs)

        e.store.append = append  # type: ignore[method-assign,assignment]
        await e.start(doubt_saga, "t10", id="early")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(e, "early")
    assert doubt_log == ["seat", "undo seat"]


@ledgerflow.workflow(name="doubt_caught", version=1)
async def doubt_caught(ctx: WorkflowContext, trip: str) -> str:
    await ctx.step(reserve_seat, trip, compensate=release_seat)
    try:
        await ctx.wait_for_signal("go")
    except WorkflowCancelled:
        await ctx.step(pay, trip)  # unshielded: the cancel stops it
    return "went on"


async def test_a_step_after_a_caught_cancel_is_not_taken_for_one_in_doubt(
    engine: EngineFactory,
) -> None:
    """Cancelled while it waited for a signal, the body caught the cancel and went
    on to a step without a shield. The step was taken for one a lost pass may have
    run (the cancel came after the last recorded command) and ran: an effect that
    should never happen. The pass that stopped at the wait never reached it."""
    doubt_log.clear()
    async with engine(doubt_caught) as e:
        await e.start(doubt_caught, "t11", id="caught")
        await waiting_for(e, "caught", "signal 'go'")
        await e.cancel("caught", "plans changed")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await outcome(e, "caught")
        assert (await e.describe("caught")).status == "compensated"
    assert doubt_log == ["seat", "undo seat"]


async def test_a_child_id_another_instance_has_is_refused_naming_what_to_do(
    engine: EngineFactory,
) -> None:
    """The default child id (<parent>.<seq>) was taken by an instance started on its
    own: the parent failed with "it belongs to parent None"."""
    async with engine(patient_parent, stubborn_kid) as e:
        await e.start(stubborn_kid, 1, id="pp2.1")
        await e.start(patient_parent, 1, id="pp2")
        with pytest.raises(ledgerflow.WorkflowFailedError) as failed:
            await outcome(e, "pp2")
    message = str(failed.value)
    assert "WorkflowAlreadyStartedError" in message
    assert "it was started on its own, not as a child" in message
    assert "give ctx.child(..., id=...) an id of its own" in message
    assert "None" not in message


async def test_an_engine_whose_store_never_opened_says_only_that(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that could not open its store warned it was closing "without waiting
    to give leases back (the store is not open: use 'async with')" before the real
    error: it held nothing, and the advice was not for it."""
    caplog.set_level(logging.WARNING)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=2"
    engine = ledgerflow.Engine(url, workflows=[single])
    with pytest.raises(StoreUnavailableError):
        await engine.start_engine()  # as `ledgerflow worker` runs it, then closes it
    await engine.close()
    said = [r.getMessage() for r in caplog.records if r.name == "ledgerflow.engine"]
    assert said == []
