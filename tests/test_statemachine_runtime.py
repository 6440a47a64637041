"""State-machine instances on the engine: events, activities, compensation, timeouts,
one event at a time, cancellation, versions and migration (every backend)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import msgspec
import pytest

import ledgerflow as lf
from ledgerflow.clock import ManualClock
from ledgerflow.workflow.history import EventReceived, StepDone, Transitioned

from ._engines import WAIT, EngineFactory, until_status

FAST = lf.RetryPolicy(max_attempts=3, initial_interval=0.001, max_interval=0.001, jitter=0)
ONCE = lf.RetryPolicy(max_attempts=1)


class Calls:
    """What the activities of one test did, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail: set[str] = set()
        self.flaky: dict[str, int] = {}

    def activity(self, name: str, *, retry: lf.RetryPolicy = ONCE) -> Any:
        @lf.step(name=name, retry=retry)
        def run(call: lf.MachineCall) -> str:
            self.log.append(name)
            if self.flaky.get(name, 0) > 0:
                self.flaky[name] -= 1
                raise ConnectionError(f"{name} flaked")
            if name in self.fail:
                raise ValueError(f"{name} refused")
            return f"{name}-done"

        return run

    def undo(self, name: str) -> Any:
        @lf.step(name=f"undo {name}")
        def run(call: lf.MachineCall, result: str) -> None:
            self.log.append(f"undo {name} ({result})")

        return run


def order_machine(calls: Calls, *, version: int = 1) -> lf.Machine:
    m = lf.Machine(
        "order",
        version=version,
        data={"approver": [None, "alice", "bob"]},
        initial_data={"approver": None},
    )
    m.state("created", initial=True)
    m.state("approved")
    m.state("reserved")
    m.state("placed", terminal=True)
    m.state("rejected", terminal=True)
    m.state("compensated", terminal=True)
    m.event("approve", payload={"approver": ["alice", "bob"]})
    m.transition("created", "approve", "approved", update=lambda d, p: {"approver": p["approver"]})
    m.transition("created", "reject", "rejected")
    m.transition(
        "approved",
        "reserve",
        "reserved",
        activity=calls.activity("reserve", retry=FAST),
        compensate=calls.undo("reserve"),
    )
    m.transition(
        "reserved", "charge", "placed", activity=calls.activity("charge"), failure="compensated"
    )
    return m


async def entered(engine: lf.Engine, instance_id: str) -> None:
    """Return once the instance has entered its initial state (its first pass ran)."""
    async with asyncio.timeout(WAIT):
        while True:
            if (await engine.machine_state(instance_id)).pending is None:
                return
            await asyncio.sleep(0.01)


async def events_of(engine: lf.Engine, instance_id: str) -> list[Any]:
    return [e.data for e in await engine.history(instance_id)]


async def test_an_order_moves_event_by_event_to_its_end(engine: EngineFactory) -> None:
    calls = Calls()
    machine = order_machine(calls)
    async with engine(machine) as running:
        handle = await running.start(machine, None, id="o1")
        approved = await running.execute("o1", "approve", {"approver": "alice"}, timeout=WAIT)
        assert (approved.state, approved.data, approved.accepts) == (
            "approved",
            {"approver": "alice"},
            ("reserve",),
        )
        reserved = await running.execute("o1", "reserve", timeout=WAIT)
        assert reserved.results == {"reserve": "reserve-done"}
        placed = await running.execute("o1", "charge", actor="ops", timeout=WAIT)
        assert placed.state == "placed"
        assert placed.accepts == ()
        outcome = await handle.result(timeout=WAIT)
        assert outcome == lf.MachineOutcome(
            state="placed",
            data={"approver": "alice"},
            results={"reserve": "reserve-done", "charge": "charge-done"},
        )
        assert calls.log == ["reserve", "charge"]
        assert placed.path == (
            "start",
            "created --approve--> approved",
            "approved --reserve--> reserved",
            "reserved --charge--> placed",
        )
        recorded = await running.history("o1")
        sent = [e for e in recorded if isinstance(e.data, EventReceived)]
        assert [e.data.by for e in sent][-1] == "ops"
        assert sent[-1].metadata.actor == "ops"
        with pytest.raises(lf.WorkflowFinishedError):
            await running.execute("o1", "charge", timeout=WAIT)


