"""Edges of one pass (``workflow/run.py``): children that end later, commands after
the body ended, where retry jitter comes from, events the store refuses, and the
texts users read when code and history disagree.

Each runs on every backend. Faults are injected by wrapping the store the engine
holds; retry delays are observed through a ``RetryPolicy`` that records what it is
asked, so no test waits for a back-off.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest

import ledgerflow
from ledgerflow import RetryPolicy, WorkflowContext
from ledgerflow.errors import EventSerializationError, LeaseLostError, StoreUnavailableError
from ledgerflow.events import ANY
from ledgerflow.hashing import to_micros as clock_us
from ledgerflow.resilience.retrying import jitter_source
from ledgerflow.workflow import saga as saga_module
from ledgerflow.workflow.engine import Engine
from ledgerflow.workflow.history import (
    ChildFinished,
    ChildStarted,
    ClockRead,
    CompensationAttemptFailed,
    CompensationDone,
    SignalRejected,
    SignalSent,
    StepDone,
    TimerFired,
    TimerStarted,
)
from ledgerflow.workflow.host import BodyEnded
from ledgerflow.workflow.replay import replay

from ._engines import WAIT, EngineFactory
from ._passes import crashes, outcome, waiting
from ._passes import no_pass_crashed as no_pass_crashed  # autouse: applies here


class Tally:
    """What steps did; sync steps run in threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[str] = []
        self.fail: dict[str, int] = {}

    def did(self, what: str) -> None:
        with self.lock:
            self.log.append(what)
            left = self.fail.get(what, 0)
            if left:
                self.fail[what] = left - 1
                raise RuntimeError(f"{what} failed ({left} to go)")

    def count(self, what: str) -> int:
        with self.lock:
            return self.log.count(what)


tally = Tally()
late_tasks: list[asyncio.Task[Any]] = []


@pytest.fixture(autouse=True)
def fresh_tally() -> None:
    global tally
    tally = Tally()
    late_tasks.clear()


async def types_of(e: Engine, workflow_id: str) -> list[type]:
    return [type(event.data) for event in await e.history(workflow_id)]


async def until_recorded(e: Engine, workflow_id: str, kind: type) -> None:
    """Wait until the instance's history holds an event of ``kind``."""
    async with asyncio.timeout(WAIT):
        while kind not in await types_of(e, workflow_id):
            assert crashes == []
            await asyncio.sleep(0.005)


def a(n: int) -> int:
    tally.did("a")
    return n + 1


def b(n: int) -> int:
    tally.did("b")
    return n * 2


def c(n: int) -> int:
    tally.did("c")
    return n - 1


# -- children that end in a later pass ----------------------------------------------


@ledgerflow.workflow(name="slow_kid", version=1)
async def slow_kid(ctx: WorkflowContext, n: int) -> int:
    verdict = await ctx.wait_for_signal("verdict", str)
    if verdict != "ok":
        raise ValueError(f"kid {n} says {verdict}")
    return await ctx.step(a, n)


@ledgerflow.workflow(name="waiting_parent", version=1)
async def waiting_parent(ctx: WorkflowContext, n: int) -> list[Any]:
    try:
        got: list[Any] = ["ok", await ctx.child(slow_kid, n)]
    except ledgerflow.ChildWorkflowError as exc:
        got = [exc.child_id, exc.status, exc.error_type, exc.message, str(exc)]
    await ctx.wait_for_signal("close")
    return got


async def test_a_parent_resumes_when_its_child_ends_in_a_later_pass(
    engine: EngineFactory,
) -> None:
    """The parent's pass ends while the child waits; the child's end is news in the
    parent's history that wakes it. A later engine replays the parent past the
    child (its news is in the history) without running the child again."""
    async with engine(waiting_parent, slow_kid) as e:
        await e.start(waiting_parent, 4, id="wp")
        await waiting(e, "wp.1", "signal 'verdict'")
        assert (await e.describe("wp")).waiting_for == "child wp.1"
        await e.signal("wp.1", "verdict", "ok")
        await waiting(e, "wp", "signal 'close'")
        news = [ev.data for ev in await e.history("wp") if isinstance(ev.data, ChildFinished)]
    assert [(x.child_id, x.status, x.result) for x in news] == [("wp.1", "completed", 5)]
    async with engine(waiting_parent, slow_kid) as e:
        await e.signal("wp", "close")
        assert await outcome(e, "wp") == ["ok", 5]
    assert tally.count("a") == 1


async def test_a_failed_child_raises_child_workflow_error_with_its_details(
    engine: EngineFactory,
) -> None:
    async with engine(waiting_parent, slow_kid) as e:
        await e.start(waiting_parent, 6, id="wf")
        await waiting(e, "wf.1", "signal 'verdict'")
        await e.signal("wf.1", "verdict", "no")
        await waiting(e, "wf", "signal 'close'")
    async with engine(waiting_parent, slow_kid) as e:  # and the same on replay
        await e.signal("wf", "close")
        got = await outcome(e, "wf")
    assert got == [
        "wf.1",
        "failed",
        "ValueError",
        "kid 6 says no",
        "child workflow 'wf.1' ended failed: ValueError: kid 6 says no",
    ]


@ledgerflow.workflow(name="named_kid_parent", version=1)
async def named_kid_parent(ctx: WorkflowContext, n: int) -> int:
    return await ctx.child(slow_kid, n, id=f"kid-of-{n}")


