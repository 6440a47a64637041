"""The PostgreSQL store's guarded resources: the tables (migration 7, see
``_postgres_sql.migrations``), the statements appends run for breaker counts and
moves, and the hooks of ``_resources.ResourceGuards``, on the store's reader pool.

Every hook is one short READ COMMITTED transaction of its own:

- ``take_probe`` is one conditional UPDATE: concurrent ones queue on the row and
  each re-checks ``probes < max_probes`` against the row it finds once it gets it.
- ``take_token`` locks the resource's row (creating it first if missing) and
  only then reads the bucket, so two takers, in any processes, never both see the
  last token.
- ``acquire_permit`` first takes a transaction-scoped advisory lock on the
  resource (see ``ResourceSql.lock_permits``), so acquirers of one resource take
  turns, and counts the permits held in a statement after it: its snapshot sees
  every earlier acquirer's commit. Rows that do not exist yet (the permit about to
  be given) cannot be locked; a lock on the ``resources`` row would do as well, but
  appends hold that row from their tally or move until their commit, so acquirers
  would queue behind the ledger's writers; the advisory lock is taken by nothing
  else.

Locks. The rows of ``permits`` are taken in (resource, holder) order by whatever
holds more than one: an acquire (the holder's row and the expired ones, in one
statement), a renewal, a release, and an append that drops several permits or
touches several rows (``resource_locks``, which takes its ``resources`` rows in
name order first). Besides its advisory lock, an acquire waits only for permit
rows, and then at most for the insert of a ``resources`` row that no committed
permit refers to; token and probe takers hold one ``resources`` row and wait for
nothing else. So no two of them can each hold a row the other waits for.
"""

from __future__ import annotations

import abc
import functools
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.abc import Params
from psycopg.rows import TupleRow

from ._migrations import Migration
from ._resources import refill, token_wait_us
from .runtime import DropPermit, MoveBreaker, ResourceRow, RuntimeWrite, Tally

__all__ = [
    "PostgresResources",
    "ResourceSql",
    "permit_key",
    "resource_locks",
    "resource_migration",
    "runtime_params",
]

T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]


def resource_migration(schema: str) -> Migration:
    """The tables of guarded resources in ``schema`` (as SQLite's migration 6).

    state: closed | open | half_open. transitions is the version of the breaker's
    ledger stream. tokens is NULL until the rate limit is first used. Names order
    by code point, as in Python and SQLite; ``owner`` keeps the default collation,
    as the other tables' lease owners and worker ids do, since they are compared."""
    return Migration(
        7,
        "guarded resources: breakers, rate limits, bulkheads",
        (
            f"""CREATE TABLE {schema}.resources (
                resource text COLLATE "C" PRIMARY KEY,
                state text NOT NULL DEFAULT 'closed',
                changed_at bigint NOT NULL DEFAULT 0,
                transitions bigint NOT NULL DEFAULT 0,
                consecutive bigint NOT NULL DEFAULT 0,
                window_start bigint NOT NULL DEFAULT 0,
                window_calls bigint NOT NULL DEFAULT 0,
                window_failures bigint NOT NULL DEFAULT 0,
                probes bigint NOT NULL DEFAULT 0,
                tokens double precision,
                tokens_at bigint
            )""",
            f"""CREATE TABLE {schema}.permits (
                resource text COLLATE "C" NOT NULL,
                holder text COLLATE "C" NOT NULL,
                owner text NOT NULL,
                until bigint NOT NULL,
                PRIMARY KEY (resource, holder)
            )""",
            f"CREATE INDEX permits_by_owner ON {schema}.permits (owner)",
        ),
    )


def permit_key(schema: str, resource: str) -> int:
    """The advisory lock (bigint key space) that makes acquirers of ``resource``'s
    permits in ``schema`` take turns. A personalized hash: never equal to a stream
    key (``_postgres_sql.stream_key``) but by chance, and then it only makes one
    wait a moment longer."""
    digest = hashlib.blake2b(
        f"{schema}\0{resource}".encode(), digest_size=8, person=b"lf-permits"
    ).digest()
    return int.from_bytes(digest, signed=True)


