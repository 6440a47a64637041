"""The event bus on NATS JetStream: how fast the relay publishes what the ledger holds,
next to what the broker takes from one client, and how long an appended event takes
to reach a consumer.

    python bench/bus.py            # prints one JSON line; under a minute
    python bench/bus.py --quick    # fewer events, shorter phases; ~10 s
    python bench/bus.py --profile  # and a cProfile of the 1-stream catch-up on stderr

NATS with JetStream at ``LEDGERFLOW_BENCH_NATS`` (else ``LEDGERFLOW_TEST_NATS``, else
nats://127.0.0.1:4222); when it does not answer, the line says it was skipped and why
(exit status 0). The run uses a JetStream stream of its own (``LFBENCH_<random>`` over
``lfbench<random>.>``, file storage, as ``JetStreamBus.open`` makes it), deleted at the
end. Each ledger is SQLite on a fresh database (bench/store.py's ``fresh_database``).

- ``relay_throughput``: ``EVENTS`` events are appended first (appends of
  ``APPEND_CHUNK`` events, the streams' appends gathered round by round, so the global
  log interleaves the streams), over 1, 10 and 200 ledger streams (three sub-runs,
  three ledgers); then ``relay.catch_up()`` publishes them all (batches of
  ``BATCH_SIZE``), timed: events/s, and how its time splits between reading the log,
  publishing, the checkpoint commit and the rest (building the messages). Beside it,
  on the same messages (other ids and subjects): the JetStream floor, ``js.publish``
  one at a time awaited from one client, and pipelined (``publish_async``, every
  message in flight, then waited for); and ``JetStreamBus.publish`` on its own (the
  adapter, without the ledger), in batches of ``BATCH_SIZE``. Floors are time-boxed
  (``FLOOR_SECONDS``).
- ``end_to_end``: the relay runs in the background (``start()``, ``POLL_INTERVAL``)
  and a durable consumer is subscribed (``bus.subscribe``, in this process). Events
  are appended one per append the way an app would: ``STEADY_RATE`` per second for
  ``STEADY_SECONDS`` over ``E2E_STREAMS`` streams, then a burst of ``BURST_EVENTS``
  from ``BURST_WRITERS`` concurrent writers (one stream each) as fast as the store
  takes them. Latency is from the append's return to the consumer's handler
  (``time.monotonic`` in one process); p50 / p99 nearest-rank, per phase. The SQLite
  commit floor of bench/store.py is measured beside it (the appends' own cost).

Every event must be published exactly once: the relay's count, the stream's message
count (``stream_info``) and, end to end, the consumer (each event once, each stream's
in order). A wrong result goes into ``errors`` (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import socket
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import ledgerflow as lf
from ledgerflow.bus import Delivery, JetStreamBus, Message, Relay, Route, envelope
from ledgerflow.events import RecordedEvent
from modes import percentile
from store import fresh_database, note

NATS_URL = (
    os.environ.get("LEDGERFLOW_BENCH_NATS")
    or os.environ.get("LEDGERFLOW_TEST_NATS")
    or "nats://127.0.0.1:4222"
)
MSG_ID = "Nats-Msg-Id"
EVENT_TYPE = "bench.placed"

EVENTS = 20_000
QUICK_EVENTS = 5_000
STREAM_COUNTS = (1, 10, 200)
APPEND_CHUNK = 10
BATCH_SIZE = 500
FLOOR_SECONDS = 1.5
QUICK_FLOOR_SECONDS = 0.4

POLL_INTERVAL = 0.05
E2E_STREAMS = 20
STEADY_RATE = 300.0
STEADY_SECONDS = 6.0
QUICK_STEADY_SECONDS = 2.0
BURST_EVENTS = 2_000
QUICK_BURST_EVENTS = 500
BURST_WRITERS = 20
DRAIN_TIMEOUT_S = 15.0
"""A hang guard for the consumer to receive everything, never a speed bound."""
SETTLE_S = 0.3
"""Waited after the last expected delivery, so a duplicate would be seen."""

TARGET_RELAY_EVENTS_PER_S = 10_000
TARGET_E2E_P50_MS = 20.0


@dataclass(frozen=True, slots=True)
class Placed:
    seq: int
    t: float
    """``time.monotonic()`` just before the append."""
    amount: int = 100
    note: str = "bench"


def make_registry() -> lf.EventRegistry:
    registry = lf.EventRegistry()
    registry.register(Placed, EVENT_TYPE)
    return registry


def nats_problem(url: str) -> str | None:
    """None when something answers at the URL's host and port, else why not."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"no NATS at {url}: {exc}"


