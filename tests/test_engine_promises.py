"""The engine keeps its promises under faults and bad input (issue 11).

Each test is named for the case it guards: a lost or wrongly ended workflow, a doubled
effect, a bad input or a sharp edge that was reproduced on the engine before. They
run on every backend unless the case belongs to one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

import ledgerflow
from ledgerflow import ManualClock, RetryPolicy, WorkflowContext
from ledgerflow.errors import StoreUnavailableError
from ledgerflow.events import ANY
from ledgerflow.store.runtime import Nudge
from ledgerflow.workflow.engine import Engine
from ledgerflow.workflow.history import StepDone

from ._engines import WAIT, EngineFactory, waiting_for


@dataclass
class Calls:
    """What the steps did, shared with the test (steps run in threads)."""

    log: list[str] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: dict[str, Any] = field(default_factory=dict)

    def did(self, what: str) -> None:
        with self.lock:
            self.log.append(what)

    def count(self, what: str) -> int:
        return self.log.count(what)


calls = Calls()


@pytest.fixture(autouse=True)
def fresh_calls() -> None:
    global calls
    calls = Calls()


def reserve(sku: str) -> str:
    calls.did("reserve")
    return f"R-{sku}"


def release(sku: str) -> None:
    calls.did("release")


def ship(sku: str) -> str:
    calls.did("ship")
    return "shipped"


@ledgerflow.workflow(name="saga3", version=1)
async def saga3(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve, sku, compensate=release)
    return await ctx.step(ship, sku)


async def history_types(engine: Engine, workflow_id: str) -> list[str]:
    return [event.type for event in await engine.history(workflow_id)]


# -- 1. parents never hang on a child's end ----------------------------------------


def child_work(n: int) -> int:
    calls.did("child")
    return n * 2


@ledgerflow.workflow(name="kid", version=1)
async def kid(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(child_work, n)


@ledgerflow.workflow(name="parent", version=1)
async def parent(ctx: WorkflowContext, n: int) -> int:
    return await ctx.child(kid, n) + 1


async def test_parent_resumes_when_the_child_ended_but_died_before_telling_it(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 1: the child's end and the news to its parent are separate appends. A
    crash between them leaves the child's wake-up in place, so the next engine
    delivers the news; the parent never waits on a wake-up nobody will claim."""
    real = Engine._after_end
    crashed: list[str] = []

    async def crash_once(self: Engine, history: Any) -> None:
        if history.started.parent_id is not None and not crashed:
            crashed.append(history.workflow_id)
            raise RuntimeError("killed between the child's end and the news")
        await real(self, history)

    monkeypatch.setattr(Engine, "_after_end", crash_once)
    async with engine(parent, kid) as e:
        await e.start(parent, 20, id="p-1")
        async with asyncio.timeout(WAIT):
            while not crashed:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert (await e.describe("p-1.1")).status == "completed"
        assert (await e.describe("p-1")).status == "running"
        assert await e.store.get_wakeup("p-1.1") is not None  # kept for the news
    async with engine(parent, kid) as e:
        assert await e.handle("p-1").result(timeout=WAIT) == 41
        assert await e.store.get_wakeup("p-1") is None
        assert await e.store.get_wakeup("p-1.1") is None
        assert "wf.child_finished" in await history_types(e, "p-1")
    assert calls.count("child") == 1


async def test_many_parents_and_fast_children_all_finish(engine: EngineFactory) -> None:
    """Case 1 without a crash: the child's news lands before or after the parent's
    wait is written, and either way the parent goes on."""
    async with engine(parent, kid, concurrency=50) as e:
        handles = [await e.start(parent, n, id=f"pp-{n}") for n in range(60)]
        results = [await h.result(timeout=WAIT) for h in handles]
    assert results == [2 * n + 1 for n in range(60)]


# -- 2. infrastructure errors never decide a workflow's outcome ---------------------


