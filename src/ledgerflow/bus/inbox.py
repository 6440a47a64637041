"""Consumers that apply each message once: the inbox.

An ``Inbox`` is a bus handler with tables of its own (declared like a projection's).
Its function turns a message into writes through a ``View``; the writes and the
message's id, recorded as processed, commit in one transaction. A message delivered
again (a broker's redelivery, a relay's re-publication beyond the broker's window) is
found processed and applies nothing; a handler that raises commits nothing and gets
the message again.

    billing = Inbox(store, "billing", tables=[INVOICES], handle=on_order)
    await billing.open()
    await bus.subscribe("ledgerflow.order.>", durable="billing", handler=billing)
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StaleReadError
from ..projections.definition import Projection
from ..projections.tables import Table
from ..projections.view import View
from .port import Delivery

if TYPE_CHECKING:
    from ..store import WorkflowStore

__all__ = ["Inbox"]

log = logging.getLogger("ledgerflow.inbox")

_FRESH_READS = 20
"""Times a message is handled afresh when rows it read changed under it, before it is
left to the bus to deliver again."""

Handle = Callable[[Delivery, View], Awaitable[None] | None]


class Inbox:
    def __init__(
        self,
        store: WorkflowStore,
        name: str,
        *,
        handle: Handle,
        tables: Sequence[Table] = (),
        now_us: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.projection = Projection(name, tables=tables)
        """Its tables, for ``ReadModel(store, inbox.projection)``."""
        self.name = self.projection.name
        self.handle = handle
        self._now_us = now_us or (lambda: time.time_ns() // 1_000)

    async def open(self) -> None:
        """Make its tables (once, before the first message)."""
        await self.store.ensure_tables(
            self.name, list(self.projection.tables.values()), listed=False
        )

    async def __call__(self, delivery: Delivery) -> None:
        message_id = delivery.message.id
        if await self.store.consumed(self.name, message_id):
            return  # applied before: an early way out; consume() decides for sure
        for attempt in range(1, _FRESH_READS + 1):
            seen: dict[tuple[str, Any], dict[str, Any] | None] = {}

            async def read(
                table: str, key: Any, seen: dict[tuple[str, Any], Any] = seen
            ) -> dict[str, Any] | None:
                row = await self.store.read_model_get(
                    self.name, self.projection.tables[table], key, generation=0
                )
                seen.setdefault((table, key), row)
                return row

            view = View(self.projection, read)
            result = self.handle(delivery, view)
            if inspect.isawaitable(result):
                await result
            # What the handler read is checked as it commits: another process of
            # this consumer may have written those rows since, and writes made from
            # the old values would overwrite its update (lost increments).
            try:
                await self.store.consume(
                    self.name,
                    message_id,
                    self.projection.tables,
                    view.writes,
                    now_us=self._now_us(),
                    seen=[(table, key, row) for (table, key), row in seen.items()],
                )
                return
            except StaleReadError:
                if attempt == _FRESH_READS:
                    raise  # the bus delivers the message again later
                log.debug("inbox %s: %s read rows another process changed", self.name, message_id)
