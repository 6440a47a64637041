"""Leases carry epochs, appends are fenced with them, runners renew them (issue 12).

A lease that lapsed let a second engine claim an instance while the first still ran
it, and both then ran every later step: nothing renewed a lease during a pass, and
appends did not check who held it. Now every claim takes the next epoch of the
instance's lease, every append of a runner is fenced with its epoch (one that no
longer holds fails alone, writing nothing) and engines renew the leases of what they
run. Store-level cases run on every backend; PostgreSQL's one-round-trip append
(which plans without reading) is covered by appending twice in a row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

import ledgerflow
from ledgerflow import LeaseLostError, WorkflowContext
from ledgerflow.events import NO_STREAM, NewEvent
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store.runtime import Fence, Lease, Schedule, WakeupRow

from ._engines import WAIT, EngineFactory, waiting_for

FAR = 2**52
"""A moment after every lease the tests give."""


def event(n: int) -> NewEvent:
    return NewEvent(type="Noted", data={"n": n})


async def started(store: BaseEventStore, workflow_id: str, owner: str) -> None:
    """An instance stream with a wake-up leased to ``owner`` (epoch 1)."""
    await store.append(
        workflow_id, [event(0)], NO_STREAM, runtime=[Schedule(workflow_id, 0, owner, 100)]
    )


# -- the store ----------------------------------------------------------------------


async def test_a_claim_takes_the_next_epoch_and_a_fenced_append_holds_to_it(
    store: BaseEventStore,
) -> None:
    await started(store, "wf", "a")
    assert (await store.get_wakeup("wf")) == WakeupRow("wf", 0, "a", 100, 1)
    await store.append("wf", [event(1)], 1, fence=Fence("wf", "a", 1))

    # The lease ran out and b claimed it: a's next append fails and writes nothing,
    # twice in a row (PostgreSQL's second append plans without reading the leases).
    assert await store.claim_wakeups("b", now_us=FAR, lease_until_us=FAR + 10, limit=5) == [
        Lease("wf", 2)
    ]
    for _ in range(2):
        with pytest.raises(LeaseLostError) as lost:
            await store.append("wf", [event(2)], 2, fence=Fence("wf", "a", 1))
        assert (lost.value.workflow_id, lost.value.held_by, lost.value.held_epoch) == (
            "wf",
            "b",
            2,
        )
    assert await store.stream_version("wf") == 2
    # b's own appends go through, on either path.
    await store.append("wf", [event(2)], 2, fence=Fence("wf", "b", 2))
    await store.append("wf", [event(3)], 3, fence=Fence("wf", "b", 2))
    assert await store.stream_version("wf") == 4


async def test_a_lapsed_lease_nobody_claimed_still_holds(store: BaseEventStore) -> None:
    await started(store, "wf", "a")
    # Its end (100) is long past, but no one else acted: the fence holds.
    await store.append("wf", [event(1)], 1, fence=Fence("wf", "a", 1))
    await store.append("wf", [event(2)], 2, fence=Fence("wf", "a", 1))
    assert await store.stream_version("wf") == 3


async def test_a_lease_given_back_fences_its_old_holder_out(store: BaseEventStore) -> None:
    await started(store, "wf", "a")
    await store.append("wf", [event(1)], 1, runtime=[Schedule("wf", 50)])  # given back
    assert (await store.get_wakeup("wf")) == WakeupRow("wf", 50, None, None, 1)
    with pytest.raises(LeaseLostError):
        await store.append("wf", [event(2)], 2, fence=Fence("wf", "a", 1))
    with pytest.raises(LeaseLostError):  # no wake-up row at all: nobody holds it
        await store.append("other", [event(0)], NO_STREAM, fence=Fence("other", "a", 1))
    assert await store.stream_version("other") == 0


async def test_a_fence_that_fails_fails_its_request_alone(store: BaseEventStore) -> None:
    await started(store, "held", "a")
    await started(store, "taken", "a")
    await store.claim_wakeups("b", now_us=FAR, lease_until_us=FAR + 10, limit=1)
    taken = await store.get_wakeup("taken")
    held = await store.get_wakeup("held")
    assert taken is not None
    assert held is not None
    loser, winner = ("taken", "held") if taken.lease_owner == "b" else ("held", "taken")
    outcomes = await asyncio.gather(
        store.append(loser, [event(1)], 1, fence=Fence(loser, "a", 1)),
        store.append(winner, [event(1)], 1, fence=Fence(winner, "a", 1)),
        store.append("free", [event(1)], NO_STREAM),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], LeaseLostError)
    assert not isinstance(outcomes[1], BaseException)
    assert not isinstance(outcomes[2], BaseException)
    assert (await store.stream_version(loser), await store.stream_version(winner)) == (1, 2)


async def test_a_fence_sees_the_lease_as_earlier_requests_of_the_batch_left_it(
    store: BaseEventStore,
) -> None:
    await started(store, "wf", "a")
    # One group commit: a gives the lease back, then appends under its old epoch.
    outcomes = await asyncio.gather(
        store.append("wf", [event(1)], 1, runtime=[Schedule("wf", 5)], fence=Fence("wf", "a", 1)),
        store.append("wf", [event(2)], 2, fence=Fence("wf", "a", 1)),
        return_exceptions=True,
    )
    assert not isinstance(outcomes[0], BaseException)
    assert isinstance(outcomes[1], LeaseLostError)
    # A Schedule with an owner takes the next epoch, in the same batch too.
    outcomes = await asyncio.gather(
        store.append("wf", [event(2)], 2, runtime=[Schedule("wf", 5, "c", 99)]),
        store.append("wf", [event(3)], 3, fence=Fence("wf", "c", 2)),
        return_exceptions=True,
    )
    assert [isinstance(o, BaseException) for o in outcomes] == [False, False]
    assert await store.get_wakeup("wf") == WakeupRow("wf", 5, "c", 99, 2)


async def test_renewing_extends_only_the_leases_still_held(store: BaseEventStore) -> None:
    await started(store, "kept", "a")
    await started(store, "lost", "a")
    await store.append("lost", [event(1)], 1, runtime=[Schedule("lost", 0, "b", 100)])
    assert await store.renew_leases(
        "a", [Lease("kept", 1), Lease("lost", 1)], lease_until_us=5_000
    ) == [Lease("kept", 1)]
    assert await store.get_wakeup("kept") == WakeupRow("kept", 0, "a", 5_000, 1)
    assert await store.get_wakeup("lost") == WakeupRow("lost", 0, "b", 100, 2)
    assert await store.renew_leases("a", [], lease_until_us=9) == []
    # A renewed lease is not claimable before its new end; the other one ran out.
    assert await store.claim_wakeups("c", now_us=4_999, lease_until_us=6_000, limit=9) == [
        Lease("lost", 3)
    ]


async def test_a_fence_is_checked_at_the_boundary(store: BaseEventStore) -> None:
    await started(store, "wf", "a")
    with pytest.raises(ledgerflow.InvalidEventDataError, match=r"Fence\.epoch"):
        await store.append("wf", [event(1)], 1, fence=Fence("wf", "a", -1))
    with pytest.raises(ledgerflow.InvalidEventDataError, match="fence must be a Fence"):
        await store.append("wf", [event(1)], 1, fence=("wf", "a", 1))  # type: ignore[arg-type]


# -- engines ------------------------------------------------------------------------


@dataclass
class Effects:
    runs: Counter[str]
    lock: threading.Lock
    gate: threading.Event
    first_began: threading.Event


def new_effects() -> Effects:
    return Effects(Counter(), threading.Lock(), threading.Event(), threading.Event())


effects = new_effects()


@pytest.fixture(autouse=True)
def fresh_effects() -> None:
    global effects
    effects = new_effects()


def slow(name: str) -> str:
    with effects.lock:
        effects.runs[name] += 1
    time.sleep(0.25)
    return name


@ledgerflow.workflow(name="fencing.slow5", version=1)
async def slow5(ctx: WorkflowContext, n: int) -> int:
    for i in range(5):
        await ctx.step(slow, f"s{i}")
    return n


async def test_two_engines_with_a_short_lease_run_each_step_once(engine: EngineFactory) -> None:
    # Five 0.25 s steps under a 0.4 s lease: the pass outlives its lease three times
    # over. The heartbeat keeps it, so the second engine (polling every 20 ms) never
    # takes the instance over and no step runs twice.
    lease = timedelta(seconds=0.4)
    async with (
        engine(slow5, lease=lease, poll_interval=0.02) as first,
        engine(slow5, lease=lease, poll_interval=0.02) as second,
    ):
        await first.start(slow5, 7, id="slow")
        assert await second.handle("slow").result(timeout=WAIT) == 7
    assert effects.runs == Counter({f"s{i}": 1 for i in range(5)})


def gated(name: str) -> str:
    with effects.lock:
        effects.runs[name] += 1
    if name == "first":
        effects.first_began.set()
        effects.gate.wait(WAIT)
    return name


@ledgerflow.workflow(name="fencing.gated", version=1)
async def gated_flow(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(gated, "first")
    await ctx.step(gated, "second")
    return n


async def test_a_runner_taken_over_records_nothing_more_and_steps_back(
    engine: EngineFactory,
) -> None:
    lost = REGISTRY.get_sample_value("ledgerflow_leases_lost_total", {"kind": "workflow"}) or 0
    async with engine(gated_flow, lease=timedelta(seconds=60)) as stalled:
        await stalled.start(gated_flow, 1, id="g")
        assert await asyncio.to_thread(effects.first_began.wait, WAIT)
        # The runner stalls (a GC pause, a frozen VM) past its lease, and another
        # worker claims the instance meanwhile.
        assert await stalled.store.claim_wakeups(
            "intruder", now_us=FAR, lease_until_us=FAR + 10, limit=5
        ) == [Lease("g", 2)]
        effects.gate.set()
        # Its step's result is refused (fenced), so it never acts on it.
        for _ in range(100):
            if "g" not in stalled._active:
                break
            await asyncio.sleep(0.02)
        assert "g" not in stalled._active
        assert (
            REGISTRY.get_sample_value("ledgerflow_leases_lost_total", {"kind": "workflow"})
            == lost + 1
        )
        assert effects.runs["second"] == 0
        history = [e.type for e in await stalled.history("g")]
        assert history == ["wf.started"]
        assert (await stalled.describe("g")).status == "running"
        await stalled.store.release_wakeups("intruder")
    # The next runner finishes it; the stalled one's step ran again (at least once),
    # the later one once.
    async with engine(gated_flow) as rescuer:
        assert await rescuer.handle("g").result(timeout=WAIT) == 1
    assert effects.runs == Counter({"first": 2, "second": 1})


# -- clocks that disagree -----------------------------------------------------------


def ahead(seconds: float) -> Callable[[], datetime]:
    """A machine clock that runs ``seconds`` ahead of the database's."""
    return lambda: datetime.now(UTC) + timedelta(seconds=seconds)


