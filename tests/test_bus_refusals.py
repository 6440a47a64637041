"""What JetStream refuses: a message over the stream's own size limit stops the relay
at its event (in order, with the failure recorded), a stream name or subject it can
never take is said at once, and header values that a NATS header line cannot hold
go through percent-encoded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow.bus import Delivery, JetStreamBus, Message, Relay, Route
from ledgerflow.projections import operations
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter

WAIT = 30.0
"""A hang guard, never a speed bound."""
LIMIT = 2000
"""The stream's max_msg_size: far below the server's max_payload."""


@pytest.fixture
async def ledger() -> AsyncIterator[BaseEventStore]:
    async with open_adapter("memory://", registry=lf.EventRegistry()) as store:
        yield store


@pytest.fixture(params=["one by one", "pipelined"])
async def limited(nats_url: str, request: pytest.FixtureRequest) -> AsyncIterator[JetStreamBus]:
    """A bus on a stream of this test's own that its owner made with a
    ``max_msg_size`` (used as it is), deleted afterwards."""
    import nats
    from nats.js import api

    tag = uuid.uuid4().hex[:10]
    name = f"LFTEST_{tag}"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        api.StreamConfig(name=name, subjects=[f"lftest{tag}.>"], max_msg_size=LIMIT)
    )
    bus = JetStreamBus(
        nats_url,
        stream=name,
        subjects=[f"lftest{tag}.>"],
        timeout=2.0,
        pipelined=request.param == "pipelined",
    )
    bus.subject_root = f"lftest{tag}"  # type: ignore[attr-defined]
    try:
        await bus.open()
        yield bus
    finally:
        await bus.close()
        with contextlib.suppress(Exception):  # already gone
            await js.delete_stream(name)
        await nc.close()


async def _stored(bus: JetStreamBus) -> list[tuple[str, int]]:
    """(ledger stream, version) of every message the stream holds, in its order."""
    info = await bus._js.stream_info(bus.stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):  # a deleted sequence
            body = lf.bus.decode(Message("", "", (await bus._js.get_msg(bus.stream, seq)).data))
            found.append((body["stream"], body["version"]))
    return found


async def _set_limit(bus: JetStreamBus, size: int) -> None:
    """The stream's owner changes its max_msg_size behind the bus's back."""
    config = (await bus._js.stream_info(bus.stream)).config
    config.max_msg_size = size
    await bus._js.update_stream(config)


def _note(text: str) -> lf.NewEvent:
    return lf.NewEvent("shop.note", {"text": text})


async def test_a_message_over_the_streams_own_limit_stops_the_relay_there_in_order(
    ledger: BaseEventStore, limited: JetStreamBus
) -> None:
    """The relay checked the server's max_payload only: pipelined, the stream refused
    v2 and stored v3 before it, and the relay retried v2 for ever with no failure
    recorded (so `skip` refused). Now it stops at v2 with the failure recorded,
    v3 is not published before it, and a retry once the limit is raised publishes
    v2 then v3."""
    root = limited.subject_root  # type: ignore[attr-defined]
    assert limited.max_message_bytes is not None
    assert limited.max_message_bytes < LIMIT
    await ledger.append("lim-1", [_note("small")])
    refused = await ledger.append("lim-1", [_note("x" * 5000)])
    await ledger.append("lim-1", [_note("after")])
    await ledger.append("other-1", [_note("another stream")])
    relay = Relay(
        ledger, limited, [Route(subject=root + ".{category}.{type}", types={"shop.note"})]
    )
    await asyncio.wait_for(relay.catch_up(), WAIT)
    row = await ledger.projection_row("relay_main")
    assert row is not None
    assert row.failure is not None
    assert row.failure.position == refused.positions[0]
    assert row.failure.error_type == "MessageTooLargeError"
    assert "max_msg_size" in row.failure.message
    assert await _stored(limited) == [("lim-1", 1)]
    await _set_limit(limited, 8000)
    await operations.retry(ledger, "relay_main", reason="stream limit raised")
    await asyncio.wait_for(relay.catch_up(), WAIT)
    stored = await _stored(limited)
    assert [v for s, v in stored if s == "lim-1"] == [1, 2, 3]
    assert sorted(stored) == [("lim-1", 1), ("lim-1", 2), ("lim-1", 3), ("other-1", 1)]


async def test_a_limit_lowered_behind_the_bus_is_a_failure_at_that_event_not_a_retry(
    ledger: BaseEventStore, limited: JetStreamBus, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's limit is lowered after the bus read it: the server refuses a
    message the relay's check let through. The relay records the failure there (it
    retried for ever); the bus reads the new limit, so a skip goes on. One by one,
    nothing after the refused message of its ledger stream is stored; pipelined, what
    was sent after it may be, and an error line says so."""
    root = limited.subject_root  # type: ignore[attr-defined]
    await ledger.append("lim-1", [_note("small")])
    refused = await ledger.append("lim-1", [_note("x" * 1500)])
    await ledger.append("lim-1", [_note("after")])
    await ledger.append("other-1", [_note("another stream")])
    await _set_limit(limited, 1000)
    relay = Relay(
        ledger, limited, [Route(subject=root + ".{category}.{type}", types={"shop.note"})]
    )
    with caplog.at_level(logging.ERROR, logger="ledgerflow.bus"):
        await asyncio.wait_for(relay.catch_up(), WAIT)
    row = await ledger.projection_row("relay_main")
    assert row is not None
    assert row.failure is not None
    assert row.failure.position == refused.positions[0]
    assert row.failure.error_type == "MessageTooLargeError"
    assert limited.max_message_bytes is not None
    assert limited.max_message_bytes < 1000  # read again
    stored = sorted(await _stored(limited))
    if limited.pipelined and ("lim-1", 3) in stored:
        assert stored == [("lim-1", 1), ("lim-1", 3), ("other-1", 1)]
        assert any("stored before an earlier one" in r.getMessage() for r in caplog.records)
    else:
        assert stored == [("lim-1", 1), ("other-1", 1)]
    await operations.skip(ledger, "relay_main", reason="too big", position=refused.positions[0])
    await asyncio.wait_for(relay.catch_up(), WAIT)
    assert sorted(await _stored(limited)) == [("lim-1", 1), ("lim-1", 3), ("other-1", 1)]