RUNTIME_NAMES = {
    "tally": ("resource", "failed", "at", "window"),
    "move_breaker": ("resource", "state", "at", "transitions"),
}
"""The kinds whose statements take named parameters (used more than once), and the
names of ``runtime.as_row``'s positional ones."""


class ResourceSql:
    """Every guarded-resource statement the store sends, qualified with its schema."""

    def __init__(self, schema: str) -> None:
        s = schema
        # In ON CONFLICT DO UPDATE every expression sees the row as it was (r), as
        # in SQLite: the window test is the same in all four. Its difference is
        # taken in numeric: times may be any int64, and bigint would overflow.
        new_window = "%(at)s::numeric - r.window_start >= %(window)s"
        tally = (
            f"INSERT INTO {s}.resources AS r "
            "(resource, consecutive, window_start, window_calls, window_failures) "
            "VALUES (%(resource)s, %(failed)s, %(at)s, 1, %(failed)s) "
            "ON CONFLICT (resource) DO UPDATE SET "
            "consecutive = CASE WHEN %(failed)s = 1 THEN r.consecutive + 1 ELSE 0 END, "
            f"window_calls = CASE WHEN {new_window} THEN 1 ELSE r.window_calls + 1 END, "
            f"window_failures = CASE WHEN {new_window} THEN %(failed)s "
            "ELSE r.window_failures + %(failed)s END, "
            f"window_start = CASE WHEN {new_window} THEN %(at)s ELSE r.window_start END"
        )
        # Half-opening keeps the counts.
        half = "%(state)s::text = 'half_open'"
        move_breaker = (
            f"INSERT INTO {s}.resources AS r "
            "(resource, state, changed_at, transitions, window_start) "
            "VALUES (%(resource)s, %(state)s, %(at)s, %(transitions)s, %(at)s) "
            "ON CONFLICT (resource) DO UPDATE SET "
            "state = %(state)s, changed_at = %(at)s, transitions = %(transitions)s, probes = 0, "
            f"consecutive = CASE WHEN {half} THEN r.consecutive ELSE 0 END, "
            f"window_calls = CASE WHEN {half} THEN r.window_calls ELSE 0 END, "
            f"window_failures = CASE WHEN {half} THEN r.window_failures ELSE 0 END, "
            f"window_start = CASE WHEN {half} THEN r.window_start ELSE %(at)s END"
        )
        # Parameters as ``runtime.as_row`` gives them, by the names of RUNTIME_NAMES
        # where there are some.
        self.runtime = {
            "tally": tally,
            "move_breaker": move_breaker,
            "drop_permit": f"DELETE FROM {s}.permits WHERE resource = %s AND holder = %s",
        }
        # See resource_locks: sent before an append's resource writes.
        self.lock_resources = (
            f"SELECT 1 FROM {s}.resources WHERE resource = ANY(%s::text[]) "
            "ORDER BY resource FOR UPDATE"
        )
        self.lock_dropped = (
            f"SELECT 1 FROM {s}.permits p JOIN unnest(%s::text[], %s::text[]) AS d(r, h) "
            "ON p.resource = d.r AND p.holder = d.h ORDER BY p.resource, p.holder FOR UPDATE OF p"
        )
        columns = (
            "r.resource, r.state, r.changed_at, r.transitions, r.consecutive, r.window_start, "
            "r.window_calls, r.window_failures, r.probes, r.tokens, r.tokens_at, "
            f"(SELECT count(*) FROM {s}.permits p "
            "WHERE p.resource = r.resource AND p.until >= %(now)s)"
        )
        self.state = f"SELECT {columns} FROM {s}.resources r WHERE r.resource = %(resource)s"
        self.list = f"SELECT {columns} FROM {s}.resources r ORDER BY r.resource"
        self.take_probe = (
            f"UPDATE {s}.resources SET probes = probes + 1 WHERE resource = %s "
            "AND state = 'half_open' AND transitions = %s AND probes < %s RETURNING 1"
        )
        # A token: the row is made if missing (a full bucket: tokens NULL), then
        # locked and read; what is left is written back.
        self.add_bucket = f"INSERT INTO {s}.resources (resource) VALUES (%s) ON CONFLICT DO NOTHING"
        self.lock_bucket = (
            f"SELECT tokens, tokens_at FROM {s}.resources WHERE resource = %s FOR UPDATE"
        )
        self.set_bucket = (
            f"UPDATE {s}.resources SET tokens = %s, tokens_at = %s WHERE resource = %s"
        )
        # A permit, in this order, each statement seeing what the one before did
        # (READ COMMITTED: each takes its snapshot when it starts):
        self.lock_permits = "SELECT pg_advisory_xact_lock(%(key)s)"
        # The rows this acquire may change, in key order (see the module's doc): the
        # holder's, and the expired ones, which go. One a renewal extends meanwhile
        # is re-checked once locked, so it counts again; one it waits to extend is
        # gone before it gets it.
        self.lock_held = (
            f"SELECT 1 FROM {s}.permits WHERE resource = %(resource)s "
            "AND (holder = %(holder)s OR until < %(now)s) ORDER BY resource, holder FOR UPDATE"
        )
        # A holder that has one keeps it (expired or not, as in SQLite)...
        self.keep_permit = (
            f"UPDATE {s}.permits SET until = %(until)s, owner = %(owner)s "
            "WHERE resource = %(resource)s AND holder = %(holder)s RETURNING 1"
        )
        self.sweep_permits = (
            f"DELETE FROM {s}.permits WHERE resource = %(resource)s AND until < %(now)s "
            "AND holder <> %(holder)s"
        )
        # ...else it takes one if fewer than max_concurrent are held (its own row,
        # kept above, makes the insert do nothing).
        self.take_permit = (
            f"INSERT INTO {s}.permits (resource, holder, owner, until) "
            "SELECT %(resource)s, %(holder)s, %(owner)s, %(until)s "
            f"WHERE (SELECT count(*) FROM {s}.permits "
            "WHERE resource = %(resource)s AND until >= %(now)s) < %(max)s "
            "ON CONFLICT (resource, holder) DO NOTHING RETURNING 1"
        )
        # The resource is listed (and its permits counted) like any other. Inserted
        # only if not there: a row that is (and so has any permit) is never waited
        # for, even while an append holds it. A refused acquire has one already.
        self.list_resource = (
            f"INSERT INTO {s}.resources (resource) SELECT %(resource)s WHERE NOT EXISTS "
            f"(SELECT 1 FROM {s}.resources WHERE resource = %(resource)s) "
            "ON CONFLICT DO NOTHING"
        )
        # Renewals and releases lock the owner's rows in key order, as acquires and
        # appends do.
        held = (
            "WITH held AS MATERIALIZED ("
            f"SELECT resource, holder FROM {s}.permits WHERE owner = %(owner)s "
            "ORDER BY resource, holder FOR UPDATE) "
        )
        self.renew = (
            f"{held}UPDATE {s}.permits p SET until = %(until)s FROM held h "
            "WHERE p.resource = h.resource AND p.holder = h.holder RETURNING 1"
        )
        self.release = (
            f"{held}DELETE FROM {s}.permits p USING held h "
            "WHERE p.resource = h.resource AND p.holder = h.holder RETURNING 1"
        )