class Broker:
    """The run's JetStream stream, a bus on it, and a plain client beside it (the
    floors, message counts, and the deletion at the end)."""

    def __init__(self, url: str) -> None:
        tag = uuid.uuid4().hex[:10]
        self.url = url
        self.stream = f"LFBENCH_{tag}"
        self.root = f"lfbench{tag}"
        self.tag = tag
        self.bus = JetStreamBus(url, stream=self.stream, subjects=[f"{self.root}.>"])
        self.nc: Any = None
        self.js: Any = None

    async def open(self) -> None:
        import nats

        await self.bus.open()
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream(timeout=5.0)

    async def messages(self, subject: str) -> int:
        """Messages the stream holds on ``subject`` (a filter: wildcards allowed)."""
        info = await self.js.stream_info(self.stream, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())

    async def server(self) -> dict[str, Any]:
        info = await self.js.stream_info(self.stream)
        return {
            "nats_server": str(self.nc._server_info.get("version", "?")),
            "storage": str(info.config.storage),
            "messages_at_end": info.state.messages,
        }

    async def close(self) -> None:
        # Closing on purpose: the bus's "disconnected; reconnecting" line is noise here.
        bus_log = logging.getLogger("ledgerflow.bus")
        level = bus_log.level
        bus_log.setLevel(logging.ERROR)
        try:
            await self.bus.close()
        finally:
            bus_log.setLevel(level)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.js.delete_stream(self.stream)
            await self.nc.close()


# -- relay throughput -------------------------------------------------------------------


class Split:
    """Where a relay's time goes: wrappers around the store's and the bus's calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj: Any, method: str, label: str) -> None:
        inner: Callable[..., Awaitable[Any]] = getattr(obj, method)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)

    @staticmethod
    def unwrap(obj: Any, method: str) -> None:
        with contextlib.suppress(AttributeError):
            delattr(obj, method)  # the instance attribute: the class's method shows again


async def fill(store: Any, prefix: str, streams: int, total: int) -> float:
    """``total`` events over ``streams`` streams, appends of ``APPEND_CHUNK`` events,
    each round's appends gathered (the global log interleaves the streams); events/s."""
    per = total // streams
    seq = 0
    start = time.perf_counter()
    for done in range(0, per, APPEND_CHUNK):
        chunk = min(APPEND_CHUNK, per - done)
        appends = []
        for s in range(streams):
            events = [Placed(seq + i, 0.0) for i in range(chunk)]
            seq += chunk
            appends.append(store.append(f"{prefix}-{s}", events))
        await asyncio.gather(*appends)
    return seq / (time.perf_counter() - start)


def floor_messages(events: list[RecordedEvent], root: str, label: str) -> list[Message]:
    """The relay's messages for ``events`` (same body and headers), on a subject and
    with ids of their own, so the broker stores them as new messages."""
    return [
        Message(
            f"{root}.{label}.bench.placed",
            f"{label}-{e.id}",
            envelope(e),
            {"Ledgerflow-Stream": e.stream_id, "Ledgerflow-Type": e.type},
            key=e.stream_id,
        )
        for e in events
    ]


async def floor_sequential(broker: Broker, messages: list[Message], seconds: float) -> float:
    """``js.publish`` one at a time, each awaited, until ``seconds`` pass; messages/s."""
    js = broker.js
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    for m in messages:
        await js.publish(
            m.subject,
            m.data,
            timeout=5.0,
            stream=broker.stream,
            headers={**m.headers, MSG_ID: m.id},
        )
        count += 1
        if time.perf_counter() >= deadline:
            break
    return count / (time.perf_counter() - start)


