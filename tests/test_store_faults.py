"""Faults at the store's edges: malformed requests in a group commit (every backend),
and PostgreSQL connections lost before, during and after COMMIT.

A request's reported outcome must be the truth about the table: ``Appended`` or
``AlreadyAppended`` only if its events are stored at the positions reported, a refusal
only if none is stored, and "may or may not be stored" only when the store could not
find out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

import ledgerflow
from ledgerflow import (
    AlreadyAppended,
    Appended,
    ConcurrencyError,
    EventRegistry,
    InvalidEventDataError,
    Metadata,
    NewEvent,
    StoreUnavailableError,
)
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store._plan import BatchPlan
from ledgerflow.store.postgres import PostgresEventStore, _allocator_key
from ledgerflow.store.runtime import InstanceRow, Nudge, PutInstance, Schedule, Unschedule

from ._adapters import open_adapter
from .conftest import PG_URL, pg_url, raw_sql, stalling_commits

WAIT = 30.0
"""Guard against a hang, never an assertion about speed."""


def tagged(tag: str, event_id: uuid.UUID | None = None) -> NewEvent:
    return NewEvent("noted", {"tag": tag}, id=event_id)


# -- one malformed request in a group commit (every backend) --------------------------


@dataclass(frozen=True)
class Big:
    n: int


Bad = Callable[[BaseEventStore], Awaitable[object]]

# Each bad call names the field at fault. Before, several of these reached the writer
# and failed every request of the batch, or were stored and broke every later read.
MALFORMED: dict[str, tuple[str, Bad]] = {
    "event id given as a str": (
        "NewEvent.id",
        lambda s: s.append("bad", [NewEvent("E", {}, id="abc")]),  # type: ignore[arg-type]
    ),
    "event id given as a UUID's text": (
        "NewEvent.id",
        lambda s: s.append("bad", [NewEvent("E", {}, id=str(uuid.uuid4()))]),  # type: ignore[arg-type]
    ),
    "event id given as an int": (
        "NewEvent.id",
        lambda s: s.append("bad", [NewEvent("E", {}, id=7)]),  # type: ignore[arg-type]
    ),
    "event type not a str": (
        "NewEvent.type",
        lambda s: s.append("bad", [NewEvent(7, {})]),  # type: ignore[arg-type]
    ),
    "event type with a lone surrogate": (
        "NewEvent.type",
        lambda s: s.append("bad", [NewEvent("E\ud800", {})]),
    ),
    "stream id with a lone surrogate": (
        "stream id",
        lambda s: s.append("bad\udc80", [NewEvent("E", {})]),
    ),
    "schema version given as a str": (
        "NewEvent.schema_version",
        lambda s: s.append("bad", [NewEvent("E", {}, schema_version="2")]),  # type: ignore[arg-type]
    ),
    "schema version beyond 32 bits": (
        "NewEvent.schema_version",
        lambda s: s.append("bad", [NewEvent("E", {}, schema_version=2**31)]),
    ),
    "registered class at a version beyond 32 bits": (
        "schema version",
        lambda s: s.append("bad", [Big(1)]),
    ),
    "metadata field of the wrong type": (
        "metadata",
        lambda s: s.append("bad", [NewEvent("E", {}, metadata=Metadata(actor=5))]),  # type: ignore[arg-type]
    ),
    "call metadata extra not a dict": (
        "metadata",
        lambda s: s.append("bad", [NewEvent("E", {})], metadata=Metadata(extra="x")),  # type: ignore[arg-type]
    ),
    "event metadata given as a dict": (
        "NewEvent.metadata",
        lambda s: s.append("bad", [NewEvent("E", {}, metadata={"actor": "x"})]),  # type: ignore[arg-type]
    ),
    "expected version beyond 64 bits": (
        "expected version",
        lambda s: s.append("bad", [NewEvent("E", {})], expected_version=2**64),
    ),
    "runtime time given as a str": (
        "Schedule.due_at_us",
        lambda s: s.append("bad", [NewEvent("E", {})], runtime=[Schedule("wf", "soon")]),  # type: ignore[arg-type]
    ),
    "runtime time beyond 64 bits": (
        "Schedule.due_at_us",
        lambda s: s.append("bad", [NewEvent("E", {})], runtime=[Schedule("wf", 2**63)]),
    ),
    "lease owner with a lone surrogate": (
        "Schedule.lease_owner",
        lambda s: s.append("bad", [NewEvent("E", {})], runtime=[Schedule("wf", 1, "o\ud800", 5)]),
    ),
    "instance version given as a str": (
        "InstanceRow.version",
        lambda s: s.append(
            "bad",
            [NewEvent("E", {})],
            runtime=[PutInstance(InstanceRow("wf", "n", "1", "running", None, 1, 1))],  # type: ignore[arg-type]
        ),
    ),
    "instance version beyond 32 bits": (
        "InstanceRow.version",
        lambda s: s.append(
            "bad",
            [NewEvent("E", {})],
            runtime=[PutInstance(InstanceRow("wf", "n", 2**31, "running", None, 1, 1))],
        ),
    ),
    "nudge without a time": (
        "Nudge.due_at_us",
        lambda s: s.append("bad", [NewEvent("E", {})], runtime=[Nudge("wf", None)]),  # type: ignore[arg-type]
    ),
    "runtime workflow id not a str": (
        "Unschedule.workflow_id",
        lambda s: s.append("bad", [NewEvent("E", {})], runtime=[Unschedule(7)]),  # type: ignore[arg-type]
    ),
    "not a runtime write": (
        "not a runtime write",
        lambda s: s.append("bad", [NewEvent("E", {})], runtime=["row"]),  # type: ignore[list-item]
    ),
    "bad runtime row without events": (
        "Schedule.due_at_us",
        lambda s: s.append("bad", [], expected_version=0, runtime=[Schedule("wf", 1.5)]),  # type: ignore[arg-type]
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_one_malformed_append_fails_alone_in_a_group_commit(
    store: BaseEventStore, registry: EventRegistry, case: str
) -> None:
    registry.register(Big, "big", 2**31)
    field, bad = MALFORMED[case]
    good = [store.append(f"good-{i}", [tagged(str(i))]) for i in range(40)]
    # Queued in one turn of the event loop, so all of them share one group commit.
    results = await asyncio.wait_for(
        asyncio.gather(*good[:20], bad(store), *good[20:], return_exceptions=True), WAIT
    )
    error = results[20]
    assert isinstance(error, InvalidEventDataError), repr(error)
    assert field in str(error)
    innocent = results[:20] + results[21:]
    assert all(isinstance(r, Appended) for r in innocent), [
        r for r in innocent if not isinstance(r, Appended)
    ]
    assert sorted(p for r in innocent if isinstance(r, Appended) for p in r.positions) == list(
        range(1, 41)
    )
    # Nothing of the bad call is stored, and every event still reads back.
    assert [e.data["tag"] for e in await store.read_all()] == [str(i) for i in range(40)]
    assert await store.stream_version("bad") == 0
    assert await store.list_instances() == []
    assert await store.next_wakeup() is None


async def test_runtime_rows_given_as_a_generator_are_all_written(store: BaseEventStore) -> None:
    # The rows were checked by consuming the generator, then read again: empty.
    rows = (Schedule(f"wf-{i}", i) for i in range(3))
    await store.append("s", [NewEvent("E", {})], runtime=rows)  # type: ignore[arg-type]
    assert await store.next_wakeup() == 0
    assert await store.get_wakeup("wf-2") is not None


async def test_a_defect_in_the_write_path_is_reported_as_one(
    store: BaseEventStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception inside the adapter is not an outage: its callers hear
    of an internal error naming it (still handled as an outage: retryable, and the
    HTTP API answers 500), the log has the traceback, and the store goes on."""
    import importlib

    module = importlib.import_module(
        {
            "memory": "ledgerflow.store.memory",
            "sqlite": "ledgerflow.store.sqlite",
            "postgres": "ledgerflow.store._postgres_write",
        }[store.backend]
    )
    real = module.plan_batch

    def broken(*args: Any, **kwargs: Any) -> BatchPlan:
        raise KeyError("no such head")

    monkeypatch.setattr(module, "plan_batch", broken)
    event_id = uuid.uuid4()
    with caplog.at_level(logging.ERROR), pytest.raises(ledgerflow.StoreInternalError) as caught:
        await asyncio.wait_for(store.append("s", [tagged("a", event_id)]), WAIT)
    error = caught.value
    assert isinstance(error, StoreUnavailableError)
    assert error.retryable
    assert "internal error: KeyError: 'no such head'" in str(error)
    assert "unavailable" not in str(error)
    assert any(r.exc_info for r in caplog.records), "no traceback logged"
    monkeypatch.setattr(module, "plan_batch", real)
    result = await asyncio.wait_for(store.append("s", [tagged("a", event_id)]), WAIT)
    assert isinstance(result, Appended)