def runtime_params(kind: str, params: tuple[Any, ...]) -> tuple[Any, ...] | dict[str, Any]:
    """``as_row``'s parameters as the statement of ``kind`` takes them."""
    names = RUNTIME_NAMES.get(kind)
    return params if names is None else dict(zip(names, params, strict=True))


def resource_locks(
    sql: ResourceSql, writes: Sequence[RuntimeWrite]
) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements that lock the stored rows an append's resource writes change,
    in key order (``resources`` rows, then ``permits`` rows), before it changes them
    in its own order; none if it changes at most one row, which closes no cycle.

    Rows a tally or move inserts are not there to lock: two appends that create
    the same new resources in opposite orders may still deadlock, once per
    resource ever; PostgreSQL ends one of them, and the batch is decided again."""
    resources = sorted({w.resource for w in writes if isinstance(w, Tally | MoveBreaker)})
    permits = sorted({(w.resource, w.holder) for w in writes if isinstance(w, DropPermit)})
    if len(resources) + len(permits) < 2:
        return []
    locks: list[tuple[str, tuple[Any, ...]]] = []
    if resources:
        locks.append((sql.lock_resources, (resources,)))
    if permits:
        locks.append((sql.lock_dropped, ([r for r, _ in permits], [h for _, h in permits])))
    return locks


class PostgresResources(abc.ABC):
    """Mixed into ``PostgresEventStore``: the guarded-resource hooks, on its reader
    pool."""

    schema: str

    @functools.cached_property
    def _resource_sql(self) -> ResourceSql:
        return ResourceSql(self.schema)

    @abc.abstractmethod
    async def _fetch(
        self, action: str, sql: str, params: Params, *, flushed: bool = True
    ) -> list[TupleRow]:
        """One statement on the reader pool, as a transaction of its own."""

    @abc.abstractmethod
    async def _transaction(
        self, action: str, fn: Callable[[Connection], Awaitable[T]], *, flushed: bool = True
    ) -> T:
        """``fn`` on a pooled connection, in one transaction (a pipeline: ``fn``'s
        fetches are its round trips)."""

    async def _resource_state(self, resource: str, now_us: int) -> ResourceRow | None:
        params = {"now": now_us, "resource": resource}
        rows = await self._fetch("read a resource", self._resource_sql.state, params)
        return ResourceRow(*rows[0]) if rows else None

    async def _list_resources(self, now_us: int) -> list[ResourceRow]:
        rows = await self._fetch("list resources", self._resource_sql.list, {"now": now_us})
        return [ResourceRow(*r) for r in rows]

    async def _take_probe(self, resource: str, transitions: int, max_probes: int) -> bool:
        rows = await self._fetch(
            "take a probe", self._resource_sql.take_probe, (resource, transitions, max_probes)
        )
        return len(rows) == 1

    async def _take_token(self, resource: str, rate: float, burst: int, now_us: int) -> int:
        sql = self._resource_sql

        async def take(conn: Connection) -> int:
            await conn.execute(sql.add_bucket, (resource,))
            cur = await conn.execute(sql.lock_bucket, (resource,))
            row = await cur.fetchone()
            level = refill(row[0], row[1], rate, burst, now_us) if row else float(burst)
            if level < 1.0:
                return token_wait_us(level, rate)
            # A caller's now may be older than the last take's (read before it
            # waited for the row): time already credited is never credited again.
            at = now_us if row is None or row[1] is None else max(row[1], now_us)
            await conn.execute(sql.set_bucket, (level - 1.0, at, resource))
            return 0

        # Not flushed: a take lost with the server only lets one more call through.
        return await self._transaction("take a token", take, flushed=False)

    async def _acquire_permit(
        self,
        resource: str,
        holder: str,
        owner: str,
        max_concurrent: int,
        now_us: int,
        until_us: int,
    ) -> bool:
        sql = self._resource_sql
        params = {
            "key": permit_key(self.schema, resource),
            "resource": resource,
            "holder": holder,
            "owner": owner,
            "max": max_concurrent,
            "now": now_us,
            "until": until_us,
        }

        async def acquire(conn: Connection) -> bool:
            await conn.execute(sql.lock_permits, params)
            await conn.execute(sql.lock_held, params)
            kept = await conn.execute(sql.keep_permit, params)
            await conn.execute(sql.sweep_permits, params)
            taken = await conn.execute(sql.take_permit, params)
            await conn.execute(sql.list_resource, params)
            return bool(await kept.fetchall() or await taken.fetchall())

        # Not flushed: a permit lost with the server was held by a call that is over.
        return await self._transaction("acquire a permit", acquire, flushed=False)

    async def _renew_permits(self, owner: str, until_us: int) -> int:
        params = {"owner": owner, "until": until_us}
        return len(await self._fetch("renew permits", self._resource_sql.renew, params))

    async def _release_permits(self, owner: str) -> int:
        params = {"owner": owner}
        return len(await self._fetch("release permits", self._resource_sql.release, params))
