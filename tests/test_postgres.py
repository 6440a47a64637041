"""PostgreSQL-only behaviour: the global order across processes, NOTIFY, schemas,
connection loss. The contract every backend shares lives in the contract suite."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest

import ledgerflow
from ledgerflow import Appended, AppendResult, NewEvent, RecordedEvent, StoreError
from ledgerflow.hashing import GENESIS_HASH, chain_hash, to_micros
from ledgerflow.store._plan import AppendRequest
from ledgerflow.store.postgres import (
    PostgresEventStore,
    _migrations,
    _parts,
    channel_for,
    split_url,
)
from ledgerflow.store.runtime import (
    InstanceRow,
    Lease,
    Nudge,
    PutInstance,
    RuntimeWrite,
    Schedule,
    Unschedule,
    WakeupRow,
)

from ._adapters import open_adapter
from .conftest import (
    PG_URL,
    lock_waiters,
    pg_admin,
    pg_url,
    require_postgres,
    stalling_commits,
    terminate_backends,
)

KNOWN_SCHEMA = _migrations("ledgerflow")[-1].version

pytestmark = pytest.mark.postgres

# Run by each writer process: appends from several tasks at once (so its own group
# commit batches them), to its own streams with expected versions and to shared
# streams with and without them, then reports every event acknowledged to it.
_WRITER = """
import asyncio, json, random, sys, uuid
import ledgerflow
from ledgerflow import ConcurrencyError, NewEvent

