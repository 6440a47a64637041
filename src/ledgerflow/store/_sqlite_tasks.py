"""The SQLite store's task queues: the tables, the statements appends run for task
rows, and the hooks of ``_tasks.TaskQueues``. Every write goes through the store's
one writer connection, so a claim reads the running count and leases in one
transaction that nobody else writes during."""

from __future__ import annotations

import abc
import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._migrations import Migration
from .runtime import TASK_COLUMNS, QueueRow, TaskLease, TaskRow

__all__ = [
    "HANDED_BACK_MIGRATION",
    "RECORDED_ATTEMPT_MIGRATION",
    "TASK_MIGRATION",
    "TASK_SQL",
    "SQLiteTasks",
]

T = TypeVar("T")

TASK_MIGRATION = Migration(
    5,
    "task queues",
    (
        # payload is JSON text kept byte for byte. attempt counts the claims.
        """CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY,
            workflow_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            queue TEXT NOT NULL,
            payload TEXT NOT NULL,
            due_at INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            lease_owner TEXT,
            lease_until INTEGER,
            lease_epoch INTEGER NOT NULL,
            created_at INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX tasks_by_queue ON tasks (queue, due_at)",
        "CREATE INDEX tasks_by_workflow ON tasks (workflow_id)",
        "CREATE INDEX tasks_by_owner ON tasks (lease_owner) WHERE lease_owner IS NOT NULL",
        "CREATE TABLE queues (queue TEXT PRIMARY KEY, max_concurrent INTEGER) WITHOUT ROWID",
    ),
)

RECORDED_ATTEMPT_MIGRATION = Migration(
    10,
    "task attempts lost with their workers",
    (
        "ALTER TABLE tasks ADD COLUMN recorded_attempt INTEGER NOT NULL DEFAULT 0",
        # What is queued already: taken as recorded (a loss is never claimed falsely;
        # one of a task running through the upgrade goes unsaid).
        "UPDATE tasks SET recorded_attempt = attempt",
    ),
)

HANDED_BACK_MIGRATION = Migration(
    11,
    "task attempts handed back unfinished",
    ("ALTER TABLE tasks ADD COLUMN handed_back INTEGER NOT NULL DEFAULT 0",),
)

TASK_SQL = {
    "put_task": (
        f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (task_id) DO NOTHING"
    ),
    # The lease is given back with its epoch kept: the old holder's fence then fails.
    # The attempt's failure is recorded (or it did not count): see recorded_attempt.
    "retry_task": (
        "UPDATE tasks SET due_at = ?, attempt = attempt - ?, recorded_attempt = attempt - ?, "
        "lease_owner = NULL, lease_until = NULL, handed_back = 0 WHERE task_id = ?"
    ),
    "drop_task": "DELETE FROM tasks WHERE task_id = ?",
    "drop_tasks": "DELETE FROM tasks WHERE workflow_id = ?",
}

_RUNNING = (
    "SELECT count(*) FROM tasks WHERE queue = ? AND lease_owner IS NOT NULL AND lease_until >= ?"
)
_CLAIM = (
    "UPDATE tasks SET lease_owner = ?1, lease_until = ?2, lease_epoch = lease_epoch + 1, "
    "attempt = attempt + 1 WHERE task_id IN ("
    "SELECT task_id FROM tasks WHERE queue = ?3 AND due_at <= ?4 "
    "AND (lease_owner IS NULL OR lease_until < ?4) "
    "AND (?5 IS NULL OR name IN (SELECT value FROM json_each(?5))) "
    "ORDER BY due_at, task_id LIMIT ?6) "
    f"RETURNING {TASK_COLUMNS}"
)
# Never claimed; or no attempt running, and none since the last recorded failure
# that may have acted unrecorded (lost with its worker, or handed back unfinished):
# a step waiting out its retry's backoff has nothing in doubt to wait for.
_WITHDRAW = (
    "DELETE FROM tasks WHERE task_id = ? AND (lease_epoch = 0 OR (lease_owner IS NULL "
    "AND recorded_attempt >= attempt AND handed_back = 0))"
)
_NEXT_DUE = (
    "SELECT min(CASE WHEN lease_owner IS NULL THEN due_at "
    "ELSE max(due_at, coalesce(lease_until, 0) + 1) END) FROM tasks "
    "WHERE queue IN (SELECT value FROM json_each(?1)) "
    "AND (?2 IS NULL OR name IN (SELECT value FROM json_each(?2)))"
)
# Leases of dead workers, and expired leases of owners with no row: as for wake-ups.
REAP_TASK_LEASES = (
    "UPDATE tasks SET lease_owner = NULL, lease_until = NULL "
    "WHERE lease_owner IS NOT NULL AND ("
    "lease_owner IN (SELECT worker_id FROM workers WHERE heartbeat_at + lease_us < ?1) "
    "OR (lease_until < ?1 AND lease_owner NOT IN (SELECT worker_id FROM workers)))"
)
_QUEUES = (
    "WITH names AS (SELECT queue FROM tasks UNION SELECT queue FROM queues) "
    "SELECT n.queue, q.max_concurrent, "
    "(SELECT count(*) FROM tasks t WHERE t.queue = n.queue AND t.due_at <= ?1 "
    " AND (t.lease_owner IS NULL OR t.lease_until < ?1)), "
    "(SELECT count(*) FROM tasks t WHERE t.queue = n.queue AND t.due_at > ?1 "
    " AND t.lease_owner IS NULL), "
    "(SELECT count(*) FROM tasks t WHERE t.queue = n.queue AND t.lease_owner IS NOT NULL "
    " AND t.lease_until >= ?1) "
    "FROM names n LEFT JOIN queues q ON q.queue = n.queue ORDER BY n.queue"
)


def _task(r: Sequence[Any]) -> TaskRow:
    """A ``tasks`` row (``handed_back`` is stored as 0 or 1)."""
    return TaskRow(*(*r[:-1], bool(r[-1])))


def _names(names: tuple[str, ...] | None) -> str | None:
    return None if names is None else json.dumps(names)


class SQLiteTasks(abc.ABC):
    """Mixed into ``SQLiteEventStore``, whose writer thread runs every write."""

    @abc.abstractmethod
    async def _on_writer(self, fn: Callable[[], T]) -> T: ...

    @abc.abstractmethod
    def _write_con(self) -> sqlite3.Connection:
        """The writer connection (only on the writer thread)."""

    @abc.abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]: ...

    async def _in_transaction(
        self, fn: Callable[[sqlite3.Connection], T], *, flushed: bool = True
    ) -> T:
        """``fn`` in one write transaction on the writer connection. ``flushed=False``:
        its commit does not wait for the disk (``synchronous=NORMAL`` for it: in WAL
        mode a power loss may drop it, never corrupt anything; the next flushed commit
        makes it durable), for soft state such as a rate limit's tokens."""

        def run() -> T:
            con = self._write_con()
            if not flushed:
                con.execute("PRAGMA synchronous = NORMAL")
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(con)
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            finally:
                if not flushed:
                    con.execute("PRAGMA synchronous = FULL")
            return result

        return await self._on_writer(run)

    async def _claim_tasks(
        self,
        owner: str,
        queues: tuple[str, ...],
        names: tuple[str, ...] | None,
        now_us: int,
        lease_until_us: int,
        limit: int,
    ) -> list[TaskRow]:
        def claim(con: sqlite3.Connection) -> list[TaskRow]:
            claimed: list[TaskRow] = []
            for queue in queues:
                room = limit - len(claimed)
                found = con.execute(
                    "SELECT max_concurrent FROM queues WHERE queue = ?", (queue,)
                ).fetchone()
                if found is not None and found[0] is not None:
                    (running,) = con.execute(_RUNNING, (queue, now_us)).fetchone()
                    room = min(room, found[0] - running)
                if room <= 0:
                    continue
                params = (owner, lease_until_us, queue, now_us, _names(names), room)
                claimed.extend(_task(r) for r in con.execute(_CLAIM, params))
            return claimed

        rows = await self._in_transaction(claim)
        return sorted(rows, key=lambda t: (t.due_at_us, t.task_id))

    async def _renew_task_leases(
        self, owner: str, leases: list[TaskLease], lease_until_us: int
    ) -> list[TaskLease]:
        def renew(con: sqlite3.Connection) -> list[TaskLease]:
            kept = []
            for lease in leases:
                cur = con.execute(
                    "UPDATE tasks SET lease_until = ? "
                    "WHERE task_id = ? AND lease_owner = ? AND lease_epoch = ?",
                    (lease_until_us, lease.task_id, owner, lease.epoch),
                )
                if cur.rowcount:
                    kept.append(lease)
            return kept

        return await self._in_transaction(renew)

    async def _withdraw_task(self, task_id: str) -> bool:
        def withdraw(con: sqlite3.Connection) -> bool:
            con.execute(_WITHDRAW, (task_id,))
            left = con.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return left is None

        return await self._in_transaction(withdraw)

    async def _release_tasks(self, owner: str | None) -> int:
        def release(con: sqlite3.Connection) -> int:
            cur = con.execute(
                "UPDATE tasks SET lease_owner = NULL, lease_until = NULL, "
                "attempt = max(0, attempt - 1), handed_back = 1 "
                "WHERE lease_owner IS NOT NULL AND (?1 IS NULL OR lease_owner = ?1)",
                (owner,),
            )
            return cur.rowcount

        return await self._in_transaction(release)

    async def _next_task_due(
        self, queues: tuple[str, ...], names: tuple[str, ...] | None
    ) -> int | None:
        rows = await self._read(_NEXT_DUE, (json.dumps(queues), _names(names)))
        return None if rows[0][0] is None else int(rows[0][0])

    async def _list_tasks(
        self, queue: str | None, workflow_id: str | None, after: str | None, limit: int
    ) -> list[TaskRow]:
        rows = await self._read(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE (?1 IS NULL OR queue = ?1) "
            "AND (?2 IS NULL OR workflow_id = ?2) AND (?3 IS NULL OR task_id > ?3) "
            "ORDER BY task_id LIMIT ?4",
            (queue, workflow_id, after, limit),
        )
        return [_task(r) for r in rows]

    async def _set_queue_limit(self, queue: str, max_concurrent: int | None) -> None:
        def put(con: sqlite3.Connection) -> None:
            if max_concurrent is None:  # no limit: no row
                con.execute("DELETE FROM queues WHERE queue = ?", (queue,))
                return
            con.execute(
                "INSERT INTO queues (queue, max_concurrent) VALUES (?, ?) "
                "ON CONFLICT (queue) DO UPDATE SET max_concurrent = excluded.max_concurrent",
                (queue, max_concurrent),
            )

        await self._in_transaction(put)

    async def _list_queues(self, now_us: int) -> list[QueueRow]:
        rows = await self._read(_QUEUES, (now_us,))
        return [QueueRow(*r) for r in rows]
