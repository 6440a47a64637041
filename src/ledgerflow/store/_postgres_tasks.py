"""The PostgreSQL store's task queues: the statements appends run for task rows, the
lock a write transaction takes on them, and the hooks of ``_tasks.TaskQueues``.
The tables are migration 6 in ``_postgres_sql``.

Locks. Whatever waits for task rows takes them in ``task_id`` order, and after
every wake-up row it takes (wake-ups in id order too): a write transaction
(``lock`` in its first round trip), a renewal, a release, a reap. So no two of
them can each hold a row the other waits for. Claims never wait for task rows
(SKIP LOCKED); a claim waits only for the row of a limited queue in ``queues``,
queue by queue in name order, and those are held only by other claims (which wait
for nothing but later queues' rows) and by ``set_queue_limit`` (which waits for
nothing else).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.abc import Params
from psycopg.rows import TupleRow

from ._plan import AppendRequest, fenced_tasks
from .runtime import (
    TASK_COLUMNS,
    DropTask,
    DropTasks,
    PutTask,
    QueueRow,
    RetryTask,
    TaskLease,
    TaskRow,
)

__all__ = ["PostgresTasks", "TaskSql", "task_locks"]

T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]


def task_locks(requests: Sequence[AppendRequest]) -> tuple[list[str], list[str]] | None:
    """The task rows a batch must lock before planning: (task ids, workflow ids whose
    tasks go), or None if it need lock none.

    Those it is fenced on (their leases are read under the lock, so no claim moves
    one between the check and the commit), and those it retries or drops. Once it
    locks any, it locks the stored rows of the tasks it puts too: ``INSERT ... ON
    CONFLICT`` waits for a transaction changing a conflicting row, and would
    otherwise wait out of id order. A batch that only puts tasks locks none: it
    holds no stored task row, so nothing that waits for task rows waits for it;
    and two appends that put one task both write its workflow's stream (the
    engine's do), whose lock, taken first by ``begin_append``, orders them."""
    ids = set(fenced_tasks(requests))
    workflows: set[str] = set()
    for request in requests:
        for write in request.runtime:
            if isinstance(write, RetryTask | DropTask):
                ids.add(write.task_id)
            elif isinstance(write, DropTasks):
                workflows.add(write.workflow_id)
    if not ids and not workflows:
        return None
    ids.update(w.row.task_id for r in requests for w in r.runtime if isinstance(w, PutTask))
    return sorted(ids), sorted(workflows)


