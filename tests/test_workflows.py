"""Durable workflows and sagas: the behaviour users rely on, on every backend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pydantic
import pytest

import ledgerflow
from ledgerflow import ManualClock, WorkflowContext
from ledgerflow.workflow.history import Finished, History, StepDone

from ._engines import WAIT, EngineFactory, waiting_for


@dataclass
class Ledger:
    """A fake external system that records what was done, by idempotency key."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    applied: dict[str, Any] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)

    def do(self, what: str, value: Any) -> None:
        self.calls.append((what, value))
        remaining = self.fail.get(what, 0)
        if remaining:
            self.fail[what] = remaining - 1
            raise RuntimeError(f"{what} failed")
        self.applied.setdefault(ledgerflow.current_step().idempotency_key, (what, value))


fake = Ledger()


@pytest.fixture(autouse=True)
def fresh_fake() -> None:
    global fake
    fake = Ledger()


@dataclass(frozen=True)
class Order:
    sku: str
    amount: int


@dataclass(frozen=True)
class Placed:
    status: str
    charge: int | None = None


def reserve(order: Order) -> str:
    fake.do("reserve", order.sku)
    return f"R-{order.sku}"


def release(order: Order) -> None:
    fake.do("release", order.sku)


async def charge(order: Order) -> int:
    fake.do("charge", order.amount)
    return 1000 + order.amount


async def refund(order: Order, result: int) -> None:
    fake.do("refund", result)


def ship(order: Order) -> str:
    fake.do("ship", order.sku)
    return "shipped"


NO_WAIT = ledgerflow.RetryPolicy(max_attempts=2, initial_interval=0)


@ledgerflow.workflow(name="saga", version=1)
async def saga(ctx: WorkflowContext, order: Order) -> Placed:
    await ctx.step(reserve, order, compensate=release)
    charged = await ctx.step(charge, order, compensate=refund)
    await ctx.step(ship, order, retry=NO_WAIT)
    return Placed("placed", charged)


@ledgerflow.workflow(name="approval", version=1)
async def approval(ctx: WorkflowContext, order: Order) -> Placed:
    ctx.expose({"stage": "waiting for approval"})
    decision = await ctx.wait_for_signal("approve", bool, timeout=timedelta(days=3))
    if not decision:
        return Placed("rejected")
    ctx.expose({"stage": "charging"})
    charged = await ctx.step(charge, order, compensate=refund)
    await ctx.sleep(timedelta(hours=1))
    ctx.expose({"stage": "done"})
    return Placed("placed", charged)


async def finished(engine: ledgerflow.Engine, workflow_id: str) -> ledgerflow.WorkflowDescription:
    result = await engine.handle(workflow_id).result(timeout=WAIT)
    del result
    return await engine.describe(workflow_id)


# -- steps and sagas ---------------------------------------------------------------


async def test_steps_run_once_and_results_are_typed(engine: EngineFactory) -> None:
    async with engine(saga) as e:
        handle = await e.start(saga, Order("book", 12), id="o-1")
        assert await handle.result(timeout=WAIT) == Placed("placed", 1012)
        history = await e.history("o-1")
    assert [c[0] for c in fake.calls] == ["reserve", "charge", "ship"]
    steps = [ev.data for ev in history if isinstance(ev.data, StepDone)]
    assert [(s.seq, s.name, s.result) for s in steps] == [
        (1, "reserve", "R-book"),
        (2, "charge", 1012),
        (3, "ship", "shipped"),
    ]
    assert set(fake.applied) == {"o-1/1", "o-1/2", "o-1/3"}


async def test_failure_compensates_in_reverse_order(engine: EngineFactory) -> None:
    fake.fail["ship"] = 2  # both attempts of NO_WAIT fail
    async with engine(saga) as e:
        await e.start(saga, Order("lamp", 5), id="o-2")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("o-2").result(timeout=WAIT)
        described = await e.describe("o-2")
    assert caught.value.status == "compensated"
    assert caught.value.error_type == "StepFailedError"
    assert described.status == "compensated"
    assert [c[0] for c in fake.calls] == ["reserve", "charge", "ship", "ship", "refund", "release"]
    assert ("refund", 1005) in fake.calls  # the compensation got the step's result


async def test_retries_use_the_same_idempotency_key(engine: EngineFactory) -> None:
    fake.fail["ship"] = 1
    async with engine(saga) as e:
        await e.start(saga, Order("pen", 1), id="o-3")
        assert (await e.handle("o-3").result(timeout=WAIT)).status == "placed"
    assert [c[0] for c in fake.calls].count("ship") == 2
    assert fake.applied["o-3/3"] == ("ship", "pen")


def always_fails(order: Order) -> None:
    raise ValueError("cannot undo")


