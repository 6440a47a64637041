"""The outbox relay: the ledger is the outbox; the relay publishes what it holds.

A relay follows the global log from its own checkpoint (a projection row named
``relay_<name>``, with the same lease: one relay at a time, taken over when its holder
dies). For each batch it publishes the events a ``Route`` selects (by type, or by
stream prefix), each stream's in order, with the event id as the message id, and then
moves its checkpoint. The write transaction that recorded the events is never widened:
nothing is published for a write that rolled back, and nothing a write committed is
left unpublished.

A crash between publishing and checkpointing publishes the batch again: the broker
drops the copies it stored within its duplicate window (JetStream: ``Nats-Msg-Id``),
and consumers drop the rest by message id. A broker that is down stops the relay where
it is; it backs off and catches up once the broker is back, and its lag is that of its
row (``ledgerflow projections list``).

Each message is published in a ``publish <subject>`` span (a producer's) of the trace
that recorded its event (``Metadata.traceparent``), linked to the relay's batch span
and open until the broker holds the batch; its headers carry that span's context, so
the services that consume it continue the order's trace.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec

from .. import metrics, personal, tracing
from ..errors import (
    ConfigurationError,
    InvalidEventDataError,
    PersonalDataErasedError,
    ProjectionLeaseLostError,
)
from ..events import Metadata, RecordedEvent
from ..hashing import to_micros
from ..projections.definition import Projection
from ..projections.runner import ProjectionRunner
from ..projections.state import ProjectionFailure, ProjectionLease
from ..store.ports import EventRow, row_event
from .port import EventBus, Message, MessageRefusedError, wire_size

if TYPE_CHECKING:
    from ..store import WorkflowStore

__all__ = ["Relay", "Route", "envelope"]

log = logging.getLogger("ledgerflow.bus")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


PRIVATE_STREAMS = frozenset({"ledgerflow-api-keys", "ledgerflow-ui-sessions"})
"""Streams no relay publishes, whatever its routes select: the HTTP server's API keys
(``server.keys.KEY_STREAM``: names, roles, tenants and secret hashes) are for the
ledger's own readers, not for every consumer of the bus."""


@dataclass(frozen=True)
class Route:
    """Which events to publish, and on which subject.

    ``types``: event type names (none: any type); ``stream_prefix``: only events of
    streams whose id starts with it. ``subject`` is a template over ``{type}`` (its
    dots kept as subject tokens), ``{category}`` (the stream id before its first
    ``-``) and ``{stream}``; characters a subject cannot hold become ``_``."""

    subject: str = "ledgerflow.{category}.{type}"
    types: Collection[str] = ()
    stream_prefix: str | None = None

    def __post_init__(self) -> None:
        # A wrong template is said now, not by every batch of a running relay.
        try:
            made = self.subject.format(type="t", category="c", stream="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(
                f"route subject {self.subject!r}: only {{type}}, {{category}} and {{stream}} "
                f"may be filled in ({exc!r})"
            ) from None
        if not made or any(c in made for c in " *>") or ".." in made or made.endswith("."):
            raise ConfigurationError(f"route subject {self.subject!r} is no NATS subject")

    def matches(self, event: RecordedEvent) -> bool:
        if self.types and event.type not in self.types:
            return False
        return self.stream_prefix is None or event.stream_id.startswith(self.stream_prefix)

    def subject_for(self, event: RecordedEvent) -> str:
        category = event.stream_id.split("-", 1)[0]
        return self.subject.format(
            type=".".join(_UNSAFE.sub("_", t) for t in event.type.split(".")),
            category=_UNSAFE.sub("_", category) or "_",
            stream=_UNSAFE.sub("_", event.stream_id) or "_",
        )


def envelope(event: RecordedEvent) -> bytes:
    """The event as a message's JSON body."""
    return msgspec.json.encode(
        {
            "id": str(event.id),
            "stream": event.stream_id,
            "version": event.version,
            "position": event.position,
            "type": event.type,
            "schema_version": event.schema_version,
            "recorded_at": event.recorded_at.isoformat(),
            "data": msgspec.to_builtins(event.data),
            "metadata": msgspec.to_builtins(event.metadata),
        }
    )