# -- PostgreSQL: losing the connection around COMMIT ----------------------------------

COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"
"""The CommandComplete message the server sends once a COMMIT is done."""


class _Relay:
    """A TCP relay to PostgreSQL that can swallow the server's reply to a COMMIT.

    Armed, it forwards nothing more to the client once a reply holds a completed
    COMMIT; when the server then drops the connection, the client's side closes
    too: the transaction committed and the client never heard of it.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = False
        self.swallowed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def refuse_new_connections(self) -> None:
        assert self._server is not None
        self._server.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing every socket ends each link's pumps (cancelling them instead would
        # make asyncio log the cancelled handlers).
        for writer in list(self._writers):
            writer.close()
        await asyncio.wait_for(asyncio.gather(*list(self._links), return_exceptions=True), WAIT)
        if self._server is not None:
            await self._server.wait_closed()

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        server_w: asyncio.StreamWriter | None = None
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            self._writers.add(server_w)
            await asyncio.gather(
                self._pump(client_r, server_w, watch=False),
                self._pump(server_r, client_w, watch=True),
            )
        finally:
            self._links.discard(task)
            for writer in (client_w, server_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, watch: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if watch and self.armed and COMMIT_DONE in data:
                    self.armed = False
                    self.swallowed.set()
                    while await source.read(65536):
                        pass
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


@pytest.fixture
async def relay(pg_schema: str) -> AsyncIterator[_Relay]:
    info = psycopg.conninfo.conninfo_to_dict(PG_URL.split("?", 1)[0])
    proxy = _Relay(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    await proxy.start()
    yield proxy
    await proxy.stop()


def _via(relay: _Relay, schema: str) -> str:
    """The schema's URL, through the relay."""
    info = psycopg.conninfo.conninfo_to_dict(PG_URL.split("?", 1)[0])
    user, db = info.get("user") or "postgres", info.get("dbname") or "test"
    return f"postgresql://{user}@127.0.0.1:{relay.port}/{db}?schema={schema}"