async def floor_pipelined(broker: Broker, messages: list[Message]) -> float:
    """``publish_async`` of every message (the client bounds what is in flight), then
    every acknowledgement awaited; messages/s."""
    js = broker.js
    start = time.perf_counter()
    futures = [
        await js.publish_async(
            m.subject, m.data, stream=broker.stream, headers={**m.headers, MSG_ID: m.id}
        )
        for m in messages
    ]
    acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=60.0)
    elapsed = time.perf_counter() - start
    if any(a.duplicate for a in acks):
        raise RuntimeError("pipelined floor: the broker saw a message twice")
    return len(messages) / elapsed


async def bus_publish(broker: Broker, messages: list[Message], seconds: float) -> float:
    """``JetStreamBus.publish`` in batches of ``BATCH_SIZE`` until ``seconds`` pass."""
    count = 0
    start = time.perf_counter()
    for i in range(0, len(messages), BATCH_SIZE):
        batch = messages[i : i + BATCH_SIZE]
        duplicates = await broker.bus.publish(batch)
        if any(duplicates):
            raise RuntimeError("bus publish: the broker saw a message twice")
        count += len(batch)
        if time.perf_counter() - start >= seconds:
            break
    return count / (time.perf_counter() - start)


async def relay_run(
    broker: Broker,
    streams: int,
    total: int,
    floor_s: float,
    errors: list[str],
    profile: bool,
    tag: str = "",
) -> dict[str, Any]:
    prefix = f"tp{streams}{tag}"
    registry = make_registry()
    async with (
        fresh_database("sqlite", "bus") as (url, _floor, _settings),
        lf.open_store(url, registry=registry) as store,
    ):
        fill_rate = await fill(store, prefix, streams, total)
        total = await store.head_position()
        events = await store.read_all(from_position=1, limit=total)
        if len(events) != total:
            errors.append(f"{prefix}: read {len(events)} of {total} events back")

        # The floors, on the same messages (their own subjects and ids).
        sequential = await floor_sequential(
            broker, floor_messages(events, broker.root, f"fs{prefix}"), floor_s
        )
        pipelined = await floor_pipelined(
            broker, floor_messages(events, broker.root, f"fp{prefix}")
        )
        if await broker.messages(f"{broker.root}.fp{prefix}.>") != total:
            errors.append(f"{prefix}: the pipelined floor stored the wrong count")
        adapter = await bus_publish(
            broker, floor_messages(events, broker.root, f"fb{prefix}"), floor_s
        )

        relay = Relay(
            store,
            broker.bus,
            [Route(subject=broker.root + ".{category}.{type}", types={EVENT_TYPE})],
            name=prefix,
            batch_size=BATCH_SIZE,
        )
        split = Split()
        timed = [
            (store, "read_all", "read_log"),
            (store, "project", "checkpoint"),
            (store, "projection_row", "checkpoint_read"),
            (store, "claim_projection", "lease"),
            (store, "release_projection", "lease"),
            (broker.bus, "publish", "publish"),
        ]
        for obj, method, label in timed:
            split.wrap(obj, method, label)
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            published = await relay.catch_up()
        finally:
            if profiler is not None:
                profiler.disable()
            elapsed = time.perf_counter() - start
            for obj, method, _label in timed:
                split.unwrap(obj, method)
        if profiler is not None:
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(25)
            note(f"cProfile of the relay's catch-up, {streams} streams:\n{out.getvalue()}")

        stored = await broker.messages(f"{broker.root}.{prefix}.>")
        row = await store.projection_row(f"relay_{prefix}")
        if published != total:
            errors.append(f"{prefix}: the relay published {published} of {total} events")
        if stored != total:
            errors.append(f"{prefix}: the stream holds {stored} of {total} messages")
        if row is None or row.position != total:
            errors.append(f"{prefix}: the relay's checkpoint is at {row and row.position}")

    rate = published / elapsed
    accounted = sum(split.seconds.values())
    shares = {k: round(v / elapsed, 3) for k, v in sorted(split.seconds.items())}
    shares["rest"] = round(max(0.0, elapsed - accounted) / elapsed, 3)
    return {
        "streams": streams,
        "events": total,
        "fill_events_per_s": round(fill_rate),
        "relay_seconds": round(elapsed, 3),
        "relay_events_per_s": round(rate),
        "floor_sequential_per_s": round(sequential),
        "floor_pipelined_per_s": round(pipelined),
        "bus_publish_per_s": round(adapter),
        "relay_over_floor_sequential": round(rate / sequential, 2),
        "relay_over_floor_pipelined": round(rate / pipelined, 3),
        "relay_time_shares": shares,
    }