async def test_a_transient_store_error_abandons_the_pass_not_the_workflow(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with engine(saga3) as e:
        real = e.store.append
        left = [2]

        async def flaky(stream_id: str, events: Any, expected_version: Any = ANY, **kw: Any) -> Any:
            if left[0] and any(isinstance(event, StepDone) for event in events):
                left[0] -= 1
                raise StoreUnavailableError(e.store.backend, "connection dropped (injected)")
            return await real(stream_id, events, expected_version, **kw)

        monkeypatch.setattr(e.store, "append", flaky)
        assert await (await e.start(saga3, "a", id="t-1")).result(timeout=WAIT) == "shipped"
        types = await history_types(e, "t-1")
    assert "wf.compensation_done" not in types
    assert calls.count("release") == 0
    # The step whose result could not be recorded ran again (at least once).
    assert calls.count("reserve") == 3
    assert calls.count("ship") == 1


def lock_the_database(path: str, seconds: float) -> str:
    """A step that makes another connection hold SQLite's write lock for a while,
    longer than the engine's busy timeout, right as the step's result is recorded
    (once: the step runs again when its result could not be recorded)."""
    calls.did("lock")
    if calls.count("lock") > 1:
        return "locked"
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("BEGIN IMMEDIATE")

    def let_go() -> None:
        time.sleep(seconds)
        con.execute("COMMIT")
        con.close()

    threading.Thread(target=let_go, daemon=True).start()
    return "locked"


@ledgerflow.workflow(name="locker", version=1)
async def locker(ctx: WorkflowContext, path: str) -> str:
    await ctx.step(reserve, "x", compensate=release)
    await ctx.step(lock_the_database, path, 1.0)
    return await ctx.step(ship, "x")


async def test_sqlite_write_lock_held_past_busy_timeout_is_not_a_workflow_failure(
    tmp_path: Any, clock: ManualClock
) -> None:
    path = tmp_path / "locked.db"
    async with ledgerflow.Engine(
        f"sqlite:///{path}?busy_timeout=0.2", workflows=[locker], clock=clock
    ) as e:
        await e.start(locker, str(path), id="l-1")
        assert await e.handle("l-1").result(timeout=WAIT) == "shipped"
        assert (await e.describe("l-1")).status == "completed"
    assert calls.count("release") == 0
    assert calls.count("lock") >= 2  # its result hit the lock: it ran again


# -- 4. results over the size limit ------------------------------------------------


def huge(sku: str) -> str:
    calls.did("huge")
    return "x" * 2_000_000


@ledgerflow.workflow(name="bigstep", version=1)
async def bigstep(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve, sku, compensate=release)
    return await ctx.step(huge, sku)


@ledgerflow.workflow(name="bigreturn", version=1)
async def bigreturn(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve, sku, compensate=release)
    return "y" * 2_000_000


async def test_an_oversized_step_result_fails_the_step_once_and_compensates(
    engine: EngineFactory,
) -> None:
    # One step thread: were the oversized step's thread still held (it waits for its
    # result to be recorded, which never happens), the compensation could not run.
    async with engine(bigstep, step_threads=1) as e:
        await e.start(bigstep, "a", id="big-1")
        with pytest.raises(ledgerflow.WorkflowFailedError, match="ResultTooLargeError"):
            await e.handle("big-1").result(timeout=WAIT)
        assert (await e.describe("big-1")).status == "compensated"
    assert calls.log == ["reserve", "huge", "release"]


async def test_an_oversized_return_value_fails_the_workflow_once(engine: EngineFactory) -> None:
    async with engine(bigreturn) as e:
        await e.start(bigreturn, "a", id="big-2")
        with pytest.raises(ledgerflow.WorkflowFailedError, match="ResultTooLargeError"):
            await e.handle("big-2").result(timeout=WAIT)
    assert calls.log == ["reserve", "release"]


# -- 5 and 7. what a command depends on is durable before it acts ------------------

store_of: dict[str, Engine] = {}


async def recorded_steps(workflow_id: str) -> list[str]:
    events = await store_of["engine"].store.read_stream(f"wf-{workflow_id}")
    return [e.data.name for e in events if isinstance(e.data, StepDone)]


async def first_step(n: int) -> int:
    return n + 1


async def second_step(n: int) -> int:
    calls.seen["before second"] = await recorded_steps(ledgerflow.current_step().workflow_id)
    return n + 1


@ledgerflow.workflow(name="two", version=1)
async def two(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(second_step, await ctx.step(first_step, n))


async def test_a_step_result_is_durable_before_the_next_step_acts(engine: EngineFactory) -> None:
    async with engine(two) as e:
        store_of["engine"] = e
        assert await (await e.start(two, 1, id="d-1")).result(timeout=WAIT) == 3
    assert calls.seen["before second"] == ["first_step"]


async def child_reads_parent(n: int) -> int:
    info = ledgerflow.current_step()
    parent_id = info.workflow_id.rsplit(".", 1)[0]
    calls.seen["parent steps"] = await recorded_steps(parent_id)
    return n


@ledgerflow.workflow(name="reader", version=1)
async def reader(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(child_reads_parent, n)


@ledgerflow.workflow(name="feeder", version=1)
async def feeder(ctx: WorkflowContext, n: int) -> int:
    value = await ctx.step(first_step, n)
    return await ctx.child(reader, value)


async def test_a_child_starts_only_after_the_step_its_input_came_from_is_durable(
    engine: EngineFactory,
) -> None:
    async with engine(feeder, reader) as e:
        store_of["engine"] = e
        assert await (await e.start(feeder, 4, id="f-1")).result(timeout=WAIT) == 5
    assert calls.seen["parent steps"] == ["first_step"]


def held(n: int) -> int:
    calls.did(f"held {n}")
    return n


@ledgerflow.workflow(name="one_sync", version=1)
async def one_sync(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(held, n)


async def test_a_step_thread_is_freed_only_once_its_result_is_durable(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 5: finished bodies whose results are not yet durable never outnumber the
    step threads, so a crash re-runs at most that many."""
    async with engine(one_sync, step_threads=1) as e:
        real = e.store.append
        gate = asyncio.Event()
        waiting: list[str] = []

        async def slow_commit(stream_id: str, events: Any, expected: Any = ANY, **kw: Any) -> Any:
            if any(isinstance(event, StepDone) for event in events) and not gate.is_set():
                waiting.append(stream_id)
                await gate.wait()
            return await real(stream_id, events, expected, **kw)

        monkeypatch.setattr(e.store, "append", slow_commit)
        handles = [await e.start(one_sync, n, id=f"h-{n}") for n in range(3)]
        async with asyncio.timeout(WAIT):
            while not waiting:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        # One body finished; its result is not durable, so the one thread is held.
        assert len([c for c in calls.log if c.startswith("held")]) == 1
        gate.set()
        assert [await h.result(timeout=WAIT) for h in handles] == [0, 1, 2]


# -- 6. gather: a pass ends only when every command it started has settled ---------


def fails_fast(sku: str) -> str:
    calls.did("fails")
    raise ValueError("declined")


async def slow_ok(sku: str) -> str:
    await asyncio.sleep(0.3)
    calls.did("slow")
    return "slow"


async def undo_slow(sku: str) -> None:
    calls.did("undo slow")


@ledgerflow.workflow(name="gather_fail", version=1)
async def gather_fail(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve, sku, compensate=release)
    await asyncio.gather(
        ctx.step(fails_fast, sku, retry=RetryPolicy.none()),
        ctx.step(slow_ok, sku, compensate=undo_slow),
    )
    return "done"


async def test_gather_branch_failing_still_compensates_the_sibling_step(
    engine: EngineFactory,
) -> None:
    async with engine(gather_fail) as e:
        await e.start(gather_fail, "g", id="g-1")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await e.handle("g-1").result(timeout=WAIT)
        assert (await e.describe("g-1")).status == "compensated"
    assert calls.log.index("slow") < calls.log.index("undo slow") < calls.log.index("release")


async def counted(sku: str) -> str:
    with calls.lock:
        calls.running += 1
        calls.most_at_once = max(calls.most_at_once, calls.running)
    await asyncio.sleep(0.3)
    with calls.lock:
        calls.running -= 1
    calls.did("counted")
    return "counted"


@ledgerflow.workflow(name="gather_wait", version=1)
async def gather_wait(ctx: WorkflowContext, sku: str) -> str:
    go, work = await asyncio.gather(ctx.wait_for_signal("go", str), ctx.step(counted, sku))
    return f"{go} {work}"


async def test_gather_suspending_on_a_signal_keeps_the_sibling_step_result(
    engine: EngineFactory,
) -> None:
    async with engine(gather_wait) as e:
        await e.start(gather_wait, "g", id="g-2")
        await waiting_for(e, "g-2", "signal 'go'")
        assert calls.count("counted") == 1
        await e.signal("g-2", "go", "ready")
        assert await e.handle("g-2").result(timeout=WAIT) == "ready counted"
    assert calls.count("counted") == 1
    assert calls.most_at_once == 1


# -- 8. engine randomness never touches the workflow's stream -----------------------

flaky_left: list[int] = []


def flaky_once(sku: str) -> str:
    if flaky_left:
        flaky_left.pop()
        raise RuntimeError("try again")
    return sku


@ledgerflow.workflow(name="draws", version=1)
async def draws(ctx: WorkflowContext, sku: str) -> float:
    await ctx.step(flaky_once, sku, retry=RetryPolicy(initial_interval=0.01, jitter=1.0))
    value = ctx.random().random()
    ctx.expose({"draw": value, "uuid": str(ctx.uuid())})
    return value


async def test_retry_jitter_leaves_the_workflows_random_stream_alone(
    engine: EngineFactory,
) -> None:
    flaky_left[:] = [1]
    async with engine(draws) as e:
        value = await (await e.start(draws, "r", id="rand-1")).result(timeout=WAIT)
        replayed = await e.query("rand-1")
        types = await history_types(e, "rand-1")
    assert replayed["draw"] == value
    assert "wf.step_attempt_failed" in types


# -- 9. a timed-out sync attempt is never overlapped by the next ---------------------


def hangs(sku: str) -> str:
    info = ledgerflow.current_step()
    with calls.lock:
        calls.running += 1
        calls.most_at_once = max(calls.most_at_once, calls.running)
    try:
        for _ in range(60):
            if info.cancelled:
                calls.did(f"cancelled {info.attempt}")
                info.raise_if_cancelled()
            time.sleep(0.01)
        return "never this slow"
    finally:
        with calls.lock:
            calls.running -= 1


@ledgerflow.workflow(name="hanging", version=1)
async def hanging(ctx: WorkflowContext, sku: str) -> str:
    return await ctx.step(
        hangs, sku, timeout=0.05, retry=RetryPolicy(max_attempts=3, initial_interval=0)
    )


async def test_a_sync_step_timeout_stops_it_and_attempts_never_overlap(
    engine: EngineFactory,
) -> None:
    async with engine(hanging, step_threads=4) as e:
        await e.start(hanging, "h", id="hang-1")
        with pytest.raises(ledgerflow.WorkflowFailedError, match="TimeoutError"):
            await e.handle("hang-1").result(timeout=WAIT)
        types = await history_types(e, "hang-1")
        # The last attempt was flagged when it timed out; it stops on its own.
        async with asyncio.timeout(WAIT):
            while calls.count("cancelled 3") == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    assert calls.most_at_once == 1
    assert calls.log == ["cancelled 1", "cancelled 2", "cancelled 3"]
    assert types.count("wf.step_attempt_failed") == 2
    assert types.count("wf.step_failed") == 1


# -- 10. attempts are durable ----------------------------------------------------------


def declined(sku: str) -> str:
    calls.did("charge")
    raise RuntimeError("card declined")


@ledgerflow.workflow(name="charging", version=1)
async def charging(ctx: WorkflowContext, sku: str) -> str:
    return await ctx.step(declined, sku, retry=RetryPolicy(max_attempts=2, initial_interval=3600))


async def test_retry_attempts_survive_a_restart(engine: EngineFactory, clock: ManualClock) -> None:
    async with engine(charging) as e:
        await e.start(charging, "c", id="ch-1")
        await waiting_for(e, "ch-1", "retry of step")
        await e.close(grace=0.05)  # the engine stops during the hour-long backoff
    assert calls.count("charge") == 1
    async with engine(charging) as e:
        # The backoff is a durable timer: a restart waits out the rest of it.
        await waiting_for(e, "ch-1", "retry of step 'declined' at ")
        await asyncio.sleep(0.2)
        assert calls.count("charge") == 1
        clock.advance(3600)
        with pytest.raises(ledgerflow.WorkflowFailedError, match="card declined"):
            await e.handle("ch-1").result(timeout=WAIT)
    assert calls.count("charge") == 2  # max_attempts=2, whatever the restarts


def undo_fails(sku: str) -> None:
    calls.did("undo")
    raise RuntimeError("refund API down")


@ledgerflow.workflow(name="undoing", version=1)
async def undoing(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve, sku, compensate=undo_fails)
    await ctx.step(fails_fast, sku, retry=RetryPolicy.none())
    return "never"


async def test_compensation_attempts_are_recorded(engine: EngineFactory) -> None:
    async with engine(undoing) as e:
        await e.start(undoing, "u", id="u-1")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await e.handle("u-1").result(timeout=WAIT)
        assert (await e.describe("u-1")).status == "compensation_failed"
        types = await history_types(e, "u-1")
    assert calls.count("undo") == 5  # DEFAULT_COMPENSATION_RETRY
    assert types.count("wf.compensation_attempt_failed") == 4
    assert types.count("wf.compensation_failed") == 1


# -- 13. values that cannot be recorded park the instance ----------------------------


def opaque(sku: str) -> Any:
    calls.did("opaque")
    return object()


@ledgerflow.workflow(name="unencodable", version=1)
async def unencodable(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve, sku, compensate=release)
    await ctx.step(opaque, sku)
    return "never"


async def test_an_unencodable_step_result_parks_the_instance_naming_step_and_type(
    engine: EngineFactory,
) -> None:
    async with engine(unencodable) as e:
        await e.start(unencodable, "o", id="o-1")
        with pytest.raises(ledgerflow.UnrecordableValueError, match=r"'opaque'.*object"):
            await e.handle("o-1").result(timeout=WAIT)
        described = await e.describe("o-1")
        assert await step_slots_held(e) == 0  # a result never recorded holds no slot
    assert described.status == "stuck"
    assert described.error is not None
    assert "UnrecordableValueError" in described.error
    assert calls.count("release") == 0  # nothing failed: nothing is undone


misfits = {"on": True}
"""Whether the code of the misfit tests returns the wrong type (before the fix)."""


@pytest.fixture
def misfit_code() -> Iterator[None]:
    misfits["on"] = True
    yield
    misfits["on"] = True


def priced(sku: str) -> int:
    calls.did("priced")
    return "twelve" if misfits["on"] else 12  # type: ignore[return-value]


@ledgerflow.workflow(name="misfit", version=1)
async def misfit(ctx: WorkflowContext, sku: str) -> int:
    await ctx.step(reserve, sku, compensate=release)
    return await ctx.step(priced, sku)


@pytest.mark.usefixtures("misfit_code")
async def test_a_step_result_of_another_type_than_declared_parks_unrecorded(
    engine: EngineFactory,
) -> None:
    """A result that does not fit the step's return annotation used to be recorded,
    and every replay then failed to read it back: stuck for good, whatever code was
    deployed. It is not recorded now; fixed code runs the step again on resume."""
    async with engine(misfit) as e:
        await e.start(misfit, "m", id="m-1")
        with pytest.raises(ledgerflow.UnrecordableValueError, match=r"'priced'.*fit.*int"):
            await e.handle("m-1").result(timeout=WAIT)
        assert (await e.describe("m-1")).status == "stuck"
        assert "wf.step_done" not in (await history_types(e, "m-1"))[2:]
        assert await step_slots_held(e) == 0
        misfits["on"] = False  # the fix is deployed
        await e.resume("m-1", reason="priced returns an int now")
        assert await e.handle("m-1").result(timeout=WAIT) == 12
    assert calls.count("priced") == 2
    assert calls.count("release") == 0


@ledgerflow.workflow(name="misfit-return", version=1)
async def misfit_return(ctx: WorkflowContext, sku: str) -> int:
    await ctx.step(reserve, sku, compensate=release)
    return "twelve" if misfits["on"] else 12  # type: ignore[return-value]


@pytest.mark.usefixtures("misfit_code")
async def test_a_return_value_of_another_type_than_declared_parks_unrecorded(
    engine: EngineFactory,
) -> None:
    """It used to be recorded as the instance's result (completed), and result()
    then raised a bare CodecError; a parent of it was stuck for good."""
    async with engine(misfit_return) as e:
        await e.start(misfit_return, "m", id="mr-1")
        with pytest.raises(ledgerflow.UnrecordableValueError, match=r"return value.*int"):
            await e.handle("mr-1").result(timeout=WAIT)
        assert (await e.describe("mr-1")).status == "stuck"
        misfits["on"] = False
        await e.resume("mr-1", reason="returns an int now")
        assert await e.handle("mr-1").result(timeout=WAIT) == 12
        # A type asked for that the recorded result does not fit: a typed error.
        client = ledgerflow.WorkflowClient(e.store)
        with pytest.raises(ledgerflow.RecordedValueError):
            await client.handle("mr-1", output_type=list[str]).result(timeout=WAIT)
    assert calls.count("reserve") == 1


cancel_sent = threading.Event()


def reserve_until_cancelled(sku: str) -> str:
    calls.did("reserve")
    assert cancel_sent.wait(WAIT)  # the cancel lands while this step runs
    return f"R-{sku}"


@ledgerflow.workflow(name="cancelled-mid-step", version=1)
async def cancelled_mid_step(ctx: WorkflowContext, sku: str) -> str:
    await ctx.step(reserve_until_cancelled, sku, compensate=release)
    if sku == "child":
        return await ctx.child(undoing, sku, id="cm-the-child")
    return await ctx.step(ship, sku)


@pytest.mark.parametrize("sku", ["step", "child"])
async def test_no_step_or_child_starts_after_an_accepted_cancel(
    engine: EngineFactory, sku: str
) -> None:
    """The next step's first append (the running step's result) folded in the
    cancel, and nothing looked again: the step ran, and the instance often ended
    completed although its cancel had been accepted."""
    cancel_sent.clear()
    async with engine(cancelled_mid_step, undoing) as e:
        await e.start(cancelled_mid_step, sku, id=f"cm-{sku}")
        for _ in range(int(WAIT / 0.01)):
            if calls.count("reserve"):
                break
            await asyncio.sleep(0.01)
        await e.cancel(f"cm-{sku}", reason="customer")
        cancel_sent.set()
        with pytest.raises(ledgerflow.WorkflowFailedError) as ended:
            await e.handle(f"cm-{sku}").result(timeout=WAIT)
        with pytest.raises(ledgerflow.WorkflowNotFoundError):
            await e.describe("cm-the-child")
    assert ended.value.status == "compensated"
    assert calls.count("ship") == 0
    assert calls.count("release") == 1


async def step_slots_held(e: ledgerflow.Engine) -> int:
    """Slots of the step threads still taken, once passes just ended have had a
    moment to give theirs back (a slot never given back is a step thread lost for
    good: the engine would run fewer and fewer sync steps at once)."""
    for _ in range(200):
        if not e.step_threads.in_use:
            break
        await asyncio.sleep(0.01)
    return e.step_threads.in_use


def label(sku: str) -> str:
    return f"L-{sku}"


@ledgerflow.workflow(name="relabel", version=1)
async def relabel_v1(ctx: WorkflowContext, sku: str) -> str:
    value = await ctx.step(label, sku, name="label")
    await ctx.wait_for_signal("go")
    return value


def label_as_int(sku: str) -> int:
    return 1


@ledgerflow.workflow(name="relabel", version=1)
async def relabel_changed(ctx: WorkflowContext, sku: str) -> str:
    value = await ctx.step(label_as_int, sku, name="label")  # a changed return type
    await ctx.wait_for_signal("go")
    return str(value)


async def test_a_changed_return_annotation_parks_with_the_recorded_value_named(
    engine: EngineFactory,
) -> None:
    async with engine(relabel_v1) as e:
        await e.start(relabel_v1, "s", id="rl-1")
        await waiting_for(e, "rl-1", "signal 'go'")
    async with engine(relabel_changed) as e:
        await e.signal("rl-1", "go")
        with pytest.raises(ledgerflow.RecordedValueError, match=r"step 'label'.*int"):
            await e.handle("rl-1").result(timeout=WAIT)
        assert (await e.describe("rl-1")).status == "stuck"


# -- 14. a stuck instance is not re-claimed for every signal -------------------------


async def test_a_stuck_instance_that_receives_signals_is_not_reclaimed(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(relabel_v1) as e:
        await e.start(relabel_v1, "s", id="st-1")
        await waiting_for(e, "st-1", "signal 'go'")
    async with engine(relabel_changed) as e:
        await e.signal("st-1", "go")
        with pytest.raises(ledgerflow.RecordedValueError):
            await e.handle("st-1").result(timeout=WAIT)
        await e.signal("st-1", "go")  # kept for when it resumes, but no wake-up
        assert await e.store.get_wakeup("st-1") is None
        # Nudged anyway (an older sender): the engine drops the wake-up again.
        stream = e.stream_id("st-1")
        version = await e.store.stream_version(stream)
        await e.store.append(stream, [], version, runtime=[Nudge("st-1", 0)])
        async with asyncio.timeout(WAIT):
            while await e.store.get_wakeup("st-1") is not None:
                clock.advance(1)  # past the poll interval: the engine looks at the rows
                await asyncio.sleep(0.02)
        assert (await e.describe("st-1")).status == "stuck"


# -- 16. edges ------------------------------------------------------------------------


def cleanup(sku: str) -> None:
    calls.did("cleanup")


@ledgerflow.workflow(name="tidy", version=1)
async def tidy(ctx: WorkflowContext, sku: str) -> str:
    try:
        await ctx.wait_for_signal("never")
    except ledgerflow.WorkflowCancelled:
        with ctx.cancellation_shield():
            await ctx.step(cleanup, sku)
        raise
    return "not cancelled"


async def test_cleanup_runs_after_a_cancel_inside_a_cancellation_shield(
    engine: EngineFactory,
) -> None:
    async with engine(tidy) as e:
        await e.start(tidy, "t", id="tidy-1")
        await waiting_for(e, "tidy-1", "signal 'never'")
        await e.cancel("tidy-1", "no longer needed")
        with pytest.raises(ledgerflow.WorkflowFailedError, match="no longer needed"):
            await e.handle("tidy-1").result(timeout=WAIT)
        assert (await e.describe("tidy-1")).status == "cancelled"
    assert calls.log == ["cleanup"]


@ledgerflow.workflow(name="waiting_kid", version=1)
async def waiting_kid(ctx: WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("never")
    return n


@ledgerflow.workflow(name="waiting_parent", version=1)
async def waiting_parent(ctx: WorkflowContext, n: int) -> int:
    return await ctx.child(waiting_kid, n)


async def test_cancelling_a_parent_cancels_its_running_children(engine: EngineFactory) -> None:
    async with engine(waiting_parent, waiting_kid) as e:
        await e.start(waiting_parent, 1, id="wp-1")
        await waiting_for(e, "wp-1.1", "signal 'never'")
        await e.cancel("wp-1", "order withdrawn")
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await e.handle("wp-1").result(timeout=WAIT)
        with pytest.raises(ledgerflow.WorkflowFailedError, match="order withdrawn"):
            await e.handle("wp-1.1").result(timeout=WAIT)
        assert (await e.describe("wp-1.1")).status == "cancelled"


@ledgerflow.workflow(name="napper", version=1)
async def napper(ctx: WorkflowContext, n: int) -> int:
    await ctx.sleep(60)
    return n


async def test_signals_no_wait_took_are_shown_not_silently_dropped(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(napper) as e:
        await e.start(napper, 1, id="nap-1")
        await waiting_for(e, "nap-1", "timer")
        await e.signal("nap-1", "ignored", {"x": 1})
        clock.advance(60)
        assert await e.handle("nap-1").result(timeout=WAIT) == 1
        assert (await e.describe("nap-1")).unconsumed_signals == ("ignored",)
        with pytest.raises(ledgerflow.WorkflowFinishedError):
            await e.signal("nap-1", "late")


def test_engine_internals_are_not_public() -> None:
    for name in ("start_child", "child_finished", "snapshot_if_due", "now_us"):
        assert not hasattr(Engine, name), name


async def test_counter_of_attempt_failures_is_per_step(engine: EngineFactory) -> None:
    """Attempt records of one step never count against another step."""
    flaky_left[:] = [1]

    @ledgerflow.workflow(name="two_flaky", version=1)
    async def two_flaky(ctx: WorkflowContext, sku: str) -> str:
        policy = RetryPolicy(max_attempts=2, initial_interval=0)
        await ctx.step(flaky_once, sku, retry=policy)
        flaky_left[:] = [1]
        return await ctx.step(flaky_once, sku, retry=policy)

    async with engine(two_flaky) as e:
        assert await (await e.start(two_flaky, "z", id="tf-1")).result(timeout=WAIT) == "z"
        attempts = Counter(
            ev.data.seq for ev in await e.history("tf-1") if ev.type == "wf.step_attempt_failed"
        )
    assert attempts == {1: 1, 2: 1}


# -- guards the suite lacked ------------------------------------------------------------

gate: dict[str, asyncio.Event] = {}


async def held_open(n: int) -> int:
    calls.did("held open")
    await gate["open"].wait()
    return n


@ledgerflow.workflow(name="after_timer", version=1)
async def after_timer(ctx: WorkflowContext, n: int) -> int:
    await ctx.sleep(10)
    return await ctx.step(held_open, n)


async def test_a_claim_holds_the_instance_for_the_whole_lease(
    engine: EngineFactory, clock: ManualClock
) -> None:
    gate["open"] = asyncio.Event()
    async with engine(after_timer, lease=timedelta(seconds=60)) as e:
        await e.start(after_timer, 1, id="lease-1")
        await waiting_for(e, "lease-1", "timer")
        clock.advance(10)  # due: the scheduler claims it
        async with asyncio.timeout(WAIT):
            while calls.count("held open") == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        wakeup = await e.store.get_wakeup("lease-1")
        assert wakeup is not None
        assert wakeup.lease_owner == e.owner
        assert wakeup.lease_until_us is not None
        assert wakeup.lease_until_us >= clock.now_us() + 60_000_000
        gate["open"].set()
        assert await e.handle("lease-1").result(timeout=WAIT) == 1


@ledgerflow.workflow(name="naps", version=1)
async def naps(ctx: WorkflowContext, n: int) -> int:
    for _ in range(n):
        await ctx.sleep(0.002)
    return n


async def test_an_instance_due_again_while_its_pass_ends_is_run_again_at_once(
    store_url: str,
) -> None:
    """The scheduler may claim an instance whose pass is still ending (a short timer
    written a moment before): that claim must lead to another pass, not to a lease
    nobody acts on until it expires."""
    target: Any = store_url
    if store_url.startswith("memory"):
        target = await ledgerflow.open_store(store_url).open()
    async with ledgerflow.Engine(
        target, workflows=[naps], lease=timedelta(seconds=60), poll_interval=0.01
    ) as e:
        handles = [await e.start(naps, 15, id=f"nap-{k}") for k in range(5)]
        assert [await h.result(timeout=WAIT) for h in handles] == [15] * 5
    if not isinstance(target, str):
        await target.close()


def big_number(n: int) -> int:
    return 2**70 + n


@ledgerflow.workflow(name="big_ints", version=1)
async def big_ints(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for k in range(4):
        total += await ctx.step(big_number, k)
    return total


async def test_integers_of_any_size_survive_history_snapshots(engine: EngineFactory) -> None:
    async with engine(big_ints, snapshot_every=2) as e:
        result = await (await e.start(big_ints, 0, id="bi-1")).result(timeout=WAIT)
        assert result == 4 * 2**70 + 6
        assert await e.query("bi-1") is None
        assert (await e.describe("bi-1")).status == "completed"


@ledgerflow.workflow(name="one_nap", version=1)
async def one_nap(ctx: WorkflowContext, n: int) -> int:
    await ctx.sleep(10)
    return n


async def test_a_claim_landing_while_a_pass_ends_leads_to_another_pass(
    engine: EngineFactory, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler may claim an instance in the instant between its pass writing
    the next wake-up and the pass's task ending. That claim leases the row to this
    engine, so it must lead to another pass here: dropped, nobody would run the
    instance until the lease expired."""
    real = Engine._conclude
    claimed: list[bool] = []

    async def conclude_then_claim(self: Engine, history: Any, result: Any) -> bool:
        again = await real(self, history, result)
        if result.suspend is not None and not claimed:
            clock.advance(10)  # the timer is due now...
            claimed.append(await self._claim())  # ...and the scheduler claims it
        return again

    monkeypatch.setattr(Engine, "_conclude", conclude_then_claim)
    async with engine(one_nap, lease=timedelta(minutes=10)) as e:
        await e.start(one_nap, 7, id="race-1")
        assert await e.handle("race-1").result(timeout=WAIT) == 7
    assert claimed


# -- the client: the store alone, no scheduler ------------------------------------------


async def test_a_client_starts_and_reads_what_an_engine_runs(store_url: str) -> None:
    target: Any = store_url
    if store_url.startswith("memory"):
        target = await ledgerflow.open_store(store_url).open()
    async with ledgerflow.WorkflowClient(target, workflows=[saga3], poll_interval=0.02) as client:
        handle = await client.start(saga3, "c", id="cl-1")
        assert (await client.describe("cl-1")).status == "running"  # nobody runs it yet
        assert await client.store.get_wakeup("cl-1") is not None
        async with ledgerflow.Engine(target, workflows=[saga3], poll_interval=0.02):
            assert await handle.result(timeout=WAIT) == "shipped"
        assert (await client.describe("cl-1")).status == "completed"
        with pytest.raises(ledgerflow.WorkflowFinishedError):
            await client.signal("cl-1", "late")
    if not isinstance(target, str):
        await target.close()
