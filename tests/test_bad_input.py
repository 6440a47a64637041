"""Invariant 10: bad input gets a clear, typed ledgerflow error and changes nothing.

Every case runs on every backend against a store that already holds a few events;
the whole ledger is compared before and after, and the store must still work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest

from ledgerflow import (
    NO_STREAM,
    STREAM_EXISTS,
    Appended,
    ConcurrencyError,
    DuplicateEventError,
    EventRegistry,
    EventSerializationError,
    EventTooLargeError,
    InvalidEventDataError,
    LedgerflowError,
    Metadata,
    NewEvent,
    StreamNotFoundError,
    UnknownEventTypeError,
)
from ledgerflow.store import DEFAULT_MAX_EVENT_BYTES
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter


@dataclasses.dataclass(frozen=True)
class Amount:
    cents: int


@dataclasses.dataclass(frozen=True)
class Anything:
    payload: Any


class Opaque:
    """An object JSON has no representation for."""


Ledger = list[tuple[uuid.UUID, str, int, int, str, int, Any, Metadata, bytes]]


async def contents(store: BaseEventStore) -> tuple[int, Ledger, dict[str, int], object]:
    """Everything a bad call could have changed: head, events, versions, stream heads."""
    events = await store.read_all()
    ledger = [
        (
            e.id,
            e.stream_id,
            e.version,
            e.position,
            e.type,
            e.schema_version,
            e.data,
            e.metadata,
            e.hash,
        )
        for e in events
    ]
    versions = {s: await store.stream_version(s) for s in ("seed", "other", "new")}
    return await store.head_position(), ledger, versions, await store.stream_heads()


@pytest.fixture
async def seeded(store_url: str, registry: EventRegistry) -> AsyncIterator[BaseEventStore]:
    registry.register(Amount, "amount")
    registry.register(Anything, "anything")
    async with open_adapter(store_url, registry=registry) as store:
        await store.append("seed", [NewEvent("a", {"n": 1}), Amount(5)])
        await store.append("other", [NewEvent("b", {"n": 2})])
        yield store


Case = Callable[[BaseEventStore], Awaitable[object]]
BIG = "x" * DEFAULT_MAX_EVENT_BYTES
HANG_GUARD = 5.0
"""How long a call that should fail at once may block before we call it a hang."""

CASES: dict[str, tuple[type[LedgerflowError], Case]] = {
    "wrong expected version": (
        ConcurrencyError,
        lambda s: s.append("seed", [NewEvent("a", {})], expected_version=1),
    ),
    "expected version of a missing stream": (
        ConcurrencyError,
        lambda s: s.append("new", [NewEvent("a", {})], expected_version=3),
    ),
    "no stream on an existing one": (
        ConcurrencyError,
        lambda s: s.append("seed", [NewEvent("a", {})], expected_version=NO_STREAM),
    ),
    "stream exists on a missing one": (
        ConcurrencyError,
        lambda s: s.append("new", [NewEvent("a", {})], expected_version=STREAM_EXISTS),
    ),
    "unknown stream": (StreamNotFoundError, lambda s: s.read_stream("new")),
    "oversized data": (EventTooLargeError, lambda s: s.append("new", [NewEvent("a", {"b": BIG})])),
    "oversized typed event": (EventTooLargeError, lambda s: s.append("seed", [Anything(BIG)])),
    "oversized metadata": (
        EventTooLargeError,
        lambda s: s.append("new", [NewEvent("a", {}, metadata=Metadata(reason=BIG))]),
    ),
    "oversized call metadata": (
        EventTooLargeError,
        lambda s: s.append("new", [NewEvent("a", {})], metadata=Metadata(extra={"x": BIG})),
    ),
    "a set in the data": (
        EventSerializationError,
        lambda s: s.append("new", [NewEvent("a", {"tags": {"x", "y"}})]),
    ),
    "an object in the data": (
        EventSerializationError,
        lambda s: s.append("new", [NewEvent("a", {"what": Opaque()})]),
    ),
    "an object in a typed event": (
        EventSerializationError,
        lambda s: s.append("seed", [Amount(1), Anything(Opaque())]),
    ),
    "an object in metadata": (
        EventSerializationError,
        lambda s: s.append("new", [NewEvent("a", {}, metadata=Metadata(extra={"o": Opaque()}))]),
    ),
    "data that is not an object": (
        InvalidEventDataError,
        lambda s: s.append("new", [NewEvent("a", [1, 2])]),  # type: ignore[arg-type]
    ),
    "typed payload of the wrong type": (
        InvalidEventDataError,
        lambda s: s.append("new", [NewEvent("amount", {"cents": "five"})]),
    ),
    "empty event type": (InvalidEventDataError, lambda s: s.append("new", [NewEvent("", {})])),
    "unregistered class": (UnknownEventTypeError, lambda s: s.append("new", [Opaque()])),
    "None as an event": (UnknownEventTypeError, lambda s: s.append("new", [None])),
    "empty event list": (InvalidEventDataError, lambda s: s.append("new", [])),
    "events given as a str": (InvalidEventDataError, lambda s: s.append("new", "events")),
    "events given as bytes": (InvalidEventDataError, lambda s: s.append("new", b"events")),
    "events given as a generator": (
        InvalidEventDataError,
        lambda s: s.append("new", (NewEvent("a", {}) for _ in range(2))),  # type: ignore[arg-type]
    ),
    "empty stream id": (InvalidEventDataError, lambda s: s.append("", [NewEvent("a", {})])),
    "stream id not a str": (
        InvalidEventDataError,
        lambda s: s.append(7, [NewEvent("a", {})]),  # type: ignore[arg-type]
    ),
    "stream id too long": (
        InvalidEventDataError,
        lambda s: s.append("s" * 256, [NewEvent("a", {})]),
    ),
    "negative expected version": (
        InvalidEventDataError,
        lambda s: s.append("seed", [NewEvent("a", {})], expected_version=-1),
    ),
    "bool expected version": (
        InvalidEventDataError,
        lambda s: s.append("other", [NewEvent("a", {})], expected_version=True),
    ),
    "str expected version": (
        InvalidEventDataError,
        lambda s: s.append("seed", [NewEvent("a", {})], expected_version="2"),  # type: ignore[arg-type]
    ),
    "metadata not a Metadata": (
        InvalidEventDataError,
        lambda s: s.append("new", [NewEvent("a", {})], metadata={"actor": "x"}),  # type: ignore[arg-type]
    ),
    "id reused with other content": (
        DuplicateEventError,
        lambda s: reuse_id(s),
    ),
    "negative read_stream limit": (
        InvalidEventDataError,
        lambda s: s.read_stream("seed", limit=-1),
    ),
    "negative read_all limit": (InvalidEventDataError, lambda s: s.read_all(limit=-1)),
    "negative read_rows limit": (InvalidEventDataError, lambda s: s.read_rows(limit=-1)),
    "negative stream_heads limit": (InvalidEventDataError, lambda s: s.stream_heads(limit=-1)),
    "subscription batch of zero": (
        InvalidEventDataError,
        lambda s: asyncio.wait_for(anext(s.subscribe(batch_size=0)), HANG_GUARD),
    ),
    # PostgreSQL called these corruption ("operator does not exist: bigint >=
    # boolean"), SQLite raised OverflowError; a float was taken as a position.
    # Stored as null, a list, a string key: the event silently differed.
    "NaN in a typed event's Any field": (
        EventSerializationError,
        lambda s: s.append("seed", [Anything({"n": math.nan})]),
    ),
    "an int key in a typed event's Any field": (
        EventSerializationError,
        lambda s: s.append("seed", [Anything({1: 2})]),
    ),
    "infinity in metadata extra": (
        EventSerializationError,
        lambda s: s.append("seed", [NewEvent("a", {})], metadata=Metadata(extra={"n": math.inf})),
    ),
    "a tuple in metadata extra": (
        EventSerializationError,
        lambda s: s.append("seed", [NewEvent("a", {})], metadata=Metadata(extra={"t": (1, 2)})),
    ),
    "a bool as read_all's position": (
        InvalidEventDataError,
        lambda s: s.read_all(from_position=True),
    ),
    "a float as read_rows's position": (
        InvalidEventDataError,
        lambda s: s.read_rows(from_position=1.5),  # type: ignore[arg-type]
    ),
    "a bool as read_stream's version": (
        InvalidEventDataError,
        lambda s: s.read_stream("seed", from_version=True),
    ),
    "a position past 2**63": (InvalidEventDataError, lambda s: s.read_all(from_position=2**64)),
    "a version past 2**63": (
        InvalidEventDataError,
        lambda s: s.read_stream("seed", from_version=2**64),
    ),
    "a limit past 2**63": (InvalidEventDataError, lambda s: s.read_all(limit=2**63)),
    "a subscription from past 2**63": (
        InvalidEventDataError,
        lambda s: asyncio.wait_for(anext(s.subscribe(from_position=2**64)), HANG_GUARD),
    ),
}


async def reuse_id(store: BaseEventStore) -> object:
    first = (await store.read_stream("seed"))[0]
    return await store.append("seed", [NewEvent("a", {"n": 99}, id=first.id)])


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_refused_and_changes_nothing(seeded: BaseEventStore, case: str) -> None:
    error, call = CASES[case]
    before = await contents(seeded)
    with pytest.raises(error):
        await call(seeded)
    assert await contents(seeded) == before
    # The store is still usable afterwards.
    assert await seeded.append("other", [NewEvent("b", {})], expected_version=1) == Appended(
        "other", 2, (before[0] + 1,)
    )


async def test_event_size_limit_is_configurable(store_url: str) -> None:
    limit = 200
    metadata_size = len(msgspec.json.encode(Metadata()))

    def event_of_size(size: int) -> NewEvent:
        data = {"p": "x" * (size - metadata_size - len(b'{"p":""}'))}
        assert len(msgspec.json.encode(data)) + metadata_size == size
        return NewEvent("sized", data)

    async with open_adapter(store_url, max_event_bytes=limit) as store:
        assert store.max_event_bytes == limit
        await store.append("s", [event_of_size(limit)])
        with pytest.raises(EventTooLargeError) as info:
            await store.append("s", [event_of_size(limit - 10), event_of_size(limit + 1)])
        assert (info.value.event_type, info.value.size, info.value.limit) == (
            "sized",
            limit + 1,
            limit,
        )
        assert await store.head_position() == 1
        assert await store.stream_version("s") == 1


async def test_default_event_size_limit_is_one_mebibyte(store: BaseEventStore) -> None:
    assert DEFAULT_MAX_EVENT_BYTES == 1024 * 1024
    assert store.max_event_bytes == DEFAULT_MAX_EVENT_BYTES
    payload = "y" * (DEFAULT_MAX_EVENT_BYTES - 100)
    await store.append("s", [NewEvent("big", {"p": payload})])
    with pytest.raises(EventTooLargeError) as info:
        await store.append("s", [NewEvent("big", {"p": payload + "y" * 200})])
    assert info.value.limit == DEFAULT_MAX_EVENT_BYTES
    assert await store.head_position() == 1
    assert (await store.read_stream("s"))[0].data == {"p": payload}