# -- end to end -------------------------------------------------------------------------


class Consumer:
    """The handler: each delivery's arrival time by event ``seq``, and checks."""

    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.count = 0
        self.problems: list[str] = []
        self.last_version: dict[str, int] = {}
        self.changed = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        now = time.monotonic()
        event = delivery.event()
        seq = int(event["data"]["seq"])
        self.count += 1
        if seq in self.arrived:
            self.problems.append(f"event {seq} delivered twice")
        else:
            self.arrived[seq] = now
        stream, version = event["stream"], int(event["version"])
        if version <= self.last_version.get(stream, 0):
            self.problems.append(f"{stream}: version {version} after {self.last_version[stream]}")
        self.last_version[stream] = max(version, self.last_version.get(stream, 0))
        self.changed.set()

    async def wait_for(self, seqs: range) -> bool:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while not all(s in self.arrived for s in seqs):
            if time.monotonic() >= deadline:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=0.2)
        return True


def latency_figures(
    seqs: range, returned: dict[int, float], called: dict[int, float], consumer: Consumer
) -> dict[str, Any]:
    got = [s for s in seqs if s in consumer.arrived]
    after_return = [(consumer.arrived[s] - returned[s]) * 1000 for s in got]
    appends = [(returned[s] - called[s]) * 1000 for s in seqs]
    if not after_return:
        return {"events": len(seqs), "received": 0}
    return {
        "events": len(seqs),
        "received": len(got),
        "p50_ms": round(percentile(after_return, 50), 2),
        "p99_ms": round(percentile(after_return, 99), 2),
        "max_ms": round(max(after_return), 2),
        "append_p50_ms": round(percentile(appends, 50), 2),
    }


async def end_to_end(broker: Broker, quick: bool, errors: list[str]) -> dict[str, Any]:
    steady_n = int(STEADY_RATE * (QUICK_STEADY_SECONDS if quick else STEADY_SECONDS))
    burst_n = QUICK_BURST_EVENTS if quick else BURST_EVENTS
    returned: dict[int, float] = {}
    called: dict[int, float] = {}
    consumer = Consumer()
    async with (
        fresh_database("sqlite", "bus-e2e") as (url, floor, _settings),
        lf.open_store(url, registry=make_registry()) as store,
    ):
        floor_commits = await floor.commits_per_s(0.5)
        relay = Relay(
            store,
            broker.bus,
            [Route(subject=broker.root + ".{category}.{type}", types={EVENT_TYPE})],
            name="e2e",
            batch_size=BATCH_SIZE,
            poll_interval=POLL_INTERVAL,
        )
        subscription = await broker.bus.subscribe(
            f"{broker.root}.e2e.>", durable=f"e2e_{broker.tag}", handler=consumer
        )
        relay.start()
        try:

            async def append(stream: str, seq: int) -> None:
                called[seq] = now = time.monotonic()
                await store.append(stream, [Placed(seq, now)])
                returned[seq] = time.monotonic()

            # A warm-up event: the relay's lease and the consumer's first fetch.
            await append("e2e-warm", -1)
            if not await consumer.wait_for(range(-1, 0)):
                errors.append("end_to_end: the warm-up event never arrived")

            steady = range(steady_n)
            start = time.monotonic()
            for seq in steady:
                delay = start + seq / STEADY_RATE - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await append(f"e2e-{seq % E2E_STREAMS}", seq)
            steady_s = time.monotonic() - start
            if not await consumer.wait_for(steady):
                errors.append("end_to_end: steady events missing after the drain timeout")

            burst = range(steady_n, steady_n + burst_n)

            async def writer(w: int) -> None:
                for seq in burst[w::BURST_WRITERS]:
                    await append(f"e2e-b{w}", seq)

            start = time.monotonic()
            await asyncio.gather(*(writer(w) for w in range(BURST_WRITERS)))
            burst_s = time.monotonic() - start
            if not await consumer.wait_for(burst):
                errors.append("end_to_end: burst events missing after the drain timeout")
            drained_s = time.monotonic() - start
            await asyncio.sleep(SETTLE_S)
        finally:
            await relay.stop()
            await subscription.stop()

    total = 1 + steady_n + burst_n
    stored = await broker.messages(f"{broker.root}.e2e.>")
    if stored != total:
        errors.append(f"end_to_end: the stream holds {stored} of {total} messages")
    if consumer.count != total or len(consumer.arrived) != total:
        errors.append(
            f"end_to_end: {consumer.count} deliveries of {len(consumer.arrived)} events, "
            f"{total} expected"
        )
    errors.extend(f"end_to_end: {p}" for p in consumer.problems[:5])
    steady_fig = latency_figures(steady, returned, called, consumer)
    steady_fig["rate_per_s"] = round(steady_n / steady_s)
    burst_fig = latency_figures(burst, returned, called, consumer)
    burst_fig["appended_per_s"] = round(burst_n / burst_s)
    burst_fig["drained_s"] = round(drained_s, 2)
    return {
        "sqlite_floor_commits_per_s": round(floor_commits),
        "poll_interval_s": POLL_INTERVAL,
        "steady": steady_fig,
        "burst": burst_fig,
    }


