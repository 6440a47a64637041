"""The rules every backend shares, on plain values: ``plan_batch`` and its helpers.

Each request of a batch is decided in order, as if it were its own transaction:
expected version, idempotent retries, the hash chain, gapless global positions, and
runtime rows only for requests that were appended.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledgerflow.audit import row_hash
from ledgerflow.errors import ConcurrencyError, DuplicateEventError, StoreError
from ledgerflow.events import AlreadyAppended, Appended, AppendResult, ExpectedVersion, StreamState
from ledgerflow.hashing import GENESIS_HASH
from ledgerflow.store._plan import (
    AppendRequest,
    BatchPlan,
    EventRow,
    PreparedEvent,
    StreamHead,
    check_expected,
    plan_batch,
    reused_ids,
)
from ledgerflow.store.runtime import Nudge, RuntimeWrite, Unschedule

AT = 1_700_000_000_000_000
_ids = iter(range(1, 1_000_000))


def event(n: int | None = None, *, data: bytes = b"{}", caller_id: bool = True) -> PreparedEvent:
    """A fresh event (id ``n``, or the next unused one)."""
    return PreparedEvent(
        UUID(int=next(_ids) if n is None else n),
        "noted",
        1,
        data,
        b'{"actor":"t"}',
        caller_id,
    )


def request(
    stream: str,
    *events: PreparedEvent,
    expected: ExpectedVersion = StreamState.ANY,
    runtime: Sequence[RuntimeWrite] = (),
) -> AppendRequest:
    return AppendRequest(stream, events, expected, tuple(runtime))


def plan(
    *requests: AppendRequest,
    heads: dict[str, StreamHead] | None = None,
    existing: Sequence[EventRow] = (),
    last_position: int = 0,
) -> BatchPlan:
    return plan_batch(requests, heads or {}, {row.id: row for row in existing}, last_position, AT)


# -- check_expected ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        (StreamState.ANY, 0),
        (StreamState.ANY, 5),
        (StreamState.NO_STREAM, 0),
        (StreamState.STREAM_EXISTS, 1),
        (StreamState.STREAM_EXISTS, 7),
        (0, 0),
        (3, 3),
    ],
)
def test_expected_versions_that_hold(expected: ExpectedVersion, actual: int) -> None:
    check_expected("s", expected, actual)


@pytest.mark.parametrize(
    ("expected", "actual"),
    [
        (StreamState.NO_STREAM, 1),
        (StreamState.STREAM_EXISTS, 0),
        (0, 1),
        (3, 2),
        (3, 4),
    ],
)
def test_expected_versions_that_fail(expected: ExpectedVersion, actual: int) -> None:
    with pytest.raises(ConcurrencyError) as caught:
        check_expected("s", expected, actual)
    assert (caught.value.stream_id, caught.value.expected, caught.value.actual) == (
        "s",
        expected,
        actual,
    )


# -- appending --------------------------------------------------------------------------


def test_a_new_stream_starts_the_chain_after_the_last_position() -> None:
    a, b = event(), event()
    result = plan(request("s", a, b, expected=StreamState.NO_STREAM), last_position=41)
    assert result.outcomes == [Appended("s", 2, (42, 43))]
    first, second = result.rows
    assert first == EventRow(
        42, a.id, "s", 1, a.type, a.schema_version, a.data, a.metadata, AT, GENESIS_HASH, first.hash
    )
    assert second == EventRow(
        43, b.id, "s", 2, b.type, b.schema_version, b.data, b.metadata, AT, first.hash, second.hash
    )
    assert [row_hash(r) for r in result.rows] == [first.hash, second.hash]
    assert result.heads == {"s": StreamHead(2, second.hash, 43)}
    assert result.last_position == 43


def test_an_existing_stream_goes_on_from_its_head() -> None:
    head = StreamHead(4, b"\x09" * 32, 17)
    e = event()
    result = plan(request("s", e, expected=4), heads={"s": head}, last_position=30)
    assert result.outcomes == [Appended("s", 5, (31,))]
    (row,) = result.rows
    assert (row.version, row.position, row.prev_hash) == (5, 31, head.last_hash)
    assert row.hash == row_hash(row)
    assert result.heads == {"s": StreamHead(5, row.hash, 31)}


def test_requests_of_a_batch_see_each_other() -> None:
    result = plan(
        request("a", event(), expected=StreamState.NO_STREAM),
        request("b", event(), event(), expected=0),
        request("a", event(), expected=1),
        request("a", event(), expected=1),  # stale: a is at 2 now
        request("b", event(), expected=StreamState.STREAM_EXISTS),
        last_position=10,
    )
    assert result.outcomes[:3] == [
        Appended("a", 1, (11,)),
        Appended("b", 2, (12, 13)),
        Appended("a", 2, (14,)),
    ]
    error = result.outcomes[3]
    assert isinstance(error, ConcurrencyError)
    assert (error.stream_id, error.expected, error.actual) == ("a", 1, 2)
    assert result.outcomes[4] == Appended("b", 3, (15,))
    assert [r.position for r in result.rows] == [11, 12, 13, 14, 15]
    by_stream = {s: [r for r in result.rows if r.stream_id == s] for s in "ab"}
    assert by_stream["a"][1].prev_hash == by_stream["a"][0].hash
    assert by_stream["b"][2].prev_hash == by_stream["b"][1].hash
    assert result.heads == {
        "a": StreamHead(2, by_stream["a"][1].hash, 14),
        "b": StreamHead(3, by_stream["b"][2].hash, 15),
    }
    assert result.last_position == 15


def test_a_failed_request_writes_nothing_and_only_appended_requests_keep_runtime_rows() -> None:
    head = StreamHead(2, b"\x05" * 32, 8)
    result = plan(
        request("s", event(), expected=5, runtime=[Nudge("s", 1)]),
        request("t", event(), expected=StreamState.STREAM_EXISTS, runtime=[Nudge("t", 2)]),
        request("s", event(), expected=2, runtime=[Unschedule("s")]),
        heads={"s": head},
        last_position=8,
    )
    assert [type(o) for o in result.outcomes] == [ConcurrencyError, ConcurrencyError, Appended]
    assert result.outcomes[2] == Appended("s", 3, (9,))
    assert result.runtime == [Unschedule("s")]
    assert result.heads == {"s": StreamHead(3, result.rows[0].hash, 9)}


def test_a_batch_that_appends_nothing_keeps_the_last_position() -> None:
    result = plan(request("s", event(), expected=3), request("t", expected=0), last_position=12)
    assert result.rows == []
    assert result.heads == {}
    assert result.last_position == 12
    assert result.outcomes[1] == Appended("t", 0, ())


def test_a_request_without_events_checks_the_version_and_writes_its_runtime_rows() -> None:
    head = StreamHead(3, b"\x03" * 32, 5)
    result = plan(
        request("s", expected=3, runtime=[Nudge("s", 10)]),
        request("s", expected=4, runtime=[Nudge("s", 20)]),
        request("s", event(), expected=3),
        heads={"s": head},
        last_position=9,
    )
    assert result.outcomes[0] == Appended("s", 3, ())
    assert isinstance(result.outcomes[1], ConcurrencyError)
    assert result.outcomes[2] == Appended("s", 4, (10,))
    assert result.runtime == [Nudge("s", 10)]
    assert result.rows[0].prev_hash == head.last_hash


# -- idempotency ------------------------------------------------------------------------


def stored(*requests: AppendRequest) -> list[EventRow]:
    return plan(*requests).rows


def test_a_repeated_append_is_already_appended_and_writes_nothing() -> None:
    a, b = event(), event()
    rows = stored(request("x", event()), request("s", a, b))
    head = StreamHead(2, rows[-1].hash, 3)
    result = plan(
        request("s", a, b, expected=StreamState.NO_STREAM, runtime=[Nudge("s", 1)]),
        heads={"s": head},
        existing=rows,
        last_position=3,
    )
    assert result.outcomes == [AlreadyAppended("s", 2, (2, 3))]
    assert (result.rows, result.heads, result.runtime, result.last_position) == ([], {}, [], 3)


def test_an_append_repeated_within_one_batch_is_already_appended() -> None:
    a = event()
    result = plan(request("s", a), request("t", event()), request("s", a), request("u", event()))
    assert result.outcomes[2:] == [AlreadyAppended("s", 1, (1,)), Appended("u", 1, (3,))]
    assert len(result.rows) == 3


def test_a_partly_stored_append_is_a_duplicate() -> None:
    a, b = event(), event()
    rows = stored(request("s", a))
    result = plan(request("s", a, b), existing=rows, heads={"s": StreamHead(1, rows[0].hash, 1)})
    (error,) = result.outcomes
    assert isinstance(error, DuplicateEventError)
    assert (error.event_id, error.stream_id) == (b.id, "s")
    assert error.reason == (
        "some events of this append are stored and some are not; "
        "a retried append must repeat the original events exactly"
    )
    assert result.rows == []


@pytest.mark.parametrize(
    "change",
    [
        lambda r: dataclasses.replace(r, stream_id="other"),
        lambda r: dataclasses.replace(r, type="other"),
        lambda r: dataclasses.replace(r, schema_version=2),
        lambda r: dataclasses.replace(r, data=b'{"other":1}'),
        lambda r: dataclasses.replace(r, metadata=b"{}"),
    ],
    ids=["stream", "type", "schema_version", "data", "metadata"],
)
def test_an_id_stored_with_other_content_is_a_duplicate(
    change: Callable[[EventRow], EventRow],
) -> None:
    a = event()
    (row,) = stored(request("s", a))
    changed = change(row)
    result = plan(request("s", a), existing=[changed], heads={"s": StreamHead(1, row.hash, 1)})
    (error,) = result.outcomes
    assert isinstance(error, DuplicateEventError)
    assert (error.event_id, error.stream_id) == (a.id, changed.stream_id)
    assert error.reason == "the id was stored with different content"


def test_ids_stored_by_different_appends_are_a_duplicate() -> None:
    a, b = event(), event()
    rows = stored(request("s", a), request("s", event()), request("s", b))
    result = plan(request("s", a, b), existing=rows, heads={"s": StreamHead(3, rows[2].hash, 3)})
    (error,) = result.outcomes
    assert isinstance(error, DuplicateEventError)
    assert (error.event_id, error.stream_id) == (a.id, "s")
    assert error.reason == "the ids were stored by different appends"


def test_a_duplicate_fails_alone() -> None:
    a = event()
    (row,) = stored(request("s", a))
    other = dataclasses.replace(row, data=b"[]")
    result = plan(
        request("s", a),
        request("t", event()),
        existing=[other],
        heads={"s": StreamHead(1, row.hash, 1)},
        last_position=1,
    )
    assert isinstance(result.outcomes[0], DuplicateEventError)
    assert result.outcomes[1] == Appended("t", 1, (2,))


def test_only_caller_chosen_ids_are_looked_up() -> None:
    mine, fresh, also_mine = event(), event(caller_id=False), event()
    requests = [request("s", mine, fresh), request("t"), request("u", also_mine)]
    assert reused_ids(requests) == [mine.id, also_mine.id]


# -- properties -------------------------------------------------------------------------

STREAMS = ["a", "b", "c"]


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[AppendRequest], dict[str, StreamHead], int]:
    """Stored heads for some streams, and requests with right and wrong expectations."""
    heads: dict[str, StreamHead] = {}
    position = draw(st.integers(min_value=0, max_value=5))
    for stream in STREAMS:
        if draw(st.booleans()):
            position += draw(st.integers(min_value=1, max_value=3))
            version = draw(st.integers(min_value=1, max_value=4))
            heads[stream] = StreamHead(version, draw(st.binary(min_size=32, max_size=32)), position)
    expectations = st.one_of(
        st.sampled_from(list(StreamState)), st.integers(min_value=0, max_value=6)
    )
    requests = [
        request(
            draw(st.sampled_from(STREAMS)),
            *[event(data=b'{"n":%d}' % i) for i in range(draw(st.integers(0, 3)))],
            expected=draw(expectations),
            runtime=[Nudge(f"w{i}", i)],
        )
        for i in range(draw(st.integers(min_value=0, max_value=8)))
    ]
    return requests, heads, position


def holds(expected: ExpectedVersion, actual: int) -> bool:
    if expected is StreamState.ANY:
        return True
    if expected is StreamState.NO_STREAM:
        return actual == 0
    if expected is StreamState.STREAM_EXISTS:
        return actual > 0
    return actual == expected


@given(batches())
def test_a_batch_decides_like_a_model_of_the_rules(
    batch: tuple[list[AppendRequest], dict[str, StreamHead], int],
) -> None:
    requests, heads, last_position = batch
    result = plan_batch(requests, heads, {}, last_position, AT)
    versions = {s: h.version for s, h in heads.items()}
    hashes = {s: h.last_hash for s, h in heads.items()}
    position = last_position
    rows = iter(result.rows)
    runtime: list[RuntimeWrite] = []
    assert len(result.outcomes) == len(requests)
    for req, outcome in zip(requests, result.outcomes, strict=True):
        version = versions.get(req.stream_id, 0)
        if not holds(req.expected, version):
            assert isinstance(outcome, ConcurrencyError)
            assert (outcome.stream_id, outcome.expected, outcome.actual) == (
                req.stream_id,
                req.expected,
                version,
            )
            continue
        runtime.extend(req.runtime)
        positions = []
        for e in req.events:
            row = next(rows)
            version += 1
            position += 1
            assert (row.id, row.stream_id, row.version, row.position) == (
                e.id,
                req.stream_id,
                version,
                position,
            )
            assert (row.type, row.schema_version, row.data, row.metadata) == (
                e.type,
                e.schema_version,
                e.data,
                e.metadata,
            )
            assert row.recorded_at_us == AT
            assert row.prev_hash == hashes.get(req.stream_id, GENESIS_HASH)
            assert row.hash == row_hash(row)
            hashes[req.stream_id] = row.hash
            positions.append(position)
        versions[req.stream_id] = version
        assert outcome == Appended(req.stream_id, version, tuple(positions))
    assert next(rows, None) is None
    assert result.runtime == runtime
    assert result.last_position == position
    touched = {r.stream_id for r in result.rows}
    assert result.heads == {
        s: StreamHead(
            versions[s], hashes[s], max(r.position for r in result.rows if r.stream_id == s)
        )
        for s in touched
    }


@given(batches(), st.data())
def test_a_batch_decides_like_its_requests_one_by_one(
    batch: tuple[list[AppendRequest], dict[str, StreamHead], int], data: st.DataObject
) -> None:
    requests, heads, last_position = batch
    # Some requests come twice: retries, which change nothing once the first went in.
    retries = data.draw(st.lists(st.sampled_from(requests), max_size=3)) if requests else []
    requests = data.draw(st.permutations(requests + retries))
    whole = plan_batch(requests, heads, {}, last_position, AT)
    current, known, position = dict(heads), dict[UUID, EventRow](), last_position
    outcomes: list[AppendResult | StoreError] = []
    rows: list[EventRow] = []
    changed: dict[str, StreamHead] = {}
    for req in requests:
        one = plan_batch([req], current, known, position, AT)
        outcomes += one.outcomes
        rows += one.rows
        known.update((r.id, r) for r in one.rows)
        current.update(one.heads)
        changed.update(one.heads)
        position = one.last_position
    assert [repr(o) for o in whole.outcomes] == [repr(o) for o in outcomes]
    assert (whole.rows, whole.heads, whole.last_position) == (rows, changed, position)
