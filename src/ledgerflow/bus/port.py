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
from urllib.parse import quote, unquote

import msgspec

from .. import tracing
from ..errors import LedgerflowError

__all__ = [
    "Delivery",
    "EventBus",
    "Handler",
    "Message",
    "MessageRefusedError",
    "MessageTooLargeError",
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

ENCODED_PREFIX = "ledgerflow-"
"""Headers (``Ledgerflow-Stream``, ``-Type``, ``-Step``) that carry ledger names: any
text, percent-encoded on the wire like the message id (``header_value``)."""

# Printable ASCII but "%": a NATS header line holds these as they are. Anything
# else (non-ASCII, CR/LF, other controls) reached consumers mangled or, for CR/LF,
# as a header of its own.
_KEPT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_value(value: str) -> str:
    """``value`` as a NATS header line can hold it: UTF-8, percent-encoded outside
    printable ASCII, and ``%`` itself (``unquote`` gives it back)."""
    return quote(value, safe=_KEPT)


def header_text(value: str) -> str:
    """What ``header_value`` encoded, decoded."""
    # A foreign publisher's header may hold a stray "%": kept, never an error.
    return unquote(value, errors="replace") if "%" in value else value


def encoded(name: str) -> bool:
    """Whether the header ``name`` is percent-encoded on the wire."""
    return name == MSG_ID or name.lower().startswith(ENCODED_PREFIX)


def wire_headers(message: Message) -> dict[str, str]:
    """``message``'s headers as they go on the wire, its id among them."""
    headers = {**message.headers, MSG_ID: message.id}
    return {k: header_value(v) if encoded(k) else v for k, v in headers.items()}


def wire_size(message: Message) -> int:
    """What ``message`` weighs against a NATS server's ``max_payload``: its data and
    its headers as NATS sends them (``NATS/1.0``, one ``name: value`` line each,
    the message id's among them, a blank line)."""
    lines = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in wire_headers(message).items())
    return len(message.data) + len(b"NATS/1.0\r\n") + lines + 2


class MessageRefusedError(LedgerflowError):
    """The broker refused a message for what it is, not for how it is doing (its
    size, a header too long): sent again, it is refused again until the broker's
    configuration changes. Every message before it of its key is stored; none after
    it is sent from then on (pipelined, those already sent may be stored: see
    ``JetStreamBus._pipeline``). ``message_id``: the refused message's."""

    def __init__(self, message_id: str, reason: str) -> None:
        super().__init__(f"message {message_id}: {reason}")
        self.message_id = message_id
        self.reason = reason


class MessageTooLargeError(MessageRefusedError):
    """The message is over what the broker takes (a NATS server's ``max_payload``, a
    JetStream stream's ``max_msg_size``)."""


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


def log_given_up(durable: str, message: Message, attempt: int, exc: BaseException) -> None:
    """Say that a consumer's handler failed on a message for the last time its
    ``max_attempts`` allows: it is not delivered again."""
    log.error(
        "consumer %s: message %s failed on attempt %d, its last (max_attempts): %s: %s; "
        "it is not delivered again",
        durable,
        message.id,
        attempt,
        type(exc).__name__,
        exc,
    )


MAX_REDELIVERY_DELAY = 30.0
"""The longest pause before a failed message comes again."""


def redelivery_delay(first: float, attempt: int) -> float:
    """The pause before attempt ``attempt + 1``: ``first``, doubled on each failure
    up to ``MAX_REDELIVERY_DELAY``. A poison message came twice a second for ever,
    with a warning each time."""
    return min(first * 2.0 ** min(max(attempt - 1, 0), 16), max(first, MAX_REDELIVERY_DELAY))


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