@ledgerflow.workflow(name="bad_undo", version=1)
async def bad_undo(ctx: WorkflowContext, order: Order) -> None:
    await ctx.step(reserve, order, compensate=release)
    await ctx.step(
        charge,
        order,
        compensate=always_fails,
    )
    raise RuntimeError("business rule broken")


async def test_compensation_that_keeps_failing_is_visible(engine: EngineFactory) -> None:
    async with engine(bad_undo) as e:
        await e.start(bad_undo, Order("x", 1), id="o-4")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("o-4").result(timeout=WAIT)
        rows = await e.list_workflows(status="compensation_failed")
    assert caught.value.status == "compensation_failed"
    assert caught.value.error_type == "RuntimeError"
    assert [r.workflow_id for r in rows] == ["o-4"]
    # The other compensation still ran.
    assert ("release", "x") in fake.calls


undo_tries: list[int] = []


@ledgerflow.step(retry=ledgerflow.RetryPolicy(max_attempts=2, initial_interval=0.01))
def undo_twice_at_most(order: Order) -> None:
    undo_tries.append(ledgerflow.current_step().attempt)
    raise ValueError("cannot undo")


@ledgerflow.workflow(name="own_undo_retry", version=1)
async def own_undo_retry(ctx: WorkflowContext, order: Order) -> None:
    await ctx.step(charge, order, compensate=undo_twice_at_most)
    raise RuntimeError("business rule broken")


async def test_a_compensation_takes_its_own_retry_policy(engine: EngineFactory) -> None:
    """Its @ledgerflow.step(retry=...) was ignored: always 5 attempts."""
    undo_tries.clear()
    async with engine(own_undo_retry) as e:
        await e.start(own_undo_retry, Order("x", 1), id="o-5")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("o-5").result(timeout=WAIT)
    assert caught.value.status == "compensation_failed"
    assert undo_tries == [1, 2]


class Stock:
    """A step as an object with execute and compensate."""

    def execute(self, order: Order) -> int:
        fake.do("take", order.amount)
        return order.amount

    def compensate(self, order: Order) -> None:
        fake.do("put back", order.amount)


@ledgerflow.workflow(name="class_step", version=1)
async def class_step(ctx: WorkflowContext, order: Order) -> int:
    taken: int = await ctx.step(Stock(), order)
    if order.sku == "fail":
        raise RuntimeError("after the class step")
    return taken


async def test_class_based_steps(engine: EngineFactory) -> None:
    async with engine(class_step) as e:
        assert await (await e.start(class_step, Order("ok", 3))).result(timeout=WAIT) == 3
        failing = await e.start(class_step, Order("fail", 4))
        with pytest.raises(ledgerflow.WorkflowFailedError):
            await failing.result(timeout=WAIT)
    assert ("put back", 4) in fake.calls


# -- signals, timers, queries ------------------------------------------------------


async def test_signal_after_the_wait(engine: EngineFactory, clock: ManualClock) -> None:
    async with engine(approval) as e:
        await e.start(approval, Order("a", 7), id="s-1")

        await waiting_for(e, "s-1", "signal 'approve'")
        assert await e.query("s-1") == {"stage": "waiting for approval"}
        await e.signal("s-1", "approve", True)

        await waiting_for(e, "s-1", "timer")
        assert await e.query("s-1") == {"stage": "charging"}
        clock.advance(timedelta(hours=1))
        assert await e.handle("s-1").result(timeout=WAIT) == Placed("placed", 1007)


async def test_signal_before_the_wait_is_kept(engine: EngineFactory) -> None:
    @ledgerflow.workflow(name="late_wait", version=1)
    async def late_wait(ctx: WorkflowContext, order: Order) -> bool | None:
        await ctx.step(reserve, order)
        await ctx.wait_for_signal("go", bool)  # the first "go" is for this wait
        return await ctx.wait_for_signal("go", bool)

    async with engine(late_wait) as e:
        await e.start(late_wait, Order("a", 1), id="s-2")
        await e.signal("s-2", "go", False)
        await e.signal("s-2", "go", True)
        assert await e.handle("s-2").result(timeout=WAIT) is True


async def test_wait_times_out(engine: EngineFactory, clock: ManualClock) -> None:
    async with engine(approval) as e:
        await e.start(approval, Order("a", 1), id="s-3")

        await waiting_for(e, "s-3", "signal 'approve'")
        clock.advance(timedelta(days=3))
        assert await e.handle("s-3").result(timeout=WAIT) == Placed("rejected")


