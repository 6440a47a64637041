"""A ledger stream a server folds into memory and follows: what API keys and UI
sessions are kept in, so every server process agrees within ``REFRESH_S``."""

from __future__ import annotations

import abc
import asyncio
import time

from ..errors import StreamNotFoundError
from ..events import RecordedEvent
from ..store import WorkflowStore

__all__ = ["MISS_REFRESH_S", "REFRESH_S", "Followed"]

REFRESH_S = 1.0
"""How long a server may go on acting on a change recorded elsewhere (a revoked key,
a closed session)."""
MISS_REFRESH_S = 0.2
"""Something unknown makes the server look for news at most this often (a flood of
made-up credentials must not become a flood of reads)."""


class Followed(abc.ABC):
    """The events of ``stream``, folded with ``_apply`` as they are read."""

    stream: str

    def __init__(self, store: WorkflowStore) -> None:
        self.store = store
        self._version = 0
        self._read_at = float("-inf")
        self._missed_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> None:
        """Read the events recorded since the last look (if it is older than
        ``REFRESH_S``, or ``force``)."""
        if not force and time.monotonic() - self._read_at < REFRESH_S:
            return
        async with self._lock:
            if not force and time.monotonic() - self._read_at < REFRESH_S:
                return
            started = time.monotonic()
            try:
                events = await self.store.read_stream(self.stream, from_version=self._version + 1)
            except StreamNotFoundError:
                events = []
            for event in events:
                self._apply(event)
                self._version = event.version
            self._read_at = started

    async def refresh_on_miss(self) -> None:
        """Look for news about something not found, at most every ``MISS_REFRESH_S``
        (made by another server just now, perhaps)."""
        if time.monotonic() - self._missed_at >= MISS_REFRESH_S:
            self._missed_at = time.monotonic()
            await self.refresh(force=True)

    @abc.abstractmethod
    def _apply(self, event: RecordedEvent) -> None:
        """Fold one event of the stream in."""
