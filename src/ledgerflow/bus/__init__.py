"""The event bus: the ledger as an outbox, relayed to a broker (NATS JetStream, or in
process), and consumers that apply each message once. See
``docs/adr/016-event-bus.md``."""

from __future__ import annotations

from .inbox import Inbox
from .jetstream import JetStreamBus
from .memory import InProcessBus
from .port import Delivery, EventBus, Handler, Message, Subscription, decode, step_message
from .relay import Relay, Route, envelope
from .triggers import Triggers

__all__ = [
    "Delivery",
    "EventBus",
    "Handler",
    "InProcessBus",
    "Inbox",
    "JetStreamBus",
    "Message",
    "Relay",
    "Route",
    "Subscription",
    "Triggers",
    "decode",
    "envelope",
    "step_message",
]