async def _admin() -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)


async def _wait_until_blocked(pid: int) -> None:
    """Return once the backend ``pid`` waits for a lock."""
    async with asyncio.timeout(10), await _admin() as con:
        while True:
            cur = await con.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            )
            row = await cur.fetchone()
            if row is not None and row[0] == "Lock":
                return
            await asyncio.sleep(0.01)


async def _terminate(pid: int) -> None:
    async with await _admin() as con:
        cur = await con.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert await cur.fetchone() == (True,)


def _writer_pid(store: BaseEventStore) -> int:
    assert isinstance(store, PostgresEventStore)
    conn = store._writer_conn
    assert conn is not None
    return conn.info.backend_pid


@contextlib.asynccontextmanager
async def _holding_head(schema: str) -> AsyncIterator[None]:
    """Hold the lock under which writers take positions, so a writer stops inside
    its transaction, before its inserts and its COMMIT."""
    async with await _admin() as con:
        await con.execute("SELECT pg_advisory_lock(%s, 0)", (_allocator_key(schema),))
        try:
            yield
        finally:
            await con.execute("SELECT pg_advisory_unlock(%s, 0)", (_allocator_key(schema),))


Request = tuple[str, list[NewEvent], Any]
"""stream, events, expected version"""


def _stored(url: str) -> dict[str, tuple[str, int]]:
    """tag -> (stream, position) of every event in the table; each tag once."""
    rows = raw_sql(url, "SELECT stream_id, position, data FROM {t}events ORDER BY position")
    stored: dict[str, tuple[str, int]] = {}
    for stream, position, data in rows:
        tag = json.loads(bytes(data))["tag"]
        assert tag not in stored, f"{tag} stored twice"
        stored[tag] = (stream, position)
    return stored


