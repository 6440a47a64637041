"""Consumers on JetStream: a slow handler's fetched messages are not delivered again
behind its back, and a message that keeps failing backs off and, with
``max_attempts``, is given up with an error line."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator

import pytest

import ledgerflow as lf
from ledgerflow.bus import Delivery, InProcessBus, JetStreamBus

WAIT = 30.0
"""A hang guard, never a speed bound."""


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[JetStreamBus]:
    tag = uuid.uuid4().hex[:10]
    bus = JetStreamBus(nats_url, stream=f"LFTEST_{tag}", subjects=[f"lftest{tag}.>"], timeout=2.0)
    bus.subject_root = f"lftest{tag}"  # type: ignore[attr-defined]
    await bus.open()
    try:
        yield bus
    finally:
        with contextlib.suppress(Exception):  # already gone
            await bus._js.delete_stream(bus.stream)
        await bus.close()


async def _publish(bus: JetStreamBus, count: int) -> None:
    root = bus.subject_root  # type: ignore[attr-defined]
    await bus.publish(
        [
            lf.bus.Message(f"{root}.m", str(uuid.uuid4()), f'{{"n": {n}}}'.encode(), key="k")
            for n in range(count)
        ]
    )


async def test_a_slow_handler_gets_each_fetched_message_once(bus: JetStreamBus) -> None:
    """A consumer fetched 64 messages and said nothing until it had handled each:
    behind a handler slower than ack_wait / 64 the last ones ran out their ack_wait
    and came again, although every call returned. Now the fetched messages not yet
    handled are kept in progress. (A durable made beforehand with a 1 s ack_wait
    stands in for the default 30 s.)"""
    from nats.js import api

    root = bus.subject_root  # type: ignore[attr-defined]
    await bus._js.add_consumer(
        bus.stream,
        api.ConsumerConfig(
            durable_name="slow",
            ack_wait=1.0,
            filter_subject=f"{root}.>",
            ack_policy=api.AckPolicy.EXPLICIT,
        ),
    )
    await _publish(bus, 10)
    calls: collections.Counter[int] = collections.Counter()
    done = asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        calls[delivery.event()["n"]] += 1
        await asyncio.sleep(0.4)  # 10 of them: 4 s, four times the ack_wait
        if len(calls) == 10:
            done.set()

    subscription = await bus.subscribe(f"{root}.>", durable="slow", handler=slow)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(2.5)  # anything delivered again comes by now
    finally:
        await subscription.stop()
    assert calls == dict.fromkeys(range(10), 1)


async def test_a_message_that_keeps_failing_backs_off_and_is_given_up_with_max_attempts(
    bus: JetStreamBus, caplog: pytest.LogCaptureFixture
) -> None:
    """A poison message came twice a second for ever, with a warning each time, and
    ``max_attempts`` gave it up without a word. Now each redelivery waits twice as
    long as the one before (up to 30 s), and the last attempt says it is the last;
    the messages behind it are handled meanwhile."""
    root = bus.subject_root  # type: ignore[attr-defined]
    await _publish(bus, 3)
    attempts: list[tuple[int, int, float]] = []
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    async def poison(delivery: Delivery) -> None:
        n = delivery.event()["n"]
        attempts.append((n, delivery.attempt, loop.time()))
        if n == 0:
            if delivery.attempt == 4:
                done.set()
            raise ValueError("never")

    bus.redelivery_delay = 0.1
    with caplog.at_level(logging.WARNING, logger="ledgerflow.bus"):
        subscription = await bus.subscribe(
            f"{root}.>", durable="poison", handler=poison, max_attempts=4
        )
        try:
            await asyncio.wait_for(done.wait(), WAIT)
            await asyncio.sleep(1.5)  # a fifth attempt would come by now
        finally:
            await subscription.stop()
    mine = [(a, t) for n, a, t in attempts if n == 0]
    assert [a for a, _ in mine] == [1, 2, 3, 4]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(mine)]
    assert gaps[2] > 0.3  # 0.1, 0.2, 0.4 s: doubled each time
    assert [n for n, _, _ in attempts].index(1) < 2  # the others did not wait for it
    said = [r for r in caplog.records if "its last" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.ERROR


async def test_the_in_process_bus_gives_up_the_same_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = InProcessBus(redelivery_delay=0.01)
    attempts: list[int] = []
    done = asyncio.Event()

    async def poison(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 3:
            done.set()
        raise ValueError("never")

    await bus.publish([lf.bus.Message("x.y", "1", b"{}")])
    subscription = await bus.subscribe("x.>", durable="p", handler=poison, max_attempts=3)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(0.2)
    finally:
        await subscription.stop()
    assert attempts == [1, 2, 3]
    assert [r.levelno for r in caplog.records if "its last" in r.getMessage()] == [logging.ERROR]