class Relay(ProjectionRunner):
    """Publishes the ledger's events that ``routes`` select to ``bus`` (see the
    module docstring). ``start()`` runs it in the background; ``catch_up()`` publishes
    what is there now."""

    def __init__(
        self,
        store: WorkflowStore,
        bus: EventBus,
        routes: Sequence[Route],
        *,
        name: str = "main",
        owner: str | None = None,
        lease: timedelta = timedelta(seconds=30),
        batch_size: int = 500,
        poll_interval: float = 1.0,
        now_us: Callable[[], int] | None = None,
    ) -> None:
        if not routes:
            raise ConfigurationError("a relay needs routes: which events to publish")
        super().__init__(
            store,
            [Projection(f"relay_{name}")],
            owner=owner,
            lease=lease,
            batch_size=batch_size,
            poll_interval=poll_interval,
            now_us=now_us,
        )
        self.bus = bus
        self.routes = list(routes)
        self.name = name

    def _route(self, event: RecordedEvent) -> Route | None:
        if event.stream_id in PRIVATE_STREAMS:
            return None  # credentials never leave the ledger, whatever the routes say
        for route in self.routes:
            if route.matches(event):
                return route
        return None

    def _message(self, event: RecordedEvent) -> Message | None:
        route = self._route(event)
        return None if route is None else self._on(event, route.subject_for(event))

    def _on(self, event: RecordedEvent, subject: str) -> Message:
        """The message of ``event`` on ``subject``, carrying the active span's trace
        context."""
        headers = {"Ledgerflow-Stream": event.stream_id, "Ledgerflow-Type": event.type}
        return Message(
            subject, str(event.id), envelope(event), tracing.inject(headers), key=event.stream_id
        )

    async def _batch(self, projection: Projection, lease: ProjectionLease) -> tuple[int, bool]:
        began = time.perf_counter()
        row = await self.store.projection_row(projection.name)
        if row is None or row.owner != lease.owner or row.epoch != lease.epoch:
            raise ProjectionLeaseLostError(projection.name, lease.owner, lease.epoch, "lease lost")
        if row.failure is not None:
            return 0, False  # stopped at an event it cannot publish until an operator acts
        position = row.position
        events, _ = await self._read(projection, position)
        if not events:
            return 0, False
        refused = self._too_big(events)
        refresh = getattr(self.bus, "refresh_limits", None)
        if refused is not None and refresh is not None:
            await refresh()  # a limit raised since (and `projections retry`) goes on
            refused = self._too_big(events)
        if refused is not None:
            # What comes before it goes out; then the relay stops there, as a
            # projection stops at an event its handler fails on. Retried as it was, it
            # failed for ever, and each retry sent the messages before it again.
            events = events[: refused[0]]
        published = 0
        if events:
            with self._spanned(projection, events, began) as span:
                try:
                    published = await self._publish(events)
                except MessageRefusedError as exc:
                    # Refused by the broker for a reason the check above could not
                    # see (a limit lowered since): stopped there all the same.
                    # Every other key's messages are stored, and this one's before it.
                    refused = self._refused(events, exc)
                    events = events[: refused[0]]
                    published = sum(1 for e in events if self._route(e) is not None)
                span.set_attribute("ledgerflow.messages", published)
                if events:
                    await self.store.project(
                        lease,
                        {},
                        from_position=position,
                        to_position=events[-1].position,
                        event_at_us=to_micros(events[-1].recorded_at),
                        writes=[],
                        now_us=self._now_us(),
                    )
        if refused is not None:
            failure = refused[1]
            await self.store.fail_projection(lease, failure, now_us=self._now_us())
            log.error(
                "relay %s stopped at position %d (%s %s): %s; retry or skip it",
                self.name,
                failure.position,
                failure.event_type,
                failure.event_id,
                failure.message,
            )
            return published, False
        return published, len(events) == self.batch_size

    async def _undecodable(
        self,
        projection: Projection,
        row: EventRow,
        exc: InvalidEventDataError | PersonalDataErasedError,
    ) -> RecordedEvent | ProjectionFailure:
        """An event this process's registry cannot decode (its subject's personal
        data erased, a type or version this code lacks) goes out as an untyped read
        shows it: its JSON, an erased value as ``{"$erased": field}``. A relay carries
        JSON, and consumers are not held back by what this code can decode."""
        return await self._untyped(row)

    async def _untyped(self, row: EventRow) -> RecordedEvent:
        try:
            data = msgspec.json.decode(row.data)
            metadata = msgspec.json.decode(row.metadata, type=Metadata)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Not JSON at all: only an edit outside ledgerflow stores that. Say so,
            # rather than publish something else in its place.
            raise InvalidEventDataError(row.type, row.schema_version, str(exc)) from exc
        if personal.holds_personal(row.data):
            ids = personal.key_ids_in(data)
            data = personal.reveal(data, await self.store.key_vault.keys_by_id(ids) if ids else {})
        return row_event(row, data, metadata)

    def _too_big(self, events: Sequence[RecordedEvent]) -> tuple[int, ProjectionFailure] | None:
        """The first event whose message the broker would refuse for its size (its
        index and the failure to record), if the bus says what it takes."""
        limit = getattr(self.bus, "max_message_bytes", None)
        if not isinstance(limit, int):
            return None
        for index, event in enumerate(events):
            route = self._route(event)
            if route is None:
                continue
            message = self._on(event, route.subject_for(event))
            size = wire_size(message)
            if size > limit:
                source = getattr(self.bus, "max_message_source", "NATS max_payload")
                return index, ProjectionFailure(
                    event.position,
                    str(event.id),
                    event.type,
                    "MessageTooLargeError",
                    f"its message on {message.subject!r} is {size} bytes; the broker "
                    f"takes at most {limit} ({source}): raise that limit and retry, or "
                    "skip the event",
                )
        return None

    def _refused(
        self, events: Sequence[RecordedEvent], exc: MessageRefusedError
    ) -> tuple[int, ProjectionFailure]:
        """Where in ``events`` the broker refused a message, and the failure to
        record."""
        index = next(i for i, e in enumerate(events) if str(e.id) == exc.message_id)
        event = events[index]
        return index, ProjectionFailure(
            event.position,
            str(event.id),
            event.type,
            type(exc).__name__,
            f"{exc.reason}: change the broker's configuration and retry, or skip the event",
        )

    async def _publish(self, events: Sequence[RecordedEvent]) -> int:
        """Publish the messages of the ``events`` the routes select; how many."""
        routed = [(event, route) for event in events if (route := self._route(event)) is not None]
        if not routed:
            return 0
        # An event recorded outside any span is published in the batch's trace.
        batch = tracing.current_traceparent()
        found = tracing.link(batch)
        links = () if found is None else (found,)
        messages: list[Message] = []
        with contextlib.ExitStack() as spans:
            # Each span stays open (entered, not yet left) until the whole batch is
            # published: its duration is the publish's, and a failure marks them all.
            publishing = []
            for event, route in routed:
                subject = route.subject_for(event)
                # Its own trace; the batch's if it was recorded outside any (and a
                # trace of its own without one: never the previous message's).
                made_in = event.metadata.traceparent or batch
                spans.enter_context(tracing.joined(made_in) if made_in else tracing.rooted())
                publishing.append(
                    spans.enter_context(
                        tracing.span(
                            f"publish {subject}",
                            {
                                "messaging.destination.name": subject,
                                "ledgerflow.event_id": str(event.id),
                                "ledgerflow.stream": event.stream_id,
                            },
                            kind=tracing.SpanKind.PRODUCER,
                            links=links,
                        )
                    )
                )
                messages.append(self._on(event, subject))
            # What the bus does meanwhile (a task its new connection starts copies
            # the context) is the batch's work, not the last message's.
            with tracing.joined(batch):
                duplicates = await self.bus.publish(messages)  # BusUnavailableError: retried
            for span, duplicate in zip(publishing, duplicates, strict=True):
                if duplicate:
                    span.set_attribute("ledgerflow.duplicate", True)
        if any(duplicates):
            log.info(
                "relay %s: %d of %d messages were published before (a retry)",
                self.name,
                sum(duplicates),
                len(messages),
            )
        metrics.relayed(self.name, len(messages))
        return len(messages)