async def test_an_event_the_state_does_not_accept_is_refused_and_nothing_recorded(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    machine = order_machine(calls)
    async with engine(machine) as running:
        await running.start(machine, None, id="o1")
        await running.execute("o1", "approve", {"approver": "bob"}, timeout=WAIT)
        before = len(await running.history("o1"))
        with pytest.raises(lf.InvalidTransition) as refused:
            await running.execute("o1", "charge", timeout=WAIT)
        assert refused.value.state == "approved"
        assert refused.value.accepts == ("reserve",)
        assert "approved" in str(refused.value)
        assert "'reserve'" in str(refused.value)
        with pytest.raises(lf.InvalidTransition):
            await running.execute("o1", "no-such-event", timeout=WAIT)
        with pytest.raises(lf.WorkflowInputError, match="unknown"):
            await running.execute("o1", "reserve", {"extra": 1}, timeout=WAIT)
        with pytest.raises(lf.WorkflowInputError, match="non-empty"):
            await running.execute("o1", "", timeout=WAIT)
        with pytest.raises(lf.WorkflowNotFoundError):
            await running.execute("nobody", "reserve", timeout=WAIT)
        assert len(await running.history("o1")) == before
        assert calls.log == []


def renamed_machine(calls: Calls) -> lf.Machine:
    """``order_machine`` v1 with its state 'approved' renamed in place: the deploy
    the replay gate warns about, made anyway."""
    m = lf.Machine(
        "order",
        version=1,
        data={"approver": [None, "alice", "bob"]},
        initial_data={"approver": None},
    )
    m.state("created", initial=True)
    m.state("accepted")
    m.state("placed", terminal=True)
    m.state("rejected", terminal=True)
    m.event("approve", payload={"approver": ["alice", "bob"]})
    m.transition("created", "approve", "accepted", update=lambda d, p: {"approver": p["approver"]})
    m.transition("created", "reject", "rejected")
    m.transition("accepted", "reserve", "placed", activity=calls.activity("reserve"))
    return m


async def test_an_instance_in_a_state_a_deploy_removed_is_parked_saying_so(
    engine: EngineFactory,
) -> None:
    """The instance's state is gone from the deployed definition of its version: it
    ran on accepting nothing, not stuck, and an event sent to it was refused as if
    it had ended. Now the refusal names the missing state and the instance is
    parked as stuck, saying what to do."""
    calls = Calls()
    async with engine(order_machine(calls)) as running:
        await running.start(order_machine(calls), None, id="o1")
        await running.execute("o1", "approve", {"approver": "bob"}, timeout=WAIT)
    async with engine(renamed_machine(calls)) as running:
        with pytest.raises(lf.InvalidTransition) as refused:
            await running.execute("o1", "reserve", timeout=WAIT)
        assert "has no state 'approved'" in str(refused.value)
        assert "it has ended" not in str(refused.value)
        await until_status(running, "o1", "stuck")
        described = await running.describe("o1")
    assert described.error is not None
    assert "WorkflowDefinitionError" in described.error
    assert "has no state 'approved'" in described.error
    assert "machines migrate" in described.error
    assert calls.log == []


async def test_a_payload_missing_a_declared_field_is_refused(engine: EngineFactory) -> None:
    machine = order_machine(Calls())
    async with engine(machine) as running:
        await running.start(machine, None, id="o1")
        # Said as the event's refusal (it read "invalid input for workflow "event...").
        with pytest.raises(
            lf.EventInputError, match=r"^event 'approve' to instance 'o1' refused: .*missing"
        ):
            await running.execute("o1", "approve", timeout=WAIT)
        with pytest.raises(lf.WorkflowInputError, match="mapping"):
            await running.execute("o1", "approve", [1, 2], timeout=WAIT)  # type: ignore[arg-type]


async def test_a_guard_that_does_not_hold_refuses_the_event(engine: EngineFactory) -> None:
    m = lf.Machine("gate", data={"open": [True, False]}, initial_data={"open": False})
    m.state("shut", initial=True)
    m.state("through", terminal=True)
    m.transition("shut", "pass", "through", guard=lambda d, p: bool(d["open"]))
    m.transition("shut", "unlock", "shut", update=lambda d, p: {"open": True})
    async with engine(m) as running:
        await running.start(m, None, id="g")
        with pytest.raises(lf.InvalidTransition, match="no guard holds"):
            await running.execute("g", "pass", timeout=WAIT)
        await running.execute("g", "unlock", timeout=WAIT)
        assert (await running.execute("g", "pass", timeout=WAIT)).state == "through"


async def test_retries_run_under_the_activitys_retry_policy(engine: EngineFactory) -> None:
    calls = Calls()
    calls.flaky["reserve"] = 2
    machine = order_machine(calls)
    async with engine(machine) as running:
        await running.start(machine, None, id="o1")
        await running.execute("o1", "approve", {"approver": "alice"}, timeout=WAIT)
        reserved = await running.execute("o1", "reserve", timeout=WAIT)
        assert reserved.state == "reserved"
        assert calls.log == ["reserve", "reserve", "reserve"]


async def test_a_failed_activity_without_failure_states_leaves_the_machine_where_it_was(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    m = lf.Machine("pay")
    m.state("due", initial=True)
    m.state("paid", terminal=True)
    m.transition("due", "pay", "paid", activity=calls.activity("pay"))
    async with engine(m) as running:
        await running.start(m, None, id="p")
        calls.fail.add("pay")
        with pytest.raises(lf.TransitionFailedError) as failed:
            await running.execute("p", "pay", timeout=WAIT)
        assert (failed.value.state, failed.value.compensated) == ("due", False)
        assert failed.value.error_type == "ValueError"
        calls.fail.clear()
        assert (await running.execute("p", "pay", timeout=WAIT)).state == "paid"
        assert calls.log == ["pay", "pay"]


async def test_a_failure_compensates_every_completed_activity_newest_first(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    m = lf.Machine("trip")
    m.state("start", initial=True)
    m.state("flight")
    m.state("hotel")
    m.state("booked", terminal=True)
    m.state("undone", terminal=True)
    m.transition(
        "start",
        "book_flight",
        "flight",
        activity=calls.activity("flight"),
        compensate=calls.undo("flight"),
    )
    m.transition(
        "flight",
        "book_hotel",
        "hotel",
        activity=calls.activity("hotel"),
        compensate=calls.undo("hotel"),
    )
    m.transition("hotel", "book_car", "booked", activity=calls.activity("car"), failure="undone")
    async with engine(m) as running:
        handle = await running.start(m, None, id="t")
        await running.execute("t", "book_flight", timeout=WAIT)
        await running.execute("t", "book_hotel", timeout=WAIT)
        calls.fail.add("car")
        with pytest.raises(lf.TransitionFailedError) as failed:
            await running.execute("t", "book_car", timeout=WAIT)
        assert (failed.value.state, failed.value.compensated) == ("undone", True)
        assert calls.log == [
            "flight",
            "hotel",
            "car",
            "undo hotel (hotel-done)",
            "undo flight (flight-done)",
        ]
        assert (await handle.result(timeout=WAIT)).state == "undone"


async def test_entry_and_exit_activities_run_around_the_transitions_own(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    m = lf.Machine("doors")
    m.state(
        "hall",
        initial=True,
        on_enter=calls.activity("enter hall"),
        on_exit=calls.activity("leave hall"),
    )
    m.state("room", terminal=True, on_enter=calls.activity("enter room"))
    m.transition("hall", "walk", "room", activity=calls.activity("walk"))
    async with engine(m) as running:
        handle = await running.start(m, None, id="d")
        await running.execute("d", "walk", timeout=WAIT)
        await handle.result(timeout=WAIT)
        assert calls.log == ["enter hall", "leave hall", "walk", "enter room"]


async def test_an_initial_entry_that_fails_for_good_fails_the_instance(
    engine: EngineFactory,
) -> None:
    """It once left the instance running in no state, its result never coming."""
    calls = Calls()
    calls.fail.add("open shop")
    m = lf.Machine("shop")
    m.state("open", initial=True, on_enter=calls.activity("open shop"))
    m.state("closed", terminal=True)
    m.transition("open", "close", "closed")
    async with engine(m) as running:
        handle = await running.start(m, None, id="s")
        with pytest.raises(lf.WorkflowFailedError, match="entering the initial state 'open'"):
            await handle.result(timeout=WAIT)
        assert (await running.describe("s")).status == "failed"
        with pytest.raises(lf.WorkflowFinishedError):
            await running.execute("s", "close", timeout=WAIT)
    assert calls.log == ["open shop"]


async def test_a_failing_exit_or_entry_activity_fails_the_transition_and_compensates(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    m = lf.Machine("rooms")
    m.state("hall", initial=True, on_exit=calls.activity("leave hall"))
    m.state("room", on_enter=calls.activity("enter room"))
    m.state("garden", terminal=True)
    m.state("outside", terminal=True)
    m.transition(
        "hall",
        "walk",
        "room",
        activity=calls.activity("walk"),
        compensate=calls.undo("walk"),
        failure="outside",
    )
    m.transition("room", "out", "garden")
    async with engine(m) as running:
        handle = await running.start(m, None, id="r")
        calls.fail.add("enter room")
        with pytest.raises(lf.TransitionFailedError) as failed:
            await running.execute("r", "walk", timeout=WAIT)
        assert (failed.value.state, failed.value.compensated) == ("outside", True)
        assert (await handle.result(timeout=WAIT)).state == "outside"
    # The exit and the transition's own activity ran, then the entry failed: the
    # transition's activity is undone (the exit has no compensation).
    assert calls.log == ["leave hall", "walk", "enter room", "undo walk (walk-done)"]


async def test_a_failing_exit_without_failure_states_leaves_the_machine_where_it_was(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    calls.fail.add("leave hall")
    m = lf.Machine("stay")
    m.state("hall", initial=True, on_exit=calls.activity("leave hall"))
    m.state("room", terminal=True)
    m.transition("hall", "walk", "room", activity=calls.activity("walk"))
    async with engine(m) as running:
        await running.start(m, None, id="h")
        with pytest.raises(lf.TransitionFailedError) as failed:
            await running.execute("h", "walk", timeout=WAIT)
        assert failed.value.state == "hall"
        calls.fail.clear()
        assert (await running.execute("h", "walk", timeout=WAIT)).state == "room"
    assert calls.log == ["leave hall", "leave hall", "walk"]


def approval_machine(calls: Calls) -> lf.Machine:
    m = lf.Machine("approval")
    m.state(
        "waiting",
        initial=True,
        timeout=timedelta(days=7),
        on_timeout="expire",
    )
    m.state("approved", terminal=True)
    m.state("rejected", terminal=True)
    m.transition("waiting", "approve", "approved")
    m.transition("waiting", "expire", "rejected", activity=calls.activity("notify"))
    return m


async def test_a_state_timeout_is_a_durable_timer_that_sends_its_event(
    engine: EngineFactory, clock: ManualClock
) -> None:
    calls = Calls()
    m = approval_machine(calls)
    async with engine(m) as running:
        await running.start(m, None, id="a")
        state = await running.machine_state("a")
        assert state.state == "waiting"
        await entered(running, "a")  # and has set its timer
    # The engine is gone; the timer is in the ledger: a new engine fires it when due.
    clock.advance(timedelta(days=7, seconds=1))
    async with engine(m) as running:
        handle = running.handle("a")
        outcome = await handle.result(timeout=WAIT)
        assert outcome.state == "rejected"
        assert calls.log == ["notify"]
        received = [e for e in await events_of(running, "a") if isinstance(e, EventReceived)]
        assert [(r.name, r.by, r.timeout_of) for r in received] == [
            ("expire", "timeout", "waiting")
        ]


async def test_an_event_before_the_timeout_wins_and_the_timer_never_fires(
    engine: EngineFactory, clock: ManualClock
) -> None:
    calls = Calls()
    m = approval_machine(calls)
    async with engine(m) as running:
        handle = await running.start(m, None, id="a")
        await running.execute("a", "approve", timeout=WAIT)
        clock.advance(timedelta(days=8))
        assert (await handle.result(timeout=WAIT)).state == "approved"
        assert calls.log == []


async def test_concurrent_events_apply_one_at_a_time_and_none_is_lost(
    engine: EngineFactory,
) -> None:
    m = lf.Machine("counter", data={"n": range(21)}, initial_data={"n": 0})
    m.state("counting", initial=True)
    m.state("done", terminal=True)
    m.transition(
        "counting",
        "add",
        "counting",
        guard=lambda d, p: d["n"] < 20,
        update=lambda d, p: {"n": d["n"] + 1},
    )
    m.transition("counting", "stop", "done")
    async with engine(m) as running:
        await running.start(m, None, id="c")
        senders = [lf.WorkflowClient(running.store, workflows=[m]) for _ in range(3)]
        results = await asyncio.gather(
            *(
                sender.execute("c", "add", timeout=WAIT)
                for sender in [running, *senders]
                for _ in range(5)
            )
        )
        assert sorted(r.data["n"] for r in results) == list(range(1, 21))
        state = await running.machine_state("c")
        assert state.data == {"n": 20}
        with pytest.raises(lf.InvalidTransition, match="no guard holds"):
            await running.execute("c", "add", timeout=WAIT)
        moves = [e for e in await events_of(running, "c") if isinstance(e, Transitioned)]
        assert [t.data["n"] for t in moves] == list(range(21))


busy_until = threading.Event()


def slow_activity(call: lf.MachineCall) -> None:
    assert busy_until.wait(WAIT)


async def test_an_event_not_sent_in_time_is_said_not_sent(engine: EngineFactory) -> None:
    """While the instance ran an earlier event, a timeout ran out before ours was
    recorded, and execute raised TimeoutError, which says the event is accepted and
    will run (the CLI said so): it never did."""
    m = lf.Machine("busy")
    m.state("a", initial=True)
    m.state("b")
    m.state("c", terminal=True)
    m.transition("a", "go", "b", activity=slow_activity)
    m.transition("b", "next", "c")
    busy_until.clear()
    async with engine(m) as running:
        await running.start(m, None, id="b1")
        going = asyncio.create_task(running.execute("b1", "go", timeout=WAIT))
        sender = lf.WorkflowClient(running.store, workflows=[m])
        for _ in range(int(WAIT / 0.01)):  # until "go" is the pending event
            if any(isinstance(e, EventReceived) for e in await events_of(running, "b1")):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(lf.InstanceBusyError, match="nothing was recorded, send it again"):
            await sender.execute("b1", "next", timeout=0.2)
        received = [e.name for e in await events_of(running, "b1") if isinstance(e, EventReceived)]
        assert received == ["go"]
        busy_until.set()
        assert (await going).state == "b"
        assert (await sender.execute("b1", "next", timeout=WAIT)).state == "c"


async def test_cancelling_an_instance_compensates_what_it_completed(engine: EngineFactory) -> None:
    calls = Calls()
    machine = order_machine(calls)
    async with engine(machine) as running:
        handle = await running.start(machine, None, id="o1")
        await running.execute("o1", "approve", {"approver": "alice"}, timeout=WAIT)
        await running.execute("o1", "reserve", timeout=WAIT)
        await running.cancel("o1", "customer changed their mind", actor="support")
        with pytest.raises(lf.WorkflowFailedError) as ended:
            await handle.result(timeout=WAIT)
        assert ended.value.status == "compensated"
        assert calls.log == ["reserve", "undo reserve (reserve-done)"]
        with pytest.raises(lf.WorkflowFinishedError):
            await running.execute("o1", "charge", timeout=WAIT)


async def test_parallel_regions_fork_and_join_at_run_time(engine: EngineFactory) -> None:
    calls = Calls()
    m = lf.Machine("onboarding")
    m.state("hired", initial=True)
    m.state("laptop")
    m.state("badge")
    m.state("laptop_ready")
    m.state("badge_ready")
    m.state("ready", terminal=True)
    m.transition("hired", "start", ["laptop", "badge"])
    m.transition("laptop", "laptop_done", "laptop_ready", activity=calls.activity("image laptop"))
    m.transition("badge", "badge_done", "badge_ready")
    m.transition(["laptop_ready", "badge_ready"], "first_day", "ready")
    async with engine(m) as running:
        handle = await running.start(m, None, id="e")
        forked = await running.execute("e", "start", timeout=WAIT)
        assert forked.marking == ("badge", "laptop")
        assert forked.accepts == ("badge_done", "laptop_done")
        await running.execute("e", "badge_done", timeout=WAIT)
        with pytest.raises(lf.InvalidTransition):
            await running.execute("e", "first_day", timeout=WAIT)  # the laptop is not ready
        await running.execute("e", "laptop_done", timeout=WAIT)
        assert (await running.execute("e", "first_day", timeout=WAIT)).state == "ready"
        assert (await handle.result(timeout=WAIT)).state == "ready"


def unsound() -> lf.Machine:
    m = lf.Machine("stuck")
    m.state("a", initial=True)
    m.state("b")
    m.state("end", terminal=True)
    m.transition("a", "go", "b")  # b has no way out: a deadlock
    return m


async def test_an_unsound_definition_is_refused_at_registration_unless_told(
    store_url: str,
) -> None:
    with pytest.raises(lf.WorkflowDefinitionError, match="deadlock"):
        lf.WorkflowClient(store_url, workflows=[unsound()])
    lf.WorkflowClient(store_url, workflows=[unsound()], verify_machines="warn")
    with pytest.raises(lf.WorkflowDefinitionError, match="verify_machines"):
        lf.WorkflowClient(store_url, workflows=[unsound()], verify_machines="maybe")


def test_a_definition_the_runtime_cannot_run_is_refused() -> None:
    m = lf.Machine("t", data={"x": [1, 2]})
    m.state("a", initial=True, timeout=timedelta(hours=1), on_timeout="late")
    m.state("z", terminal=True)
    m.transition("a", "go", "z")
    with pytest.raises(lf.WorkflowDefinitionError) as refused:
        m.check()
    assert "'late'" in str(refused.value)
    assert "no start value" in str(refused.value)


async def test_migration_moves_a_running_instance_only_when_it_can_still_complete(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    v1 = order_machine(calls)
    # v2 renames "reserved" to "held" and adds a fraud check before the charge.
    v2 = lf.Machine(
        "order",
        version=2,
        data={"approver": [None, "alice", "bob"]},
        initial_data={"approver": None},
    )
    for name in ("created", "approved", "held", "checked"):
        v2.state(name, initial=name == "created")
    for name in ("placed", "rejected", "compensated"):
        v2.state(name, terminal=True)
    v2.event("approve", payload={"approver": ["alice", "bob"]})
    v2.transition("created", "approve", "approved", update=lambda d, p: {"approver": p["approver"]})
    v2.transition("created", "reject", "rejected")
    v2.transition(
        "approved",
        "reserve",
        "held",
        activity=calls.activity("reserve", retry=FAST),
        compensate=calls.undo("reserve"),
    )
    v2.transition("held", "check", "checked")
    v2.transition(
        "checked", "charge", "placed", activity=calls.activity("charge"), failure="compensated"
    )
    async with engine(v1, v2) as running:
        await running.start(v1, None, id="o1")
        await running.execute("o1", "approve", {"approver": "alice"}, timeout=WAIT)
        await running.execute("o1", "reserve", timeout=WAIT)
        before = len(await running.history("o1"))
        with pytest.raises(lf.MigrationError, match="'reserved'"):
            await running.migrate("o1", 2, reason="fraud checks")
        with pytest.raises(lf.WorkflowInputError, match="reason"):
            await running.migrate("o1", 2, states={"reserved": "held"}, reason=" ")
        with pytest.raises(lf.UnknownWorkflowError):
            await running.migrate("o1", 3, reason="no such version")
        assert len(await running.history("o1")) == before
        moved = await running.migrate(
            "o1", 2, states={"reserved": "held"}, actor="release-bot", reason="fraud checks"
        )
        assert (moved.version, moved.state, moved.accepts) == (2, "held", ("check",))
        with pytest.raises(lf.InvalidTransition):
            await running.execute("o1", "charge", timeout=WAIT)
        await running.execute("o1", "check", timeout=WAIT)
        calls.fail.add("charge")
        with pytest.raises(lf.TransitionFailedError):
            await running.execute("o1", "charge", timeout=WAIT)
        # The reservation made under v1 is undone by v2's compensation of it.
        assert calls.log[-1] == "undo reserve (reserve-done)"
        row = await running.store.get_instance("o1")
        assert row is not None
        assert row.version == 2


async def test_migration_is_refused_where_the_new_version_cannot_complete(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    v1 = order_machine(calls)
    v2 = lf.Machine(
        "order",
        version=2,
        data={"approver": [None, "alice", "bob"]},
        initial_data={"approver": None},
    )
    v2.state("created", initial=True)
    v2.state("approved")
    v2.state("trap")
    v2.state("done", terminal=True)
    v2.event("approve", payload={"approver": ["alice", "bob"]})
    v2.transition("created", "approve", "done", update=lambda d, p: {"approver": p["approver"]})
    v2.transition("approved", "loop", "trap")
    v2.transition("trap", "loop", "approved")
    v2.transition("created", "side", "approved")
    async with engine(v1, v2, verify_machines="warn") as running:
        await running.start(v1, None, id="o1")
        await running.execute("o1", "approve", {"approver": "bob"}, timeout=WAIT)
        with pytest.raises(lf.MigrationError, match="no terminal state"):
            await running.migrate("o1", 2, reason="try")


async def test_a_recorded_activity_is_not_run_again_by_a_later_engine(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    machine = order_machine(calls)
    async with engine(machine) as running:
        await running.start(machine, None, id="o1")
        await running.execute("o1", "approve", {"approver": "alice"}, timeout=WAIT)
        await running.execute("o1", "reserve", timeout=WAIT)
    async with engine(machine) as again:
        placed = await again.execute("o1", "charge", timeout=WAIT)
        assert placed.state == "placed"
        done = [e for e in await events_of(again, "o1") if isinstance(e, StepDone)]
        assert [d.name for d in done] == ["reserve", "charge"]
    assert calls.log == ["reserve", "charge"]


# -- what a careless or hostile caller sends ---------------------------------------------


async def test_bad_input_is_refused_before_anything_is_recorded(engine: EngineFactory) -> None:
    @lf.workflow(name="plain")
    async def plain(ctx: lf.WorkflowContext, n: int) -> int:
        return n

    m = lf.Machine("typed", input=int)
    m.state("a", initial=True)
    m.state("z", terminal=True)
    m.transition("a", "go", "z")
    async with engine(m, plain) as running:
        with pytest.raises(lf.WorkflowInputError):
            await running.start(m, "not an int", id="bad")
        with pytest.raises(lf.WorkflowNotFoundError):
            await running.machine_state("bad")
        await running.start(m, 7, id="t")
        with pytest.raises(lf.WorkflowInputError):
            await running.execute("t", "go", {"when": object()}, timeout=WAIT)
        with pytest.raises(lf.WorkflowInputError):
            await running.execute("t", "go", "payload", timeout=WAIT)  # type: ignore[arg-type]
        await (await running.start(plain, 1, id="p")).result(timeout=WAIT)
        with pytest.raises(lf.WorkflowInputError, match="not a state machine"):
            await running.execute("p", "go", timeout=WAIT)
        assert (await running.execute("t", "go", timeout=WAIT)).state == "z"


async def test_a_guard_or_update_that_raises_refuses_the_event_visibly(
    engine: EngineFactory,
) -> None:
    flaky = {"guard": False, "update": False}

    def guard(data: Mapping[str, Any], payload: Mapping[str, Any]) -> bool:
        if flaky["guard"]:
            raise RuntimeError("guard broke")
        return True

    def update(data: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
        if flaky["update"]:
            return {"n": 1, "extra": 2}
        return {"n": 1}

    m = lf.Machine("fragile", data={"n": [0, 1]}, initial_data={"n": 0})
    m.state("a", initial=True)
    m.state("z", terminal=True)
    m.transition("a", "go", "z", guard=guard, update=update)
    async with engine(m) as running:
        await running.start(m, None, id="f")
        flaky["guard"] = True
        with pytest.raises(lf.InvalidTransition, match="guard raised RuntimeError"):
            await running.execute("f", "go", timeout=WAIT)
        flaky["guard"], flaky["update"] = False, True
        with pytest.raises(lf.InvalidTransition, match="changed the data fields"):
            await running.execute("f", "go", timeout=WAIT)
        flaky["update"] = False
        assert (await running.execute("f", "go", timeout=WAIT)).data == {"n": 1}


async def test_an_activity_whose_result_cannot_be_recorded_parks_and_says_so(
    engine: EngineFactory,
) -> None:
    def opaque(call: lf.MachineCall) -> Any:
        return object()

    m = lf.Machine("opaque")
    m.state("a", initial=True)
    m.state("z", terminal=True)
    m.transition("a", "go", "z", activity=opaque)
    async with engine(m) as running:
        await running.start(m, None, id="o")
        with pytest.raises(lf.WorkflowFailedError) as parked:
            await running.execute("o", "go", timeout=WAIT)
        assert parked.value.status == "stuck"
        assert "UnrecordableValueError" in str(parked.value)
        with pytest.raises(lf.WorkflowFinishedError):
            await running.execute("o", "go", timeout=WAIT)


async def test_describe_says_what_a_machine_waits_for(
    engine: EngineFactory, clock: ManualClock
) -> None:
    calls = Calls()
    m = approval_machine(calls)
    async with engine(m) as running:
        await running.start(m, None, id="a")
        await entered(running, "a")
        described = await running.describe("a")
        assert described.waiting_for is not None
        assert described.waiting_for.startswith("an event in state 'waiting': approve, expire")
        assert "'expire' at " in described.waiting_for


class Decision(msgspec.Struct, frozen=True):
    approver: Literal["alice", "bob"]
    urgent: bool = False
    note: str = ""


def typed_machine() -> lf.Machine:
    m = lf.Machine("typed-approval")
    m.state("open", initial=True)
    m.state("fast", terminal=True)
    m.state("slow", terminal=True)
    m.event("decide", type=Decision)
    m.transition("open", "decide", "fast", guard=lambda d, p: bool(p["urgent"]))
    m.transition("open", "decide", "slow", guard=lambda d, p: not p["urgent"])
    return m


def test_a_typed_payload_gives_verification_its_domains() -> None:
    m = typed_machine()
    assert m.events["decide"].payload["approver"] == ("alice", "bob")
    assert m.events["decide"].payload["urgent"] == (False, True)
    report = lf.verify_machine(m)
    assert report.ok, [str(f) for f in report.findings]
    # A guard reading a field whose values nobody declared is reported, not guessed.
    reads_note = typed_machine()
    reads_note.transition("open", "decide", "slow", guard=lambda d, p: p["note"] == "x")
    findings = lf.verify_machine(reads_note).findings
    assert any(f.kind == "guard_error" and "declared domain" in f.message for f in findings)
    with pytest.raises(lf.WorkflowDefinitionError, match="does not have"):
        lf.Machine("x").event("e", type=Decision, payload={"nope": [1]})
    # Values no sender could get past the type were explored as if they could come.
    with pytest.raises(lf.WorkflowDefinitionError, match="lists 'carol', 7, which its type"):
        lf.Machine("x").event("e", type=Decision, payload={"approver": ["alice", "carol", 7]})


async def test_a_typed_payload_is_checked_and_completed_before_it_is_recorded(
    engine: EngineFactory,
) -> None:
    m = typed_machine()
    async with engine(m) as running:
        await running.start(m, None, id="t")
        with pytest.raises(lf.WorkflowInputError, match="approver"):
            await running.execute("t", "decide", {"approver": "mallory"}, timeout=WAIT)
        with pytest.raises(lf.WorkflowInputError, match="urgent"):
            await running.execute("t", "decide", {"approver": "bob", "urgent": "yes"}, timeout=WAIT)
        # A misspelt optional field: refused, as for an untyped event (it was dropped).
        with pytest.raises(lf.WorkflowInputError, match=r"unknown fields \['urgnet'\]"):
            await running.execute("t", "decide", {"approver": "bob", "urgnet": True}, timeout=WAIT)
        moved = await running.execute("t", "decide", Decision("bob"), timeout=WAIT)
        assert moved.state == "slow"
        received = [e for e in await events_of(running, "t") if isinstance(e, EventReceived)]
        assert [r.payload for r in received] == [{"approver": "bob", "urgent": False, "note": ""}]


# -- activities on task queues, under named policies, parked for an operator -------------


async def test_activities_and_their_compensations_run_on_a_task_queue(
    engine: EngineFactory,
) -> None:
    calls = Calls()

    @lf.step(name="remote reserve", queue="warehouse", retry=ONCE)
    def reserve(call: lf.MachineCall) -> str:
        calls.log.append(f"reserve for {call.instance_id} in {call.state}")
        return "R-9"

    @lf.step(name="remote release", queue="warehouse")
    def release(call: lf.MachineCall, result: str) -> None:
        calls.log.append(f"release {result}")

    m = lf.Machine("remote")
    m.state("new", initial=True)
    m.state("held")
    m.state("done", terminal=True)
    m.transition("new", "hold", "held", activity=reserve, compensate=release)
    m.transition("held", "finish", "done")
    async with engine(m, queues=["warehouse"], steps=[reserve, release]) as running:
        handle = await running.start(m, None, id="r")
        held = await running.execute("r", "hold", timeout=WAIT)
        assert held.results == {"remote reserve": "R-9"}
        await running.cancel("r", "changed plans")
        with pytest.raises(lf.WorkflowFailedError) as ended:
            await handle.result(timeout=WAIT)
        assert ended.value.status == "compensated"
    assert calls.log == ["reserve for r in new", "release R-9"]


PARKS = lf.Policy(retry=lf.Retry(max_attempts=2, initial_interval=0.01), on_exhausted="park")


async def test_an_activity_that_used_up_its_attempts_waits_for_an_operator(
    engine: EngineFactory,
) -> None:
    calls = Calls()
    calls.flaky["submit"] = 2

    @lf.step(name="submit", policy="erp")
    def submit(call: lf.MachineCall) -> str:
        calls.log.append("submit")
        if calls.flaky["submit"] > 0:
            calls.flaky["submit"] -= 1
            raise ConnectionError("ERP down")
        return "PO-1"

    m = lf.Machine("procure")
    m.state("draft", initial=True)
    m.state("submitted", terminal=True)
    m.transition("draft", "submit", "submitted", activity=submit)
    async with engine(m, policies={"erp": PARKS}) as running:
        await running.start(m, None, id="p")
        with pytest.raises(TimeoutError):  # the event stays accepted: it waits
            await running.execute("p", "submit", timeout=0.2)
        async with asyncio.timeout(WAIT):
            while True:
                described = await running.describe("p")
                if described.status == "needs_attention":
                    break
                await asyncio.sleep(0.01)
        assert (described.waiting_for or "").startswith("operator: step 'submit' failed 2 time(s)")
        await running.retry_step("p", reason="ERP is back", actor="ops")
        outcome = await running.handle("p").result(timeout=WAIT)
        assert outcome.state == "submitted"
        assert outcome.results == {"submit": "PO-1"}
    assert calls.log == ["submit"] * 3


async def test_a_long_lived_instance_reads_the_same_from_its_snapshot(
    engine: EngineFactory,
) -> None:
    m = lf.Machine("ticker", data={"n": range(61)}, initial_data={"n": 0})
    m.state("ticking", initial=True)
    m.state("stopped", terminal=True)
    m.transition(
        "ticking",
        "tick",
        "ticking",
        guard=lambda d, p: d["n"] < 60,
        update=lambda d, p: {"n": d["n"] + 1},
        activity=lf.step(name="tick")(lambda call: call.data["n"]),
    )
    m.transition("ticking", "stop", "stopped")
    async with engine(m, snapshot_every=10) as running:
        await running.start(m, None, id="t")
        for _ in range(45):  # 137 events: read from a snapshot from now on
            await running.execute("t", "tick", timeout=WAIT)
    async with engine(m, snapshot_every=10) as again:
        snapshot, _ = await again.store.load_stream(again.stream_id("t"))
        assert snapshot is not None
        state = await again.machine_state("t")
        assert (state.data, state.results) == ({"n": 45}, {"tick": 44})
        assert len(state.path) == 46
        for _ in range(15):
            await again.execute("t", "tick", timeout=WAIT)
        with pytest.raises(lf.InvalidTransition, match="no guard holds"):
            await again.execute("t", "tick", timeout=WAIT)
        assert (await again.execute("t", "stop", timeout=WAIT)).state == "stopped"


async def test_can_process_answers_without_recording(engine: EngineFactory) -> None:
    machine = order_machine(Calls())
    async with engine(machine) as running:
        await running.start(machine, None, id="o1")
        await entered(running, "o1")
        before = len(await running.history("o1"))
        assert await running.can_process("o1", "approve", {"approver": "alice"})
        assert not await running.can_process("o1", "approve")  # its payload is missing
        assert not await running.can_process("o1", "charge")
        assert len(await running.history("o1")) == before
        await running.execute("o1", "reject", timeout=WAIT)
        assert not await running.can_process("o1", "approve", {"approver": "alice"})


def test_a_timeout_event_with_a_payload_is_refused_at_definition() -> None:
    """A timeout sends its event with no payload; an event whose payload has fields
    was refused at run time (its update read a field), recorded as refused, and the
    instance never timed out again: running for ever. ``verify`` said sound."""
    m = lf.Machine("quote", version=1, data={"why": [None, "customer"]}, initial_data={"why": None})
    m.state("open", initial=True, timeout=timedelta(hours=1), on_timeout="close")
    m.state("closed", terminal=True)
    m.event("close", payload={"why": ["customer"]})
    m.transition("open", "close", "closed", update=lambda d, p: {"why": p["why"]})
    with pytest.raises(lf.WorkflowDefinitionError, match="a timeout sends no payload"):
        m.check()


async def test_an_update_that_returns_nothing_refuses_the_event_saying_so(
    engine: EngineFactory,
) -> None:
    """Registered despite its findings (``verify_machines="off"``), an update that
    forgot to return its data refused the event with Python's own words: "'NoneType'
    object is not iterable"."""
    m = lf.Machine("forgetful", version=1, data={"n": [0, 1]}, initial_data={"n": 0})
    m.state("open", initial=True)
    m.state("done", terminal=True)
    m.transition("open", "bump", "done", update=lambda d, p: None)  # type: ignore[arg-type,return-value]
    async with engine(m, verify_machines="off") as running:
        await running.start(m, None, id="f-1")
        with pytest.raises(lf.InvalidTransition, match="returned NoneType, not the data"):
            await running.execute("f-1", "bump", timeout=WAIT)


async def test_a_refused_timeout_parks_the_instance_rather_than_leave_it_for_ever(
    engine: EngineFactory, clock: ManualClock
) -> None:
    """The state's timeout sends its event once per entry; its transition's guard
    refused it, the refusal was recorded, and the instance stayed ``running`` in the
    state for ever, waiting for nothing. It is parked now, saying why."""
    m = lf.Machine(
        "quote", version=1, data={"urgent": [False, True]}, initial_data={"urgent": False}
    )
    m.state("open", initial=True, timeout=timedelta(hours=1), on_timeout="expire")
    m.state("expired", terminal=True)
    m.transition("open", "expire", "expired", guard=lambda d, p: d["urgent"])
    async with engine(m, verify_machines="off") as running:
        await running.start(m, None, id="q")
        await entered(running, "q")
        clock.advance(timedelta(hours=1, seconds=1))
        running._wake.set()
        await until_status(running, "q", "stuck")
        error = str((await running.describe("q")).error)
        assert "the timeout of state 'open' sent 'expire', which it refused" in error