@ledgerflow.workflow(name="fencing.napper", version=1)
async def napper(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(gated, "before")
    await ctx.sleep(30)
    return n


async def test_a_worker_whose_clock_runs_ahead_fires_no_timer_early(engine: EngineFactory) -> None:
    async with engine(napper, clock=ledgerflow.DatabaseClock(), poll_interval=0.02) as right:
        await right.start(napper, 1, id="nap")
        await waiting_for(right, "nap", "timer")
    fast = ledgerflow.DatabaseClock(local=ahead(90))
    async with engine(napper, clock=fast, poll_interval=0.02) as skewed:
        # Corrected against the database at start: ~0 s off, not 90.
        assert abs((fast.now() - datetime.now(UTC)).total_seconds()) < 5
        await asyncio.sleep(0.3)  # ~15 looks for due work
        described = await skewed.describe("nap")
        assert (described.status, (described.waiting_for or "")[:5]) == ("running", "timer")


async def test_a_worker_whose_clock_runs_ahead_steals_no_live_lease(engine: EngineFactory) -> None:
    real = ledgerflow.DatabaseClock()
    async with engine(gated_flow, clock=real, lease=timedelta(seconds=60)) as holder:
        await holder.start(gated_flow, 5, id="held")
        assert await asyncio.to_thread(effects.first_began.wait, WAIT)
        fast = ledgerflow.DatabaseClock(local=ahead(90))
        async with engine(gated_flow, clock=fast, poll_interval=0.02) as skewed:
            await asyncio.sleep(0.3)
            wakeup = await skewed.store.get_wakeup("held")
            assert wakeup is not None
            assert (wakeup.lease_owner, wakeup.lease_epoch) == (holder.owner, 1)
            effects.gate.set()
            assert await holder.handle("held").result(timeout=WAIT) == 5
    assert effects.runs == Counter({"first": 1, "second": 1})