async def test_the_bus_sends_nothing_of_a_key_from_a_message_over_the_limit_on(
    limited: JetStreamBus,
) -> None:
    """Publishing on the bus directly (a step's message): a message over the limit
    it knows and every later one of its key are not sent; the other keys' are
    stored, and the error names the refused message."""
    from ledgerflow.bus.port import MessageTooLargeError

    root = limited.subject_root  # type: ignore[attr-defined]

    def message(key: str, n: int, size: int = 10) -> Message:
        body = json.dumps({"stream": key, "version": n, "pad": "x" * size}).encode()
        return Message(f"{root}.m", str(uuid.uuid4()), body, key=key)

    batch = [message("a", 1), message("a", 2, 5000), message("b", 1), message("a", 3)]
    with pytest.raises(MessageTooLargeError) as caught:
        await limited.publish(batch)
    assert caught.value.message_id == batch[1].id
    assert sorted(await _stored(limited)) == [("a", 1), ("b", 1)]


@pytest.mark.parametrize(
    ("stream", "subjects"),
    [
        ("BAD NAME", ["ok.>"]),
        ("dotted.name", ["ok.>"]),
        ("", ["ok.>"]),
        ("GOOD", [".>"]),
        ("GOOD", [">"]),
        ("GOOD", ["a..b"]),
        ("GOOD", ["a.>.b"]),
        ("GOOD", ["a b.>"]),
    ],
)
def test_a_stream_name_or_subject_jetstream_never_takes_is_refused_at_once(
    stream: str, subjects: list[str]
) -> None:
    """nats-py's ValueError (a name with a space or a dot) and the server's refusal
    (subjects '.>') were taken for a broker that is down: retried for ever."""
    with pytest.raises(lf.ConfigurationError):
        JetStreamBus("nats://127.0.0.1:1", stream=stream, subjects=subjects)


ODD = ["odd-é", "odd-😀", "odd-a\r\nX-Evil: 1", "odd-100%", "odd-a\tb", "odd-plain"]


@pytest.mark.parametrize("value", ODD)
def test_a_header_value_round_trips(value: str) -> None:
    from ledgerflow.bus.port import header_text, header_value

    wire = header_value(value)
    assert wire.isascii()
    assert wire.isprintable()
    assert header_text(wire) == value


async def test_odd_stream_ids_reach_consumers_as_they_are(
    ledger: BaseEventStore, limited: JetStreamBus
) -> None:
    """The Ledgerflow-Stream header carried the stream id raw: non-ASCII arrived as an
    email.header.Header object, CR/LF as 'odd-a  X-Evil: 1'. Now the header is
    percent-encoded on the wire and a JetStreamBus consumer decodes it."""
    root = limited.subject_root  # type: ignore[attr-defined]
    for stream in ODD:
        await ledger.append(stream, [_note("n")])
    relay = Relay(
        ledger, limited, [Route(subject=root + ".{category}.{type}", types={"shop.note"})]
    )
    assert await asyncio.wait_for(relay.catch_up(), WAIT) == len(ODD)
    got: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def keep(delivery: Delivery) -> None:
        got.append(dict(delivery.message.headers))
        if len(got) == len(ODD):
            done.set()

    subscription = await limited.subscribe(f"{root}.>", durable="odd", handler=keep)
    try:
        await asyncio.wait_for(done.wait(), WAIT)
    finally:
        await subscription.stop()
    assert [h["Ledgerflow-Stream"] for h in got] == ODD
    assert all("X-Evil" not in h for h in got)


async def _make_ledger(db: str) -> None:
    async with lf.open_store(db):
        pass


@pytest.mark.parametrize(
    "given",
    [
        ["--subject", "{stream}"],
        ["--subject", "{category}.{type}"],
        ["--stream", "BAD NAME"],
        ["--stream", "dotted.name"],
    ],
)
def test_a_relay_that_could_never_publish_exits_2_at_once(tmp_path: Any, given: list[str]) -> None:
    """It ran on, retrying for ever: a template that begins with a placeholder made
    the stream's subjects '.>' (refused by the server), and a stream name with a space
    or a dot was refused by nats-py; both were taken for a broker that is down."""
    import subprocess

    from ._workers import CLI, child_env

    db = f"sqlite:///{tmp_path / 'r.db'}"
    asyncio.run(_make_ledger(db))  # a ledger there: what ends the relay is its configuration
    try:
        result = subprocess.run(
            [*CLI, "relay", "--db", db, "--nats", "nats://127.0.0.1:1", *given],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the relay ran on with {given}")
    assert result.returncode == 2
    assert given[1] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
