"""Event-sourced aggregates: a functional core and a repository around it.

The core is a *decider*: ``decide(state, command) -> events`` says what happens,
``evolve(state, event) -> state`` folds one event into a new frozen state. Neither
does I/O, so both are tested with plain values. :class:`Repository` does the I/O:
it loads (latest snapshot, then the events after it), runs ``decide``, and appends
with the loaded version as the expected one, so two racing commands never both win.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from . import personal
from .errors import ConcurrencyError, ConfigurationError, StreamNotFoundError
from .events import Metadata, Snapshot
from .store.ports import EventStore

__all__ = ["Aggregate", "Loaded", "Repository"]

log = logging.getLogger("ledgerflow.aggregate")

S = TypeVar("S")
C = TypeVar("C")
E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Aggregate(Generic[S, C, E]):
    """What an aggregate is, as values and pure functions.

    ``name`` prefixes its streams (``f"{name}-{id}"``). ``state_type`` is the type of
    the state (a frozen dataclass or msgspec Struct) used to encode snapshots; a
    snapshot is kept every ``snapshot_every`` events (None: never), unless the state
    or its events hold personal data (``ledgerflow.personal``: a snapshot would keep
    it in the clear, past an erasure). A snapshot is used only by code whose state
    type has the shape it was written with (its fields and their types, as a JSON
    Schema fingerprint kept with it): older ones are ignored and the state is
    rebuilt from events, so a field added with a default never reads as that
    default where the events say otherwise. Bump ``snapshot_version`` when the
    state's *meaning* changes but not its shape (``evolve`` counts differently).
    """

    name: str
    initial: S
    decide: Callable[[S, C], Sequence[E]]
    evolve: Callable[[S, E], S]
    state_type: type[S]
    snapshot_every: int | None = 100
    snapshot_version: int = 1

    def __post_init__(self) -> None:
        if self.snapshot_every is not None and self.snapshot_every < 1:
            raise ConfigurationError(f"aggregate {self.name!r}: snapshot_every must be >= 1")

    def fold(self, events: Sequence[E], state: S | None = None) -> S:
        current = self.initial if state is None else state
        for event in events:
            current = self.evolve(current, event)
        return current


@dataclass(frozen=True, slots=True)
class Loaded(Generic[S]):
    """An aggregate's state and the stream version it reflects (0: no events yet)."""

    id: str
    state: S
    version: int


class Repository(Generic[S, C, E]):
    """Loads and saves one kind of aggregate through an EventStore."""

    def __init__(self, store: EventStore, aggregate: Aggregate[S, C, E]) -> None:
        self.store = store
        self.aggregate = aggregate
        self._encode = msgspec.json.Encoder().encode
        self._decode_state = msgspec.json.Decoder(aggregate.state_type).decode
        self._snapshot_type = f"{aggregate.name}@{_shape(aggregate.state_type)}"

    def stream_id(self, aggregate_id: str) -> str:
        return f"{self.aggregate.name}-{aggregate_id}"

    async def load(self, aggregate_id: str) -> Loaded[S]:
        stream = self.stream_id(aggregate_id)
        state, version = self.aggregate.initial, 0
        snapshot = await self.store.load_snapshot(stream)
        if (
            snapshot is not None
            and snapshot.type == self._snapshot_type
            and snapshot.schema_version == self.aggregate.snapshot_version
        ):
            try:
                state, version = self._decode_state(snapshot.state), snapshot.version
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                # A cache, not the truth: rebuilt from the events instead.
                log.warning(
                    "aggregate %s: snapshot of %s ignored: %s", self.aggregate.name, stream, exc
                )
        try:
            events = await self.store.read_stream(stream, from_version=version + 1)
        except StreamNotFoundError:
            events = []
        if version and not events and await self.store.stream_version(stream) < version:
            # A snapshot ahead of its stream (saved by hand at a version the stream
            # never reached): taken as the truth, every save would conflict for ever.
            log.warning(
                "aggregate %s: snapshot of %s at version %d ignored: the stream is behind it",
                self.aggregate.name,
                stream,
                version,
            )
            state, version = self.aggregate.initial, 0
            try:
                events = await self.store.read_stream(stream)
            except StreamNotFoundError:
                events = []
        for event in events:
            state = self.aggregate.evolve(state, event.data)
            version = event.version
        return Loaded(aggregate_id, state, version)

    async def save(
        self, loaded: Loaded[S], events: Sequence[E], *, metadata: Metadata | None = None
    ) -> Loaded[S]:
        """Append ``events`` expecting the stream at ``loaded.version``.

        Raises ``ConcurrencyError`` if another writer got there first.
        """
        if not events:
            return loaded
        stream = self.stream_id(loaded.id)
        result = await self.store.append(stream, events, loaded.version, metadata=metadata)
        state = self.aggregate.fold(events, loaded.state)
        saved = Loaded(loaded.id, state, result.version)
        every = self.aggregate.snapshot_every
        if (
            every is not None
            and result.version // every > loaded.version // every
            and not _personal(state, events)
        ):
            await self.store.save_snapshot(
                Snapshot(
                    stream,
                    result.version,
                    self._snapshot_type,
                    self.aggregate.snapshot_version,
                    self._encode(state),
                )
            )
        return saved

    async def handle(
        self,
        aggregate_id: str,
        command: C,
        *,
        metadata: Metadata | None = None,
        attempts: int = 3,
    ) -> tuple[Loaded[S], Sequence[E]]:
        """Load, decide, save; on a lost race reload and decide again.

        Exceptions from ``decide`` (business rule violations) propagate unchanged
        and nothing is written.
        """
        for attempt in range(1, attempts + 1):
            loaded = await self.load(aggregate_id)
            events = self.aggregate.decide(loaded.state, command)
            try:
                return await self.save(loaded, events, metadata=metadata), events
            except ConcurrencyError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


def _personal(state: object, events: Sequence[object]) -> bool:
    """Whether a snapshot of ``state`` would keep personal data in the clear (its
    type, or the events that made it, declare some): such states are not kept."""
    if not personal.declared():
        return False
    return personal.has_personal_objects(state) or any(
        personal.has_personal_objects(e) for e in events
    )


def _shape(state_type: type) -> str:
    """A fingerprint of the state type's shape: its JSON Schema (field names, their
    types, nested classes), hashed. Unnamed in it: defaults and docstrings."""
    try:
        schema = msgspec.json.schema(state_type)
    except (TypeError, ValueError):  # a type msgspec cannot describe: by name only
        schema = {"type": f"{state_type.__module__}.{state_type.__qualname__}"}
    return hashlib.sha256(msgspec.json.encode(_without_defaults(schema))).hexdigest()[:16]


def _without_defaults(node: object) -> object:
    if isinstance(node, dict):
        return {
            k: _without_defaults(v)
            for k, v in sorted(node.items())
            if k not in ("default", "description", "title")
        }
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node