# -- the run ----------------------------------------------------------------------------


async def run(quick: bool, profile: int | None) -> dict[str, Any]:
    line: dict[str, Any] = {"bench": "bus", "nats": NATS_URL, "quick": quick}
    problem = nats_problem(NATS_URL)
    if problem is not None:
        return line | {"skipped": problem}
    broker = Broker(NATS_URL)
    try:
        await broker.open()
    except Exception as exc:  # noqa: BLE001 - no JetStream there: skipped, and why
        with contextlib.suppress(Exception):
            await broker.close()
        return line | {"skipped": f"JetStream at {NATS_URL} is not usable: {exc!r}"}
    errors: list[str] = []
    total = QUICK_EVENTS if quick else EVENTS
    floor_s = QUICK_FLOOR_SECONDS if quick else FLOOR_SECONDS
    line["stream"] = broker.stream
    try:
        runs = []
        for streams in STREAM_COUNTS:
            note(f"relay_throughput: {total} events over {streams} streams")
            runs.append(
                await relay_run(broker, streams, total, floor_s, errors, profile == streams)
            )
        rates = [r["relay_events_per_s"] for r in runs]
        # The same one-stream run with the bus waiting for each acknowledgement before
        # a stream's next message (JetStreamBus(pipelined=False)).
        note(f"relay_throughput: {total} events over 1 stream, one acknowledgement at a time")
        broker.bus.pipelined = False
        try:
            one_by_one = await relay_run(broker, 1, total, floor_s, errors, False, "s")
        finally:
            broker.bus.pipelined = True
        line["relay_one_by_one_one_stream"] = one_by_one
        line["relay_throughput"] = {
            "batch_size": BATCH_SIZE,
            "append_chunk": APPEND_CHUNK,
            "runs": runs,
            "relay_events_per_s_min": min(rates),
            "target_events_per_s": TARGET_RELAY_EVENTS_PER_S,
            "meets_target": min(rates) >= TARGET_RELAY_EVENTS_PER_S,
            "floor_sequential_per_s_median": round(
                statistics.median(r["floor_sequential_per_s"] for r in runs)
            ),
        }
        note("end_to_end: steady appends, then a burst")
        e2e = await end_to_end(broker, quick, errors)
        e2e["target_p50_ms"] = TARGET_E2E_P50_MS
        e2e["meets_target"] = e2e["steady"].get("p50_ms", 1e9) < TARGET_E2E_P50_MS
        line["end_to_end"] = e2e
        line["broker"] = await broker.server()
    except Exception:  # noqa: BLE001 - recorded; the run fails
        errors.append(traceback.format_exc(limit=8))
    finally:
        await broker.close()
    line["errors"] = errors
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--profile",
        nargs="?",
        const=1,
        type=int,
        metavar="STREAMS",
        help="cProfile the relay's catch-up of that sub-run (1, 10 or 200; 1 if not given)",
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()
    line = asyncio.run(run(args.quick, args.profile))
    line["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(line), flush=True)
    return 1 if line.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
