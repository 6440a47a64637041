"""The event bus port: messages out to other services, and back in.

A ``Message`` carries one ledger event: its id (the message id brokers deduplicate on:
``Nats-Msg-Id`` on JetStream), a subject, the event as JSON, headers. ``publish`` sends
a batch and returns once the broker has them, each stream's messages in their order;
``subscribe`` delivers a durable consumer's messages to a handler, acknowledged when it
returns and delivered again when it raises. Adapters: ``InProcessBus`` (tests, one
process) and ``JetStreamBus`` (NATS JetStream).

Headers carry the W3C trace context (``traceparent``) of the span that sent the
message (the relay's ``publish <subject>``, or the step that made it): ``deliver``
runs a handler in a ``process <subject>`` span of that trace, so one order is one
trace across the services its messages reach.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from .. import tracing

__all__ = [
    "Delivery",
    "EventBus",
    "Handler",
    "Message",
    "Subscription",
    "decode",
    "deliver",
    "subject_matches",
]


@dataclass(frozen=True, slots=True)
class Message:
    subject: str
    id: str
    """The ledger event's id: brokers drop a message whose id they saw (within their
    window); consumers drop one whose id they processed (``Inbox``)."""
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    key: str = ""
    """What orders it: messages with one key (the ledger stream) keep their order."""


log = logging.getLogger("ledgerflow.bus")

MSG_ID = "Nats-Msg-Id"
"""The header that carries a message's id to JetStream (its duplicate window)."""


def wire_size(message: Message) -> int:
    """What ``message`` weighs against a NATS server's ``max_payload``: its data and
    its headers as NATS sends them (``NATS/1.0``, one ``name: value`` line each,
    the message id's among them, a blank line)."""
    headers = {**message.headers, MSG_ID: message.id}
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(message.data) + len(b"NATS/1.0\r\n") + lines + 2


def step_message(subject: str, data: Any, *, key: str = "") -> Message:
    """A message published from inside a step: its id is the step's idempotency key,
    the same on every attempt and replay, so a step that runs again (a retry, a crash
    after publishing) publishes a message the broker and inboxes drop as a repeat.

        @ledgerflow.step()
        async def notify_warehouse(order: Order) -> None:
            await bus.publish([step_message("warehouse.pick", {"order": order.id})])
    """
    from ..workflow.steps import current_step  # a step's context, when it runs

    step = current_step()
    headers = tracing.inject({"Ledgerflow-Step": step.idempotency_key})
    return Message(
        subject,
        step.idempotency_key,
        msgspec.json.encode(data),
        headers,
        key=key or step.idempotency_key.rpartition("/")[0],
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    message: Message
    attempt: int
    """1 the first time, then each redelivery."""

    def event(self) -> dict[str, Any]:
        """The ledger event the message carries (as ``Relay`` encodes it)."""
        return decode(self.message)


Handler = Callable[[Delivery], Awaitable[None]]


async def deliver(handler: Handler, delivery: Delivery, *, system: str | None = None) -> None:
    """Run ``handler`` on ``delivery`` in a ``process <subject>`` span (a consumer's)
    of the trace the message's headers carry. What the handler raises is recorded on
    the span and raised on, for the bus to deliver the message again."""
    message = delivery.message
    attributes: dict[str, str | int] = {
        "messaging.destination.name": message.subject,
        "messaging.message.id": message.id,
        "ledgerflow.attempt": delivery.attempt,
    }
    if system is not None:
        attributes["messaging.system"] = system
    # A message sent outside any span starts a trace of its own, rather than
    # joining whatever span was active when the consumer subscribed (its task
    # inherited that context).
    traced = "traceparent" in message.headers
    with (
        tracing.joined(message.headers) if traced else tracing.rooted(),
        tracing.span(f"process {message.subject}", attributes, kind=tracing.SpanKind.CONSUMER),
    ):
        await handler(delivery)


def log_failed(durable: str, message: Message, attempt: int, exc: BaseException) -> None:
    """Say why a consumer's handler failed on a message (it is delivered again)."""
    log.warning(
        "consumer %s: message %s failed (attempt %d): %s: %s",
        durable,
        message.id,
        attempt,
        type(exc).__name__,
        exc,
    )


class Subscription(Protocol):
    async def stop(self) -> None: ...


class EventBus(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        """Send ``messages``; once it returns the broker holds each (or already held
        it: True at its place). Messages of one ``key`` are stored in their order.
        ``BusUnavailableError`` if the broker cannot be reached: some may be stored,
        and publishing them again is safe."""
        ...

    async def subscribe(
        self, subject: str, *, durable: str, handler: Handler, max_attempts: int = 0
    ) -> Subscription:
        """Deliver the messages of ``subject`` (wildcards ``*`` and ``>``) to
        ``handler`` through the durable consumer ``durable`` (it resumes where it
        left off), acknowledging each when the handler returns; one that raises is
        delivered again (``max_attempts``: 0 for no limit)."""
        ...


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


def decode(message: Message) -> dict[str, Any]:
    found: dict[str, Any] = msgspec.json.decode(message.data)
    return found
