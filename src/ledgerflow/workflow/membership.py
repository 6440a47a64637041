"""An engine's row in the registry of workers: joining, heartbeats, leaving, and
reaping the workers that stopped beating (ADR 009).

Liveness is the heartbeat alone, never host and pid: a pid means nothing across PID
namespaces (containers) or hosts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection

from .. import metrics
from .._version import running_version
from ..errors import LedgerflowError, StoreError
from ..store import WorkflowStore
from ..store.runtime import WorkerRow

__all__ = ["Membership"]

log = logging.getLogger("ledgerflow.engine")


class Membership:
    """What the registry says of one engine, kept up to date by that engine.

    The engine's state is read through the callables at each write: the workflows
    it can run (registered ones may be added after start), its passes in flight, and
    whether it is stopping.
    """

    def __init__(
        self,
        store: WorkflowStore,
        worker_id: str,
        *,
        host: str,
        queues: tuple[str, ...],
        lease_us: int,
        workflows: Callable[[], Collection[tuple[str, int]]],
        in_flight: Callable[[], int],
        stopping: Callable[[], bool],
    ) -> None:
        self._store = store
        self.worker_id = worker_id
        self._host = host
        self._queues = queues
        self._lease_us = lease_us
        self._workflows = workflows
        self._in_flight = in_flight
        self._stopping = stopping
        self._started_at_us: int | None = None
        """When this engine joined; None until it has (and again once it left)."""
        self._written_workflows: frozenset[tuple[str, int]] = frozenset()

    @property
    def joined(self) -> bool:
        return self._started_at_us is not None

    def _row(self, started_at_us: int, now_us: int) -> WorkerRow:
        return WorkerRow(
            worker_id=self.worker_id,
            host=self._host,
            pid=os.getpid(),
            queues=self._queues,
            workflows=tuple(f"{name}@{version}" for name, version in sorted(self._workflows())),
            version=running_version(),
            started_at_us=started_at_us,
            heartbeat_at_us=now_us,
            lease_us=self._lease_us,
            in_flight=self._in_flight(),
            stopping=self._stopping(),
        )

    async def join(self, now_us: int) -> None:
        """Write this engine's row (all of it), beating at ``now_us``."""
        started = now_us if self._started_at_us is None else self._started_at_us
        workflows = frozenset(self._workflows())
        await self._store.register_worker(self._row(started, now_us))
        self._started_at_us = started
        self._written_workflows = workflows

    async def beat(self, now_us: int) -> bool:
        """Tell the registry this engine lives at ``now_us`` (and whether it is
        stopping); True if the store heard it.

        A row found gone means another engine judged this one dead (a pause longer
        than the lease) and released its leases: the passes it runs fail their
        fences and step back, and it joins again.
        """
        if self._started_at_us is None:
            return False  # never joined: start_engine failed or never ran
        try:
            if frozenset(self._workflows()) != self._written_workflows:
                await self.join(now_us)  # workflows registered since: the row says so
                return True
            known = await self._store.heartbeat_worker(
                self.worker_id,
                now_us=now_us,
                in_flight=self._in_flight(),
                stopping=self._stopping(),
            )
            if not known and not self._stopping():
                log.warning(
                    "ledgerflow engine %s: its registry row was gone (judged dead after "
                    "a heartbeat older than its lease); registering again",
                    self.worker_id,
                )
                await self.join(now_us)
        except StoreError as exc:
            # Any store failure, not only an outage: an exception here would end the
            # heartbeat task, and this engine would be reaped while it lives.
            log.warning("ledgerflow engine: cannot record a heartbeat (%s)", exc)
            return False
        return True

    async def reap(self, now_us: int) -> list[str]:
        """Remove the workers whose heartbeat is older than their lease at
        ``now_us`` and release their leases (one statement, so cheap to run on every
        heartbeat); the ids of those removed. ``now_us`` must be that of this
        engine's own last heartbeat, so that it never finds itself dead."""
        try:
            reaped = await self._store.reap_workers(now_us)
        except StoreError as exc:
            log.warning("ledgerflow engine: cannot reap dead workers (%s)", exc)
            return []
        metrics.workers_reaped(len(reaped))
        for worker_id in reaped:
            log.warning(
                "ledgerflow engine %s: worker %s missed its heartbeat for longer than its "
                "lease; its leases are released",
                self.worker_id,
                worker_id,
            )
        return reaped

    async def leave(self) -> None:
        """Remove this engine's row: last, after its leases are given back, since a
        worker listed is one whose leases may be held."""
        if self._started_at_us is None:
            return
        try:
            await self._store.deregister_worker(self.worker_id)
        except LedgerflowError as exc:
            log.warning("ledgerflow engine: cannot leave the registry (%s)", exc)
        self._started_at_us = None
