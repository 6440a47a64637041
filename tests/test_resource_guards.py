"""The store's guarded-resource state (breakers, rate limits, bulkheads): one contract
on every backend, and the token bucket's arithmetic under hypothesis."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ledgerflow as lf
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store._resources import refill, token_wait_us
from ledgerflow.store.runtime import DropPermit, MoveBreaker, Tally

S = 1_000_000
WINDOW = 60 * S


async def tally(store: BaseEventStore, resource: str, failed: bool, at: int) -> None:
    await store.append(
        f"calls-{resource}", [lf.NewEvent("call")], runtime=[Tally(resource, failed, at, WINDOW)]
    )


async def move(store: BaseEventStore, resource: str, state: str, at: int, version: int) -> None:
    await store.append(
        f"breaker-{resource}",
        [lf.NewEvent("breaker.moved", {"state": state})],
        version - 1 if version > 1 else lf.NO_STREAM,
        runtime=[MoveBreaker(resource, state, at, version)],
    )


async def test_nothing_recorded_means_no_state(store: BaseEventStore) -> None:
    assert await store.resource_state("erp", now_us=0) is None
    assert await store.list_resources(now_us=0) == []


async def test_outcomes_are_counted_in_a_row_and_in_a_window(store: BaseEventStore) -> None:
    for failed in (True, True, False, True, True):
        await tally(store, "erp", failed, 10 * S)
    row = await store.resource_state("erp", now_us=10 * S)
    assert row is not None
    assert (row.state, row.consecutive, row.window_calls, row.window_failures) == (
        "closed",
        2,
        5,
        4,
    )
    assert row.window_start_us == 10 * S
    # A call a whole window later starts a new window.
    await tally(store, "erp", True, 10 * S + WINDOW)
    row = await store.resource_state("erp", now_us=0)
    assert row is not None
    assert (row.consecutive, row.window_calls, row.window_failures) == (3, 1, 1)
    assert row.window_start_us == 10 * S + WINDOW


async def test_a_breaker_moves_with_its_event_and_starts_counting_afresh(
    store: BaseEventStore,
) -> None:
    for _ in range(3):
        await tally(store, "erp", True, S)
    await move(store, "erp", "open", 2 * S, 1)
    row = await store.resource_state("erp", now_us=2 * S)
    assert row is not None
    assert (row.state, row.changed_at_us, row.transitions) == ("open", 2 * S, 1)
    assert (row.consecutive, row.window_calls, row.window_failures) == (0, 0, 0)
    # The same move twice: the stream version refuses the second.
    with pytest.raises(lf.ConcurrencyError):
        await move(store, "erp", "open", 3 * S, 1)
    await tally(store, "erp", True, 3 * S)
    await move(store, "erp", "half_open", 4 * S, 2)
    row = await store.resource_state("erp", now_us=4 * S)
    assert row is not None
    assert (row.state, row.transitions, row.consecutive) == ("half_open", 2, 1)  # kept
    await move(store, "erp", "closed", 5 * S, 3)
    row = await store.resource_state("erp", now_us=5 * S)
    assert row is not None
    assert (row.state, row.consecutive, row.probes) == ("closed", 0, 0)
    assert [e.data["state"] for e in await store.read_stream("breaker-erp")] == [
        "open",
        "half_open",
        "closed",
    ]


async def test_half_open_lets_a_bounded_number_of_probes_through(store: BaseEventStore) -> None:
    assert not await store.take_probe("erp", transitions=0, max_probes=1)  # no state
    await move(store, "erp", "open", S, 1)
    assert not await store.take_probe("erp", transitions=1, max_probes=1)  # open
    await move(store, "erp", "half_open", 2 * S, 2)
    assert not await store.take_probe("erp", transitions=1, max_probes=1)  # an old move
    granted = await asyncio.gather(
        *(store.take_probe("erp", transitions=2, max_probes=2) for _ in range(10))
    )
    assert sum(granted) == 2
    row = await store.resource_state("erp", now_us=2 * S)
    assert row is not None
    assert row.probes == 2
    # Half-opening again (the probes were lost with their worker) gives new ones.
    await move(store, "erp", "half_open", 9 * S, 3)
    assert await store.take_probe("erp", transitions=3, max_probes=2)


async def test_a_token_bucket_starts_full_and_refills_at_its_rate(store: BaseEventStore) -> None:
    taken = [await store.take_token("erp", rate=2.0, burst=3, now_us=0) for _ in range(4)]
    assert taken[:3] == [0, 0, 0]
    assert taken[3] == S // 2  # one token every 0.5 s
    assert await store.take_token("erp", rate=2.0, burst=3, now_us=S // 4) == S // 4
    assert await store.take_token("erp", rate=2.0, burst=3, now_us=S // 2) == 0
    # A long quiet spell fills it to its burst, no more.
    got = [await store.take_token("erp", rate=2.0, burst=3, now_us=100 * S) for _ in range(4)]
    assert [g == 0 for g in got] == [True, True, True, False]
    row = await store.resource_state("erp", now_us=100 * S)
    assert row is not None
    assert row.tokens is not None
    assert row.tokens < 1
    assert row.tokens_at_us == 100 * S


async def test_a_take_with_an_older_clock_reading_credits_no_time_twice(
    store: BaseEventStore,
) -> None:
    """A caller's now is read before it waits for the writer, so takes can arrive out
    of order: the bucket's time never goes back, or the same stretch would refill it
    twice (found by a multi-process test: 3 tokens in 1 s from a bucket of 2 at 1/s)."""
    assert await store.take_token("erp", rate=1.0, burst=2, now_us=900_000) == 0
    assert await store.take_token("erp", rate=1.0, burst=2, now_us=0) == 0
    assert await store.take_token("erp", rate=1.0, burst=2, now_us=900_000) == S


async def test_racing_takers_never_get_more_tokens_than_the_bucket_holds(
    store: BaseEventStore,
) -> None:
    results = await asyncio.gather(
        *(store.take_token("erp", rate=1.0, burst=5, now_us=S) for _ in range(20))
    )
    assert results.count(0) == 5


async def test_a_bulkhead_gives_out_at_most_its_permits(store: BaseEventStore) -> None:
    async def take(holder: str, now: int = S, owner: str = "w1") -> bool:
        return await store.acquire_permit(
            "erp", holder, owner=owner, max_concurrent=3, now_us=now, until_us=now + 10 * S
        )

    assert [await take(f"c{i}") for i in range(4)] == [True, True, True, False]
    assert await take("c1")  # a holder keeps its permit
    row = await store.resource_state("erp", now_us=S)
    assert row is not None
    assert row.permits == 3
    # Its outcome recorded, a call's permit is free.
    await store.append("calls-erp", [lf.NewEvent("done")], runtime=[DropPermit("erp", "c0")])
    assert await take("c3")
    # Expired permits (a worker that stopped renewing) do not count...
    assert await take("c4", now=12 * S, owner="w2")
    # ...and renewed ones do.
    assert await store.renew_permits("w2", until_us=100 * S) == 1
    assert await take("c5", now=20 * S)
    assert await take("c6", now=20 * S)
    assert not await take("c7", now=20 * S)
    # A worker stopping gives back what it holds (expired ones may be gone already).
    assert await store.release_permits("w1") >= 2
    assert await take("c7", now=20 * S)
    assert [r.resource for r in await store.list_resources(now_us=20 * S)] == ["erp"]


async def test_racing_callers_never_exceed_the_bulkhead(store: BaseEventStore) -> None:
    granted = await asyncio.gather(
        *(
            store.acquire_permit(
                "erp", f"c{i}", owner="w", max_concurrent=3, now_us=S, until_us=9 * S
            )
            for i in range(12)
        )
    )
    assert sum(granted) == 3


async def test_bad_arguments_are_refused(store: BaseEventStore) -> None:
    with pytest.raises(lf.EventError):
        await store.take_token("erp", rate=0, burst=1, now_us=0)
    with pytest.raises(lf.EventError):
        await store.take_token("", rate=1, burst=1, now_us=0)
    with pytest.raises(lf.EventError):
        await store.acquire_permit("erp", "h", owner="w", max_concurrent=0, now_us=0, until_us=1)
    with pytest.raises(lf.EventError):
        await store.append("x", [lf.NewEvent("e")], runtime=[MoveBreaker("erp", "ajar", 0, 1)])
    with pytest.raises(lf.EventError):
        await store.append("x", [lf.NewEvent("e")], runtime=[Tally("erp", True, 0, 0)])


# -- the bucket's arithmetic -------------------------------------------------------------


@given(
    st.floats(0.01, 1000),
    st.integers(1, 1000),
    st.lists(st.integers(0, 10 * S), min_size=1, max_size=60),
)
def test_a_bucket_never_gives_more_than_its_burst_and_rate_allow(
    rate: float, burst: int, gaps: list[int]
) -> None:
    tokens: float | None = None
    at: int | None = None
    now = 0
    taken = 0
    for gap in gaps:
        now += gap
        level = refill(tokens, at, rate, burst, now)
        assert 0 <= level <= burst
        if level >= 1:
            tokens, at, taken = level - 1, now, taken + 1
        else:
            wait = token_wait_us(level, rate)
            assert refill(level, now, rate, burst, now + wait) >= 1 - 1e-9
    assert taken <= burst + now * rate / S + 1e-6


async def test_a_holder_asking_again_from_another_worker_moves_its_permit_there(
    store: BaseEventStore,
) -> None:
    """A call taken over from a dead worker asks again under the same holder: the
    permit becomes the new worker's, which renews and releases it (found by a kill -9
    test: it stayed in the dead worker's name and expired while the call ran)."""

    async def take(owner: str) -> bool:
        return await store.acquire_permit(
            "erp", "wf-1/2/1", owner=owner, max_concurrent=1, now_us=S, until_us=2 * S
        )

    assert await take("dead")
    assert await take("alive")
    assert await store.renew_permits("dead", until_us=9 * S) == 0
    assert await store.renew_permits("alive", until_us=9 * S) == 1
    assert await store.release_permits("alive") == 1