class TaskSql:
    """Every task statement the store sends, qualified with its schema."""

    def __init__(self, schema: str) -> None:
        s = schema
        marks = ",".join(["%s"] * len(TASK_COLUMNS.split(",")))
        # Parameters as ``runtime.as_row`` gives them.
        self.runtime = {
            "put_task": (
                f"INSERT INTO {s}.tasks ({TASK_COLUMNS}) VALUES ({marks}) "
                "ON CONFLICT (task_id) DO NOTHING"
            ),
            # The lease is given back with its epoch kept: the old holder's fence fails.
            # The attempt's failure is recorded (or it did not count).
            "retry_task": (
                f"UPDATE {s}.tasks SET due_at = %s, attempt = attempt - %s, "
                "recorded_attempt = attempt - %s, lease_owner = NULL, lease_until = NULL, "
                "handed_back = false WHERE task_id = %s"
            ),
            "drop_task": f"DELETE FROM {s}.tasks WHERE task_id = %s",
            "drop_tasks": f"DELETE FROM {s}.tasks WHERE workflow_id = %s",
        }
        # See task_locks; sent after lock_wakeups. Every row returned is a stored
        # lease, as plan_batch takes them.
        self.lock = (
            f"SELECT task_id, lease_owner, lease_epoch FROM {s}.tasks "
            "WHERE task_id = ANY(%s::text[]) OR workflow_id = ANY(%s::text[]) "
            "ORDER BY task_id FOR UPDATE"
        )
        # A claim of a limited queue first locks the queue's row, as a statement of
        # its own: under READ COMMITTED the claim that follows takes its snapshot
        # once the lock is granted, so the running tasks it counts include those
        # of every claim that held the lock before. Unlimited queues lock nothing.
        self.lock_queue = (
            f"SELECT 1 FROM {s}.queues WHERE queue = %s AND max_concurrent IS NOT NULL FOR UPDATE"
        )
        # SKIP LOCKED and MATERIALIZED as for wake-ups (see Sql.claim). The LIMIT is
        # the room left: of the call's limit, and of the queue's max_concurrent less
        # its running tasks (counted only when it has one: CASE is lazy).
        room = (
            f"(SELECT CASE WHEN q.max_concurrent IS NULL THEN %(room)s::bigint "
            "ELSE greatest(0, least(%(room)s::bigint, q.max_concurrent - ("
            f"SELECT count(*) FROM {s}.tasks r WHERE r.queue = %(queue)s "
            "AND r.lease_owner IS NOT NULL AND r.lease_until >= %(now)s))) END "
            f"FROM (SELECT 1) AS one LEFT JOIN {s}.queues q ON q.queue = %(queue)s)"
        )
        claim = (
            "WITH due AS MATERIALIZED ("
            f"SELECT t.task_id FROM {s}.tasks t "
            "WHERE t.queue = %(queue)s AND t.due_at <= %(now)s "
            "AND (t.lease_owner IS NULL OR t.lease_until < %(now)s) AND {of_names} "
            f"ORDER BY t.due_at, t.task_id LIMIT {room} FOR UPDATE SKIP LOCKED) "
            f"UPDATE {s}.tasks SET lease_owner = %(owner)s, lease_until = %(until)s, "
            "lease_epoch = lease_epoch + 1, attempt = attempt + 1 "
            f"WHERE task_id IN (SELECT task_id FROM due) RETURNING {TASK_COLUMNS}"
        )
        of_names = "t.name = ANY(%(names)s::text[])"
        self.claim = {
            False: claim.format(of_names="true"),
            True: claim.format(of_names=of_names),
        }
        self.renew = (
            "WITH held AS MATERIALIZED ("
            f"SELECT t.task_id FROM {s}.tasks t "
            "JOIN unnest(%(ids)s::text[], %(epochs)s::bigint[]) AS l(id, epoch) "
            "ON t.task_id = l.id AND t.lease_epoch = l.epoch "
            "WHERE t.lease_owner = %(owner)s ORDER BY t.task_id FOR UPDATE OF t) "
            f"UPDATE {s}.tasks SET lease_until = %(until)s "
            "WHERE task_id IN (SELECT task_id FROM held) RETURNING task_id, lease_epoch"
        )
        # A hand-back does not count the attempt it ends.
        release = (
            "WITH held AS MATERIALIZED ("
            f"SELECT task_id FROM {s}.tasks WHERE {{held}} ORDER BY task_id FOR UPDATE) "
            f"UPDATE {s}.tasks SET lease_owner = NULL, lease_until = NULL, "
            "attempt = greatest(0, attempt - 1), handed_back = true "
            "WHERE task_id IN (SELECT task_id FROM held) RETURNING task_id"
        )
        # Deleted if never claimed; or if no attempt runs and none since the last
        # recorded failure may have acted unrecorded (lost with its worker, or
        # handed back unfinished): a step waiting out its retry's backoff has
        # nothing in doubt. What is left is a task that must be waited for.
        self.withdraw = (
            f"WITH gone AS (DELETE FROM {s}.tasks WHERE task_id = %s AND (lease_epoch = 0 "
            "OR (lease_owner IS NULL AND recorded_attempt >= attempt AND NOT handed_back)) "
            f"RETURNING task_id) SELECT 1 FROM {s}.tasks WHERE task_id = %s "
            "AND NOT EXISTS (SELECT 1 FROM gone)"
        )
        self.release_owner = release.format(held="lease_owner = %s")
        self.release_all = release.format(held="lease_owner IS NOT NULL")
        next_due = (
            "SELECT min(CASE WHEN t.lease_owner IS NULL THEN t.due_at "
            "ELSE greatest(t.due_at, coalesce(t.lease_until, 0) + 1) END) "
            f"FROM {s}.tasks t WHERE t.queue = ANY(%(queues)s::text[]) AND {{of_names}}"
        )
        self.next_due = {
            False: next_due.format(of_names="true"),
            True: next_due.format(of_names=of_names),
        }
        # One statement per combination of filters, so that each can use an index.
        self.list = {
            (by_queue, by_workflow, paged): f"SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE "
            + " AND ".join(
                ["true"]
                + (["queue = %(queue)s"] if by_queue else [])
                + (["workflow_id = %(workflow)s"] if by_workflow else [])
                + (["task_id > %(after)s"] if paged else [])
            )
            + " ORDER BY task_id LIMIT %(limit)s"
            for by_queue in (False, True)
            for by_workflow in (False, True)
            for paged in (False, True)
        }
        self.set_limit = (
            f"INSERT INTO {s}.queues (queue, max_concurrent) VALUES (%s, %s) "
            "ON CONFLICT (queue) DO UPDATE SET max_concurrent = excluded.max_concurrent"
        )
        # No limit: no row (a queue with neither tasks nor a limit is not listed).
        self.drop_limit = f"DELETE FROM {s}.queues WHERE queue = %s"
        # As SQLite counts them: ready (due, not held or the lease expired),
        # scheduled (due later, not held), running (held, the lease not expired).
        # Queue names order by code point, as in Python.
        self.queues = (
            "WITH counts AS ("
            "SELECT queue, "
            "count(*) FILTER (WHERE due_at <= %(now)s "
            "AND (lease_owner IS NULL OR lease_until < %(now)s)) AS ready, "
            "count(*) FILTER (WHERE due_at > %(now)s AND lease_owner IS NULL) AS scheduled, "
            "count(*) FILTER (WHERE lease_owner IS NOT NULL AND lease_until >= %(now)s) "
            f"AS running FROM {s}.tasks GROUP BY queue) "
            "SELECT coalesce(c.queue, q.queue), q.max_concurrent, coalesce(c.ready, 0), "
            "coalesce(c.scheduled, 0), coalesce(c.running, 0) "
            f"FROM counts c FULL JOIN {s}.queues q ON q.queue = c.queue "
            'ORDER BY coalesce(c.queue, q.queue) COLLATE "C"'
        )