async def test_a_child_given_an_id_keeps_it_across_passes(engine: EngineFactory) -> None:
    async with engine(named_kid_parent, slow_kid) as e:
        await e.start(named_kid_parent, 2, id="np")
        await waiting(e, "kid-of-2", "signal 'verdict'")
        await e.signal("kid-of-2", "verdict", "ok")
        assert await outcome(e, "np") == 3
        assert (await e.describe("kid-of-2")).parent_id == "np"


# -- commands after the body ended --------------------------------------------------


@ledgerflow.workflow(name="fire_and_forget", version=1)
async def fire_and_forget(ctx: WorkflowContext, n: int) -> int:
    # A step started in a task the body never awaits: the body ends first.
    late_tasks.append(asyncio.ensure_future(ctx.step(b, n)))  # ledgerflow: allow
    return n


async def test_a_step_started_after_the_body_returned_is_refused(
    engine: EngineFactory,
) -> None:
    """The pass ends with the body; a command issued after that is not started (it
    raises ``BodyEnded`` in the task that issued it) and nothing of it is recorded."""
    async with engine(fire_and_forget) as e:
        assert await outcome(e, await e.start(fire_and_forget, 3, id="ff")) == 3
        await asyncio.wait(late_tasks, timeout=WAIT)
        types = await types_of(e, "ff")
    assert tally.count("b") == 0
    assert StepDone not in types
    assert len(late_tasks) == 1
    assert isinstance(late_tasks[0].exception(), BodyEnded)


# -- retry jitter -------------------------------------------------------------------


class RecordingPolicy(RetryPolicy):
    """Retries at once, and notes the draw each delay would jitter with."""

    asked: ClassVar[list[tuple[int, float]]] = []

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        assert rng is not None
        RecordingPolicy.asked.append((attempt, rng.random()))
        return 0.0


@ledgerflow.workflow(name="jittery", version=1)
async def jittery(ctx: WorkflowContext, n: int) -> float:
    await ctx.step(c, n)
    await ctx.step(a, n, retry=RecordingPolicy(max_attempts=3))
    return ctx.random().random()


async def test_retry_jitter_comes_from_its_own_source_per_instance_step_and_attempt(
    engine: EngineFactory,
) -> None:
    """Each retry's jitter is drawn from ``jitter_source(workflow id, command,
    attempt)``: the same on every engine, different for each attempt, and never
    from the workflow's own random stream (which replay must reproduce)."""
    RecordingPolicy.asked = []
    tally.fail["a"] = 2
    async with engine(jittery) as e:
        drawn = await outcome(e, await e.start(jittery, 1, id="jit-1"))
    expected = [(k, jitter_source("jit-1", 2, k).random()) for k in (1, 2)]
    assert RecordingPolicy.asked == expected
    assert expected[0][1] != expected[1][1]
    assert tally.count("a") == 3
    seed = hashlib.sha256(b"jit-1").digest()[:8]
    assert drawn == random.Random(int.from_bytes(seed, "big")).random()


def undo_a(n: int) -> None:
    tally.did("undo a")


def explode(n: int) -> int:
    tally.did("explode")
    raise RuntimeError("no")


