"""The SQLite store's guarded resources: the tables, the statements appends run for
breaker counts and moves, and the hooks of ``_resources.ResourceGuards``. Every write
goes through the store's one writer connection."""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._migrations import Migration
from ._resources import refill, token_wait_us
from .runtime import ResourceRow

__all__ = ["RESOURCE_MIGRATION", "RESOURCE_SQL", "SQLiteResources"]

T = TypeVar("T")

RESOURCE_MIGRATION = Migration(
    6,
    "guarded resources: breakers, rate limits, bulkheads",
    (
        # state: closed | open | half_open. transitions is the version of the
        # breaker's ledger stream. tokens is NULL until the rate limit is first used.
        """CREATE TABLE resources (
            resource TEXT PRIMARY KEY,
            state TEXT NOT NULL DEFAULT 'closed',
            changed_at INTEGER NOT NULL DEFAULT 0,
            transitions INTEGER NOT NULL DEFAULT 0,
            consecutive INTEGER NOT NULL DEFAULT 0,
            window_start INTEGER NOT NULL DEFAULT 0,
            window_calls INTEGER NOT NULL DEFAULT 0,
            window_failures INTEGER NOT NULL DEFAULT 0,
            probes INTEGER NOT NULL DEFAULT 0,
            tokens REAL,
            tokens_at INTEGER
        ) WITHOUT ROWID""",
        """CREATE TABLE permits (
            resource TEXT NOT NULL,
            holder TEXT NOT NULL,
            owner TEXT NOT NULL,
            until INTEGER NOT NULL,
            PRIMARY KEY (resource, holder)
        ) WITHOUT ROWID""",
        "CREATE INDEX permits_by_owner ON permits (owner)",
    ),
)

# In an UPDATE every expression sees the row as it was: the window test is the same
# in all four. Parameters: resource, failed (0/1), at, window.
_TALLY = (
    "INSERT INTO resources (resource, consecutive, window_start, window_calls, window_failures) "
    "VALUES (?1, ?2, ?3, 1, ?2) ON CONFLICT (resource) DO UPDATE SET "
    "consecutive = CASE WHEN ?2 = 1 THEN consecutive + 1 ELSE 0 END, "
    "window_calls = CASE WHEN ?3 - window_start >= ?4 THEN 1 ELSE window_calls + 1 END, "
    "window_failures = CASE WHEN ?3 - window_start >= ?4 THEN ?2 ELSE window_failures + ?2 END, "
    "window_start = CASE WHEN ?3 - window_start >= ?4 THEN ?3 ELSE window_start END"
)
# Parameters: resource, state, at, transitions. Half-opening keeps the counts.
_MOVE_BREAKER = (
    "INSERT INTO resources (resource, state, changed_at, transitions, window_start) "
    "VALUES (?1, ?2, ?3, ?4, ?3) ON CONFLICT (resource) DO UPDATE SET "
    "state = ?2, changed_at = ?3, transitions = ?4, probes = 0, "
    "consecutive = CASE WHEN ?2 = 'half_open' THEN consecutive ELSE 0 END, "
    "window_calls = CASE WHEN ?2 = 'half_open' THEN window_calls ELSE 0 END, "
    "window_failures = CASE WHEN ?2 = 'half_open' THEN window_failures ELSE 0 END, "
    "window_start = CASE WHEN ?2 = 'half_open' THEN window_start ELSE ?3 END"
)

RESOURCE_SQL = {
    "tally": _TALLY,
    "move_breaker": _MOVE_BREAKER,
    "drop_permit": "DELETE FROM permits WHERE resource = ? AND holder = ?",
}

_COLUMNS = (
    "r.resource, r.state, r.changed_at, r.transitions, r.consecutive, r.window_start, "
    "r.window_calls, r.window_failures, r.probes, r.tokens, r.tokens_at, "
    "(SELECT count(*) FROM permits p WHERE p.resource = r.resource AND p.until >= ?1)"
)


