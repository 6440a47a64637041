"""Messages from the bus drive processes here: an event another service published
starts a workflow (or a state machine), or signals one.

Each trigger is a durable consumer of its subject. Starting is idempotent on the id
the trigger derives from the message (the same message delivered twice finds the
instance started); a signal is sent with the message's id as its idempotency key (it
is recorded once). A message whose handling raises is delivered again; one that can
never apply (its instance has ended, or its input does not fit) is dropped with a
warning, not retried forever.

    triggers = Triggers(engine, bus)
    await triggers.start("billing.>", order_workflow, id=lambda e: e["stream"],
                         input=lambda e: OrderInput(**e["data"]))
    await triggers.signal("payments.paid", "paid", workflow_id=lambda e: e["data"]["order"])
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import WorkflowAlreadyStartedError, WorkflowFinishedError, WorkflowInputError
from .port import Delivery, EventBus, Subscription

if TYPE_CHECKING:
    from ..workflow.client import WorkflowClient
    from ..workflow.executors import Definition

__all__ = ["Triggers"]

log = logging.getLogger("ledgerflow.bus")

Pick = Callable[[dict[str, Any]], Any]
"""From the message's event (``Delivery.event()``) to a value."""


class Triggers:
    def __init__(self, client: WorkflowClient, bus: EventBus) -> None:
        self.client = client
        self.bus = bus
        self.subscriptions: list[Subscription] = []

    async def start(
        self,
        subject: str,
        workflow: Definition,
        *,
        id: Pick,
        input: Pick,
        durable: str | None = None,
    ) -> Subscription:
        """Start ``workflow`` for each message of ``subject``, with the id and input
        taken from the message's event."""

        async def handle(delivery: Delivery) -> None:
            event = delivery.event()
            instance = str(id(event))
            try:
                await self.client.start(workflow, input(event), id=instance)
            except (WorkflowAlreadyStartedError, WorkflowInputError) as exc:
                log.warning(
                    "trigger on %s: message %s dropped: %s", subject, delivery.message.id, exc
                )

        return await self._subscribe(subject, durable or f"start_{workflow.name}", handle)

    async def signal(
        self,
        subject: str,
        name: str,
        *,
        workflow_id: Pick,
        payload: Pick | None = None,
        durable: str | None = None,
    ) -> Subscription:
        """Send signal ``name`` to the instance the message names, once per message."""

        async def handle(delivery: Delivery) -> None:
            event = delivery.event()
            target = str(workflow_id(event))
            body = payload(event) if payload is not None else event.get("data")
            try:
                await self.client.signal(target, name, body, id=f"bus:{delivery.message.id}:{name}")
            except (WorkflowFinishedError, WorkflowInputError) as exc:
                log.warning(
                    "trigger on %s: message %s dropped: %s", subject, delivery.message.id, exc
                )

        return await self._subscribe(subject, durable or f"signal_{name}", handle)

    async def _subscribe(
        self, subject: str, durable: str, handle: Callable[[Delivery], Any]
    ) -> Subscription:
        # A durable consumer's name holds no dots or wildcards (JetStream's rule).
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", durable)
        subscription = await self.bus.subscribe(subject, durable=safe, handler=handle)
        self.subscriptions.append(subscription)
        return subscription

    async def stop(self) -> None:
        for subscription in self.subscriptions:
            await subscription.stop()
        self.subscriptions.clear()