async def test_timer_fires_after_a_restart(engine: EngineFactory, clock: ManualClock) -> None:
    async with engine(approval) as e:
        await e.start(approval, Order("a", 9), id="t-1")
        await e.signal("t-1", "approve", True)

        await waiting_for(e, "t-1", "timer")
    clock.advance(timedelta(hours=2))
    async with engine(approval) as e:
        assert await e.handle("t-1").result(timeout=WAIT) == Placed("placed", 1009)
    assert [c[0] for c in fake.calls] == ["charge"]  # not charged again on recovery


# -- cancellation ------------------------------------------------------------------


async def test_cancel_mid_saga_compensates(engine: EngineFactory) -> None:
    async with engine(approval) as e:
        await e.start(approval, Order("c", 3), id="c-1")
        await e.signal("c-1", "approve", True)

        await waiting_for(e, "c-1", "timer")
        await e.cancel("c-1", "customer changed their mind")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("c-1").result(timeout=WAIT)
    assert caught.value.status == "compensated"
    assert caught.value.error_type == "WorkflowCancelled"
    assert fake.calls == [("charge", 3), ("refund", 1003)]


async def test_cancel_without_compensations_ends_cancelled(engine: EngineFactory) -> None:
    async with engine(approval) as e:
        await e.start(approval, Order("c", 3), id="c-2")
        await e.cancel("c-2")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("c-2").result(timeout=WAIT)
        assert caught.value.status == "cancelled"
        with pytest.raises(ledgerflow.WorkflowFinishedError):
            await e.cancel("c-2")


# -- children ----------------------------------------------------------------------


@ledgerflow.workflow(name="parent", version=1)
async def parent(ctx: WorkflowContext, order: Order) -> list[int]:
    first = await ctx.child(saga, order)
    second = await ctx.child(saga, Order(order.sku + "2", order.amount + 1), id="child-fixed")
    return [first.charge or 0, second.charge or 0]


async def test_child_workflows(engine: EngineFactory) -> None:
    async with engine(parent, saga) as e:
        await e.start(parent, Order("kid", 1), id="p-1")
        assert await e.handle("p-1").result(timeout=WAIT) == [1001, 1002]
        child = await e.describe("p-1.1")
        fixed = await e.describe("child-fixed")
    assert (child.status, child.parent_id) == ("completed", "p-1")
    assert (fixed.status, fixed.parent_id) == ("completed", "p-1")


async def test_a_tenants_instance_and_its_children_live_in_its_namespace(
    engine: EngineFactory,
) -> None:
    async with engine(parent, saga) as e:
        handle = await e.start(
            parent, Order("kid", 1), id="p-1", tenant="acme", actor="ana", reason="test order"
        )
        assert handle.id == "acme/p-1"
        assert await handle.result(timeout=WAIT) == [1001, 1002]
        # A generated child id and an explicit one both land under the tenant.
        assert (await e.describe("acme/p-1.1")).parent_id == "acme/p-1"
        assert (await e.describe("acme/child-fixed")).parent_id == "acme/p-1"
        listed = await e.list_workflows(id_prefix="acme/")
        assert [r.workflow_id for r in listed] == ["acme/child-fixed", "acme/p-1", "acme/p-1.1"]
        first = (await e.history("acme/p-1"))[0]
        assert first.data.tenant == "acme"
        assert (first.metadata.actor, first.metadata.reason, first.metadata.tenant) == (
            "ana",
            "test order",
            "acme",
        )
        # Starting again is idempotent within the tenant's namespace.
        again = await e.start(parent, Order("kid", 1), id="p-1", tenant="acme")
        assert again.id == "acme/p-1"
        for bad in ("Acme", "-acme", "ac/me", "", "a" * 64, "acmé"):
            with pytest.raises(ledgerflow.WorkflowInputError, match="tenant"):
                await e.start(parent, Order("kid", 1), id="p-9", tenant=bad)
        assert await e.list_workflows(text="p-9") == []


async def test_failing_child_raises_in_the_parent(engine: EngineFactory) -> None:
    fake.fail["ship"] = 2
    async with engine(parent, saga) as e:
        await e.start(parent, Order("kid", 1), id="p-2")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("p-2").result(timeout=WAIT)
    assert caught.value.error_type == "ChildWorkflowError"


# -- versions and determinism ------------------------------------------------------


@ledgerflow.workflow(name="versioned", version=1)
async def versioned_v1(ctx: WorkflowContext, order: Order) -> str:
    await ctx.wait_for_signal("go")
    return "v1"