class SQLiteResources(abc.ABC):
    """Mixed into ``SQLiteEventStore``, whose writer thread runs every write."""

    @abc.abstractmethod
    async def _in_transaction(
        self, fn: Callable[[sqlite3.Connection], T], *, flushed: bool = True
    ) -> T: ...

    @abc.abstractmethod
    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]: ...

    async def _resource_state(self, resource: str, now_us: int) -> ResourceRow | None:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM resources r WHERE r.resource = ?2", (now_us, resource)
        )
        return ResourceRow(*rows[0]) if rows else None

    async def _list_resources(self, now_us: int) -> list[ResourceRow]:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM resources r ORDER BY r.resource", (now_us,)
        )
        return [ResourceRow(*r) for r in rows]

    async def _take_probe(self, resource: str, transitions: int, max_probes: int) -> bool:
        def take(con: sqlite3.Connection) -> bool:
            cur = con.execute(
                "UPDATE resources SET probes = probes + 1 WHERE resource = ? "
                "AND state = 'half_open' AND transitions = ? AND probes < ?",
                (resource, transitions, max_probes),
            )
            return cur.rowcount == 1

        return await self._in_transaction(take)

    async def _take_token(self, resource: str, rate: float, burst: int, now_us: int) -> int:
        def take(con: sqlite3.Connection) -> int:
            row = con.execute(
                "SELECT tokens, tokens_at FROM resources WHERE resource = ?", (resource,)
            ).fetchone()
            level = refill(row[0], row[1], rate, burst, now_us) if row else float(burst)
            if level < 1.0:
                return token_wait_us(level, rate)
            # A caller's now may be older than the last take's (read before it queued
            # for the writer): time already credited is never credited again.
            at = now_us if row is None or row[1] is None else max(row[1], now_us)
            con.execute(
                "INSERT INTO resources (resource, tokens, tokens_at) VALUES (?1, ?2, ?3) "
                "ON CONFLICT (resource) DO UPDATE SET tokens = ?2, tokens_at = ?3",
                (resource, level - 1.0, at),
            )
            return 0

        # Not flushed: a take lost with the machine only lets one more call through.
        return await self._in_transaction(take, flushed=False)

    async def _acquire_permit(
        self,
        resource: str,
        holder: str,
        owner: str,
        max_concurrent: int,
        now_us: int,
        until_us: int,
    ) -> bool:
        def acquire(con: sqlite3.Connection) -> bool:
            # A holder that has one keeps it, and its worker now owns it: a call taken
            # over from a dead worker is renewed by the heartbeat of the one running it.
            held = con.execute(
                "UPDATE permits SET until = ?, owner = ? WHERE resource = ? AND holder = ?",
                (until_us, owner, resource, holder),
            )
            if held.rowcount:
                return True
            con.execute("DELETE FROM permits WHERE resource = ? AND until < ?", (resource, now_us))
            (count,) = con.execute(
                "SELECT count(*) FROM permits WHERE resource = ?", (resource,)
            ).fetchone()
            if count >= max_concurrent:
                return False
            con.execute(
                "INSERT INTO permits (resource, holder, owner, until) VALUES (?, ?, ?, ?)",
                (resource, holder, owner, until_us),
            )
            # The resource is listed (and its permits counted) like any other.
            con.execute(
                "INSERT INTO resources (resource) VALUES (?) ON CONFLICT DO NOTHING", (resource,)
            )
            return True

        # Not flushed: a permit lost with the machine was held by a call now over.
        return await self._in_transaction(acquire, flushed=False)

    async def _renew_permits(self, owner: str, until_us: int) -> int:
        def renew(con: sqlite3.Connection) -> int:
            return con.execute(
                "UPDATE permits SET until = ? WHERE owner = ?", (until_us, owner)
            ).rowcount

        return await self._in_transaction(renew)

    async def _release_permits(self, owner: str) -> int:
        def release(con: sqlite3.Connection) -> int:
            return con.execute("DELETE FROM permits WHERE owner = ?", (owner,)).rowcount

        return await self._in_transaction(release)
