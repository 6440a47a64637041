"""Reads of instance rows asked for together, made as one read of the store.

A client waiting for many results (``result()`` on thousands of handles) looked at
each instance's row on its own once a poll interval: 10,000 handles were 10,000
reads a second, which ran a PostgreSQL pool dry (``StoreUnavailableError`` after its
10 s wait, on a healthy server) and slowed the workers that shared the database.
``RowReads`` gathers the rows asked for while a read is under way and reads them in
the next one (``WorkflowStore.get_instances``): one read at a time, of up to 500
ids a statement.
"""

from __future__ import annotations

import asyncio

from ..errors import StoreClosedError
from ..store import WorkflowStore
from ..store.runtime import InstanceRow

__all__ = ["RowReads"]


class RowReads:
    def __init__(self, store: WorkflowStore) -> None:
        self.store = store
        self._asked: dict[str, list[asyncio.Future[InstanceRow | None]]] = {}
        self._reading: asyncio.Task[None] | None = None

    async def get(self, workflow_id: str) -> InstanceRow | None:
        """The instance's row (None if there is none), read with those asked for
        at the same time."""
        found: asyncio.Future[InstanceRow | None] = asyncio.get_running_loop().create_future()
        self._asked.setdefault(workflow_id, []).append(found)
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        return await found

    async def _read(self) -> None:
        while self._asked:
            asked, self._asked = self._asked, {}
            waiting = [f for futures in asked.values() for f in futures if not f.done()]
            if not waiting:
                continue
            try:
                rows = {r.workflow_id: r for r in await self.store.get_instances(list(asked))}
            except asyncio.CancelledError:
                _fail(waiting, StoreClosedError())
                raise
            except Exception as exc:  # noqa: BLE001 - each caller hears it, as from its own read
                _fail(waiting, exc)
                continue
            for workflow_id, futures in asked.items():
                for future in futures:
                    if not future.done():
                        future.set_result(rows.get(workflow_id))


def _fail(futures: list[asyncio.Future[InstanceRow | None]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
