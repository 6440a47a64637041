"""Hypothesis drives random sequences of appends and reads against each backend and
checks every answer against a plain in-Python model of the ledger.

The state machine is synchronous; each instance runs its own event loop and its own
empty store (a fresh SQLite file or PostgreSQL schema), closed in ``teardown``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from ledgerflow import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AlreadyAppended,
    Appended,
    ConcurrencyError,
    DuplicateEventError,
    NewEvent,
    StreamNotFoundError,
    StreamState,
)
from ledgerflow.hashing import GENESIS_HASH, chain_hash
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter
from .conftest import PG_URL, pg_url, require_postgres

T = TypeVar("T")

SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

STREAMS = st.sampled_from(["a", "b", "c"])
CONTENTS = st.lists(
    st.tuples(
        st.sampled_from(["created", "changed"]),
        st.fixed_dictionaries({"k": st.integers(0, 3)}),
    ),
    min_size=1,
    max_size=3,
)
STATES = st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS])


@dataclass(frozen=True)
class Stored:
    """One event as the model holds it."""

    id: uuid.UUID
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Call:
    """An append that succeeded, to be replayed or misused later."""

    stream: str
    events: tuple[NewEvent, ...]
    result: Appended


class StoreMachine(RuleBasedStateMachine):
    backend: ClassVar[str]
    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        backend = self.backend
        self.model: dict[str, list[Stored]] = {}
        self.log: list[tuple[str, int]] = []
        """The global order: (stream, index into its model list), position - 1."""
        self.next_id = 0
        self.tmp: str | None = None
        self.schema: str | None = None
        if backend == "memory":
            url = "memory://"
        elif backend == "sqlite":
            self.tmp = tempfile.mkdtemp(prefix="lf-stateful-")
            url = f"sqlite:///{self.tmp}/ledger.db"
        else:
            import psycopg

            self.schema = f"lf_stateful_{uuid.uuid4().hex[:16]}"
            with psycopg.connect(PG_URL, autocommit=True) as con:
                con.execute(f"CREATE SCHEMA {self.schema}")
            url = pg_url(self.schema)
        self.runner = asyncio.Runner()
        self.store: BaseEventStore = open_adapter(url)
        try:
            self.run(self.store.open())
        except BaseException:
            self.teardown()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.runner.close()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            if self.schema is not None:
                import psycopg

                with psycopg.connect(PG_URL, autocommit=True) as con:
                    con.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    # -- helpers ---------------------------------------------------------------------

    def fresh(self, contents: list[tuple[str, dict[str, Any]]]) -> tuple[NewEvent, ...]:
        events = []
        for type_name, data in contents:
            self.next_id += 1
            events.append(NewEvent(type_name, data, id=uuid.UUID(int=self.next_id)))
        return tuple(events)

    def version(self, stream: str) -> int:
        return len(self.model.get(stream, []))

    def record(self, stream: str, events: tuple[NewEvent, ...]) -> Appended:
        """Apply a successful append to the model; the Appended it must have returned."""
        stored = self.model.setdefault(stream, [])
        positions = []
        for event in events:
            assert event.id is not None
            stored.append(Stored(event.id, event.type, dict(event.data)))
            self.log.append((stream, len(stored) - 1))
            positions.append(len(self.log))
        return Appended(stream, len(stored), tuple(positions))

    def append_ok(
        self, stream: str, events: tuple[NewEvent, ...], expected: int | StreamState
    ) -> Call:
        result = self.run(self.store.append(stream, events, expected_version=expected))
        assert result == self.record(stream, events)
        assert isinstance(result, Appended)
        return Call(stream, events, result)

    def append_conflicts(
        self, stream: str, events: tuple[NewEvent, ...], expected: int | StreamState
    ) -> None:
        with pytest.raises(ConcurrencyError) as info:
            self.run(self.store.append(stream, events, expected_version=expected))
        assert (info.value.stream_id, info.value.expected, info.value.actual) == (
            stream,
            expected,
            self.version(stream),
        )

    # -- rules -----------------------------------------------------------------------

    @rule(target=calls, stream=STREAMS, contents=CONTENTS)
    def append_at_expected_version(
        self, stream: str, contents: list[tuple[str, dict[str, Any]]]
    ) -> Call:
        return self.append_ok(stream, self.fresh(contents), self.version(stream))

    @rule(stream=STREAMS, contents=CONTENTS, off=st.integers(-3, 3).filter(bool))
    def append_at_wrong_version(
        self, stream: str, contents: list[tuple[str, dict[str, Any]]], off: int
    ) -> None:
        expected = max(0, self.version(stream) + off)
        if expected == self.version(stream):
            expected += 1
        self.append_conflicts(stream, self.fresh(contents), expected)

    @rule(target=calls, stream=STREAMS, contents=CONTENTS, state=STATES)
    def append_with_state(
        self, stream: str, contents: list[tuple[str, dict[str, Any]]], state: StreamState
    ) -> Call | MultipleResults[Call]:
        events = self.fresh(contents)
        exists = self.version(stream) > 0
        if state is ANY or (state is NO_STREAM) != exists:
            return self.append_ok(stream, events, state)
        self.append_conflicts(stream, events, state)
        return multiple()

    @rule(call=calls, expected=st.one_of(STATES, st.integers(0, 10)))
    def replay_a_call(self, call: Call, expected: int | StreamState) -> None:
        head = len(self.log)
        result = self.run(self.store.append(call.stream, call.events, expected_version=expected))
        assert result == AlreadyAppended(call.stream, call.result.version, call.result.positions)
        assert self.run(self.store.head_position()) == head

    @rule(call=calls, stream=STREAMS, data=st.fixed_dictionaries({"k": st.integers(10, 20)}))
    def reuse_an_id_for_other_content(self, call: Call, stream: str, data: dict[str, Any]) -> None:
        taken = call.events[0]
        with pytest.raises(DuplicateEventError) as info:
            self.run(self.store.append(stream, [NewEvent(taken.type, data, id=taken.id)]))
        assert info.value.event_id == taken.id

    @rule(call=calls, contents=CONTENTS)
    def extend_a_stored_call(self, call: Call, contents: list[tuple[str, dict[str, Any]]]) -> None:
        with pytest.raises(DuplicateEventError):
            self.run(self.store.append(call.stream, call.events + self.fresh(contents)))

    @rule(
        stream=STREAMS,
        from_version=st.none() | st.integers(0, 12),
        limit=st.none() | st.integers(0, 5),
        backwards=st.booleans(),
    )
    def read_a_stream(
        self, stream: str, from_version: int | None, limit: int | None, backwards: bool
    ) -> None:
        stored = self.model.get(stream)
        read = self.store.read_stream(
            stream, from_version=from_version, limit=limit, backwards=backwards
        )
        if not stored:
            with pytest.raises(StreamNotFoundError):
                self.run(read)
            return
        numbered = list(enumerate(stored, start=1))
        if backwards:
            top = len(stored) if from_version is None else from_version
            expected = [(v, e) for v, e in reversed(numbered) if v <= top]
        else:
            bottom = 1 if from_version is None else from_version
            expected = [(v, e) for v, e in numbered if v >= bottom]
        if limit is not None:
            expected = expected[:limit]
        got = self.run(read)
        assert [(e.version, Stored(e.id, e.type, e.data)) for e in got] == expected
        assert all(e.stream_id == stream for e in got)

    @rule(from_position=st.integers(1, 60), limit=st.none() | st.integers(0, 10))
    def read_the_log(self, from_position: int, limit: int | None) -> None:
        got = self.run(self.store.read_all(from_position=from_position, limit=limit))
        end = None if limit is None else from_position - 1 + limit
        expected = [
            (position, stream, self.model[stream][index])
            for position, (stream, index) in enumerate(self.log, start=1)
        ][from_position - 1 : end]
        assert [(e.position, e.stream_id, Stored(e.id, e.type, e.data)) for e in got] == expected

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def ledger_matches_model_and_chains(self) -> None:
        events = self.run(self.store.read_all())
        rows = {row.id: row for row in self.run(self.store.read_rows(limit=10_000))}
        assert self.run(self.store.head_position()) == len(self.log)
        # Positions are contiguous and total: exactly 1..N, in order.
        assert [e.position for e in events] == list(range(1, len(self.log) + 1))
        last: dict[str, tuple[int, bytes]] = {}
        for event, (stream, index) in zip(events, self.log, strict=True):
            assert event.stream_id == stream
            assert Stored(event.id, event.type, event.data) == self.model[stream][index]
            version, prev = last.get(stream, (0, GENESIS_HASH))
            # Versions are contiguous from 1 within each stream.
            assert event.version == version + 1 == index + 1
            assert event.prev_hash == prev
            row = rows[event.id]
            assert event.hash == chain_hash(
                prev,
                event.id,
                stream,
                event.version,
                event.position,
                event.type,
                event.schema_version,
                row.data,
                row.metadata,
                row.recorded_at_us,
            )
            last[stream] = (event.version, event.hash)
        for stream, stored in self.model.items():
            assert self.run(self.store.stream_version(stream)) == len(stored)


class MemoryMachine(StoreMachine):
    backend = "memory"


class SQLiteMachine(StoreMachine):
    backend = "sqlite"


class PostgresMachine(StoreMachine):
    backend = "postgres"


MACHINES: dict[str, type[StoreMachine]] = {
    m.backend: m for m in (MemoryMachine, SQLiteMachine, PostgresMachine)
}


@pytest.mark.parametrize("backend", list(MACHINES))
def test_store_behaves_like_the_model(backend: str) -> None:
    if backend == "postgres":
        require_postgres()
    run_state_machine_as_test(MACHINES[backend], settings=SETTINGS)
