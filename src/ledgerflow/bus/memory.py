"""An event bus in this process: for tests and single-process setups, with the same
API and promises as JetStream (stored messages, deduplication by id, durable
consumers that resume, redelivery when a handler raises)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from .._waiting import cancel_and_wait
from .port import (
    Delivery,
    Handler,
    Message,
    Subscription,
    deliver,
    log_failed,
    log_given_up,
    redelivery_delay,
    subject_matches,
)

__all__ = ["InProcessBus"]

log = logging.getLogger("ledgerflow.bus")


class InProcessBus:
    """Keeps every message published (deduplicated by id) and delivers them to
    durable consumers in order."""

    def __init__(self, *, redelivery_delay: float = 0.05) -> None:
        self.messages: list[Message] = []
        self._ids: set[str] = set()
        self._cursors: dict[str, int] = {}
        self._published = asyncio.Event()
        self._subscriptions: list[_Consumer] = []
        self.redelivery_delay = redelivery_delay

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        for consumer in list(self._subscriptions):
            await consumer.stop()

    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        duplicates = []
        for message in messages:
            duplicate = message.id in self._ids
            duplicates.append(duplicate)
            if not duplicate:
                self._ids.add(message.id)
                self.messages.append(message)
        published, self._published = self._published, asyncio.Event()
        published.set()
        return duplicates

    async def subscribe(
        self, subject: str, *, durable: str, handler: Handler, max_attempts: int = 0
    ) -> Subscription:
        consumer = _Consumer(self, subject, durable, handler, max_attempts)
        self._subscriptions.append(consumer)
        consumer.task = asyncio.create_task(consumer.run(), name=f"bus:{durable}")
        return consumer


class _Consumer:
    def __init__(
        self, bus: InProcessBus, subject: str, durable: str, handler: Handler, max_attempts: int
    ) -> None:
        self.bus = bus
        self.subject = subject
        self.durable = durable
        self.handler = handler
        self.max_attempts = max_attempts
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        bus = self.bus
        while True:
            wake = bus._published
            at = bus._cursors.get(self.durable, 0)
            if at >= len(bus.messages):
                await wake.wait()
                continue
            message = bus.messages[at]
            if subject_matches(self.subject, message.subject):
                attempt = 1
                while True:
                    try:
                        await deliver(self.handler, Delivery(message, attempt))
                        break
                    except Exception as exc:  # noqa: BLE001 - redelivered, as a broker would
                        if self.max_attempts and attempt >= self.max_attempts:
                            log_given_up(self.durable, message, attempt, exc)
                            break
                        log_failed(self.durable, message, attempt, exc)
                        await asyncio.sleep(redelivery_delay(bus.redelivery_delay, attempt))
                        attempt += 1
            bus._cursors[self.durable] = at + 1

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.bus._subscriptions.remove(self)
        if self.task is not None:
            await cancel_and_wait([self.task])