class PostgresTasks(abc.ABC):
    """Mixed into ``PostgresEventStore``: the task hooks, on its reader pool."""

    schema: str

    @functools.cached_property
    def _task_sql(self) -> TaskSql:
        return TaskSql(self.schema)

    @abc.abstractmethod
    async def _fetch(
        self, action: str, sql: str, params: Params, *, flushed: bool = True
    ) -> list[TupleRow]:
        """One statement on the reader pool, as a transaction of its own."""

    @abc.abstractmethod
    async def _announce_work(self) -> None:
        """Wake the workers of other processes: work became claimable."""

    @abc.abstractmethod
    async def _transaction(
        self, action: str, fn: Callable[[Connection], Awaitable[T]], *, flushed: bool = True
    ) -> T:
        """``fn`` on a pooled connection, in one transaction (a pipeline: ``fn``'s
        fetches are its round trips)."""

    async def _claim_tasks(
        self,
        owner: str,
        queues: tuple[str, ...],
        names: tuple[str, ...] | None,
        now_us: int,
        lease_until_us: int,
        limit: int,
    ) -> list[TaskRow]:
        sql = self._task_sql
        claim = sql.claim[names is not None]
        params: dict[str, Any] = {"owner": owner, "until": lease_until_us, "now": now_us}
        if names is not None:
            params["names"] = list(names)

        async def run(conn: Connection) -> list[TaskRow]:
            claimed: list[TaskRow] = []
            for queue in queues:  # in name order (checked): the queue locks' order
                room = limit - len(claimed)
                if room <= 0:
                    break
                await conn.execute(sql.lock_queue, (queue,))
                cur = await conn.execute(claim, {**params, "queue": queue, "room": room})
                claimed.extend(TaskRow(*r) for r in await cur.fetchall())
            return claimed

        # The commit does not wait for the disk, as for wake-up claims (see
        # _claim_wakeups): a claim lost in a crash lets the task be claimed again at
        # the same epoch by another owner, and the fence refuses the first one.
        rows = await self._transaction("claim tasks", run, flushed=False)
        # RETURNING follows no order; COLLATE "C" order is Python's str order.
        return sorted(rows, key=lambda t: (t.due_at_us, t.task_id))

    async def _renew_task_leases(
        self, owner: str, leases: list[TaskLease], lease_until_us: int
    ) -> list[TaskLease]:
        params = {
            "owner": owner,
            "until": lease_until_us,
            "ids": [lease.task_id for lease in leases],
            "epochs": [lease.epoch for lease in leases],
        }
        rows = await self._fetch("renew task leases", self._task_sql.renew, params)
        kept = {(tid, epoch) for tid, epoch in rows}
        return [lease for lease in leases if (lease.task_id, lease.epoch) in kept]

    async def _withdraw_task(self, task_id: str) -> bool:
        # The DELETE waits for a claim that holds the row and then sees its epoch;
        # one that comes after finds no row.
        rows = await self._fetch("withdraw a task", self._task_sql.withdraw, (task_id, task_id))
        return not rows

    async def _release_tasks(self, owner: str | None) -> int:
        sql = self._task_sql
        if owner is None:
            rows = await self._fetch("release tasks", sql.release_all, ())
        else:
            rows = await self._fetch("release tasks", sql.release_owner, (owner,))
        if rows:  # a graceful stop's hand-back: the next worker takes them at once
            await self._announce_work()
        return len(rows)

    async def _next_task_due(
        self, queues: tuple[str, ...], names: tuple[str, ...] | None
    ) -> int | None:
        params: dict[str, Any] = {"queues": list(queues)}
        if names is not None:
            params["names"] = list(names)
        sql = self._task_sql.next_due[names is not None]
        rows = await self._fetch("read the next task due", sql, params)
        return None if rows[0][0] is None else int(rows[0][0])

    async def _list_tasks(
        self, queue: str | None, workflow_id: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        sql = self._task_sql.list[queue is not None, workflow_id is not None, after is not None]
        params = {"queue": queue, "workflow": workflow_id, "after": after, "limit": limit}
        rows = await self._fetch("list tasks", sql, params)
        return [TaskRow(*r) for r in rows]

    async def _set_queue_limit(self, queue: str, max_concurrent: int | None) -> None:
        sql = self._task_sql
        if max_concurrent is None:
            await self._fetch("set a queue limit", sql.drop_limit, (queue,))
        else:
            await self._fetch("set a queue limit", sql.set_limit, (queue, max_concurrent))

    async def _list_queues(self, now_us: int) -> list[QueueRow]:
        rows = await self._fetch("list queues", self._task_sql.queues, {"now": now_us})
        return [QueueRow(*r) for r in rows]
