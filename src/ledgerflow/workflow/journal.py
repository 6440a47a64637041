"""The journal of workflow histories: the one place a runner's appends go through.

It keeps hot histories decoded in a bounded cache, extends them with what others
appended, appends a pass's events at the version the pass replayed (so a runner never
writes on a history it has not seen), and snapshots a long history every
``snapshot_every`` events so a cold load reads the snapshot and the tail.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..events import Snapshot
from ..store import WorkflowStore
from ..store.runtime import Fence, RuntimeWrite
from .history import SNAPSHOT_TYPE, SNAPSHOT_VERSION, History

__all__ = ["Journal", "load_history", "stream_of"]

log = logging.getLogger("ledgerflow.engine")

STREAM_PREFIX = "wf-"
SHORT_HISTORY = 128
"""A history shorter than this is read whole, in one read: most are (a few events per
step), and then the snapshot, which a short history rarely has, need not be looked
for first."""


def stream_of(workflow_id: str) -> str:
    """The ledger stream holding the history of instance ``workflow_id``."""
    return STREAM_PREFIX + workflow_id


async def load_history(store: WorkflowStore, workflow_id: str) -> History:
    """From the start if it is short, else from the latest snapshot and the events
    after it (a snapshot is a cache of the events before it: either way is the same
    history)."""
    stream = stream_of(workflow_id)
    first = await store.read_stream(stream, limit=SHORT_HISTORY)
    if len(first) < SHORT_HISTORY:
        return History.of(workflow_id, first)
    snapshot, after = await store.load_stream(stream)
    if snapshot is None:
        return History.of(workflow_id, after)
    if snapshot.type == SNAPSHOT_TYPE and snapshot.schema_version == SNAPSHOT_VERSION:
        history = History.from_snapshot(snapshot.state)
        history.extend(after)
        return history
    # A snapshot of an older shape: the whole stream, then.
    return History.of(workflow_id, await store.read_stream(stream))


class Journal:
    """Histories of the instances a runner works on; see the module docstring."""

    def __init__(
        self,
        store: WorkflowStore,
        *,
        cache_size: int,
        snapshot_every: int | None,
        fence_of: Callable[[str], Fence | None] = lambda _: None,
    ) -> None:
        self.store = store
        self.fence_of = fence_of
        """The runner's lease on an instance: every append of this journal is fenced
        with it, so a runner taken over records nothing more."""
        self.cache_size = cache_size
        self.snapshot_every = snapshot_every
        self._cache: OrderedDict[str, History] = OrderedDict()
        self._fresh: set[str] = set()
        """Histories this process has just started: nothing to read back for them."""

    async def current(self, workflow_id: str) -> History:
        """The instance's history as stored now: cached and extended, or loaded."""
        cached = self._cache.get(workflow_id)
        if workflow_id in self._fresh and cached is not None:
            self._fresh.discard(workflow_id)
            return cached
        if cached is None:
            cached = await load_history(self.store, workflow_id)
        else:
            stream = stream_of(workflow_id)
            cached.extend(await self.store.read_stream(stream, from_version=cached.version + 1))
        self.remember(cached)
        return cached

    def remember(self, history: History, *, fresh: bool = False) -> None:
        if history.personal:
            # Read again each pass: a subject erased meanwhile must not live on here.
            self.forget(history.workflow_id)
            self._fresh.discard(history.workflow_id)
            return
        self._cache[history.workflow_id] = history
        self._cache.move_to_end(history.workflow_id)
        if fresh:
            self._fresh.add(history.workflow_id)
        while len(self._cache) > self.cache_size:
            evicted, _ = self._cache.popitem(last=False)
            self._fresh.discard(evicted)

    def holds(self, history: History) -> bool:
        """Whether ``history`` is the one the next pass over its instance starts
        from (cached, not forgotten or replaced)."""
        return self._cache.get(history.workflow_id) is history

    def forget(self, workflow_id: str) -> None:
        """Drop the cached history: the next pass reads what is stored."""
        self._cache.pop(workflow_id, None)

    def settled(self, workflow_id: str) -> None:
        """The instance's task ended: a later pass reads the tail again."""
        self._fresh.discard(workflow_id)

    async def append(
        self, history: History, events: list[Any], runtime: list[RuntimeWrite]
    ) -> None:
        """Append at the version ``history`` is at (``ConcurrencyError`` if the stream
        moved on), then fold the events in."""
        before = history.version
        result = await self.store.append(
            stream_of(history.workflow_id),
            events,
            history.version,
            runtime=runtime,
            fence=self.fence_of(history.workflow_id),
        )
        first = result.version - len(events) + 1
        for offset, event in enumerate(events):
            history.add(first + offset, event)
        await self.snapshot_if_due(history, before)

    async def guarded(self, history: History, runtime: list[RuntimeWrite]) -> None:
        """Write runtime rows only if the stream is still at ``history.version``."""
        await self.store.append(
            stream_of(history.workflow_id),
            [],
            history.version,
            runtime=runtime,
            fence=self.fence_of(history.workflow_id),
        )

    async def snapshot_if_due(self, history: History, before: int) -> None:
        """Keep a snapshot every ``snapshot_every`` events, so a long history never
        has to be read whole again."""
        every = self.snapshot_every
        if not every or history.version // every <= before // every:
            return
        if history.personal:
            return  # a snapshot would keep personal data in the clear, past any erasure
        try:
            state = history.snapshot()
        except (TypeError, ValueError, OverflowError) as exc:
            # A snapshot only saves reading time: never let it stop the instance.
            log.warning("workflow %s: no snapshot taken: %s", history.workflow_id, exc)
            return
        await self.store.save_snapshot(
            Snapshot(
                stream_of(history.workflow_id),
                history.version,
                SNAPSHOT_TYPE,
                SNAPSHOT_VERSION,
                state,
            )
        )