@ledgerflow.workflow(name="undoing", version=1)
async def undoing(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(a, n, compensate=undo_a)
    return await ctx.step(explode, n, retry=RetryPolicy.none())


async def test_compensation_retry_jitter_comes_from_its_own_source(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingPolicy.asked = []
    monkeypatch.setattr(saga_module, "DEFAULT_COMPENSATION_RETRY", RecordingPolicy(max_attempts=3))
    tally.fail["undo a"] = 2
    async with engine(undoing) as e:
        with pytest.raises(ledgerflow.WorkflowFailedError, match="compensated"):
            await outcome(e, await e.start(undoing, 1, id="undo-1"))
    # The compensation is command 3, after the two steps.
    expected = [(k, jitter_source("undo-1", 3, k).random()) for k in (1, 2)]
    assert RecordingPolicy.asked == expected
    assert tally.count("undo a") == 3


# -- an event the store refuses -----------------------------------------------------


@ledgerflow.workflow(name="two_steps", version=1)
async def two_steps(ctx: WorkflowContext, n: int) -> int:
    first = await ctx.step(a, n)
    return await ctx.step(b, first)


async def test_an_event_the_store_refuses_parks_the_instance_naming_it(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step's result rides with the second step's start; the store
    refuses it (``EventError``: no retry can help). The instance is parked, not
    failed: the second step never runs and nothing is compensated."""
    async with engine(two_steps) as e:
        real_append = e.store.append
        refused: list[Any] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not refused and any(isinstance(event, StepDone) for event in events):
                refused.append(events[-1])
                raise EventSerializationError("wf.step_done", "refused (injected)")
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        with pytest.raises(ledgerflow.UnrecordableValueError) as caught:
            await outcome(e, await e.start(two_steps, 1, id="refused-1"))
        described = await e.describe("refused-1")
    assert described.status == "stuck"
    assert tally.log == ["a"]
    assert refused == [StepDone(seq=1, name="a", result=2)]
    error = caught.value
    assert (error.workflow_id, error.what, error.type_name) == (
        "refused-1",
        "an event of this pass",
        "StepDone",
    )
    assert error.reason == "event 'wf.step_done' cannot be serialized: refused (injected)"
    async with engine(two_steps) as e:  # resumed by an engine with a store that takes it
        assert await outcome(e, "refused-1") == 4


# -- what users read when code and history disagree ---------------------------------


@ledgerflow.workflow(name="drifting", version=1)
async def drifting_before(ctx: WorkflowContext, n: int) -> int:
    first = await ctx.step(a, n)
    second = await ctx.step(b, first)
    await ctx.wait_for_signal("go")
    return second


@ledgerflow.workflow(name="drifting", version=1)
async def drifting_shorter(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(a, n)


@ledgerflow.workflow(name="drifting", version=1)
async def drifting_failing(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(a, n)
    raise RuntimeError("gave up early")


@ledgerflow.workflow(name="drifting", version=1)
async def drifting_sleepy(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(a, n)
    await ctx.sleep(5)
    return n


@pytest.mark.parametrize(
    ("changed", "seq", "recorded", "attempted"),
    [
        (drifting_shorter, 2, "step 'b'", "no further command (the workflow ended)"),
        # The body's own exception named (it said "the workflow ended", and a typo
        # in the new code sent operators looking for a removed command).
        (
            drifting_failing,
            2,
            "step 'b'",
            "no further command: the workflow raised RuntimeError: gave up early",
        ),
        (drifting_sleepy, 2, "step 'b'", "timer 'sleep'"),
    ],
    ids=["returns-early", "fails-early", "another-command"],
)
async def test_code_that_ends_or_turns_before_its_history_is_parked_saying_where(
    engine: EngineFactory,
    changed: ledgerflow.WorkflowDefinition[int, int],
    seq: int,
    recorded: str,
    attempted: str,
) -> None:
    """Replaying recorded commands with code that ended earlier or took another path
    parks the instance; the message names the command number, what the history
    holds there and what the code did instead."""
    async with engine(drifting_before) as e:
        await e.start(drifting_before, 1, id="drift")
        await waiting(e, "drift", "signal 'go'")
    async with engine(changed) as e:
        await e.signal("drift", "go")
        with pytest.raises(ledgerflow.NonDeterminismError) as caught:
            await outcome(e, "drift")
        described = await e.describe("drift")
        types = await types_of(e, "drift")
    error = caught.value
    assert (error.workflow_id, error.seq, error.recorded, error.attempted) == (
        "drift",
        seq,
        recorded,
        attempted,
    )
    assert str(error) == (
        f"workflow 'drift' diverged from its history at command {seq}: "
        f"recorded {recorded}, the code attempted {attempted}"
    )
    assert described.status == "stuck"
    assert described.error == f"NonDeterminismError: {error}"
    if changed is drifting_failing:  # where it raised, not where the body begins
        line = drifting_failing.fn.__code__.co_firstlineno + 3
        assert error.location == f"{__file__}:{line}"
    assert tally.log == ["a", "b"]  # nothing acted on the changed path
    assert TimerStarted not in types


@ledgerflow.workflow(name="retyped", version=1)
async def retyped_before(ctx: WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("go")
    return n


@ledgerflow.workflow(name="retyped", version=1)
async def retyped_after(ctx: WorkflowContext, n: list[int]) -> int:
    return len(n)


async def test_recorded_input_that_no_longer_fits_parks_naming_the_input(
    engine: EngineFactory,
) -> None:
    async with engine(retyped_before) as e:
        await e.start(retyped_before, 7, id="retyped-1")
        await waiting(e, "retyped-1", "signal 'go'")
    async with engine(retyped_after) as e:
        await e.signal("retyped-1", "go")
        with pytest.raises(ledgerflow.RecordedValueError) as caught:
            await outcome(e, "retyped-1")
    assert caught.value.what == "input"
    assert str(caught.value) == (
        "workflow 'retyped-1': the recorded input does not fit list: Expected `array`, got `int`"
    )


# -- timers that are due at once ----------------------------------------------------


@ledgerflow.workflow(name="no_wait", version=1)
async def no_wait(ctx: WorkflowContext, n: int) -> int:
    await ctx.sleep(0)
    return n


async def test_a_timer_already_due_fires_in_the_same_pass(engine: EngineFactory) -> None:
    """The clock never moves here: a timer due now is started and fired in one
    append, and the workflow goes on without suspending."""
    async with engine(no_wait) as e:
        assert await outcome(e, await e.start(no_wait, 9, id="nw")) == 9
        events = await e.history("nw")
    # started, the timer started and fired (one append), finished
    assert [type(ev.data) for ev in events][1:3] == [TimerStarted, TimerFired]
    assert len(events) == 4


# -- outsiders writing while a step runs --------------------------------------------


async def signal_self(workflow_id: str) -> int:
    tally.did("signal self")
    # An outsider writes to the instance while this step runs, so the append that
    # carries its result (with the next step's start) meets a newer version.
    await poking[0].signal(workflow_id, "noise", {"n": 1})
    return 1


poking: list[Engine] = []


@ledgerflow.workflow(name="poked_midway", version=1)
async def poked_midway(ctx: WorkflowContext, workflow_id: str) -> int:
    first = await ctx.step(signal_self, workflow_id)
    return await ctx.step(b, first)


async def test_a_signal_during_a_step_is_folded_in_and_the_step_not_run_again(
    engine: EngineFactory,
) -> None:
    """The pass reads what landed meanwhile; it is only from outside (a signal), so
    the buffered result is appended past it instead of replaying (which would run
    the step again)."""
    async with engine(poked_midway) as e:
        poking[:] = [e]
        assert await outcome(e, await e.start(poked_midway, "pm", id="pm")) == 2
        types = await types_of(e, "pm")
    assert tally.log == ["signal self", "b"]
    assert types.count(StepDone) == 2
    assert types.index(SignalSent) < types.index(StepDone)


# -- a child that ends before its start is recorded ---------------------------------


@ledgerflow.workflow(name="quick_kid", version=1)
async def quick_kid(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(a, n)


@ledgerflow.workflow(name="quick_parent", version=1)
async def quick_parent(ctx: WorkflowContext, n: int) -> int:
    return await ctx.child(quick_kid, n) * 10


async def test_a_child_that_ends_before_its_start_is_recorded_is_seen_in_the_same_pass(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child is started, then its start recorded in the parent; here the child
    ends (and its news lands in the parent) in between. The parent's append folds
    the news in and goes on with the child's result, in the same pass: waiting for
    news it already holds would wait forever."""
    async with engine(quick_parent, quick_kid) as e:
        real_append = e.store.append
        held: list[int] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not held and any(isinstance(event, ChildStarted) for event in events):
                held.append(expected_version)
                await until_recorded(e, "qp", ChildFinished)  # the child's news
            return await real_append(stream_id, events, expected_version, **kw)

        async def never_idle() -> None:
            # Idle (nothing due) would mean waiting for news the history holds.
            row = await e.store.get_wakeup("qp")
            assert row is None or row.due_at_us is not None

        monkeypatch.setattr(e.store, "append", append)
        assert await outcome(e, await e.start(quick_parent, 4, id="qp"), never_idle) == 50
        types = await types_of(e, "qp")
    assert held
    assert types.index(ChildFinished) < types.index(ChildStarted)
    assert tally.count("a") == 1


@ledgerflow.workflow(name="old_parent", version=1)
async def old_parent(ctx: WorkflowContext, n: int) -> Any:
    try:
        ctx.expose(await ctx.child(quick_kid, n))
    except ledgerflow.ChildWorkflowError as exc:
        ctx.expose([exc.child_id, exc.status, exc.error_type, exc.message])
    await ctx.wait_for_signal("never")


def _old_history(done: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "type": "wf.started",
            "data": {"name": "old_parent", "version": 1, "input": 1, "parent_id": None},
        },
        {
            "type": "wf.child_started",
            "data": {"seq": 1, "name": "quick_kid", "child_id": "old.1", "version": 1},
        },
        {"type": "wf.child_done", "data": {"seq": 1, "name": "quick_kid", **done}},
    ]


async def test_a_child_outcome_recorded_by_older_versions_still_replays() -> None:
    """Histories written before children told their parents directly record a
    child's end as ``wf.child_done`` on the parent's command; they replay to the
    same outcome."""
    completed = {"child_id": "old.1", "status": "completed", "result": 2}
    assert await replay(old_parent, _old_history(completed)) == 2
    failed = {
        "child_id": "old.1",
        "status": "failed",
        "error_type": "ValueError",
        "message": "no",
    }
    exposed = await replay(old_parent, _old_history(failed))
    assert exposed == ["old.1", "failed", "ValueError", "no"]


# -- signals that do not fit ------------------------------------------------------


@ledgerflow.workflow(name="wants_int", version=1)
async def wants_int(ctx: WorkflowContext, n: int) -> int:
    await ctx.sleep(0)  # a command first: the signal below lands before the wait
    got = await ctx.wait_for_signal("number", int)
    assert got is not None  # no timeout
    return got + n


async def test_a_signal_that_does_not_fit_is_set_aside_saying_why(
    engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A payload sent ahead of the wait cannot be checked when sent; the wait
    rejects it, records why (naming the type it wanted) and warns, and goes on
    waiting for one that fits."""
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(wants_int, poll_interval=3600) as e:
        client = ledgerflow.WorkflowClient(e.store, workflows=[wants_int])
        await client.start(wants_int, 1, id="wi")
        await client.signal("wi", "number", "three")  # before the wait: not checked
        await waiting_for_signal_after(e, "wi")
        await e.signal("wi", "number", 3)
        assert await outcome(e, "wi") == 4
        rejected = [ev.data for ev in await e.history("wi") if isinstance(ev.data, SignalRejected)]
    assert len(rejected) == 1
    reason = rejected[0].reason
    assert reason == "does not fit int: Expected `int`, got `str`"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"workflow wi: signal 'number' rejected: {reason}"]


async def waiting_for_signal_after(e: Engine, workflow_id: str) -> None:
    """Wake the engine (a client started the instance) until it waits for a signal."""
    async with asyncio.timeout(WAIT):
        while (await e.describe(workflow_id)).waiting_for != "signal 'number'":
            assert crashes == []
            e._wake.set()
            await asyncio.sleep(0.01)


# -- steps awaited together ---------------------------------------------------------


sibling_gate = asyncio.Event()


async def slow_sibling(n: int) -> int:
    tally.did("slow")
    await sibling_gate.wait()
    return n


@ledgerflow.workflow(name="siblings", version=1)
async def siblings(ctx: WorkflowContext, n: int) -> list[int]:
    return list(await asyncio.gather(ctx.step(a, n), ctx.step(slow_sibling, n)))


async def test_a_result_recorded_while_a_sibling_runs_leaves_no_stray_task_error(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a sibling still running, a step's result is appended on its own; when
    the store fails that append, the pass is abandoned and run again (both steps
    run again: neither result was recorded), and no task is left with an error
    nobody retrieved."""
    global sibling_gate
    sibling_gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    stray: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: stray.append(context))
    try:
        async with engine(siblings) as e:
            real_append = e.store.append
            failed: list[int] = []

            async def append(
                stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
            ) -> Any:
                if not failed and any(isinstance(event, StepDone) for event in events):
                    failed.append(len(events))
                    raise StoreUnavailableError(e.store.backend, "dropped (injected)")
                return await real_append(stream_id, events, expected_version, **kw)

            monkeypatch.setattr(e.store, "append", append)
            await e.start(siblings, 1, id="sib")
            async with asyncio.timeout(WAIT):
                while not failed:
                    assert stray == []
                    gc.collect()
                    await asyncio.sleep(0.005)
            sibling_gate.set()
            assert await outcome(e, "sib") == [2, 1]
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert failed == [1]  # the quick step's result, alone
    assert stray == []
    assert tally.count("a") == 2


async def test_a_result_flushed_alone_is_durable_before_its_sibling_ends(
    engine: EngineFactory,
) -> None:
    global sibling_gate
    sibling_gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    stray: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: stray.append(context))
    try:
        async with engine(siblings) as e:
            await e.start(siblings, 5, id="sib2")
            async with asyncio.timeout(WAIT):
                while StepDone not in await types_of(e, "sib2"):
                    assert stray == []
                    gc.collect()
                    await asyncio.sleep(0.005)
            assert tally.count("slow") == 1
            sibling_gate.set()
            assert await outcome(e, "sib2") == [6, 5]
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert stray == []


# -- a store fault while starting a child ---------------------------------------------


async def test_a_store_fault_while_starting_a_child_abandons_the_pass_saying_why(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(quick_parent, quick_kid) as e:
        real_append = e.store.append
        failed: list[str] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not failed and stream_id == e.stream_id("cp.1"):
                failed.append(stream_id)
                raise StoreUnavailableError(e.store.backend, "dropped (injected)")
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        assert await outcome(e, await e.start(quick_parent, 1, id="cp")) == 20
    reason = f"{e.store.backend} store unavailable: dropped (injected)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"workflow cp: pass abandoned, retrying: {reason}"]


# -- reading the clock ----------------------------------------------------------------


@ledgerflow.workflow(name="clocked", version=1)
async def clocked(ctx: WorkflowContext, n: int) -> str:
    at = ctx.now()
    await ctx.step(a, n)
    ctx.expose(at.isoformat())
    await ctx.wait_for_signal("go")
    return at.isoformat()


async def test_a_clock_reading_is_recorded_and_replayed(
    engine: EngineFactory, clock: ledgerflow.ManualClock
) -> None:
    """``ctx.now()`` is recorded (with the next append, before the step acts on it)
    and replayed: later passes and queries see the first reading, not the time."""
    first = clock.now()
    async with engine(clocked) as e:
        await e.start(clocked, 1, id="clk")
        await waiting(e, "clk", "signal 'go'")
        clock.advance(3600)
        assert await e.query("clk") == first.isoformat()
        await e.signal("clk", "go")
        assert await outcome(e, "clk") == first.isoformat()
        reads = [ev.data for ev in await e.history("clk") if isinstance(ev.data, ClockRead)]
    assert reads == [ClockRead(seq=1, name="now", at_us=clock_us(first))]


# -- what compensations and failures say ----------------------------------------------


def undo_noting(n: int) -> None:
    info = ledgerflow.current_step()
    tally.did(f"{info.name} #{info.attempt}")
    if info.attempt < 3:
        raise RuntimeError(f"undo {n} failed on attempt {info.attempt}")


@ledgerflow.workflow(name="undo_noting", version=1)
async def undo_noting_wf(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(a, n, compensate=undo_noting)
    return await ctx.step(explode, n, retry=RetryPolicy.none())


async def test_a_compensation_knows_its_name_and_attempt_and_failures_are_recorded(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingPolicy.asked = []
    monkeypatch.setattr(saga_module, "DEFAULT_COMPENSATION_RETRY", RecordingPolicy(max_attempts=3))
    async with engine(undo_noting_wf) as e:
        with pytest.raises(ledgerflow.WorkflowFailedError, match="compensated"):
            await outcome(e, await e.start(undo_noting_wf, 4, id="un"))
        failures = [
            ev.data
            for ev in await e.history("un")
            if isinstance(ev.data, CompensationAttemptFailed)
        ]
    assert [x for x in tally.log if x.startswith("compensate")] == [
        "compensate a #1",
        "compensate a #2",
        "compensate a #3",
    ]
    assert [(f.attempt, f.error_type, f.message) for f in failures] == [
        (1, "RuntimeError", "undo 4 failed on attempt 1"),
        (2, "RuntimeError", "undo 4 failed on attempt 2"),
    ]


class Opaque:
    """Has no JSON form."""


@ledgerflow.workflow(name="returns_opaque", version=1)
async def returns_opaque(ctx: WorkflowContext, n: int) -> Any:
    await ctx.step(a, n)
    return Opaque()


async def test_an_unencodable_return_value_parks_naming_its_type(engine: EngineFactory) -> None:
    async with engine(returns_opaque) as e:
        with pytest.raises(ledgerflow.UnrecordableValueError) as caught:
            await outcome(e, await e.start(returns_opaque, 1, id="ro"))
        assert (await e.describe("ro")).status == "stuck"
    error = caught.value
    assert (error.workflow_id, error.what, error.type_name) == (
        "ro",
        "the workflow's return value",
        "Opaque",
    )
    assert str(error).startswith(
        "workflow 'ro': the workflow's return value cannot be recorded: a Opaque (<"
    )


def too_big(n: int) -> str:
    tally.did("too big")
    return "x" * 1_100_000  # over the default 1 MiB an event may be


@ledgerflow.workflow(name="big_result", version=1)
async def big_result(ctx: WorkflowContext, n: int) -> str:
    try:
        return await ctx.step(too_big, n)
    except ledgerflow.StepFailedError as exc:
        return str(exc)


async def test_an_oversized_step_result_fails_the_step_saying_what_and_how_big(
    engine: EngineFactory,
) -> None:
    async with engine(big_result) as e:
        said = await outcome(e, await e.start(big_result, 1, id="big"))
        limit = e.store.max_event_bytes
    assert said.startswith(
        "step 'too_big' failed: ResultTooLargeError: the result of step 'too_big' is "
    )
    assert said.endswith(
        f" bytes encoded, over the limit of {limit} bytes per event; "
        "store large payloads elsewhere and return a reference"
    )
    assert tally.count("too big") == 1


# -- two rounds of steps awaited together -------------------------------------------


second_gate = asyncio.Event()


async def slow_second(n: int) -> int:
    await second_gate.wait()
    return n


@ledgerflow.workflow(name="two_rounds", version=1)
async def two_rounds(ctx: WorkflowContext, n: int) -> list[int]:
    first = await asyncio.gather(ctx.step(a, n), ctx.step(b, n))
    second = await asyncio.gather(ctx.step(c, n), ctx.step(slow_second, n))
    return [*first, *second]


async def test_each_round_of_siblings_records_a_finished_result_while_another_runs(
    engine: EngineFactory,
) -> None:
    """Not only the first: in a later gather too, a step that is done is recorded
    while its sibling still runs, not held back until the sibling ends."""
    global second_gate
    second_gate = asyncio.Event()
    async with engine(two_rounds) as e:
        await e.start(two_rounds, 3, id="tr")
        async with asyncio.timeout(WAIT):
            while len([t for t in await types_of(e, "tr") if t is StepDone]) < 3:
                assert crashes == []
                await asyncio.sleep(0.005)
        second_gate.set()
        assert await outcome(e, "tr") == [4, 6, 2, 3]


# -- step results and their types ---------------------------------------------------


def untyped(n):  # type: ignore[no-untyped-def]  # no annotation: any JSON value goes
    tally.did("untyped")
    return {"n": n, "parts": [n, n]}


@ledgerflow.workflow(name="keeps_untyped", version=1)
async def keeps_untyped(ctx: WorkflowContext, n: int) -> Any:
    kept = await ctx.step(untyped, n)
    await ctx.wait_for_signal("go")
    return kept


async def test_an_unannotated_step_result_replays_as_recorded(engine: EngineFactory) -> None:
    async with engine(keeps_untyped) as e:
        await e.start(keeps_untyped, 2, id="ku")
        await waiting(e, "ku", "signal 'go'")
    async with engine(keeps_untyped) as e:  # a cold replay takes the recorded result
        await e.signal("ku", "go")
        assert await outcome(e, "ku") == {"n": 2, "parts": [2, 2]}
    assert tally.count("untyped") == 1


def says_int(n: int) -> int:
    tally.did("says int")
    return "not a number"  # type: ignore[return-value]  # the bug under test


@ledgerflow.workflow(name="trusts_int", version=1)
async def trusts_int(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(says_int, n) + 1


async def test_a_step_returning_other_than_its_annotation_parks_naming_the_step(
    engine: EngineFactory,
) -> None:
    async with engine(trusts_int) as e:
        with pytest.raises(ledgerflow.UnrecordableValueError) as caught:
            await outcome(e, await e.start(trusts_int, 1, id="ti"))
        # Not recorded: fixed code runs the step again on resume (recorded, the
        # value would stop every replay, whatever code was deployed).
        assert "wf.step_done" not in [event.type for event in await e.history("ti")]
    assert str(caught.value) == (
        "workflow 'ti': the result of step 'says_int' (command 1) cannot be recorded: "
        "a str ('not a number'): it does not fit the step's return type int: "
        "Expected `int`, got `str`"
    )
    assert tally.count("says int") == 1


def fails_for_good(n: int) -> int:
    tally.did("fails for good")
    raise ValueError("no such thing")


@ledgerflow.workflow(name="no_retry_for_value_errors", version=1)
async def no_retry_for_value_errors(ctx: WorkflowContext, n: int) -> int:
    policy = RetryPolicy(max_attempts=5, initial_interval=0, non_retryable=(ValueError,))
    return await ctx.step(fails_for_good, n, retry=policy)


async def test_a_non_retryable_error_fails_the_step_at_the_first_attempt(
    engine: EngineFactory,
) -> None:
    async with engine(no_retry_for_value_errors) as e:
        with pytest.raises(ledgerflow.WorkflowFailedError, match="no such thing"):
            await outcome(e, await e.start(no_retry_for_value_errors, 1, id="nr"))
    assert tally.count("fails for good") == 1


def label_before(n: int) -> str:
    tally.did("label")
    return "abc"


def label_after(n: int) -> int:
    tally.did("label again")
    return n


@ledgerflow.workflow(name="relabel", version=1)
async def relabel_before(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(label_before, n, name="label")
    await ctx.wait_for_signal("go")
    return n


@ledgerflow.workflow(name="relabel", version=1)
async def relabel_after(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(label_after, n, name="label")


async def test_a_recorded_result_that_no_longer_fits_parks_saying_what_was_recorded(
    engine: EngineFactory,
) -> None:
    async with engine(relabel_before) as e:
        await e.start(relabel_before, 1, id="rl")
        await waiting(e, "rl", "signal 'go'")
    async with engine(relabel_after) as e:
        await e.signal("rl", "go")
        with pytest.raises(ledgerflow.RecordedValueError) as caught:
            await outcome(e, "rl")
    assert str(caught.value) == (
        "workflow 'rl': the recorded result of step 'label' (command 1) does not fit "
        "int: Expected `int`, got `str`"
    )
    assert tally.log == ["label"]  # the changed step never ran


limit_of_store: list[int] = []


def control_characters(n: int) -> str:
    # Each encodes as six bytes (\u0001): the cheap size estimate cannot clear it,
    # so it is measured, and found too large, however few characters it has.
    return "\x01" * (limit_of_store[0] // 6 + 200)


def many_strings(n: int) -> list[str]:
    # A list is never guessed small: it is measured.
    return ["x" * 1000] * (limit_of_store[0] // 1000 + 10)


@ledgerflow.workflow(name="escaped_result", version=1)
async def escaped_result(ctx: WorkflowContext, n: int) -> str:
    try:
        if n == 1:
            await ctx.step(control_characters, n)
        else:
            await ctx.step(many_strings, n)
    except ledgerflow.StepFailedError as exc:
        return exc.error_type
    return "recorded"


async def test_a_result_large_only_once_escaped_is_measured_and_refused(
    engine: EngineFactory,
) -> None:
    """Fewer characters than the limit, but over it once each is escaped: the step
    fails for its size (its outcome) instead of the store refusing the event later
    (which would park the instance)."""
    async with engine(escaped_result) as e:
        limit_of_store[:] = [e.store.max_event_bytes]
        assert await outcome(e, await e.start(escaped_result, 1)) == "ResultTooLargeError"
        assert await outcome(e, await e.start(escaped_result, 2)) == "ResultTooLargeError"


@ledgerflow.workflow(name="undo_after_replay", version=1)
async def undo_after_replay(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(c, n)
    await ctx.step(a, n, compensate=undo_a)
    await ctx.wait_for_signal("go")
    raise RuntimeError("failed after a restart")


async def test_a_compensation_registered_on_replay_names_the_step_it_undoes(
    engine: EngineFactory,
) -> None:
    """After a restart the step is replayed, not run; its compensation is still
    registered, and its record points at the step (command 2) it undoes."""
    async with engine(undo_after_replay) as e:
        await e.start(undo_after_replay, 1, id="uar")
        await waiting(e, "uar", "signal 'go'")
    async with engine(undo_after_replay) as e:
        await e.signal("uar", "go")
        with pytest.raises(ledgerflow.WorkflowFailedError, match="compensated"):
            await outcome(e, "uar")
        done = [ev.data for ev in await e.history("uar") if isinstance(ev.data, CompensationDone)]
    assert [(x.seq, x.name, x.step_seq) for x in done] == [(4, "a", 2)]
    assert tally.log == ["c", "a", "undo a"]


@ledgerflow.workflow(name="big_return", version=1)
async def big_return(ctx: WorkflowContext, n: int) -> str:
    await ctx.step(a, n)
    return "y" * 1_100_000  # over the default 1 MiB an event may be


async def test_an_oversized_return_value_fails_the_workflow_saying_so(
    engine: EngineFactory,
) -> None:
    async with engine(big_return) as e:
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await outcome(e, await e.start(big_return, 1, id="br"))
        described = await e.describe("br")
        limit = e.store.max_event_bytes
    assert caught.value.error_type == "ResultTooLargeError"
    assert described.status == "failed"
    assert described.error is not None
    assert described.error.startswith("ResultTooLargeError: the workflow's return value is ")
    assert described.error.endswith(
        f" bytes encoded, over the limit of {limit} bytes per event; "
        "store large payloads elsewhere and return a reference"
    )


@ledgerflow.workflow(name="exposes_around_a_timer", version=1)
async def exposes_around_a_timer(ctx: WorkflowContext, n: int) -> str:
    ctx.expose("before the timer")
    await ctx.step(a, n, compensate=undo_a)
    await ctx.sleep(10)
    ctx.expose("after the timer")
    await ctx.step(b, n)
    return "done"


async def test_a_query_only_replays_even_past_a_due_timer(
    engine: EngineFactory, clock: ledgerflow.ManualClock
) -> None:
    """A query replays what is recorded; it never acts, even where the code would
    now go on (here a reader whose clock is past the timer's due time)."""
    async with engine(exposes_around_a_timer) as e:
        await e.start(exposes_around_a_timer, 1, id="q")
        await waiting(e, "q", "timer")
        later = ledgerflow.ManualClock(clock.now() + timedelta(seconds=11))
        reader = ledgerflow.WorkflowClient(e.store, workflows=[exposes_around_a_timer], clock=later)
        assert await reader.query("q") == "before the timer"
        types = await types_of(e, "q")
    assert TimerFired not in types
    assert tally.log == ["a"]  # the engine's run, before the query


async def test_a_result_recorded_alone_meeting_another_runner_restarts_quietly(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append of a result recorded while its sibling runs meets a command of
    another runner: the pass replays from the record (no error left in a task), and
    the workflow still ends."""
    global sibling_gate
    sibling_gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    stray: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: stray.append(context))
    try:
        async with engine(siblings) as e:
            real_append = e.store.append
            intruded: list[int] = []

            async def append(
                stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
            ) -> Any:
                if not intruded and any(isinstance(event, StepDone) for event in events):
                    intruded.append(expected_version)
                    theirs = StepDone(seq=99, name="elsewhere", result=0)
                    await real_append(stream_id, [theirs], expected_version)
                return await real_append(stream_id, events, expected_version, **kw)

            monkeypatch.setattr(e.store, "append", append)
            await e.start(siblings, 1, id="sib3")
            async with asyncio.timeout(WAIT):
                while not intruded:
                    assert stray == []
                    await asyncio.sleep(0.005)
            for _ in range(5):  # let the flush's task end, and be collected
                await asyncio.sleep(0.01)
                gc.collect()
            sibling_gate.set()
            assert await outcome(e, "sib3") == [2, 1]
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert stray == []


async def test_a_result_recorded_alone_that_the_store_refuses_parks_quietly(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    global sibling_gate
    sibling_gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    stray: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: stray.append(context))
    try:
        async with engine(siblings) as e:
            real_append = e.store.append
            refused: list[int] = []

            async def append(
                stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
            ) -> Any:
                if not refused and any(isinstance(event, StepDone) for event in events):
                    refused.append(expected_version)
                    raise EventSerializationError("wf.step_done", "refused (injected)")
                return await real_append(stream_id, events, expected_version, **kw)

            monkeypatch.setattr(e.store, "append", append)
            await e.start(siblings, 1, id="sib4")
            async with asyncio.timeout(WAIT):
                while not refused:
                    assert stray == []
                    await asyncio.sleep(0.005)
            for _ in range(5):
                await asyncio.sleep(0.01)
                gc.collect()
            sibling_gate.set()
            with pytest.raises(ledgerflow.UnrecordableValueError):
                await outcome(e, "sib4")
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert stray == []


async def test_a_runner_whose_lease_was_taken_steps_back_saying_why(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fenced append refused (another runner holds the instance now) ends the pass
    with no further effect, and the log says who holds it."""
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(two_steps) as e:
        real_append = e.store.append
        lost: list[LeaseLostError] = []

        async def append(
            stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any
        ) -> Any:
            if not lost and any(isinstance(event, StepDone) for event in events):
                lost.append(LeaseLostError("lost-1", e.owner, 1, "another:1:x", 2))
                raise lost[0]
            return await real_append(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", append)
        await e.start(two_steps, 1, id="lost-1")
        async with asyncio.timeout(WAIT):
            while not any("stepping back" in r.getMessage() for r in caplog.records):
                assert crashes == []
                await asyncio.sleep(0.005)
        assert (await e.describe("lost-1")).status == "running"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"workflow lost-1: stepping back: {lost[0]}" in warnings
    assert tally.log == ["a"]  # the second step never ran


# -- durations a workflow cannot wait for ----------------------------------------------


def one(n: int) -> int:
    return n


@ledgerflow.workflow(name="bad_waits", version=1)
async def bad_waits(ctx: WorkflowContext, kind: str) -> str:
    if kind == "sleep nan":
        await ctx.sleep(float("nan"))
    elif kind == "sleep inf":
        await ctx.sleep(float("inf"))
    elif kind == "sleep past what a store keeps":
        await ctx.sleep(1e30)
    elif kind == "sleep until naive":
        await ctx.sleep_until(datetime(2030, 1, 1))  # naive: the mistake under test
    elif kind == "signal timeout nan":
        await ctx.wait_for_signal("go", timeout=float("nan"))
    elif kind == "signal timeout past what a store keeps":
        await ctx.wait_for_signal("go", timeout=1e16)
    elif kind.startswith("step timeout "):
        await ctx.step(one, 1, timeout=float(kind.removeprefix("step timeout ")))
    await ctx.sleep_until(datetime(2020, 1, 1, tzinfo=UTC))  # in the past: fires at once
    return "waited"


@pytest.mark.parametrize(
    ("kind", "error_type", "says"),
    [
        ("sleep nan", "ValueError", "ctx.sleep needs a finite number of seconds, not nan"),
        ("sleep inf", "ValueError", "ctx.sleep needs a finite number of seconds, not inf"),
        ("sleep past what a store keeps", "ValueError", "ctx.sleep of 1e+30 s ends later"),
        ("sleep until naive", "ValueError", "needs a timezone-aware datetime"),
        ("signal timeout nan", "ValueError", "wait for 'go' needs a finite number"),
        ("signal timeout past what a store keeps", "ValueError", "later than a timer can"),
        ("step timeout 0", "WorkflowDefinitionError", "positive, finite number of seconds"),
        ("step timeout -1", "WorkflowDefinitionError", "not -1.0"),
        ("step timeout nan", "WorkflowDefinitionError", "not nan"),
    ],
)
async def test_a_duration_no_timer_can_keep_fails_the_call_that_asked(
    engine: EngineFactory, kind: str, error_type: str, says: str
) -> None:
    """Before: a timer past what a store keeps failed every pass (the instance
    spun, running, for ever); NaN or infinite durations failed with Python's own
    conversion errors; a step timeout of 0 or less timed every attempt out before
    it began, and a NaN one bounded nothing."""
    async with engine(bad_waits) as e:
        with pytest.raises(ledgerflow.WorkflowFailedError) as failed:
            await outcome(e, await e.start(bad_waits, kind, id="bw"))
        assert (failed.value.error_type, failed.value.status) == (error_type, "failed")
        assert says in failed.value.message
        assert await outcome(e, await e.start(bad_waits, "none", id="ok")) == "waited"


def test_a_step_declared_with_an_unusable_timeout_is_refused() -> None:
    with pytest.raises(ledgerflow.WorkflowDefinitionError, match="positive, finite"):
        ledgerflow.step(timeout=0)
    with pytest.raises(ledgerflow.WorkflowDefinitionError, match="positive, finite"):
        ledgerflow.step(timeout=timedelta(seconds=-1))
