"""The event bus: the relay publishes what the ledger holds (in process, and on a real
NATS JetStream), each stream in order, again after a crash without storing twice, and
catches up after the broker was down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow.bus import Delivery, InProcessBus, JetStreamBus, Relay, Route, decode
from ledgerflow.projections import operations
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter
from .conftest import nats_answers

WAIT = 30.0
"""A hang guard, never a speed bound."""
NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server",
    "--", "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip
NATS_STOP = ["start-stop-daemon", "--stop", "--oknodo", "--exec", "/usr/sbin/nats-server"]


@dataclass(frozen=True)
class Placed:
    n: int


@dataclass(frozen=True)
class Internal:
    n: int


def _registry() -> lf.EventRegistry:
    registry = lf.EventRegistry()
    registry.register(Placed, "shop.placed")
    registry.register(Internal, "shop.internal")
    return registry


@pytest.fixture
async def ledger(store_url: str) -> AsyncIterator[BaseEventStore]:
    async with open_adapter(store_url, registry=_registry()) as store:
        yield store


@pytest.fixture(params=["one by one", "pipelined"])
async def jetstream(nats_url: str, request: pytest.FixtureRequest) -> AsyncIterator[JetStreamBus]:
    """A JetStream bus on a stream of this test's own (deleted afterwards), publishing
    each ledger stream one acknowledgement at a time, or pipelined."""
    tag = uuid.uuid4().hex[:10]
    bus = JetStreamBus(
        nats_url,
        stream=f"LFTEST_{tag}",
        subjects=[f"lftest{tag}.>"],
        timeout=2.0,
        pipelined=request.param == "pipelined",
    )
    bus.subject_root = f"lftest{tag}"  # type: ignore[attr-defined]
    await bus.open()
    try:
        yield bus
    finally:
        js = bus._js
        await bus.close()
        import nats

        nc = await nats.connect(nats_url)
        with contextlib.suppress(Exception):  # already gone
            await nc.jetstream().delete_stream(f"LFTEST_{tag}")
        await nc.close()
        del js


async def _service(command: list[str]) -> None:
    """Stop or start the machine's NATS service (as .ci/run starts it)."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()


async def _write(store: lf.store.WorkflowStore, streams: int, each: int) -> None:
    for n in range(each):
        for s in range(streams):
            await store.append(f"order-{s}", [Placed(n), Internal(n)])


def _route(root: str = "ledgerflow") -> Route:
    return Route(subject=root + ".{category}.{type}", types={"shop.placed"})


async def test_the_relay_publishes_what_the_routes_select_each_stream_in_order(
    ledger: BaseEventStore,
) -> None:
    await _write(ledger, streams=3, each=4)
    bus = InProcessBus()
    relay = Relay(ledger, bus, [_route()], batch_size=5)
    assert await relay.catch_up() == 12
    bodies = [decode(m) for m in bus.messages]
    assert {m.subject for m in bus.messages} == {"ledgerflow.order.shop.placed"}
    for s in range(3):
        mine = [b["data"]["n"] for b in bodies if b["stream"] == f"order-{s}"]
        assert mine == [0, 1, 2, 3]
    assert all(m.id == b["id"] for m, b in zip(bus.messages, bodies, strict=True))
    row = await ledger.projection_row("relay_main")
    assert row is not None
    assert row.position == await ledger.head_position()
    assert await relay.catch_up() == 0  # nothing new: nothing published again
    assert len(bus.messages) == 12