async def main(url, proc, tasks, appends):
    rng = random.Random(proc)
    acked, conflicts = [], 0
    async with ledgerflow.open_store(url) as store:
        print("ready", flush=True)
        sys.stdin.readline()

        async def work(task):
            nonlocal conflicts
            own, version = f"p{proc}-t{task}", 0
            for i in range(appends):
                events = [
                    NewEvent("Tick", {"p": proc, "t": task, "i": i, "k": k}, id=uuid.uuid4())
                    for k in range(rng.choice((1, 1, 1, 2, 3, 5)))
                ]
                shared = f"shared-{rng.randrange(3)}"
                roll = rng.random()
                try:
                    if roll < 0.4:
                        result = await store.append(own, events, expected_version=version)
                        version = result.version
                    elif roll < 0.8:
                        result = await store.append(shared, events)
                    else:
                        seen = await store.stream_version(shared)
                        result = await store.append(shared, events, expected_version=seen)
                except ConcurrencyError:
                    conflicts += 1
                    continue
                acked.extend((str(e.id), p) for e, p in zip(events, result.positions))

        await asyncio.gather(*(work(t) for t in range(tasks)))
    print(json.dumps({"acked": acked, "conflicts": conflicts}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""

_APPEND_ONE = """
import asyncio, sys
import ledgerflow
from ledgerflow import NewEvent

async def main(url):
    async with ledgerflow.open_store(url) as store:
        await store.append("from-afar", [NewEvent("Waved")])

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
def other_schema() -> Iterator[str]:
    require_postgres()
    name = f"lf_test_{uuid.uuid4().hex[:16]}"
    yield name
    with pg_admin() as con:
        con.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


async def _python(script: str, *args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def _listener_pids(schema: str) -> list[int]:
    query = f'LISTEN "{channel_for(schema)}"'
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as con:
        cur = await con.execute(
            "SELECT pid FROM pg_stat_activity WHERE query = %s AND state = 'idle'", (query,)
        )
        return [int(pid) for (pid,) in await cur.fetchall()]


async def _wait_for_listener(schema: str, *, not_pid: int | None = None) -> int:
    """The backend pid of the store's LISTEN connection, once it is listening."""
    async with asyncio.timeout(10):
        while True:
            pids = [p for p in await _listener_pids(schema) if p != not_pid]
            if pids:
                return pids[0]
            await asyncio.sleep(0.02)


class _Seen:
    """What a subscriber has received so far, and a way to await more of it."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []
        self._grew = asyncio.Event()

    async def consume(self, source: AsyncIterator[RecordedEvent]) -> None:
        async for event in source:
            self.events.append(event)
            self._grew.set()

    async def until(self, position: int) -> None:
        """Wait until an event at ``position`` or beyond has arrived."""
        while not self.events or self.events[-1].position < position:
            self._grew.clear()
            await self._grew.wait()


# -- invariant 3: no gaps, across processes -------------------------------------------


async def test_a_stalled_writer_holds_back_readers_but_no_other_writer(pg_schema: str) -> None:
    """ADR 008: a transaction that took positions and has not committed stops no
    writer of other streams; readers (subscribers, read_all, head_position) stop
    before its positions until it ends, so none passes a position filled in later."""
    url = pg_url(pg_schema)
    seen = _Seen()
    async with open_adapter(url) as slow, open_adapter(url) as fast, open_adapter(url) as reader:
        await fast.append("before", [NewEvent("B")])
        consumer = asyncio.create_task(seen.consume(reader.subscribe()))
        await seen.until(1)
        async with stalling_commits(pg_schema, stream="slow"):
            stalled = asyncio.create_task(slow.append("slow", [NewEvent("S")]))
            await lock_waiters("COMMIT", 1)  # the stalled writer's
            # Another process's writer goes on: it neither waits nor fails.
            async with asyncio.timeout(10):
                after = await fast.append("after", [NewEvent("A")])
            assert isinstance(after, Appended)
            assert after.positions == (3,)
            assert not stalled.done()
            # Readers stop before the stalled transaction's position 2.
            assert [e.stream_id for e in await reader.read_all()] == ["before"]
            assert await reader.head_position() == 1
            await asyncio.sleep(0.3)
            assert [e.position for e in seen.events] == [1]
        # Released: it commits, and every reader sees both, in position order.
        assert (await asyncio.wait_for(stalled, 10)).positions == (2,)
        async with asyncio.timeout(10):
            await seen.until(3)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        assert [(e.position, e.stream_id) for e in seen.events] == [
            (1, "before"),
            (2, "slow"),
            (3, "after"),
        ]
        assert await reader.head_position() == 3


@pytest.mark.slow
async def test_subscriber_sees_every_event_once_in_order_while_processes_write(
    pg_schema: str,
) -> None:
    url = pg_url(pg_schema)
    processes, tasks, appends = 4, 8, 50
    seen = _Seen()
    async with open_adapter(url) as store:
        consumer = asyncio.create_task(seen.consume(store.subscribe(batch_size=50)))
        writers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _WRITER,
                url,
                str(n),
                str(tasks),
                str(appends),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for n in range(processes)
        ]
        for writer in writers:
            assert writer.stdout is not None
            async with asyncio.timeout(60):
                assert await writer.stdout.readline() == b"ready\n"
        reports = await asyncio.gather(*(w.communicate(b"go\n") for w in writers))
        acked: dict[str, int] = {}
        for writer, (out, err) in zip(writers, reports, strict=True):
            assert writer.returncode == 0, err.decode()
            report = json.loads(out.decode().splitlines()[-1])
            acked.update((event_id, position) for event_id, position in report["acked"])
        last = max(acked.values())

        async with asyncio.timeout(30):
            await seen.until(last)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

        # Positions only rise (a batch refused while another process took positions
        # may leave a gap; ADR 008), and every acknowledged event arrived once, at the
        # position its append reported: none was skipped or filled in behind.
        positions = [event.position for event in seen.events]
        assert positions == sorted(set(positions))
        assert {str(event.id): event.position for event in seen.events} == acked
        assert await store.head_position() == last

        # The writers really raced: positions alternate between processes.
        owners = [event.data["p"] for event in seen.events]
        switches = sum(a != b for a, b in itertools.pairwise(owners))
        assert switches > processes

        # Every stream is contiguous from 1 and chained, despite the interleaving.
        streams: dict[str, list[RecordedEvent]] = {}
        for event in seen.events:
            streams.setdefault(event.stream_id, []).append(event)
        for events in streams.values():
            assert [e.version for e in events] == list(range(1, len(events) + 1))
            assert [e.prev_hash for e in events] == [GENESIS_HASH] + [e.hash for e in events[:-1]]


# -- LISTEN/NOTIFY ------------------------------------------------------------------


async def test_subscriber_is_woken_by_a_commit_in_another_process(pg_schema: str) -> None:
    url = pg_url(pg_schema)
    seen = _Seen()
    async with open_adapter(url) as store:
        store.poll_interval = 60.0  # only a NOTIFY can wake it within the test's time
        await store.append("here", [NewEvent("Local")])
        consumer = asyncio.create_task(seen.consume(store.subscribe()))
        async with asyncio.timeout(10):
            await seen.until(1)
            await _wait_for_listener(pg_schema)
            code, _, err = await _python(_APPEND_ONE, url)
            assert code == 0, err.decode()
            await seen.until(2)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
    assert [(e.stream_id, e.position) for e in seen.events] == [("here", 1), ("from-afar", 2)]


async def test_store_recovers_when_the_server_drops_every_connection(pg_schema: str) -> None:
    app = f"lf_kill_{pg_schema[-12:]}"
    url = f"{pg_url(pg_schema)}&application_name={app}"
    seen = _Seen()
    async with (
        open_adapter(url) as store,
        open_adapter(pg_url(pg_schema)) as elsewhere,
    ):
        store.poll_interval = 60.0
        await store.append("s", [NewEvent("Before")])
        consumer = asyncio.create_task(seen.consume(store.subscribe()))
        async with asyncio.timeout(10):
            listener = await _wait_for_listener(pg_schema)
            await seen.until(1)

        killed = terminate_backends(app)
        assert killed >= 3  # writer, reader pool, listener

        # Nothing was in flight: the writer and the readers reconnect transparently.
        result = await store.append("s", [NewEvent("After")])
        assert result.positions == (2,)
        assert [e.type for e in await store.read_stream("s")] == ["Before", "After"]

        async with asyncio.timeout(10):
            await _wait_for_listener(pg_schema, not_pid=listener)
            await elsewhere.append("t", [NewEvent("Elsewhere")])
            await seen.until(3)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
    assert [e.position for e in seen.events] == [1, 2, 3]


def test_notify_channel_fits_postgres_identifier_limit() -> None:
    long_a, long_b = "a" * 63, "a" * 62 + "b"
    assert channel_for("ledgerflow") == "ledgerflow_ledgerflow"
    assert len(channel_for(long_a)) <= 63
    assert channel_for(long_a) != channel_for(long_b)


# -- schemas ------------------------------------------------------------------------


async def test_stores_on_different_schemas_do_not_see_each_other(
    pg_schema: str, other_schema: str
) -> None:
    async with (
        open_adapter(pg_url(pg_schema)) as one,
        open_adapter(pg_url(other_schema)) as two,
    ):
        await one.append("order-1", [NewEvent("Created"), NewEvent("Approved")])
        await two.append("order-1", [NewEvent("Created")])
        await two.append("order-2", [NewEvent("Created")])

        assert [e.type for e in await one.read_all()] == ["Created", "Approved"]
        assert [e.stream_id for e in await two.read_all()] == ["order-1", "order-2"]
        assert await one.stream_version("order-1") == 2
        assert await two.stream_version("order-1") == 1
        assert await one.stream_version("order-2") == 0
        assert (await one.head_position(), await two.head_position()) == (2, 2)

    with pg_admin() as con:
        tables = con.execute(
            "SELECT table_schema, count(*) FROM information_schema.tables "
            "WHERE table_schema IN (%s, %s) GROUP BY table_schema",
            (pg_schema, other_schema),
        ).fetchall()
    # events, streams, snapshots, workflows, wakeups, workers, tasks, queues, resources,
    # permits, projections, inbox, schema_migrations
    assert dict(tables) == {pg_schema: 16, other_schema: 16}


@pytest.mark.parametrize(
    "schema",
    ["Ledger", "1ledger", "led-ger", "led ger", "x" * 64, "", "ledger;drop"],
)
def test_invalid_schema_name_is_a_configuration_error(schema: str) -> None:
    with pytest.raises(ledgerflow.ConfigurationError, match="schema"):
        open_adapter(f"{PG_URL}?schema={schema}")


def test_url_options_other_than_schema_go_to_libpq_unchanged() -> None:
    conninfo, schema = split_url("postgres://u:p@db:6432/app?sslmode=disable&schema=lf_a&x=a+b")
    assert (conninfo, schema) == ("postgres://u:p@db:6432/app?sslmode=disable&x=a+b", "lf_a")
    assert split_url("postgresql:///app") == ("postgresql:///app", "ledgerflow")
    with pytest.raises(ledgerflow.ConfigurationError, match="more than one schema"):
        split_url("postgresql:///app?schema=a&schema=b")
    with pytest.raises(ledgerflow.ConfigurationError):
        open_adapter("postgresql://db/app?schema=ok&no_such_libpq_option=1")


async def test_concurrent_openers_apply_migrations_once(pg_schema: str) -> None:
    stores = [open_adapter(pg_url(pg_schema)) for _ in range(6)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    with pg_admin() as con:
        rows = con.execute(f"SELECT version, name FROM {pg_schema}.schema_migrations").fetchall()
        (taken,) = con.execute(
            f"SELECT last_value FROM {pg_schema}.positions WHERE is_called"
        ).fetchall()
    assert sorted(version for version, _ in rows) == list(range(1, KNOWN_SCHEMA + 1))
    assert taken == (0,)


async def test_schema_newer_than_the_code_is_refused(pg_schema: str) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        await store.append("s", [NewEvent("Kept")])
    with pg_admin() as con:
        con.execute(
            f"INSERT INTO {pg_schema}.schema_migrations (version, name) VALUES (99, 'future')"
        )
    store = open_adapter(pg_url(pg_schema))
    with pytest.raises(ledgerflow.SchemaVersionError) as caught:
        await store.open()
    assert (caught.value.found, caught.value.known) == (99, KNOWN_SCHEMA)
    with pg_admin() as con:
        rows = con.execute(f"SELECT count(*) FROM {pg_schema}.events").fetchone()
    assert rows == (1,)


# -- errors at the boundary ---------------------------------------------------------


async def test_unreachable_server_is_store_unavailable() -> None:
    store = open_adapter("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    with pytest.raises(ledgerflow.StoreUnavailableError) as caught:
        await store.open()
    assert not isinstance(caught.value, psycopg.Error)
    assert caught.value.retryable
    assert caught.value.backend == "postgres"


async def test_text_postgres_cannot_store_is_a_store_error(pg_schema: str) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        # Refused before the server sees it, as on every backend.
        with pytest.raises(ledgerflow.InvalidEventDataError):
            await store.append("nul\x00byte", [NewEvent("E")])
        # So is a runtime row, with the events of its append: one bad request must not
        # fail the innocent appends sharing its group commit.
        with pytest.raises(ledgerflow.InvalidEventDataError):
            await store.append("s", [NewEvent("E")], runtime=[Schedule("nul\x00byte", 1)])
        assert await store.head_position() == 0
        assert await store.next_wakeup() is None
        # The writer recovers for the next batch.
        assert (await store.append("fine", [NewEvent("E")])).positions == (1,)


# -- storage details ----------------------------------------------------------------


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=UTC),
        datetime(2030, 1, 1, 1, 2, 3, 456_789, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
async def test_bytes_and_times_round_trip_exactly(pg_schema: str, moment: datetime) -> None:
    data = {"text": 'ünïcödé \u2028 \\ "quoted"', "n": 2**53 + 1, "f": 0.1}
    async with open_adapter(pg_url(pg_schema), clock=lambda: moment) as store:
        await store.append("s", [NewEvent("A", data), NewEvent("B", {})])
        [first, second] = await store.read_all()
        rows = await store.read_rows()
    assert first.data == data
    assert first.recorded_at == moment
    assert first.recorded_at.tzinfo is not None
    for row in rows:
        assert row.recorded_at_us == to_micros(moment)
        assert row.hash == chain_hash(
            row.prev_hash,
            row.id,
            row.stream_id,
            row.version,
            row.position,
            row.type,
            row.schema_version,
            row.data,
            row.metadata,
            row.recorded_at_us,
        )
    assert second.prev_hash == first.hash


async def test_stream_heads_are_in_code_point_order_whatever_the_collation(
    pg_schema: str,
) -> None:
    names = ["b", "B", "a", "_x", "é", "Z", "a-1", "a_1", "10", "9"]
    async with open_adapter(pg_url(pg_schema)) as store:
        for name in names:
            await store.append(name, [NewEvent("E")])
        heads = await store.stream_heads()
        page = await store.stream_heads(after="a", limit=3)
    assert [name for name, _ in heads] == sorted(names)
    assert [name for name, _ in page] == sorted(n for n in names if n > "a")[:3]


async def test_a_batch_costs_the_same_round_trips_whatever_its_size(pg_schema: str) -> None:
    async def syncs(store: PostgresEventStore, count: int) -> int:
        return await _syncs_of(
            store, store.append("s", [NewEvent("E", {"i": i}) for i in range(count)])
        )

    async with open_adapter(pg_url(pg_schema)) as store:
        assert isinstance(store, PostgresEventStore)
        first = await syncs(store, 1)  # a stream this writer has not seen: read, then write
        one, many = await syncs(store, 1), await syncs(store, 300)  # known: one round trip
    assert one == many
    assert one < first <= 3


# -- runtime rows ---------------------------------------------------------------------


async def _syncs_of(store: PostgresEventStore, append: Awaitable[object]) -> int:
    """Sync and Flush messages the writer sends while ``append`` runs: round trips."""
    from psycopg import pq

    conn = store._writer_conn
    assert conn is not None
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            await append
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        sent = [f[2].strip() for f in (line.split("\t") for line in trace) if f[0] == "F"]
    # A run of messages the client sends before it waits ends in a Sync or a Flush.
    # psycopg may follow a pipeline's closing Sync with a Flush of its own when the
    # answers were not all in yet (a busy server): no new round trip, so a Flush or
    # Sync right after another is not counted (it was, and the test failed under load).
    ends = ("Sync", "Flush")
    return sum(1 for i, m in enumerate(sent) if m in ends and (i == 0 or sent[i - 1] not in ends))


def _mixed_writes(count: int) -> list[RuntimeWrite]:
    """``count`` runtime writes cycling through every kind, over many instances."""
    kinds: list[Callable[[int], RuntimeWrite]] = [
        lambda i: PutInstance(InstanceRow(f"wf-{i}", "order", 1, "running", None, i, i)),
        lambda i: Schedule(f"wf-{i}", i, "w", i + 10),
        lambda i: Nudge(f"wf-{i // 2}", i),
        lambda i: Unschedule(f"wf-{i // 3}"),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


async def test_runtime_rows_add_no_round_trips(pg_schema: str) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        assert isinstance(store, PostgresEventStore)
        await store.append("s", [NewEvent("E")], runtime=_mixed_writes(8))
        plain = await _syncs_of(store, store.append("s", [NewEvent("E")]))
        one = await _syncs_of(store, store.append("s", [NewEvent("E")], runtime=[Schedule("x", 1)]))
        many = await _syncs_of(
            store,
            store.append(
                "s", [NewEvent("E", {"i": i}) for i in range(300)], runtime=_mixed_writes(900)
            ),
        )
        guarded = await _syncs_of(
            store, store.append("s", [], expected_version=303, runtime=_mixed_writes(50))
        )
        # The last batch's writes landed (nothing later in it touches these two).
        assert await store.get_instance("wf-896") is not None
        # Created by a Schedule with a lease: epoch 1.
        assert await store.get_wakeup("wf-897") == WakeupRow("wf-897", 897, "w", 907, 1)
    assert plain == one == many
    # A guarded write must read the stream's version: one round trip more, whatever
    # its size.
    assert guarded == plain + 1


async def test_writers_appending_in_a_loop_share_commits(pg_schema: str) -> None:
    """Two tasks each appending in a loop (the next append as soon as the last one
    returns) share their commits, even if they started out of step. The writer took
    its next batch before the callers of the last one had run: each commit then held
    one task's append, by turns, for good (four such processes ran at a fifth of the
    rate of one)."""
    async with open_adapter(pg_url(pg_schema)) as store:
        assert isinstance(store, PostgresEventStore)
        batches: list[int] = []
        committing = asyncio.Event()
        write = store._write_batch

        async def counted(
            requests: list[AppendRequest], recorded_at_us: int
        ) -> list[AppendResult | StoreError]:
            batches.append(len(requests))
            committing.set()
            return await write(requests, recorded_at_us)

        store._write_batch = counted  # type: ignore[method-assign]

        async def writer(stream: str, late: bool) -> None:
            version = 0
            if late:  # starts while the other's first commit is under way
                await committing.wait()
            for _ in range(30):
                version = (await store.append(stream, [NewEvent("E")], version)).version

        await asyncio.wait_for(asyncio.gather(writer("a", False), writer("b", True)), 30)
    assert sum(batches) == 60
    # Out of step, the old loop made 60 commits of one append each.
    assert len(batches) <= 35, batches


async def test_the_notify_commit_does_not_wait_but_batches_still_do(pg_schema: str) -> None:
    """The NOTIFY after each batch commits without waiting for the disk, and that
    setting ends with its own transaction: the writer's next batches (either path)
    still commit durably."""
    async with open_adapter(pg_url(pg_schema)) as store:
        assert isinstance(store, PostgresEventStore)
        await store.append("s", [NewEvent("E")])  # decided from the database
        await store.append("s", [NewEvent("E")], expected_version=1)  # one round trip
        conn = store._writer_conn
        assert conn is not None
        cur = await conn.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("on",)
        assert "set_config('synchronous_commit', 'off', true)" in store._sql.notify


async def test_a_new_stream_said_new_takes_one_round_trip(pg_schema: str) -> None:
    """A workflow's start appends to a stream this writer never saw, expecting none:
    the guess path takes it (one round trip), and the (stream, version) key catches a
    stream that exists after all, which is then refused from the database."""
    url = pg_url(pg_schema)
    async with open_adapter(url) as store, open_adapter(url) as other:
        assert isinstance(store, PostgresEventStore)
        await other.append("taken", [NewEvent("Theirs")])
        await store.append("warm", [NewEvent("E")])  # the writer knows the next position
        plain = await _syncs_of(store, store.append("warm", [NewEvent("E")]))
        start = await _syncs_of(
            store,
            store.append(
                "wf-new",
                [NewEvent("Started")],
                ledgerflow.NO_STREAM,
                runtime=[PutInstance(InstanceRow("wf-new", "n", 1, "running", None, 1, 1))],
            ),
        )
        assert start == plain
        with pytest.raises(ledgerflow.ConcurrencyError):
            await store.append(
                "taken",
                [NewEvent("Mine")],
                ledgerflow.NO_STREAM,
                runtime=[PutInstance(InstanceRow("taken", "n", 1, "running", None, 1, 1))],
            )
        assert await store.get_instance("taken") is None  # the void batch wrote nothing
        # The miss was no sign of other writers: the next append (to a stream the
        # refusal read) still guesses.
        mine = store.append("taken", [NewEvent("Mine")], expected_version=1)
        assert await _syncs_of(store, mine) == plain
        assert [e.type for e in await store.read_stream("taken")] == ["Theirs", "Mine"]
        assert (await ledgerflow.verify_ledger(store)).ok


async def test_writers_in_two_processes_interleave_without_loss(pg_schema: str) -> None:
    """Each writer's one-round-trip guess misses after the other wrote; nothing is
    lost, doubled or misnumbered."""
    async with (
        open_adapter(pg_url(pg_schema)) as a,
        open_adapter(pg_url(pg_schema)) as b,
    ):
        results = []
        for i in range(40):
            writer = a if i % 3 else b
            results.append(await writer.append("s", [NewEvent("E", {"i": i})], i))
            results.append(await writer.append(f"own-{i % 3}", [NewEvent("F", {"i": i})]))
        # A caller id that exists takes the slow path too, and is recognised.
        again = NewEvent("E", {"i": 0}, id=(await a.read_stream("s"))[0].id)
        assert isinstance(await b.append("s", [again]), ledgerflow.AlreadyAppended)
        events = await a.read_all()
        report = await ledgerflow.verify_ledger(a)
    assert report.ok, report.findings
    assert [e.position for e in events] == list(range(1, 81))
    assert [e.data["i"] for e in events if e.stream_id == "s"] == list(range(40))
    assert [r.positions[0] for r in results] == list(range(1, 81))


async def test_release_and_append_on_the_same_wakeups_do_not_deadlock(pg_schema: str) -> None:
    forever = 2**62
    async with open_adapter(pg_url(pg_schema)) as store:
        await store.append(
            "setup",
            [NewEvent("E")],
            runtime=[
                Schedule("a", 1, "o", forever),
                Schedule("b", 1, "o", forever),
                Schedule("c", 1),
            ],
        )
        with pg_admin() as blocker, blocker.transaction():
            # Hold c so the writer stops halfway through its runtime writes.
            blocker.execute(f"SELECT 1 FROM {pg_schema}.wakeups WHERE workflow_id = 'c' FOR UPDATE")
            # Against the id order: touched one by one, b would be held while waiting
            # for c, and then a wanted while the release held a and waited for b.
            append = asyncio.create_task(
                store.append(
                    "wf", [NewEvent("E")], runtime=[Nudge("b", 0), Nudge("c", 0), Nudge("a", 0)]
                )
            )
            await lock_waiters(f"%{pg_schema}.wakeups%", 1)
            release = asyncio.create_task(store.release_wakeups("o"))
            await lock_waiters(f"%{pg_schema}.wakeups%", 2)
        async with asyncio.timeout(10):
            appended, released = await asyncio.gather(append, release)
        assert appended == Appended("wf", 1, (2,))
        assert released == 2
        # Nudges and the release keep the epochs: a and b were leased once, c never.
        for wid, epoch in zip("abc", (1, 1, 0), strict=True):
            assert await store.get_wakeup(wid) == WakeupRow(wid, 0, None, None, epoch)


async def test_a_claim_skips_rows_being_written_instead_of_waiting(pg_schema: str) -> None:
    async with open_adapter(pg_url(pg_schema)) as store:
        await store.append(
            "s", [NewEvent("E")], runtime=[Schedule(w, i) for i, w in enumerate("abc")]
        )
        with pg_admin() as blocker, blocker.transaction():
            blocker.execute(f"SELECT 1 FROM {pg_schema}.wakeups WHERE workflow_id = 'b' FOR UPDATE")
            async with asyncio.timeout(10):
                first = await store.claim_wakeups("w", now_us=9, lease_until_us=99, limit=9)
        second = await store.claim_wakeups("w", now_us=9, lease_until_us=99, limit=9)
    assert (first, second) == ([Lease("a", 1), Lease("c", 1)], [Lease("b", 1)])


async def test_a_claim_survives_the_server_dropping_the_readers(pg_schema: str) -> None:
    app = f"lf_claim_{pg_schema[-12:]}"
    async with open_adapter(f"{pg_url(pg_schema)}&application_name={app}") as store:
        await store.append("s", [NewEvent("E")], runtime=[Schedule("a", 1), Schedule("b", 2)])
        claimed = await store.claim_wakeups("w", now_us=9, lease_until_us=99, limit=1)
        assert claimed == [Lease("a", 1)]
        killed = terminate_backends(app)
        assert killed >= 2  # writer and reader pool
        # The dead pooled connection is replaced and the claim sent again.
        claimed = await store.claim_wakeups("w", now_us=9, lease_until_us=99, limit=5)
        assert claimed == [Lease("b", 1)]
        assert await store.release_wakeups("w") == 2


async def test_schema_at_version_1_is_upgraded_on_open(pg_schema: str) -> None:
    url = pg_url(pg_schema)
    async with open_adapter(url) as store:
        await store.append("s", [NewEvent("A"), NewEvent("B")])
        before = await store.read_all()
    with pg_admin() as con:
        # Back to what the release that knew only migration 1 left behind: nothing
        # of migration 2 (workflows, wakeups), 3 (lease_epoch, check_fences), 4
        # (positions from a sequence, xid per event, no head row), 5 (workers, and
        # an index on wakeups), 6 (tasks, queues), 7 (resources, permits) or 8
        # (projections, inbox).
        s = pg_schema
        con.execute(f"DROP FUNCTION {s}.check_fences, {s}.begin_append, {s}.give_back")
        con.execute(
            f"DROP TABLE {s}.workflows, {s}.wakeups, {s}.workers, {s}.tasks, {s}.queues, "
            f"{s}.resources, {s}.permits, {s}.projections, {s}.inbox, {s}.merkle_tiles, "
            f"{s}.checkpoints, {s}.subject_keys"
        )
        con.execute(f"DROP SEQUENCE {s}.positions")
        con.execute(f"ALTER TABLE {s}.events DROP COLUMN xid")
        con.execute(
            f"CREATE TABLE {s}.head (id boolean PRIMARY KEY DEFAULT true CHECK (id), "
            "position bigint NOT NULL)"
        )
        con.execute(f"INSERT INTO {s}.head VALUES (true, 2)")
        con.execute(f"DELETE FROM {s}.schema_migrations WHERE version > 1")
    async with open_adapter(url) as store:
        assert await store.read_all() == before
        assert (await ledgerflow.verify_ledger(store)).ok
        await store.append(
            "s",
            [NewEvent("C")],
            expected_version=2,
            runtime=[
                PutInstance(InstanceRow("wf", "n", 1, "running", None, 1, 1)),
                Schedule("wf", 5, "w", 9),
            ],
        )
        assert await store.list_instances() == [InstanceRow("wf", "n", 1, "running", None, 1, 1)]
        assert await store.get_wakeup("wf") == WakeupRow("wf", 5, "w", 9, 1)
        assert await store.claim_wakeups("other", now_us=10, lease_until_us=20, limit=1) == [
            Lease("wf", 2)
        ]
    with pg_admin() as con:
        rows = con.execute(
            f"SELECT version, name FROM {pg_schema}.schema_migrations ORDER BY version"
        ).fetchall()
    assert rows == [
        (1, "events, streams, snapshots and head"),
        (2, "workflow instances and wake-ups"),
        (3, "lease epochs (fencing)"),
        (4, "global order by transaction visibility (no head lock)"),
        (5, "the registry of workers"),
        (6, "task queues"),
        (7, "guarded resources: breakers, rate limits, bulkheads"),
        (8, "projections: checkpoints, leases, failures"),
        (9, "instances listed newest first"),
        (10, "audit: Merkle tiles, checkpointed tree heads, personal-data keys"),
        (11, "task attempts lost with their workers"),
        (12, "task attempts handed back unfinished"),
    ]
    async with open_adapter(url) as store:  # positions go on from where the head was
        assert [e.position for e in await store.read_all()] == [1, 2, 3]


# -- the server's lock table ----------------------------------------------------------


def test_batches_are_cut_by_streams_in_order() -> None:
    def request(stream: str) -> AppendRequest:
        return AppendRequest(stream, (), ledgerflow.ANY)

    batch = [request(s) for s in "aabcadde"]
    parts = _parts(batch, 2)
    assert [[r.stream_id for r in part] for part in parts] == [
        ["a", "a", "b"],
        ["c", "a"],
        ["d", "d", "e"],
    ]
    assert [r for part in parts for r in part] == batch  # nothing lost or reordered
    assert _parts([], 2) == []
    assert _parts(batch, 100) == [batch]


_MANY_STREAMS = """
import asyncio, sys, ledgerflow
from ledgerflow import NewEvent

async def main(url, p):
    async with ledgerflow.open_store(url) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        failed = 0
        for r in range(2):
            got = await asyncio.gather(
                *(store.append(f"p{p}-{r}-{i}", [NewEvent("E", {})]) for i in range(5000)),
                return_exceptions=True,
            )
            failed += sum(isinstance(x, Exception) for x in got)
        print(failed, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.slow
async def test_group_commits_over_thousands_of_streams_in_several_processes(
    pg_schema: str,
) -> None:
    """Each stream a transaction writes costs an entry in the server's shared lock
    table (6,400 by default). Three processes committing 5,000 new streams at once
    overflowed it ("out of shared memory") and every append of the batch failed;
    now a transaction writes at most 1,000 streams, and a batch that still finds
    the table full is split and tried again."""
    url = pg_url(pg_schema)
    async with open_adapter(url):
        pass
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _MANY_STREAMS,
            url,
            str(n),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(3)
    ]
    for writer in writers:
        assert writer.stdout is not None
        async with asyncio.timeout(60):
            assert await writer.stdout.readline() == b"ready\n"
    reports = await asyncio.gather(*(w.communicate(b"go\n") for w in writers))
    for writer, (out, err) in zip(writers, reports, strict=True):
        assert writer.returncode == 0, err.decode()
        assert out.decode().split() == ["0"], err.decode()[-2000:]
    async with open_adapter(url) as store:
        assert len(await store.read_all(limit=40_000)) == 3 * 2 * 5000