def _assert_truthful(
    url: str,
    requests: Sequence[Request],
    outcomes: Sequence[object],
    before: dict[str, tuple[str, int]],
) -> None:
    """Every request's outcome agrees with what the table holds (``before``: what it
    held before the batch)."""
    stored = _stored(url)
    for (stream, events, _), outcome in zip(requests, outcomes, strict=True):
        tags = [e.data["tag"] for e in events]
        if isinstance(outcome, (Appended, AlreadyAppended)):
            assert [stored.get(t) for t in tags] == [(stream, p) for p in outcome.positions], (
                f"{outcome!r} reported, but the table holds {[stored.get(t) for t in tags]}"
            )
        elif isinstance(outcome, StoreUnavailableError) and "may or may not" in str(outcome):
            pass  # honest: either is possible
        else:
            new = [t for t in tags if t in stored and t not in before]
            assert not new, f"{outcome!r}, yet {new} were stored"


def _batch(store: BaseEventStore, requests: Sequence[Request]) -> asyncio.Future[list[Any]]:
    """The requests as one group commit, under way."""
    return asyncio.gather(
        *(store.append(s, events, expected_version=e) for s, events, e in requests),
        return_exceptions=True,
    )


class _Paths:
    """Counts the batches each commit path of a PostgreSQL store is given."""

    def __init__(self, store: BaseEventStore, monkeypatch: pytest.MonkeyPatch) -> None:
        assert isinstance(store, PostgresEventStore)
        self.fast: list[int] = []
        fast, planned = store._commit_fast, store._commit_planned

        async def spy_fast(plan: BatchPlan) -> Any:
            self.fast.append(len(plan.outcomes))
            return await fast(plan)

        self.planned: list[int] = []

        async def spy_planned(requests: list[Any], recorded_at_us: int) -> Any:
            self.planned.append(len(requests))
            return await planned(requests, recorded_at_us)

        monkeypatch.setattr(store, "_commit_fast", spy_fast)
        monkeypatch.setattr(store, "_commit_planned", spy_planned)


async def _known_streams(store: BaseEventStore, *streams: str) -> NewEvent:
    """Append once to each stream, so the writer knows their heads (and the next
    batch goes the one-round-trip way); the first event has a caller's id."""
    first = tagged(f"{streams[0]}-0", uuid.uuid4())
    await store.append(streams[0], [first])
    for stream in streams[1:]:
        await store.append(stream, [tagged(f"{stream}-0")])
    return first