@ledgerflow.workflow(name="versioned", version=2)
async def versioned_v2(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(reserve, order)
    await ctx.wait_for_signal("go")
    return "v2"


async def test_instances_stay_on_their_version(engine: EngineFactory) -> None:
    async with engine(versioned_v1) as e:
        await e.start("versioned", Order("v", 1), id="v-old")
    async with engine(versioned_v1, versioned_v2) as e:
        await e.start("versioned", Order("v", 1), id="v-new")  # the latest version
        await e.signal("v-old", "go")
        await e.signal("v-new", "go")
        assert await e.handle("v-old").result(timeout=WAIT) == "v1"
        assert await e.handle("v-new").result(timeout=WAIT) == "v2"
        assert (await e.describe("v-new")).version == 2


@ledgerflow.workflow(name="drift", version=1)
async def drift_before(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(reserve, order)
    await ctx.wait_for_signal("go")
    await ctx.step(ship, order)
    return "done"


@ledgerflow.workflow(name="drift", version=1)
async def drift_after(ctx: WorkflowContext, order: Order) -> str:
    await ctx.step(charge, order)  # changed without a new version
    await ctx.wait_for_signal("go")
    await ctx.step(ship, order)
    return "done"


async def test_changed_code_is_a_non_determinism_error(engine: EngineFactory) -> None:
    async with engine(drift_before) as e:
        await e.start(drift_before, Order("d", 1), id="d-1")

        await waiting_for(e, "d-1", "signal 'go'")
    async with engine(drift_after) as e:
        await e.signal("d-1", "go")
        with pytest.raises(ledgerflow.NonDeterminismError) as caught:
            await e.handle("d-1").result(timeout=WAIT)
        described = await e.describe("d-1")
    assert caught.value.seq == 1
    assert caught.value.recorded == "step 'reserve'"
    assert caught.value.attempted == "step 'charge'"
    assert described.status == "stuck"
    assert [c[0] for c in fake.calls] == ["reserve"]  # nothing acted on the wrong path
    # The same broken code started again leaves it parked, recording nothing (each
    # start resumed it and parked it again: two events a start, for ever).
    for _ in range(2):
        async with engine(drift_after) as e:
            await asyncio.sleep(0.2)
            assert (await e.describe("d-1")).events == described.events
            assert (await e.describe("d-1")).status == "stuck"
    # Fixed code (the original) resumes the stuck instance on the next start.
    async with engine(drift_before) as e:
        assert await e.handle("d-1").result(timeout=WAIT) == "done"


def test_lint_flags_nondeterminism() -> None:
    with pytest.raises(ledgerflow.WorkflowDefinitionError) as caught:

        @ledgerflow.workflow(name="linted")
        async def linted(ctx: WorkflowContext, order: Order) -> float:
            import random
            import time

            stamp = time.time()
            return stamp + random.random()

    message = str(caught.value)
    assert "time.time()" in message
    assert "random.random()" in message


def test_lint_can_be_silenced_per_line() -> None:
    @ledgerflow.workflow(name="allowed")
    async def allowed(ctx: WorkflowContext, order: Order) -> float:
        import time

        return time.time()  # ledgerflow: allow

    assert allowed.name == "allowed"


async def test_deterministic_helpers_replay_identically(engine: EngineFactory) -> None:
    @ledgerflow.workflow(name="helpers", version=1)
    async def helpers(ctx: WorkflowContext, order: Order) -> list[str]:
        first = [str(ctx.now()), str(ctx.uuid()), str(ctx.random().random())]
        ctx.expose(first)
        await ctx.wait_for_signal("go")
        return first

    async with engine(helpers) as e:
        await e.start(helpers, Order("h", 1), id="h-1")

        await waiting_for(e, "h-1", "signal 'go'")
        exposed = await e.query("h-1")
        await e.signal("h-1", "go")
        assert await e.handle("h-1").result(timeout=WAIT) == exposed


# -- starting and bad input --------------------------------------------------------


async def test_start_is_idempotent_on_the_id(engine: EngineFactory) -> None:
    async with engine(saga, approval) as e:
        first = await e.start(saga, Order("i", 1), id="same")
        again = await e.start(saga, Order("i", 1), id="same")
        assert again.id == first.id
        assert (await again.result(timeout=WAIT)).status == "placed"
        with pytest.raises(ledgerflow.WorkflowAlreadyStartedError, match="'saga' workflow"):
            await e.start(approval, Order("i", 1), id="same")
        with pytest.raises(ledgerflow.WorkflowAlreadyStartedError, match="another input"):
            await e.start(saga, Order("i", 2), id="same")
        with pytest.raises(ledgerflow.WorkflowInputError, match="non-empty"):
            await e.start(saga, Order("i", 1), id="")
        # Said in the caller's terms (it was an InvalidEventDataError about the
        # length of a "stream id", a name the caller never gave).
        with pytest.raises(ledgerflow.WorkflowInputError, match="253 characters long; at most 252"):
            await e.start(saga, Order("i", 1), id="x" * 253)
        with pytest.raises(ledgerflow.WorkflowInputError, match=r"at most 252 \(with the tenant"):
            await e.start(saga, Order("i", 1), id="x" * 248, tenant="acme")
        assert [row.workflow_id for row in await e.list_workflows()] == ["same"]
    assert [c[0] for c in fake.calls] == ["reserve", "charge", "ship"]


@ledgerflow.workflow(name="floating")
async def floating(ctx: WorkflowContext, x: float) -> float:
    return x


@ledgerflow.workflow(name="anything")
async def anything(ctx: WorkflowContext, x: Any) -> Any:
    return await ctx.wait_for_signal("more")


def nested(depth: int) -> Any:
    """``depth`` levels: an object holding arrays."""
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return {"x": value}


async def test_input_and_signals_nested_too_deeply_are_refused_whatever_the_depth(
    engine: EngineFactory,
) -> None:
    """Nested 400-999 levels deep, a start over HTTP failed as a defect (500, a
    RecursionError in the code that walks values for personal data) and a signal
    too: JSON decoders take 1,000 levels, Python's recursion stops sooner."""
    async with engine(anything) as e:
        for depth in (101, 500, 900, 5000):
            with pytest.raises(ledgerflow.WorkflowInputError, match="nested deeper than 100"):
                await e.start(anything, nested(depth), id=f"deep-{depth}")
        assert await e.list_workflows() == []
        started = await e.start(anything, nested(100), id="deep-ok")  # the limit itself
        for depth in (101, 900, 5000):
            with pytest.raises(ledgerflow.WorkflowInputError, match="nested deeper than 100"):
                await e.signal(started.id, "more", nested(depth))
        await e.signal(started.id, "more", nested(100))
        assert await started.result(timeout=WAIT) == nested(100)


async def test_bad_input_is_refused_before_anything_is_recorded(engine: EngineFactory) -> None:
    wrong: Any = "not an order"  # what mypy would refuse, sent anyway
    incomplete: Any = {"sku": "x"}  # amount missing
    async with engine(saga, floating) as e:
        with pytest.raises(ledgerflow.WorkflowInputError):
            await e.start(saga, wrong, id="bad-1")
        with pytest.raises(ledgerflow.WorkflowInputError):
            await e.start(saga, incomplete, id="bad-2")
        # Of its type, but with no JSON form: it was an EventSerializationError about
        # an event named 'wf.started', a name the caller never gave.
        for no_json in (float("inf"), float("nan")):
            with pytest.raises(ledgerflow.WorkflowInputError, match="NaN or infinity"):
                await e.start(floating, no_json, id="bad-3")
        with pytest.raises(ledgerflow.UnknownWorkflowError):
            await e.start("nope", Order("x", 1))
        with pytest.raises(ledgerflow.UnknownWorkflowError):
            await e.start(approval, Order("x", 1))  # not registered with this engine
        with pytest.raises(ledgerflow.WorkflowNotFoundError):
            await e.signal("missing", "go")
        with pytest.raises(ledgerflow.WorkflowNotFoundError):
            await e.describe("missing")
        assert await e.list_workflows() == []
        assert await e.store.head_position() == 0


async def test_signal_to_a_finished_workflow_is_refused(engine: EngineFactory) -> None:
    async with engine(saga) as e:
        await (await e.start(saga, Order("f", 1), id="f-1")).result(timeout=WAIT)
        with pytest.raises(ledgerflow.WorkflowFinishedError) as caught:
            await e.signal("f-1", "anything", {"x": 1})
        assert caught.value.status == "completed"


class PydanticIn(pydantic.BaseModel):
    name: str


class StructOut(msgspec.Struct, frozen=True):
    greeting: str


async def test_pydantic_and_msgspec_types(engine: EngineFactory) -> None:
    def greet(who: PydanticIn) -> StructOut:
        return StructOut(f"hello {who.name}")

    @ledgerflow.workflow(name="typed", version=1)
    async def typed(ctx: WorkflowContext, who: PydanticIn) -> StructOut:
        return await ctx.step(greet, who)

    async with engine(typed) as e:
        handle = await e.start(typed, PydanticIn(name="ada"))
        assert await handle.result(timeout=WAIT) == StructOut("hello ada")


async def test_many_concurrent_instances(engine: EngineFactory) -> None:
    async with engine(saga, concurrency=50) as e:
        handles = await asyncio.gather(
            *(e.start(saga, Order(f"m{i}", i), id=f"m-{i}") for i in range(120))
        )
        results = await asyncio.gather(*(h.result(timeout=WAIT) for h in handles))
        history = await e.history("m-7")
    assert [r.charge for r in results] == [1000 + i for i in range(120)]
    assert isinstance(history[-1].data, Finished)
    assert len(fake.applied) == 360


# -- step options ------------------------------------------------------------------


async def slow(order: Order) -> str:
    fake.do("slow", order.sku)
    await asyncio.sleep(10)
    return "never"


@ledgerflow.step(name="charge-v1", retry=ledgerflow.RetryPolicy(max_attempts=1))
async def named_charge(order: Order) -> int:
    fake.do("named", order.amount)
    raise ValueError("card declined")


@ledgerflow.workflow(name="options", version=1)
async def options(ctx: WorkflowContext, order: Order) -> str:
    if order.sku == "slow":
        return await ctx.step(slow, order, timeout=0.05, retry=NO_WAIT)
    try:
        await ctx.step(named_charge, order)
    except ledgerflow.StepFailedError as failed:
        return f"{failed.step}: {failed.error_type}"
    return "charged"


async def test_step_timeout_counts_as_a_failed_attempt(engine: EngineFactory) -> None:
    async with engine(options) as e:
        await e.start(options, Order("slow", 1), id="to-1")
        with pytest.raises(ledgerflow.WorkflowFailedError) as caught:
            await e.handle("to-1").result(timeout=WAIT)
        history = await e.history("to-1")
    assert caught.value.status == "failed"
    assert [c[0] for c in fake.calls] == ["slow", "slow"]  # NO_WAIT: two attempts
    failed = [ev.data for ev in history if ev.type == "wf.step_failed"]
    assert [(f.name, f.error_type) for f in failed] == [("slow", "StepTimeoutError")]


async def test_step_decorator_names_and_retry(engine: EngineFactory) -> None:
    async with engine(options) as e:
        await e.start(options, Order("card", 3), id="dec-1")
        # Workflow code catches the typed failure and decides; the name is the
        # decorator's, stable across renames of the function.
        assert await e.handle("dec-1").result(timeout=WAIT) == "charge-v1: ValueError"
    assert fake.calls == [("named", 3)]  # max_attempts=1 from the decorator


async def test_malformed_signal_never_destroys_the_instance(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """Case 3: a payload that does not fit is refused at send when the instance waits
    (typed error, nothing recorded); one sent ahead of the wait is recorded as
    rejected and the wait goes on. Completed steps are never compensated for it."""

    @ledgerflow.workflow(name="typed_signal", version=1)
    async def typed_signal(ctx: WorkflowContext, order: Order) -> str:
        await ctx.step(reserve, order, compensate=release)
        if order.amount == 2:
            await ctx.sleep(60)  # the signal below is sent before the wait
        got = await ctx.wait_for_signal("order", Order)
        return f"got {got}"

    async with engine(typed_signal) as e:
        await e.start(typed_signal, Order("s", 1), id="ts-1")
        await waiting_for(e, "ts-1", "signal 'order'")
        before = len(await e.history("ts-1"))
        with pytest.raises(ledgerflow.WorkflowInputError, match="sku"):
            await e.signal("ts-1", "order", {"sku": 5})
        with pytest.raises(ledgerflow.WorkflowInputError, match="amount"):
            await e.signal("ts-1", "order", {"sku": "x"})
        with pytest.raises(ledgerflow.WorkflowInputError):
            await e.signal("ts-1", "order", object())  # not even JSON: refused at once
        assert len(await e.history("ts-1")) == before  # nothing recorded
        await e.signal("ts-1", "order", Order("ok", 2))
        assert await e.handle("ts-1").result(timeout=WAIT) == "got Order(sku='ok', amount=2)"

        await e.start(typed_signal, Order("s", 2), id="ts-2")
        await waiting_for(e, "ts-2", "timer")
        await e.signal("ts-2", "order", {"sku": 5})  # ahead of the wait: kept
        clock.advance(60)
        await waiting_for(e, "ts-2", "signal 'order'")  # rejected; the wait goes on
        await e.signal("ts-2", "order", Order("ok", 3))
        assert await e.handle("ts-2").result(timeout=WAIT) == "got Order(sku='ok', amount=3)"
        history = await e.history("ts-2")
        rejected = [ev.data for ev in history if ev.type == "wf.signal_rejected"]
        assert len(rejected) == 1
        assert "sku" in rejected[0].reason
        assert not [ev for ev in history if ev.type.startswith("wf.compensation")]
    assert [c[0] for c in fake.calls] == ["reserve", "reserve"]


@dataclass(frozen=True)
class Delivery:
    when: datetime
    ref: uuid.UUID


async def test_a_time_or_uuid_that_would_not_decode_is_refused_at_send(
    engine: EngineFactory,
) -> None:
    """The wait's recorded schema called a datetime field a plain string and no
    format was checked: "next tuesday" and "x" for a uuid were accepted at send
    (the CLI said "sent"), then rejected by the wait, unseen by the sender."""

    @ledgerflow.workflow(name="delivery", version=1)
    async def delivery(ctx: WorkflowContext, order: str) -> str:
        got = await ctx.wait_for_signal("delivery", Delivery)
        assert got is not None  # no timeout
        return got.when.isoformat()

    async with engine(delivery) as e:
        await e.start(delivery, "o", id="dl-1")
        await waiting_for(e, "dl-1", "signal 'delivery'")
        before = len(await e.history("dl-1"))
        good_ref = "6f1c9a76-0a4b-4c9e-8a55-1b7f0f1b9f00"
        with pytest.raises(ledgerflow.SignalInputError, match="when"):
            await e.signal("dl-1", "delivery", {"when": "next tuesday", "ref": good_ref})
        with pytest.raises(ledgerflow.SignalInputError, match="ref"):
            await e.signal("dl-1", "delivery", {"when": "2026-12-01T10:00:00Z", "ref": "x"})
        assert len(await e.history("dl-1")) == before  # nothing recorded
        await e.signal("dl-1", "delivery", {"when": "2026-12-01T10:00:00Z", "ref": good_ref})
        assert await e.handle("dl-1").result(timeout=WAIT) == "2026-12-01T10:00:00+00:00"


async def test_describe_and_query_a_finished_instance(engine: EngineFactory) -> None:
    async with engine(approval) as e:
        await e.start(approval, Order("q", 2), id="q-1")

        await waiting_for(e, "q-1", "signal 'approve'")
        await e.signal("q-1", "approve", False)
        assert await e.handle("q-1").result(timeout=WAIT) == Placed("rejected")
        described = await e.describe("q-1")
        assert await e.query("q-1") == {"stage": "waiting for approval"}
    assert described.status == "completed"
    assert described.result == {"status": "rejected", "charge": None}
    assert described.waiting_for is None
    assert described.events == 5  # started, waiting, signal, taken, finished


async def test_long_histories_load_from_a_snapshot(engine: EngineFactory) -> None:
    def tick(i: int) -> int:
        return i

    @ledgerflow.workflow(name="long", version=1)
    async def long(ctx: WorkflowContext, n: int) -> int:
        total = 0
        for i in range(n):
            total += await ctx.step(tick, i)
        await ctx.wait_for_signal("go")
        return total

    async with engine(long, snapshot_every=50) as e:
        await e.start(long, 230, id="long-1")

        await waiting_for(e, "long-1", "signal 'go'")
        snapshot = await e.store.load_snapshot("wf-long-1")
    assert snapshot is not None
    assert snapshot.type == "wf.history"
    assert 200 <= snapshot.version <= 232
    # Forge the snapshot (step 1 "returned" 1000): if a cold engine loads from the
    # snapshot rather than from the events, the result shows it.
    history = History.from_snapshot(snapshot.state)
    history.commands[1] = [StepDone(seq=1, name=history.commands[1][0].name, result=1000)]
    forged = ledgerflow.Snapshot(
        "wf-long-1", snapshot.version, snapshot.type, snapshot.schema_version, history.snapshot()
    )
    async with engine(long, snapshot_every=50) as e:
        await e.store.save_snapshot(forged)
        await e.signal("long-1", "go")
        assert await e.handle("long-1").result(timeout=WAIT) == sum(range(230)) + 1000


async def test_a_full_engine_waits_instead_of_spinning(engine: EngineFactory) -> None:
    gate = asyncio.Event()

    async def blocked(order: Order) -> str:
        await gate.wait()
        return order.sku

    @ledgerflow.workflow(name="gated", version=1)
    async def gated(ctx: WorkflowContext, order: Order) -> str:
        return await ctx.step(blocked, order)

    async with engine(gated, concurrency=2) as e:
        handles = [await e.start(gated, Order(f"g{i}", i)) for i in range(6)]
        calls = 0
        original = e.store.next_wakeup

        async def counted(*, workflows: Collection[tuple[str, int]] | None = None) -> int | None:
            nonlocal calls
            calls += 1
            return await original(workflows=workflows)

        e.store.next_wakeup = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.3)  # both slots busy, four instances due and waiting
        assert calls <= 2, f"the scheduler polled {calls} times while full"
        gate.set()
        assert [await h.result(timeout=WAIT) for h in handles] == [f"g{i}" for i in range(6)]


async def test_steps_awaited_together_run_concurrently_and_replay(engine: EngineFactory) -> None:
    both = asyncio.Barrier(2)

    async def meet(name: str) -> str:
        fake.do("meet", name)
        await both.wait()  # only returns if the two steps run at the same time
        return name

    @ledgerflow.workflow(name="fan_out", version=1)
    async def fan_out(ctx: WorkflowContext, order: Order) -> list[str]:
        left, right = await asyncio.gather(ctx.step(meet, "left"), ctx.step(meet, "right"))
        await ctx.wait_for_signal("go")
        return [left, right]

    async with engine(fan_out) as e:
        await e.start(fan_out, Order("f", 1), id="fan-1")

        await waiting_for(e, "fan-1", "signal 'go'")
    async with engine(fan_out) as e:  # a cold replay of the concurrent part
        await e.signal("fan-1", "go")
        assert await e.handle("fan-1").result(timeout=WAIT) == ["left", "right"]
        steps = [ev.data for ev in await e.history("fan-1") if isinstance(ev.data, StepDone)]
    assert sorted((s.seq, s.result) for s in steps) == [(1, "left"), (2, "right")]
    assert len(fake.calls) == 2


async def test_a_signal_during_the_last_step_does_not_rerun_it(engine: EngineFactory) -> None:
    engines: list[ledgerflow.Engine] = []

    async def poke(workflow_id: str) -> str:
        fake.do("poke", workflow_id)
        # An outsider writes to the instance while its last step runs, so the
        # final append meets a newer version.
        await engines[0].signal(workflow_id, "noise", {"n": 1})
        return "poked"

    @ledgerflow.workflow(name="poked", version=1)
    async def poked(ctx: WorkflowContext, workflow_id: str) -> str:
        return await ctx.step(poke, workflow_id)

    @ledgerflow.workflow(name="poked_then_wait", version=1)
    async def poked_then_wait(ctx: WorkflowContext, workflow_id: str) -> str:
        await ctx.step(poke, workflow_id)
        await ctx.wait_for_signal("go")
        return "done"

    async with engine(poked, poked_then_wait) as e:
        engines.append(e)
        assert await (await e.start(poked, "pk-1", id="pk-1")).result(timeout=WAIT) == "poked"
        await e.start(poked_then_wait, "pk-2", id="pk-2")
        await waiting_for(e, "pk-2", "signal 'go'")
        await e.signal("pk-2", "go")
        assert await e.handle("pk-2").result(timeout=WAIT) == "done"
    assert fake.calls == [("poke", "pk-1"), ("poke", "pk-2")]


async def test_takeover_releases_only_the_leases_of_dead_workers(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """At start an engine reaps the workers whose heartbeat is older than their lease,
    and the expired leases of owners with no row (engines from before the registry).
    Host and pid play no part: a worker of this host whose pid names no process here
    (it runs in another PID namespace) lives while it beats."""
    import os
    import socket
    import sys

    from ledgerflow.store.runtime import Schedule, WorkerRow

    finished = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await finished.wait()  # its pid now names no process
    host = socket.gethostname()
    now, lease = clock.now_us(), 60_000_000
    workers = {  # owner: its last heartbeat
        "dead": ("elsewhere.example:7:a", now - lease - 1),
        "namespaced": (f"{host}:{finished.pid}:b", now),
        "alive": (f"{host}:{os.getppid()}:c", now - lease),  # at the very edge: alive
        "remote": ("elsewhere.example:1:d", now),
    }
    owners = {k: owner for k, (owner, _) in workers.items()}
    owners |= {"legacy-expired": f"{host}:{finished.pid}:e", "legacy-held": "old.example:2:f"}
    until = dict.fromkeys(owners, 2**60) | {"legacy-expired": now - 1}
    async with engine(takeover=False) as e:
        for owner, beat in workers.values():
            host_, pid, _ = owner.split(":")
            row = WorkerRow(owner, host_, int(pid), (), (), "0.1.0", beat, beat, lease, 1)
            await e.store.register_worker(row)
        await e.store.append(
            "leases",
            [ledgerflow.NewEvent("setup")],
            runtime=[Schedule(f"wf-{k}", 2**60, owner, until[k]) for k, owner in owners.items()],
        )
    async with engine() as e:  # takeover at start
        rows = {k: await e.store.get_wakeup(f"wf-{k}") for k in owners}
        listed = {w.worker_id for w in await e.store.list_workers()}
    held = {k: "no row" if row is None else row.lease_owner for k, row in rows.items()}
    assert held == owners | {"dead": None, "legacy-expired": None}
    assert listed == {owners[k] for k in ("namespaced", "alive", "remote")} | {e.owner}


async def test_a_very_long_sleep_is_described_not_crashed_on(engine: EngineFactory) -> None:
    @ledgerflow.workflow(name="forever", version=1)
    async def forever(ctx: WorkflowContext, order: Order) -> None:
        await ctx.sleep(timedelta(days=4_000_000))

    async with engine(forever) as e:
        await e.start(forever, Order("z", 1), id="z-1")
        await waiting_for(e, "z-1", "timer until beyond")
        assert (await e.describe("z-1")).status == "running"
