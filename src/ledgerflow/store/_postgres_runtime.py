"""The PostgreSQL store's runtime rows: claims, renewals and releases of wake-ups,
the registry of workers, and reads of wake-ups and instances, on the reader pool.

``PostgresRuntime`` is mixed into ``PostgresEventStore``, as ``PostgresTasks`` is
for task rows; the writes of runtime rows go with appends (``_postgres_write``).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from psycopg.abc import Params
from psycopg.rows import TupleRow

from ._postgres_sql import Sql
from ._runtime_rows import instance_filter
from .runtime import InstanceQuery, InstanceRow, Lease, WakeupRow, WorkerRow

__all__ = ["PostgresRuntime"]


def _kinds(workflows: tuple[tuple[str, int], ...] | None) -> dict[str, list[Any]]:
    if workflows is None:
        return {}
    return {"names": [n for n, _ in workflows], "versions": [v for _, v in workflows]}


class PostgresRuntime(abc.ABC):
    """Mixed into ``PostgresEventStore``: the runtime-row hooks, on its reader pool."""

    schema: str
    _sql: Sql

    if TYPE_CHECKING:
        # BaseEventStore's: declared, not abstract, so as not to hide it.
        def _check_open(self) -> None: ...

    @abc.abstractmethod
    async def _fetch(
        self, action: str, sql: str, params: Params, *, flushed: bool = True
    ) -> list[TupleRow]:
        """One statement on the reader pool, as a transaction of its own."""

    @abc.abstractmethod
    async def _announce_work(self) -> None:
        """Wake the workers of other processes: work became claimable."""

    # -- runtime rows ---------------------------------------------------------------
    # Claims and releases are single autocommit statements on the reader pool: they
    # need no head lock, so they never wait for appends (see _fetch on retries).

    async def _claim_wakeups(
        self,
        owner: str,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: tuple[tuple[str, int], ...] | None,
    ) -> list[Lease]:
        params = {
            "owner": owner,
            "until": lease_until_us,
            "now": now_us,
            "limit": limit,
            **_kinds(workflows),
        }
        sql = self._sql.claim[workflows is not None]
        # The claim's commit does not wait for the disk: it is on the path from a
        # start to its first step, and losing it in a server crash is harmless. A
        # later durable commit (the claimer's first append) flushes it too, and
        # without one nothing the claimer did survived. A claim lost in a crash
        # lets the instance be claimed again, at the same epoch but by another
        # owner, and the fence (owner and epoch) refuses the first claimer's appends.
        rows = await self._fetch("claim wake-ups", sql, params, flushed=False)
        # RETURNING follows no order; COLLATE "C" order is Python's str order.
        return [
            Lease(wid, epoch, due) for wid, due, epoch in sorted(rows, key=lambda r: (r[1], r[0]))
        ]

    async def database_now_us(self) -> int:
        self._check_open()
        rows = await self._fetch(
            "read the database's clock",
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
            (),
        )
        return int(rows[0][0])

    async def _renew_leases(
        self, owner: str, leases: list[Lease], lease_until_us: int
    ) -> list[Lease]:
        params = {
            "owner": owner,
            "until": lease_until_us,
            "ids": [lease.workflow_id for lease in leases],
            "epochs": [lease.epoch for lease in leases],
        }
        rows = await self._fetch("renew leases", self._sql.renew, params)
        kept = {(wid, epoch) for wid, epoch in rows}
        return [lease for lease in leases if (lease.workflow_id, lease.epoch) in kept]

    async def _next_wakeup(self, workflows: tuple[tuple[str, int], ...] | None) -> int | None:
        sql = self._sql.next_wakeup[workflows is not None]
        rows = await self._fetch("read the next wake-up", sql, _kinds(workflows))
        return None if rows[0][0] is None else int(rows[0][0])

    async def _release_wakeups(self, owner: str | None) -> int:
        if owner is None:
            rows = await self._fetch("release wake-ups", self._sql.release_all, ())
        else:
            rows = await self._fetch("release wake-ups", self._sql.release_owner, (owner,))
        if rows:  # a graceful stop's hand-back: the next worker takes them at once
            await self._announce_work()
        return len(rows)

    async def _register_worker(self, row: WorkerRow) -> None:
        params = (
            row.worker_id,
            row.host,
            row.pid,
            list(row.queues),
            list(row.workflows),
            row.version,
            row.started_at_us,
            row.heartbeat_at_us,
            row.lease_us,
            row.in_flight,
            row.stopping,
        )
        await self._fetch("register a worker", self._sql.register_worker, params)

    async def _heartbeat_worker(
        self, worker_id: str, now_us: int, in_flight: int, stopping: bool
    ) -> bool:
        params = (now_us, in_flight, stopping, worker_id)
        rows = await self._fetch("record a heartbeat", self._sql.heartbeat_worker, params)
        return bool(rows)

    async def _deregister_worker(self, worker_id: str) -> None:
        await self._fetch("deregister a worker", self._sql.deregister_worker, (worker_id,))

    async def _list_workers(self) -> list[WorkerRow]:
        rows = await self._fetch("list workers", self._sql.list_workers, ())
        return [
            WorkerRow(
                r[0], r[1], r[2], tuple(r[3]), tuple(r[4]), r[5], r[6], r[7], r[8], r[9], r[10]
            )
            for r in rows
        ]

    async def _reap_workers(self, now_us: int) -> list[str]:
        rows = await self._fetch("reap workers", self._sql.reap_workers, {"now": now_us})
        if rows:  # their leases are released
            await self._announce_work()
        return [wid for (wid,) in rows]

    async def _lease_owners(self) -> list[str]:
        rows = await self._fetch(
            "read lease owners",
            f"SELECT DISTINCT lease_owner FROM {self.schema}.wakeups "
            "WHERE lease_owner IS NOT NULL ORDER BY lease_owner",
            (),
        )
        return [owner for (owner,) in rows]

    async def _get_wakeup(self, workflow_id: str) -> WakeupRow | None:
        rows = await self._fetch("read a wake-up", self._sql.get_wakeup, (workflow_id,))
        return WakeupRow(*rows[0]) if rows else None

    async def _get_instance(self, workflow_id: str) -> InstanceRow | None:
        rows = await self._fetch("read an instance", self._sql.get_instance, (workflow_id,))
        return InstanceRow(*rows[0]) if rows else None

    async def _get_instances(self, workflow_ids: list[str]) -> list[InstanceRow]:
        rows = await self._fetch("read instances", self._sql.get_instances, (workflow_ids,))
        return [InstanceRow(*r) for r in rows]

    async def _list_instances(
        self, query: InstanceQuery, after: str | None, limit: int
    ) -> list[InstanceRow]:
        # ILIKE under the "C" collation folds ASCII letters only, as SQLite's LIKE
        # does (the database's own collation would fold more, and list more).
        where, order, params = instance_filter(
            query,
            after,
            table=f"{self._sql.s}.workflows",
            placeholder="%s",
            text_op="ILIKE",
            text_collate=' COLLATE "C"',
        )
        sql = self._sql.list_instances.format(where=where, order=order)
        rows = await self._fetch("list instances", sql, (*params, limit))
        return [InstanceRow(*r) for r in rows]

    async def _count_instances(self, statuses: list[str]) -> dict[str, int]:
        sql = (
            f"SELECT status, count(*) FROM {self._sql.s}.workflows "
            "WHERE status = ANY(%s) GROUP BY status"
        )
        rows = await self._fetch("count instances", sql, (statuses,))
        return {status: int(n) for status, n in rows}