async def test_a_crash_between_publish_and_checkpoint_publishes_again_stores_once(
    ledger: BaseEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _write(ledger, streams=2, each=3)
    bus = InProcessBus()
    published: list[list[bool]] = []
    publish = bus.publish

    async def counting(messages: Any) -> list[bool]:
        found = await publish(messages)
        published.append(found)
        return found

    monkeypatch.setattr(bus, "publish", counting)
    relay = Relay(ledger, bus, [_route()])
    project = ledger.project
    calls = {"n": 0}

    async def dies_once(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise lf.StoreUnavailableError("sqlite", "the relay died before its checkpoint")
        await project(*args, **kwargs)

    monkeypatch.setattr(ledger, "project", dies_once)
    with pytest.raises(lf.StoreUnavailableError):
        await relay.catch_up()
    assert await relay.catch_up() == 6
    assert published == [[False] * 6, [True] * 6]  # the second time: all duplicates
    assert len(bus.messages) == 6


async def test_the_relay_on_jetstream_delivers_each_event_once_in_order(
    ledger: BaseEventStore, jetstream: JetStreamBus
) -> None:
    root = jetstream.subject_root  # type: ignore[attr-defined]
    await _write(ledger, streams=4, each=25)
    relay = Relay(ledger, jetstream, [_route(root)], batch_size=40)
    assert await relay.catch_up() == 100
    # Published again (a relay that crashed before its checkpoint): nothing stored twice.
    messages = [relay._message(e) for e in await ledger.read_all()]
    again = await jetstream.publish([m for m in messages if m is not None])
    assert all(again)
    seen: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def consume(delivery: Delivery) -> None:
        seen.append(delivery.event())
        if len(seen) == 100:
            done.set()

    subscription = await jetstream.subscribe(f"{root}.>", durable="readers", handler=consume)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(0.3)  # anything more would be a duplicate
    finally:
        await subscription.stop()
    assert len(seen) == 100
    assert len({e["id"] for e in seen}) == 100
    for s in range(4):
        assert [e["data"]["n"] for e in seen if e["stream"] == f"order-{s}"] == list(range(25))


async def test_an_event_too_big_for_the_broker_stops_the_relay_there(
    ledger: BaseEventStore, jetstream: JetStreamBus
) -> None:
    """An event the ledger takes whose message is over the server's max_payload:
    the relay retried it for ever, behind it every later event waited, and each
    retry published the batch's earlier messages again. Now what comes before it is
    published, the relay stops at it with the failure recorded (as a projection
    stops at an event its handler fails on), and skipping it goes on."""
    root = jetstream.subject_root  # type: ignore[attr-defined]
    route = Route(subject=root + ".{category}.{type}", types={"shop.placed", "shop.note"})
    limit = jetstream.max_message_bytes
    assert limit is not None
    await ledger.append("order-1", [Placed(1)])
    big = lf.NewEvent("shop.note", {"text": "x" * (limit - 200)})
    refused = await ledger.append("order-2", [big])
    await ledger.append("order-3", [Placed(3)])
    relay = Relay(ledger, jetstream, [route], batch_size=40)
    assert await relay.catch_up() == 1
    assert await relay.catch_up() == 0  # stopped there, not retrying
    row = await ledger.projection_row("relay_main")
    assert row is not None
    assert row.failure is not None
    assert row.failure.position == refused.positions[0]
    assert row.failure.error_type == "MessageTooLargeError"
    assert f"at most {limit}" in row.failure.message
    assert await ledger.skip_projection("relay_main", refused.positions[0])
    assert await relay.catch_up() == 1
    info = await jetstream._js.stream_info(jetstream.stream)
    assert info.state.messages == 2  # order-1 and order-3, each once


async def test_a_stream_that_exists_is_used_as_it_is_or_refused(nats_url: str) -> None:
    """The bus rewrote an existing stream to its own settings: another publisher's
    subjects were dropped from it (its publishes then failed), and two relays with
    different subjects took the stream from each other. Now a stream that takes the
    bus's subjects is used unchanged, and one that does not is refused, saying so."""
    import nats

    tag = uuid.uuid4().hex[:10]
    name = f"LFTEST_{tag}"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.add_stream(name=name, subjects=[f"billing{tag}.>"], max_age=3600)
        refused = JetStreamBus(nats_url, stream=name, subjects=[f"lftest{tag}.>"], timeout=2.0)
        with pytest.raises(lf.ConfigurationError, match=f"billing{tag}"):
            await refused.open()
        await refused.close()
        await js.update_stream(
            name=name, subjects=[f"billing{tag}.>", f"lftest{tag}.>"], max_age=3600
        )
        shared = JetStreamBus(nats_url, stream=name, subjects=[f"lftest{tag}.>"], timeout=2.0)
        await shared.open()
        await shared.close()
        config = (await js.stream_info(name)).config
        assert config.subjects == [f"billing{tag}.>", f"lftest{tag}.>"]  # unchanged
        assert config.max_age == 3600
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
        await nc.close()


async def test_the_bus_notices_a_server_that_vanished_within_40_s(nats_url: str) -> None:
    """A server gone without closing the connection (a cut path, a host powered off)
    was noticed by nats-py's defaults only after two pings two minutes apart went
    unanswered: consumers stood still for up to six minutes before reconnecting."""
    bus = JetStreamBus(
        nats_url, stream=f"LFTEST_{uuid.uuid4().hex[:10]}", subjects=["lfping.>"], timeout=2.0
    )
    await bus.open()
    try:
        assert bus._nc is not None
        options = bus._nc.options
        assert options["ping_interval"] * (options["max_outstanding_pings"] + 1) <= 40
    finally:
        with contextlib.suppress(Exception):
            await bus._js.delete_stream(bus.stream)
        await bus.close()


async def test_a_stream_gone_from_the_broker_is_made_again(
    ledger: BaseEventStore, jetstream: JetStreamBus
) -> None:
    """The broker came back without the stream (empty storage, or deleted): the
    relay retried for ever without it. The bus makes it again."""
    root = jetstream.subject_root  # type: ignore[attr-defined]
    relay = Relay(ledger, jetstream, [_route(root)], batch_size=40)
    await _write(ledger, streams=1, each=2)
    assert await relay.catch_up() == 2
    await jetstream._js.delete_stream(jetstream.stream)
    await _write(ledger, streams=1, each=1)
    with contextlib.suppress(lf.BusUnavailableError):
        await relay.catch_up()  # finds the stream gone, and makes it again
    assert await relay.catch_up() == 1
    info = await jetstream._js.stream_info(jetstream.stream)
    assert info.state.messages == 1


async def test_a_relay_is_not_rebuilt(ledger: BaseEventStore) -> None:
    """`projections rebuild relay_main` was accepted and never carried out: its
    status showed a rebuild under way for ever. A relay keeps no read model."""
    from ledgerflow.projections import operations

    relay = Relay(ledger, InProcessBus(), [_route()])
    await _write(ledger, streams=1, each=1)
    await relay.catch_up()
    with pytest.raises(lf.ProjectionNotFailedError, match="no read model"):
        await operations.rebuild(ledger, "relay_main", reason="try")
    row = await ledger.projection_row("relay_main")
    assert row is not None
    assert row.rebuild is None


async def test_a_consumer_gets_a_message_again_when_its_handler_fails(
    jetstream: JetStreamBus, caplog: pytest.LogCaptureFixture
) -> None:
    root = jetstream.subject_root  # type: ignore[attr-defined]
    message = lf.bus.Message(f"{root}.x.y", str(uuid.uuid4()), b'{"n": 1}', key="s")
    await jetstream.publish([message])
    attempts: list[int] = []
    done = asyncio.Event()

    async def flaky(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise RuntimeError("not yet")
        done.set()

    jetstream.redelivery_delay = 0.05
    subscription = await jetstream.subscribe(f"{root}.>", durable="flaky", handler=flaky)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
    finally:
        await subscription.stop()
    assert attempts == [1, 2, 3]
    # Each failure says why (the log named the message only).
    said = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert said
    assert all("RuntimeError: not yet" in m for m in said), said


async def _stored(bus: JetStreamBus, subject: str, count: int) -> list[lf.bus.Message]:
    """The messages the stream holds on ``subject``, in the stream's order (all of
    them: ``count`` are expected, and a pause after shows there are no more)."""
    got: list[lf.bus.Message] = []
    done = asyncio.Event()

    async def keep(delivery: Delivery) -> None:
        got.append(delivery.message)
        if len(got) >= count:
            done.set()

    subscription = await bus.subscribe(subject, durable=f"r{uuid.uuid4().hex[:8]}", handler=keep)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(0.2)  # anything more would be a duplicate
    finally:
        await subscription.stop()
    return got


def _publisher(bus: JetStreamBus) -> Any:
    return bus._pub


def _chains(root: str, chains: int, each: int) -> list[lf.bus.Message]:
    """``chains`` keys' messages interleaved, each key's numbered in order."""
    return [
        lf.bus.Message(f"{root}.c{c}", str(uuid.uuid4()), f"{n}".encode(), key=f"{root}{c}")
        for n in range(each)
        for c in range(chains)
    ]


def _in_order(stored: list[lf.bus.Message], sent: list[lf.bus.Message]) -> None:
    """Each sent message stored once, and each key's in the order sent."""
    assert sorted(m.id for m in stored) == sorted(m.id for m in sent)
    for key in {m.key for m in sent}:
        ids = [m.id for m in sent if m.key == key]
        order = {i: n for n, i in enumerate(ids)}
        assert [order[m.id] for m in stored if m.id in order] == list(range(len(ids)))


async def test_a_pipelined_batch_cut_short_goes_on_one_at_a_time_in_order(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher connection closes a third of the way into a batch (a broken
    socket): the server stored a prefix of each key's messages, the rest go one at a
    time on the main connection, nothing is stored twice or out of order, and the
    next batch pipelines again on a new publisher connection."""
    tag = uuid.uuid4().hex[:10]
    bus = JetStreamBus(nats_url, stream=f"LFTEST_{tag}", subjects=[f"lftest{tag}.>"], timeout=2.0)
    await bus.open()
    try:
        first = _chains(f"lftest{tag}", chains=3, each=10)
        assert await bus.publish(first) == [False] * 30  # makes the publisher connection
        publisher = bus._pub
        real_publish = publisher.publish
        sent = [0]

        async def breaks(*args: Any, **kwargs: Any) -> None:
            sent[0] += 1
            if sent[0] == 20:
                await publisher.close()  # what it had buffered goes out first, in order
            await real_publish(*args, **kwargs)

        monkeypatch.setattr(publisher, "publish", breaks)
        cut = _chains(f"lftest{tag}", chains=3, each=20)
        again = first[:5]  # stored already: the server says so
        held = await bus.publish(cut + again)
        # What went out before the cut may be stored with its acknowledgement lost:
        # the server then says it held it already, as the port allows.
        assert held[19:] == [False] * 41 + [True] * 5
        assert sent[0] == 20
        assert bus._pub is None  # the broken connection is not used again
        last = _chains(f"lftest{tag}", chains=2, each=5)
        assert await bus.publish(last) == [False] * 10
        renewed = _publisher(bus)  # a function: mypy keeps no narrowing across it
        assert renewed is not None
        assert renewed is not publisher
        stored = await _stored(bus, f"lftest{tag}.>", 100)
        _in_order(stored, first + cut + last)
    finally:
        await bus.close()
        import nats

        nc = await nats.connect(nats_url)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"LFTEST_{tag}")
        await nc.close()


async def test_concurrent_publishes_share_the_bus_and_keep_each_keys_order(
    jetstream: JetStreamBus,
) -> None:
    """A relay and steps publish on one bus at once: each call's messages are stored
    once, each key's in order, over one publisher connection when pipelining."""
    root = jetstream.subject_root  # type: ignore[attr-defined]
    calls = [_chains(f"{root}.p{p}", chains=3, each=30) for p in range(4)]
    results = await asyncio.gather(*(jetstream.publish(c) for c in calls))
    assert results == [[False] * 90] * 4
    if jetstream.pipelined:
        assert _publisher(jetstream) is not None
    _in_order(await _stored(jetstream, f"{root}.>", 360), [m for c in calls for m in c])


async def test_a_message_no_stream_takes_fails_the_batch_and_loses_no_other(
    jetstream: JetStreamBus,
) -> None:
    """A subject outside the stream (a route the stream does not cover): publishing
    fails with ``BusUnavailableError`` naming why, so the relay stops there and
    retries instead of moving its checkpoint past it; the other keys' messages are
    stored, in order."""
    root = jetstream.subject_root  # type: ignore[attr-defined]
    good = _chains(root, chains=2, each=5)
    stray = lf.bus.Message("elsewhere.x", str(uuid.uuid4()), b"{}", key="k-stray")
    with pytest.raises(lf.BusUnavailableError, match="publish failed"):
        await jetstream.publish([*good[:4], stray, *good[4:]])
    _in_order(await _stored(jetstream, f"{root}.>", 10), good)


@pytest.mark.skipif(os.geteuid() != 0, reason="stopping the NATS service needs root")
async def test_the_relay_waits_out_a_broker_outage_and_catches_up(
    ledger: BaseEventStore, jetstream: JetStreamBus
) -> None:
    root = jetstream.subject_root  # type: ignore[attr-defined]
    relay = Relay(ledger, jetstream, [_route(root)], batch_size=20, poll_interval=0.05)
    relay.start()
    try:
        await _write(ledger, streams=2, each=10)
        await _service(NATS_STOP)
        try:
            await _write(ledger, streams=2, each=20)  # the ledger takes writes regardless
            await asyncio.sleep(1.0)  # the relay meets the outage, and backs off
            (during,) = await operations.status(ledger, "relay_main")
            assert during.behind > 0  # its lag shows
        finally:
            await _service(NATS_START)
            deadline = time.monotonic() + WAIT
            while not nats_answers():
                assert time.monotonic() < deadline, "NATS did not come back"
                await asyncio.sleep(0.1)
        async with asyncio.timeout(WAIT):
            while True:
                row = await ledger.projection_row("relay_main")
                if row is not None and row.position >= await ledger.head_position():
                    break
                await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    seen: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def consume(delivery: Delivery) -> None:
        seen.append(delivery.event())
        if len(seen) >= 60:
            done.set()

    subscription = await jetstream.subscribe(f"{root}.>", durable="after", handler=consume)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
        await asyncio.sleep(0.3)
    finally:
        await subscription.stop()
    assert len(seen) == 60  # 2 streams x 30 placed events, none lost, none twice
    for s in range(2):
        assert [e["data"]["n"] for e in seen if e["stream"] == f"order-{s}"] == [
            *range(10),
            *range(20),
        ]


# -- messages drive processes here -------------------------------------------------------


@lf.workflow(name="bus.checkout")
async def checkout(ctx: lf.WorkflowContext, order: str) -> Any:
    paid = await ctx.wait_for_signal("paid", dict)
    return {"order": order, "paid": paid}


def _event_message(subject: str, stream: str, data: dict[str, Any]) -> lf.bus.Message:
    import msgspec

    event_id = str(uuid.uuid4())
    body = {"id": event_id, "stream": stream, "version": 1, "position": 1, "type": "x",
            "schema_version": 1, "recorded_at": "", "data": data, "metadata": {}}  # fmt: skip
    return lf.bus.Message(subject, event_id, msgspec.json.encode(body), key=stream)


async def test_messages_start_and_signal_workflows_once_each(engine: Any) -> None:
    bus = InProcessBus()
    async with engine(checkout) as running:
        triggers = lf.bus.Triggers(running, bus)
        await triggers.start(
            "billing.order.created", checkout, id=lambda e: e["stream"], input=lambda e: e["stream"]
        )
        await triggers.signal(
            "billing.order.paid", "paid", workflow_id=lambda e: e["data"]["order"]
        )
        created = _event_message("billing.order.created", "o-77", {})
        paid = _event_message("billing.order.paid", "pay-1", {"order": "o-77", "cents": 500})
        # The signal may be handled first: it is delivered again until o-77 exists.
        await bus.publish([paid, created])
        async with asyncio.timeout(WAIT):
            while True:
                if await running.store.get_instance("o-77") is not None:
                    break
                await asyncio.sleep(0.01)
        result = await running.handle("o-77").result(timeout=WAIT)
        assert result == {"order": "o-77", "paid": {"order": "o-77", "cents": 500}}
        await triggers.stop()
        # The same signal sent twice with one id (a message delivered again): recorded once.
        started = await running.start(checkout, "o-78", id="o-78")
        for _ in range(2):
            await running.signal("o-78", "paid", {"n": 1}, id="message-123")
        assert await started.result(timeout=WAIT) == {"order": "o-78", "paid": {"n": 1}}
        signals = [e for e in await running.history("o-78") if e.type == "wf.signal"]
        assert len(signals) == 1


async def test_an_inbox_applies_a_message_once_however_often_it_comes(
    ledger: BaseEventStore,
) -> None:
    totals = lf.Table("totals", key="customer", columns={"customer": str, "cents": int})

    async def add(delivery: Delivery, view: lf.View) -> None:
        data = delivery.event()["data"]
        row = await view.get(totals, data["customer"])
        cents = (row["cents"] if row else 0) + data["cents"]
        view.put(totals, {"customer": data["customer"], "cents": cents})

    inbox = lf.bus.Inbox(ledger, "billing", tables=[totals], handle=add)
    await inbox.open()
    first = _event_message("x.paid", "p-1", {"customer": "acme", "cents": 500})
    second = _event_message("x.paid", "p-2", {"customer": "acme", "cents": 70})
    for message in (first, first, second, first, second):  # redeliveries
        await inbox(Delivery(message, 1))
    model = lf.ReadModel(ledger, inbox.projection)
    assert await model.get(totals, "acme") == {"customer": "acme", "cents": 570}
    assert await ledger.consumed("billing", first.id)
    assert not await ledger.consumed("billing", "never")

    async def broken(delivery: Delivery, view: lf.View) -> None:
        view.put(totals, {"customer": "zed", "cents": 1})
        raise RuntimeError("fails after writing")

    failing = lf.bus.Inbox(ledger, "billing", tables=[totals], handle=broken)
    third = _event_message("x.paid", "p-3", {"customer": "zed", "cents": 1})
    with pytest.raises(RuntimeError):
        await failing(Delivery(third, 1))
    assert await model.get(totals, "zed") is None  # nothing of it committed
    assert not await ledger.consumed("billing", third.id)  # so it comes again
    rows = await ledger.list_projections()
    assert "billing" not in [r.name for r in rows]  # an inbox has no checkpoint to list


async def test_a_step_publishes_once_however_often_it_runs(engine: Any) -> None:
    bus = InProcessBus()
    runs = {"n": 0}

    @lf.step(name="notify", retry=lf.RetryPolicy(max_attempts=3, initial_interval=0.001))
    async def notify(order: str) -> None:
        runs["n"] += 1
        await bus.publish([lf.bus.step_message("warehouse.pick", {"order": order})])
        if runs["n"] < 3:
            raise ConnectionError("the reply got lost after publishing")

    @lf.workflow(name="bus.notifying")
    async def notifying(ctx: lf.WorkflowContext, order: str) -> None:
        await ctx.step(notify, order)

    async with engine(notifying) as running:
        await (await running.start(notifying, "o-1", id="n-1")).result(timeout=WAIT)
    assert runs["n"] == 3
    assert len(bus.messages) == 1  # three attempts, one message
    assert bus.messages[0].id.startswith("n-1/")


async def test_the_relay_command_runs_until_told_to_stop(tmp_path: Any, nats_url: str) -> None:
    import signal

    from ._workers import CLI, child_env

    db = f"sqlite:///{tmp_path / 'relay.db'}"
    async with lf.open_store(db, registry=_registry()) as store:
        await _write(store, streams=3, each=5)
        head = await store.head_position()
    tag = uuid.uuid4().hex[:8]
    process = await asyncio.create_subprocess_exec(
        *CLI, "relay", "--db", db, "--nats", nats_url, "--stream", f"LFCLI_{tag}",
        "--subject", f"lfcli{tag}.{{category}}.{{type}}", "--type", "shop.placed",
        env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with lf.open_store(db, registry=_registry()) as store, asyncio.timeout(WAIT):
            while True:
                row = await store.projection_row("relay_main")
                if row is not None and row.position >= head:
                    break
                await asyncio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == 0, output.decode()
    import nats

    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(f"LFCLI_{tag}")
        assert info.state.messages == 15  # the 15 placed events, not the noise
        await nc.jetstream().delete_stream(f"LFCLI_{tag}")
    finally:
        await nc.close()
    missing = await asyncio.create_subprocess_exec(
        *CLI, "relay", "--db", db, env={**child_env(), "LEDGERFLOW_NATS": ""},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await missing.communicate()
    assert missing.returncode == 2
    assert b"--nats" in err
    # A stream it cannot use: said once, exit 2 (it ran on silently, publishing
    # nothing, and its error came out only at SIGTERM, with exit 0).
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().add_stream(name=f"LFCLI_{tag}", subjects=[f"other{tag}.>"])
        clash = await asyncio.create_subprocess_exec(
            *CLI, "relay", "--db", db, "--nats", nats_url, "--stream", f"LFCLI_{tag}",
            "--subject", f"lfcli{tag}.{{category}}.{{type}}",
            env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(clash.communicate(), WAIT)
        assert clash.returncode == 2, err.decode()
        assert f"other{tag}" in err.decode()
        assert "Traceback" not in err.decode()
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"LFCLI_{tag}")
        await nc.close()


def test_a_route_with_a_wrong_subject_template_is_refused_at_once() -> None:
    with pytest.raises(lf.ConfigurationError, match="may be filled in"):
        Route(subject="orders.{order_id}")
    with pytest.raises(lf.ConfigurationError, match="no NATS subject"):
        Route(subject="orders.>.{type}")
    with pytest.raises(lf.ConfigurationError, match="routes"):
        Relay(None, InProcessBus(), [])  # type: ignore[arg-type]


async def test_a_relay_whose_broker_is_down_shows_its_lag_and_says_so_once(
    tmp_path: Any,
) -> None:
    """It used to wait for the broker before anything else: no row, so no lag in
    `projections list` or the metrics (the lag alert could not fire), and a warning
    four times a second."""
    import signal
    import socket
    import urllib.request

    from ._workers import CLI, child_env

    db = f"sqlite:///{tmp_path / 'relay.db'}"
    async with lf.open_store(db, registry=_registry()) as store:
        await _write(store, streams=2, each=3)
        head = await store.head_position()
    ports = []
    for _ in range(2):  # one nobody listens on (the broker), one for the metrics
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    broker, metrics_port = ports
    process = await asyncio.create_subprocess_exec(
        *CLI, "relay", "--db", db, "--nats", f"nats://127.0.0.1:{broker}",
        "--metrics-port", str(metrics_port),
        env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lag = f'ledgerflow_projection_lag_events{{projection="relay_main"}} {float(head)}'

    def scrape() -> str:
        try:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return str(answer.read().decode())
        except OSError:
            return ""

    try:
        async with lf.open_store(db, registry=_registry()) as store, asyncio.timeout(WAIT):
            while True:
                row = await store.projection_row("relay_main")
                if row is not None and lag in await asyncio.to_thread(scrape):
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # the client retries 4 times a second meanwhile
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), WAIT)
    text = output.decode()
    assert process.returncode == 0, text
    # Said once, not four times a second: the broker's client (which retries on its
    # own) and the relay's runner (which backs off while batches fail, though its
    # claims succeed).
    assert text.count("(retrying)") <= 2, text
    assert text.count("; retrying") <= 6, text


def test_a_relay_name_too_long_is_refused_before_anything_starts(tmp_path: Any) -> None:
    import subprocess

    from ._workers import CLI, child_env

    def relay(*given: str) -> subprocess.CompletedProcess[str]:
        db = f"sqlite:///{tmp_path / 'r.db'}"
        return subprocess.run(
            [*CLI, "relay", "--db", db, "--nats", "nats://x:1", *given],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    result = relay("--name", "a_relay_name_far_too_long")
    assert result.returncode == 2
    assert "at most 18 characters" in result.stderr
    assert "Traceback" not in result.stderr
    # A wrong --subject is named as such (it was reported as a --name problem).
    result = relay("--subject", "ledgerflow.{order}")
    assert result.returncode == 2
    assert "--subject 'ledgerflow.{order}'" in result.stderr
    assert "--name" not in result.stderr


def test_a_relay_on_a_mistyped_url_creates_no_ledger(tmp_path: Any) -> None:
    """It made an empty ledger there and ran on, publishing nothing, where every other
    command said `no ledger at ...` and exited 2."""
    import subprocess

    from ._workers import CLI, child_env

    target = tmp_path / "typo.db"
    result = subprocess.run(
        [*CLI, "relay", "--db", f"sqlite:///{target}", "--nats", "nats://x:1"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 2, result.stderr
    assert "no ledger at" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()


async def test_no_route_publishes_the_servers_api_keys(tmp_path: Any) -> None:
    from ledgerflow.bus.relay import PRIVATE_STREAMS
    from ledgerflow.server.keys import KEY_STREAM, ApiKeys
    from ledgerflow.server.principals import Role

    assert KEY_STREAM in PRIVATE_STREAMS
    bus = InProcessBus()
    async with lf.open_store(f"sqlite:///{tmp_path / 'k.db'}") as store:
        await ApiKeys(store).create("ops", Role.OPERATOR, "acme", by="admin")
        await store.append("order-1", [lf.NewEvent("shop.placed")])
        await Relay(store, bus, [Route()], name="all").catch_up()  # every type
    assert [m.headers["Ledgerflow-Type"] for m in bus.messages] == ["shop.placed"]
