"""The SQLite store's hooks for the runtime rows that are not written by appends:
claims, renewals and releases of wake-up leases, and the registry of workers. Every
write runs on the store's one writer thread."""

from __future__ import annotations

import abc
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._runtime_rows import instance_filter
from ._sqlite_schema import (
    _CLAIM,
    _DEAD,
    _INSTANCE_COLUMNS,
    _NEXT_WAKEUP,
    _OF_KINDS,
    _REAP_LEASES,
    _REGISTER_WORKER,
    _WAKEUP_COLUMNS,
    _WORKER_COLUMNS,
)
from ._sqlite_tasks import REAP_TASK_LEASES
from .runtime import InstanceQuery, InstanceRow, Lease, WakeupRow, WorkerRow

__all__ = ["SQLiteRuntime"]

T = TypeVar("T")


class SQLiteRuntime(abc.ABC):
    """Mixed into ``SQLiteEventStore``."""

    _writer_con: sqlite3.Connection | None

    @abc.abstractmethod
    async def _on_writer(self, fn: Callable[[], T]) -> T: ...

    @abc.abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]: ...

    async def _write(self, sql: str, params: Sequence[Any]) -> list[Any]:
        def run() -> list[Any]:
            con = self._writer_con
            assert con is not None
            return con.execute(sql, params).fetchall()

        return await self._on_writer(run)

    async def _claim_wakeups(
        self,
        owner: str,
        now_us: int,
        lease_until_us: int,
        limit: int,
        workflows: tuple[tuple[str, int], ...] | None,
    ) -> list[Lease]:
        kinds: tuple[Any, ...] = () if workflows is None else (json.dumps(workflows),)
        sql = _CLAIM.format(of_kinds="1" if workflows is None else _OF_KINDS)
        params = (owner, lease_until_us, now_us, now_us, *kinds, limit)
        rows = await self._write(sql, params)
        return [
            Lease(wid, epoch, due) for wid, due, epoch in sorted(rows, key=lambda r: (r[1], r[0]))
        ]

    async def _renew_leases(
        self, owner: str, leases: list[Lease], lease_until_us: int
    ) -> list[Lease]:
        def run() -> list[Lease]:
            con = self._writer_con
            assert con is not None
            kept = []
            con.execute("BEGIN IMMEDIATE")  # one transaction for the whole heartbeat
            try:
                for lease in leases:
                    cur = con.execute(
                        "UPDATE wakeups SET lease_until = ? "
                        "WHERE workflow_id = ? AND lease_owner = ? AND lease_epoch = ?",
                        (lease_until_us, lease.workflow_id, owner, lease.epoch),
                    )
                    if cur.rowcount:
                        kept.append(lease)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            return kept

        return await self._on_writer(run)

    async def _next_wakeup(self, workflows: tuple[tuple[str, int], ...] | None) -> int | None:
        kinds: tuple[Any, ...] = () if workflows is None else (json.dumps(workflows),)
        sql = _NEXT_WAKEUP.format(of_kinds="1" if workflows is None else _OF_KINDS)
        rows = await self._read(sql, kinds)
        return None if rows[0][0] is None else int(rows[0][0])

    async def _release_wakeups(self, owner: str | None) -> int:
        def run() -> int:
            con = self._writer_con
            assert con is not None
            if owner is None:
                cur = con.execute(
                    "UPDATE wakeups SET lease_owner = NULL, lease_until = NULL "
                    "WHERE lease_owner IS NOT NULL"
                )
            else:
                cur = con.execute(
                    "UPDATE wakeups SET lease_owner = NULL, lease_until = NULL "
                    "WHERE lease_owner = ?",
                    (owner,),
                )
            return cur.rowcount

        return await self._on_writer(run)

    async def _register_worker(self, row: WorkerRow) -> None:
        await self._write(
            _REGISTER_WORKER,
            (
                row.worker_id,
                row.host,
                row.pid,
                json.dumps(row.queues),
                json.dumps(row.workflows),
                row.version,
                row.started_at_us,
                row.heartbeat_at_us,
                row.lease_us,
                row.in_flight,
                int(row.stopping),
            ),
        )

    async def _heartbeat_worker(
        self, worker_id: str, now_us: int, in_flight: int, stopping: bool
    ) -> bool:
        rows = await self._write(
            "UPDATE workers SET heartbeat_at = ?, in_flight = ?, stopping = ? "
            "WHERE worker_id = ? RETURNING worker_id",
            (now_us, in_flight, int(stopping), worker_id),
        )
        return bool(rows)

    async def _deregister_worker(self, worker_id: str) -> None:
        await self._write("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    async def _list_workers(self) -> list[WorkerRow]:
        rows = await self._read(f"SELECT {_WORKER_COLUMNS} FROM workers ORDER BY worker_id", ())
        return [
            WorkerRow(
                wid,
                host,
                pid,
                tuple(json.loads(queues)),
                tuple(json.loads(workflows)),
                version,
                started,
                beat,
                lease,
                in_flight,
                bool(stopping),
            )
            for (
                wid,
                host,
                pid,
                queues,
                workflows,
                version,
                started,
                beat,
                lease,
                in_flight,
                stopping,
            ) in rows
        ]

    async def _reap_workers(self, now_us: int) -> list[str]:
        def run() -> list[str]:
            con = self._writer_con
            assert con is not None
            # IMMEDIATE: nobody writes between the three statements, so the workers
            # whose leases are released are exactly those removed.
            con.execute("BEGIN IMMEDIATE")
            try:
                dead = [
                    wid
                    for (wid,) in con.execute(
                        f"SELECT worker_id FROM workers WHERE {_DEAD} ORDER BY worker_id",
                        (now_us,),
                    )
                ]
                con.execute(_REAP_LEASES, (now_us,))
                con.execute(REAP_TASK_LEASES, (now_us,))
                if dead:
                    con.execute(f"DELETE FROM workers WHERE {_DEAD}", (now_us,))
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            return dead

        return await self._on_writer(run)

    async def _lease_owners(self) -> list[str]:
        rows = await self._read(
            "SELECT DISTINCT lease_owner FROM wakeups WHERE lease_owner IS NOT NULL "
            "ORDER BY lease_owner",
            (),
        )
        return [owner for (owner,) in rows]

    async def _get_wakeup(self, workflow_id: str) -> WakeupRow | None:
        rows = await self._read(
            f"SELECT {_WAKEUP_COLUMNS} FROM wakeups WHERE workflow_id = ?",
            (workflow_id,),
        )
        return WakeupRow(*rows[0]) if rows else None

    async def _get_instance(self, workflow_id: str) -> InstanceRow | None:
        rows = await self._read(
            f"SELECT {_INSTANCE_COLUMNS} FROM workflows WHERE workflow_id = ?", (workflow_id,)
        )
        return InstanceRow(*rows[0]) if rows else None

    async def _get_instances(self, workflow_ids: list[str]) -> list[InstanceRow]:
        marks = ",".join("?" * len(workflow_ids))
        rows = await self._read(
            f"SELECT {_INSTANCE_COLUMNS} FROM workflows WHERE workflow_id IN ({marks})",
            tuple(workflow_ids),
        )
        return [InstanceRow(*r) for r in rows]

    async def _list_instances(
        self, query: InstanceQuery, after: str | None, limit: int
    ) -> list[InstanceRow]:
        where, order, params = instance_filter(query, after, table="workflows", placeholder="?")
        rows = await self._read(
            f"SELECT {_INSTANCE_COLUMNS} FROM workflows WHERE {where} ORDER BY {order} LIMIT ?",
            (*params, limit),
        )
        return [InstanceRow(*r) for r in rows]

    async def _count_instances(self, statuses: list[str]) -> dict[str, int]:
        marks = ",".join("?" * len(statuses))
        rows = await self._read(
            f"SELECT status, count(*) FROM workflows WHERE status IN ({marks}) GROUP BY status",
            tuple(statuses),
        )
        return {status: int(n) for status, n in rows}