@pytest.mark.postgres
async def test_fast_path_loss_before_commit_does_not_vouch_for_a_retried_id(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's first event is a caller's retry of a stored id. The connection is
    lost before COMMIT: the batch did not commit, although that id is stored."""
    url = pg_url(pg_schema)
    async with open_adapter(url) as store:
        retried = await _known_streams(store, "a", "b", "c")
        paths = _Paths(store, monkeypatch)
        requests: list[Request] = [
            ("a", [retried], ledgerflow.ANY),
            ("b", [tagged("b-1")], ledgerflow.ANY),
            ("c", [tagged("c-1")], ledgerflow.ANY),
        ]
        async with _holding_head(pg_schema):
            pid = _writer_pid(store)
            before = _stored(pg_url(pg_schema))
            batch = _batch(store, requests)
            await _wait_until_blocked(pid)
            await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
    assert paths.fast == [3]
    _assert_truthful(url, requests, outcomes, before)
    assert outcomes[0] == AlreadyAppended("a", 1, (1,))
    assert outcomes[1:] == [Appended("b", 2, (4,)), Appended("c", 2, (5,))]


@pytest.mark.postgres
async def test_fast_path_loss_during_commit_is_decided_again(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_url(pg_schema)
    async with open_adapter(url) as store:
        await _known_streams(store, "a", "b")
        paths = _Paths(store, monkeypatch)
        requests: list[Request] = [
            ("a", [tagged("a-1"), tagged("a-2")], 1),
            ("b", [tagged("b-1")], ledgerflow.ANY),
        ]
        async with stalling_commits(pg_schema):
            pid = _writer_pid(store)
            before = _stored(pg_url(pg_schema))
            batch = _batch(store, requests)
            await _wait_until_blocked(pid)
            await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
    assert (paths.fast, paths.planned) == ([2], [2])
    _assert_truthful(url, requests, outcomes, before)
    # The lost attempt had taken positions 3-5. Whether it had (or another writer
    # took them since) cannot be told after the loss, so they stay a gap (ADR 008).
    assert outcomes == [Appended("a", 3, (6, 7)), Appended("b", 2, (8,))]


@pytest.mark.postgres
async def test_fast_path_loss_after_commit_reports_the_commit(
    pg_schema: str, relay: _Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _via(relay, pg_schema)
    async with open_adapter(url) as store:
        await _known_streams(store, "a", "b")
        paths = _Paths(store, monkeypatch)
        requests: list[Request] = [
            ("a", [tagged("a-1")], 1),
            ("b", [tagged("b-1", uuid.uuid4())], ledgerflow.ANY),
        ]
        pid = _writer_pid(store)
        relay.armed = True
        before = _stored(pg_url(pg_schema))
        batch = _batch(store, requests)
        await asyncio.wait_for(relay.swallowed.wait(), WAIT)
        await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
        # Nothing was written twice: the next append follows on.
        assert await store.append("a", [tagged("a-2")]) == Appended("a", 3, (5,))
    assert (paths.fast, paths.planned) == ([2], [1])
    _assert_truthful(pg_url(pg_schema), requests, outcomes, before)
    assert outcomes == [Appended("a", 2, (3,)), Appended("b", 2, (4,))]


def _expect_mixed(outcomes: Sequence[object]) -> None:
    assert outcomes[0] == AlreadyAppended("r", 1, (1,))
    assert isinstance(outcomes[1], ConcurrencyError)
    assert outcomes[2] == Appended("n", 2, (3, 4))


@pytest.mark.postgres
async def test_planned_path_loss_before_commit_is_retried(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_url(pg_schema)
    async with open_adapter(url) as store:
        requests = await _mixed_url(url)
        paths = _Paths(store, monkeypatch)
        async with _holding_head(pg_schema):
            pid = _writer_pid(store)
            before = _stored(pg_url(pg_schema))
            batch = _batch(store, requests)
            await _wait_until_blocked(pid)
            await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
    assert (paths.fast, paths.planned) == ([], [3])
    _assert_truthful(url, requests, outcomes, before)
    _expect_mixed(outcomes)


@pytest.mark.postgres
async def test_planned_path_loss_during_commit_is_settled_and_retried(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes were sent, so the commit's outcome was unknown: it is looked up
    (nothing stored), and the batch decided again instead of failing every caller."""
    url = pg_url(pg_schema)
    async with open_adapter(url) as store:
        requests = await _mixed_url(url)
        paths = _Paths(store, monkeypatch)
        async with stalling_commits(pg_schema):
            pid = _writer_pid(store)
            before = _stored(pg_url(pg_schema))
            batch = _batch(store, requests)
            await _wait_until_blocked(pid)
            await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
    assert (paths.fast, paths.planned) == ([], [3])
    _assert_truthful(url, requests, outcomes, before)
    _expect_mixed(outcomes)


@pytest.mark.postgres
async def test_planned_path_loss_after_commit_reports_each_request_its_outcome(
    pg_schema: str, relay: _Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _via(relay, pg_schema)
    async with open_adapter(url) as store:
        requests = await _mixed_url(url)
        paths = _Paths(store, monkeypatch)
        pid = _writer_pid(store)
        relay.armed = True
        before = _stored(pg_url(pg_schema))
        batch = _batch(store, requests)
        await asyncio.wait_for(relay.swallowed.wait(), WAIT)
        await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
        assert await store.append("n", [tagged("n-2")]) == Appended("n", 3, (5,))
    assert paths.planned[0] == 3
    _assert_truthful(pg_url(pg_schema), requests, outcomes, before)
    _expect_mixed(outcomes)


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["fast", "planned"])
async def test_an_outcome_that_cannot_be_checked_is_reported_as_unknown(
    pg_schema: str, relay: _Relay, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    url = _via(relay, pg_schema)
    async with open_adapter(url) as store:
        if path == "fast":
            await _known_streams(store, "a", "b")
        requests: list[Request] = [
            ("a", [tagged("a-1")], ledgerflow.ANY),
            ("b", [tagged("b-1")], ledgerflow.ANY),
        ]
        paths = _Paths(store, monkeypatch)
        pid = _writer_pid(store)
        relay.armed = True
        before = _stored(pg_url(pg_schema))
        batch = _batch(store, requests)
        await asyncio.wait_for(relay.swallowed.wait(), WAIT)
        relay.refuse_new_connections()  # the store cannot ask what became of it
        await _terminate(pid)
        outcomes = await asyncio.wait_for(batch, WAIT)
    assert (len(paths.fast), len(paths.planned)) == ((1, 0) if path == "fast" else (0, 1))
    for outcome in outcomes:
        assert isinstance(outcome, StoreUnavailableError), repr(outcome)
        assert "may or may not be stored" in str(outcome)
    _assert_truthful(pg_url(pg_schema), requests, outcomes, before)
    assert set(_stored(pg_url(pg_schema))) >= {"a-1", "b-1"}  # it did commit


async def _mixed_url(url: str) -> list[Request]:
    """A batch for the planned path: a retry of a stored append, a stale expected
    version and a fresh append, on streams the caller's writer has not seen."""
    async with open_adapter(url) as other:
        retried = tagged("r-0", uuid.uuid4())
        await other.append("r", [retried])
        await other.append("v", [tagged("v-0")])
    return [
        ("r", [retried], ledgerflow.NO_STREAM),
        ("v", [tagged("v-1")], 0),
        ("n", [tagged("n-0"), tagged("n-1")], ledgerflow.NO_STREAM),
    ]


# -- PostgreSQL: quiet conflicts, durable commits ---------------------------------------


@pytest.mark.postgres
async def test_a_version_conflict_prints_no_pipeline_noise(
    pg_schema: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer's one-round-trip guess misses because another process wrote: an
    ordinary ConcurrencyError, with nothing logged about aborted pipelines."""
    caplog.set_level(logging.DEBUG, logger="psycopg")
    url = pg_url(pg_schema)
    async with open_adapter(url) as mine, open_adapter(url) as theirs:
        for i in range(12):
            stream = f"s-{i}"
            await mine.append(stream, [NewEvent("E", {})], expected_version=0)
            await theirs.append(stream, [NewEvent("E", {})], expected_version=1)
            with pytest.raises(ConcurrencyError):
                await mine.append(
                    stream,
                    [NewEvent("E", {}) for _ in range(1 + i % 3)],
                    expected_version=1,
                    runtime=[Schedule(f"wf-{i}", 1)] * (i % 4),
                )
    noise = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == [], [r.getMessage() for r in noise]
    assert "pipeline aborted" not in capsys.readouterr().err


@pytest.mark.postgres
async def test_every_session_commits_synchronously_whatever_the_default(pg_schema: str) -> None:
    # The database default here is off, as a server tuned for speed may have it.
    off = "options=-c%20synchronous_commit%3Doff"
    async with await psycopg.AsyncConnection.connect(f"{PG_URL.split('?', 1)[0]}?{off}") as raw:
        cur = await raw.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("off",)
    async with open_adapter(f"{pg_url(pg_schema)}&{off}") as store:
        assert isinstance(store, PostgresEventStore)
        await store.append("s", [NewEvent("E", {})])
        writer = store._writer_conn
        assert writer is not None
        cur = await writer.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("on",)
        assert store._pool is not None
        async with store._pool.connection() as reader:
            cur = await reader.execute("SHOW synchronous_commit")
            assert await cur.fetchone() == ("on",)
