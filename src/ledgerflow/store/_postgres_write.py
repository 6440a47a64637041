"""The PostgreSQL store's write path: how a batch of appends becomes one or two round
trips and a commit, and how a commit whose connection failed is settled.

``PostgresWrites`` is mixed into ``PostgresEventStore``; it declares what it takes
from the store (its connections, statements and state) and gives it
``_write_batch``, the hook ``BaseEventStore``'s writer calls with each batch.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar
from uuid import UUID

import psycopg
from psycopg.rows import TupleRow

from ..errors import StoreError, StoreUnavailableError
from ..events import AppendResult, StreamState
from ..hashing import from_micros
from ._plan import (
    AppendRequest,
    BatchPlan,
    EventRow,
    LeaseState,
    StreamHead,
    fenced_ids,
    plan_batch,
    reused_ids,
)
from ._postgres_conn import (
    CONNECT_TIMEOUT,
    Connection,
    Session,
    driver_errors,
    event_row,
    pipeline,
    reason,
)
from ._postgres_resources import ResourceSql, resource_locks, runtime_params
from ._postgres_sql import Sql, stream_key
from ._postgres_tasks import TaskSql, task_locks
from .runtime import (
    Fence,
    Nudge,
    RuntimeWrite,
    Schedule,
    Unschedule,
    as_row,
    makes_work,
)

__all__ = ["PostgresWrites", "parts"]

log = logging.getLogger("ledgerflow.store.postgres")

_BATCH_ATTEMPTS = 3
_STREAMS_PER_TRANSACTION = 1000
"""Advisory locks (one per stream) one write transaction may hold; see _write_batch."""
_REDO = (psycopg.errors.TransactionRollback, psycopg.errors.UniqueViolation)
"""Refusals after which a batch is decided again: the server rolled it back whole."""
_PositionsMoved = psycopg.errors.RaiseException
"""begin_append's refusal of positions planned from memory (nothing was taken)."""
_KNOWN_HEADS = 10_000  # stream heads the writer remembers for one-round-trip appends


def parts(requests: list[AppendRequest], streams: int) -> list[list[AppendRequest]]:
    """``requests`` cut, in order, into runs that each write at most ``streams``
    streams (each request is decided on its own: cutting changes no outcome)."""
    runs: list[list[AppendRequest]] = [[]]
    seen: set[str] = set()
    for request in requests:
        if request.stream_id not in seen and len(seen) == streams:
            runs.append([])
            seen = set()
        seen.add(request.stream_id)
        runs[-1].append(request)
    return runs if runs[0] else []


def _params(row: EventRow) -> tuple[Any, ...]:
    return (
        row.position,
        row.id,
        row.stream_id,
        row.version,
        row.type,
        row.schema_version,
        row.data,
        row.metadata,
        from_micros(row.recorded_at_us),
        row.prev_hash,
        row.hash,
    )


def _fence_params(plan: BatchPlan) -> tuple[Any, ...]:
    fences = plan.fences
    return (
        _wakeup_ids(fences, plan.runtime),
        [f.workflow_id for f in fences],
        [f.owner for f in fences],
        [f.epoch for f in fences],
    )


def _writes(requests: Sequence[AppendRequest]) -> list[RuntimeWrite]:
    return [w for r in requests for w in r.runtime]


def _touched(writes: Sequence[RuntimeWrite]) -> set[str]:
    """The wake-up rows ``writes`` change."""
    return {w.workflow_id for w in writes if isinstance(w, Schedule | Nudge | Unschedule)}


def _wakeup_ids(fences: Sequence[Fence], writes: Sequence[RuntimeWrite]) -> list[str]:
    """Every wake-up row a batch may lock, fenced or written (the database orders
    them when it locks)."""
    ids = {f.workflow_id for f in fences}
    ids.update(_touched(writes))
    return sorted(ids)


def _runtime_statement(
    sql: Sql, tasks: TaskSql, resources: ResourceSql, write: RuntimeWrite
) -> tuple[str, tuple[Any, ...] | dict[str, Any]]:
    kind, params = as_row(write)
    if kind == "schedule":  # named: the owner is used twice
        return sql.schedule, dict(zip(("wid", "due", "owner", "until"), params, strict=True))
    if kind in tasks.runtime:
        return tasks.runtime[kind], params
    if kind in resources.runtime:
        return resources.runtime[kind], runtime_params(kind, params)
    statement = {
        "put": sql.put_instance,
        "schedule": sql.schedule,
        "nudge": sql.nudge,
        "unschedule": sql.unschedule,
    }[kind]
    return statement, params


class PostgresWrites(abc.ABC):
    """Mixed into ``PostgresEventStore``: the write path, on its writer connection."""

    backend: ClassVar[str]
    schema: str
    channel: str
    _sql: Sql
    _tag: str
    _known_heads: OrderedDict[str, StreamHead | None]
    _known_next: int | None
    _fast_skip: int
    _fast_misses: int
    _task_sql: TaskSql  # PostgresTasks's (annotated: a declaration here would hide it)
    _resource_sql: ResourceSql  # PostgresResources's, likewise

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The ledger's address, for errors."""

    @abc.abstractmethod
    async def _writing_connection(self) -> Connection:
        """The writer connection, connected again if it was discarded."""

    @abc.abstractmethod
    async def _discard_writer(self) -> Session | None:
        """Close the writer connection; the server session it had, if any."""

    # -- writing --------------------------------------------------------------------

    async def _write_batch(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        """Commit ``requests`` in as few transactions as the server's lock table lets.

        Each transaction holds one advisory lock per stream it writes, and those live
        in PostgreSQL's shared lock table (max_locks_per_transaction × connections
        entries, 6,400 by default), which every session shares. So a transaction
        writes at most ``_STREAMS_PER_TRANSACTION`` streams, and a batch refused with
        "out of shared memory" (others hold many locks just now) is split in halves
        and tried again; a part of one stream that still finds no room fails with
        ``StoreUnavailableError``, as any outage does.
        """
        outcomes: list[AppendResult | StoreError] = []
        for part in parts(requests, _STREAMS_PER_TRANSACTION):
            outcomes.extend(await self._write_part(part, recorded_at_us))
        return outcomes

    async def _write_part(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        try:
            return await self._write_one(requests, recorded_at_us)
        except StoreUnavailableError as exc:
            streams = len({r.stream_id for r in requests})
            if not isinstance(exc.__cause__, psycopg.errors.OutOfMemory) or streams < 2:
                raise
            log.warning(
                "postgres store: the server's lock table is full; committing %d streams "
                "in two transactions",
                streams,
            )
        outcomes: list[AppendResult | StoreError] = []
        for half in parts(requests, (streams + 1) // 2):
            outcomes.extend(await self._write_part(half, recorded_at_us))
        return outcomes

    async def _write_one(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        fast = self._fast_plan(requests, recorded_at_us)
        if fast is not None:
            done = await self._commit_fast(fast)
            if done is not None:
                return done
        return await self._commit_planned(requests, recorded_at_us)

    def _stream_keys(self, streams: Iterable[str]) -> list[int]:
        return [stream_key(self.schema, stream) for stream in streams]

    async def _commit_planned(
        self, requests: list[AppendRequest], recorded_at_us: int
    ) -> list[AppendResult | StoreError]:
        """The batch decided from the database: lock its streams, take positions and
        read (one round trip), then write and commit (a second)."""
        streams = list(dict.fromkeys(r.stream_id for r in requests))
        ids = reused_ids(requests)
        wanted = sum(len(r.events) for r in requests)
        with driver_errors("append", self.location):
            for attempt in range(1, _BATCH_ATTEMPTS + 1):
                conn = await self._writing_connection()
                sent: BatchPlan | None = None
                taken: tuple[int, int] | None = None  # the positions this attempt took
                try:
                    # BEGIN and COMMIT go through the pipeline by hand: psycopg's
                    # transaction() syncs on entry and exit, which costs three
                    # round trips more per batch than the two needed here.
                    async with pipeline(conn):
                        # Explicit: under REPEATABLE READ a writer that waited for a
                        # stream's lock would read that stream's head as it was
                        # before the previous holder committed.
                        await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                        first, plan, read = await self._plan(
                            conn, requests, streams, ids, wanted, recorded_at_us
                        )
                        taken_to = None if first is None else first + wanted - 1
                        if first is not None:
                            # What a lost commit may hand back, if still the last taken:
                            # up to what the plan used, whether or not the give-back
                            # below ran (if it did not, the sequence is past this).
                            taken = (first, plan.last_position)
                        given: psycopg.AsyncCursor[TupleRow] | None = None
                        if taken_to is not None and plan.last_position < taken_to:
                            # Refused or repeated requests used fewer positions than
                            # were taken: hand the rest back rather than leave a gap.
                            given = await conn.execute(
                                self._sql.give_back, (taken_to, plan.last_position)
                            )
                        # Runtime rows alone (a guarded write without events) commit too.
                        if plan.rows or plan.runtime:
                            sent = plan
                            await self._write_plan(conn, plan)
                            await self._commit_and_notify(conn, plan, recorded_at_us)
                        else:
                            await conn.execute("ROLLBACK")
                    next_position = None if taken_to is None else taken_to + 1
                    if given is not None:
                        row = await given.fetchone()
                        next_position = plan.last_position + 1 if row and row[0] else None
                    self._learn(streams, read, plan, first, next_position)
                    return plan.outcomes
                except BaseException as exc:
                    # Whatever failed, the session's state is unknown: start afresh
                    # (closing it also rolls back an open transaction).
                    self._forget()
                    broken = conn.broken
                    session = await self._discard_writer()
                    if not isinstance(exc, psycopg.Error) or attempt == _BATCH_ATTEMPTS:
                        raise
                    if not broken and isinstance(exc, _REDO):
                        # The server refused the transaction before it committed (a
                        # deadlock, or an id another process was storing at the same
                        # moment): nothing is stored; decide the batch again.
                        continue
                    if not isinstance(exc, psycopg.OperationalError):
                        raise
                    if sent is not None and await self._settled(sent, exc, session, taken):
                        return sent.outcomes
                    # Nothing was stored. A connection found dead (a server restart
                    # since the last batch, or lost mid-batch) is worth one more try.
                    if not broken:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _plan(
        self,
        conn: Connection,
        requests: list[AppendRequest],
        streams: list[str],
        ids: list[UUID],
        wanted: int,
        recorded_at_us: int,
    ) -> tuple[int | None, BatchPlan, dict[str, StreamHead]]:
        """Lock the batch's streams, take its positions and read what the plan needs,
        in one round trip; the first position taken (None if no events) and the plan."""
        sql = self._sql
        # Each statement after begin_append takes its snapshot once the stream locks
        # are granted, so it sees the previous holder's commit.
        begun = await conn.execute(sql.begin_append, (self._stream_keys(streams), wanted, None))
        heads_cur = await conn.execute(sql.heads_of, (streams,), binary=True)
        # Only caller-chosen ids can be stored already. prepare=False: a plan cached
        # while the table was small would keep scanning it whole as it grows.
        known_cur = (
            await conn.execute(sql.events_by_id, (ids,), binary=True, prepare=False)
            if ids
            else None
        )
        # The wake-up rows of fenced requests, locked (with those the batch writes,
        # in id order, as every writer locks them) so no claim moves a lease between
        # this check and the commit. After begin_append: a row lock gives the
        # transaction its id, which must come with its positions. Then the same for
        # task rows (see task_locks), always after the wake-up rows the batch
        # touches: reaping locks in that order too.
        tasks = task_locks(requests)
        wakeups = (
            _wakeup_ids(
                [r.fence for r in requests if isinstance(r.fence, Fence)], _writes(requests)
            )
            if fenced_ids(requests) or tasks
            else []
        )
        leases_cur = await conn.execute(sql.lock_wakeups, (wakeups,)) if wakeups else None
        tasks_cur = await conn.execute(self._task_sql.lock, tasks) if tasks else None
        row = await begun.fetchone()
        first: int | None = None if row is None else row[0]
        heads = {sid: StreamHead(v, h, p) for sid, v, h, p in await heads_cur.fetchall()}
        found = [] if known_cur is None else await known_cur.fetchall()
        existing = {row.id: row for row in map(event_row, found)}
        locked = [] if leases_cur is None else await leases_cur.fetchall()
        leases = {wid: LeaseState(owner, epoch) for wid, owner, epoch in locked}
        held = [] if tasks_cur is None else await tasks_cur.fetchall()
        task_leases = {tid: LeaseState(owner, epoch) for tid, owner, epoch in held}
        last = 0 if first is None else first - 1
        plan = plan_batch(requests, heads, existing, last, recorded_at_us, leases, task_leases)
        return first, plan, heads

    # -- the one-round-trip path ----------------------------------------------------
    #
    # After a commit this writer knows the next position the ledger will give out and
    # the heads of the streams it touched. If no other process has taken positions
    # since, the next batch can be planned from that knowledge and sent in one round
    # trip with the commit: begin_append checks the next position is the one we
    # planned with (else it raises and takes nothing), and any process
    # that wrote one of our streams since took positions since. Then the batch is
    # decided again from the database. So is a batch that reuses a caller's id stored
    # already (the guess never looks ids up) or whose fence does not hold.

    def _fast_plan(self, requests: list[AppendRequest], recorded_at_us: int) -> BatchPlan | None:
        if self._known_next is None:
            return None
        if task_locks(requests) is not None:
            # A task fence, retry or drop: the batch plans from task rows it locks
            # and reads first (see _plan). Puts of tasks alone may come this way:
            # such a batch holds no task row, so an insert that waits for a
            # conflicting row's holder closes no cycle of waits (see task_locks).
            return None
        if self._fast_skip:
            # Others are writing too: guesses keep missing, so skip a few.
            self._fast_skip -= 1
            return None
        heads: dict[str, StreamHead] = {}
        for request in requests:
            if request.stream_id in self._known_heads:
                head = self._known_heads[request.stream_id]
            elif request.expected is StreamState.NO_STREAM:
                # New, says the caller (a workflow's start): if it is not, the insert
                # of its version 1 breaks the (stream, version) key, and the batch is
                # decided from the database.
                head = None
            else:
                return None
            if head is not None:
                heads[request.stream_id] = head
        # Fences are assumed to hold here and checked in the transaction
        # (check_fences): if one does not, the batch is decided again from the reads.
        assumed = {
            r.fence.workflow_id: LeaseState(r.fence.owner, r.fence.epoch)
            for r in requests
            if isinstance(r.fence, Fence)
        }
        plan = plan_batch(requests, heads, {}, self._known_next - 1, recorded_at_us, assumed)
        if not plan.rows or any(isinstance(o, StoreError) for o in plan.outcomes):
            # Nothing that would collide proves the knowledge current, or a refusal
            # might rest on stale knowledge: ask the database.
            return None
        return plan

    async def _commit_fast(self, plan: BatchPlan) -> list[AppendResult | StoreError] | None:
        """The outcomes, or None if the guess missed and nothing was written."""
        fences = plan.fences
        first, last = plan.rows[0].position, plan.rows[-1].position
        with driver_errors("append", self.location):
            conn = await self._writing_connection()
            try:
                async with pipeline(conn):
                    await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                    await conn.execute(
                        self._sql.begin_append,
                        (self._stream_keys(plan.heads), len(plan.rows), first),
                    )
                    if fences:
                        await conn.execute(self._sql.check_fences, _fence_params(plan))
                    await self._write_plan(conn, plan)
                    await self._commit_and_notify(conn, plan, plan.rows[0].recorded_at_us)
            except (psycopg.IntegrityError, _PositionsMoved) as exc:
                # Another process took positions since our last batch; or a caller's
                # id is stored already, or a fence does not hold, or a stream said to
                # be new is not. The transaction is void; decide again from the
                # database. Only the first means others are writing too.
                self._forget()
                if isinstance(exc, _PositionsMoved):
                    self._fast_skip = min(64, self._fast_misses * 2 + 1)
                    self._fast_misses += 1
                try:
                    await conn.rollback()
                    if not isinstance(exc, _PositionsMoved):
                        # Our positions were taken: hand them back if still the last.
                        await conn.execute(self._sql.give_back, (last, first - 1))
                except psycopg.Error:
                    await self._discard_writer()
                return None
            except psycopg.OperationalError as exc:
                # The connection died (perhaps while idle: a server restart; perhaps
                # during the commit) or the server ended the transaction. Find out
                # whether it committed before anything else.
                self._forget()
                session = await self._discard_writer()
                if await self._settled(plan, exc, session):
                    return plan.outcomes
                return None
            except BaseException:
                self._forget()
                await self._discard_writer()
                raise
        self._fast_misses = 0
        self._learn(list(plan.heads), {}, plan, first, last + 1)
        return plan.outcomes

    async def _settled(
        self,
        plan: BatchPlan,
        cause: BaseException,
        lost: Session | None,
        taken: tuple[int, int] | None = None,
    ) -> bool:
        """Whether the transaction that wrote ``plan`` committed, after its connection
        failed at a point we cannot tell (before, during or after COMMIT).

        A transaction is all or nothing, so one question settles every request of
        the batch: are the rows the plan sealed stored, each at its position with
        its id and its hash? Not "is some event id stored": a caller's id may have
        been stored by an earlier append, and then would vouch for a batch that was
        never written. A hash covers the position, the predecessor and the moment
        the plan was sealed, so a row of another transaction cannot match, unless it
        is byte for byte the same event at the same place (the events are stored as
        reported, then, either way).

        The answer must be final, yet the lost session may live on at the server
        (a lost connection does not stop it at once, and over a broken network it
        may not even have read our COMMIT yet). So that session is ended first and
        waited for; only then is the question asked. If it cannot be asked, the
        caller learns that the append may or may not be stored, never that it was.

        ``taken``: the positions the lost transaction is known to have taken; if it
        did not commit, they are handed back (if still the last taken).
        """
        if not plan.rows:
            raise StoreUnavailableError(
                self.backend,
                f"append: {reason(cause)}; the batch held only runtime rows, which "
                "leave no event to look for: they may or may not be stored",
            )
        first, last = plan.rows[0].position, plan.rows[-1].position
        try:
            if lost is None:
                raise psycopg.OperationalError("the lost session is not known")
            conn = await self._writing_connection()
            await self._end_session(conn, lost)
            cur = await conn.execute(self._sql.sealed_between, (first, last), binary=True)
            stored = {position: (eid, digest) for position, eid, digest in await cur.fetchall()}
            committed = all(stored.get(row.position) == (row.id, row.hash) for row in plan.rows)
            if not committed and taken is not None:
                await conn.execute(self._sql.give_back, (taken[1], taken[0] - 1))
        except psycopg.Error as exc:
            await self._discard_writer()
            raise StoreUnavailableError(
                self.backend,
                f"append: {reason(cause)}; whether it was stored could not be checked "
                f"({reason(exc)}): it may or may not be stored",
            ) from exc
        return committed

    async def _end_session(self, conn: Connection, session: Session) -> None:
        """Terminate a lost session of this store's and wait until it has exited."""
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
        while True:
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid = %s AND backend_start = %s",
                session,
            )
            if await cur.fetchone() is None:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise psycopg.OperationalError(
                    f"the lost session (backend {session[0]}) did not end in {CONNECT_TIMEOUT} s"
                )
            await asyncio.sleep(0.02)

    def _learn(
        self,
        streams: list[str],
        read: dict[str, StreamHead],
        plan: BatchPlan,
        first: int | None,
        next_position: int | None,
    ) -> None:
        """Remember the heads this batch wrote or read, and the next position.

        ``first``: the first position the batch took (None: it took none).
        ``next_position``: the ledger's next position as this batch left it (None:
        unknown, another process took positions after ours).
        """
        if first is not None and first != self._known_next:
            # Another process took positions since our last batch: what we remember
            # of streams outside this batch (whose locks we held) may be stale.
            self._known_heads.clear()
        for stream in streams:
            head = plan.heads.get(stream) or read.get(stream)
            self._known_heads[stream] = head
            self._known_heads.move_to_end(stream)
        while len(self._known_heads) > _KNOWN_HEADS:
            self._known_heads.popitem(last=False)
        if first is not None:
            if next_position is None:
                self._forget()
            else:
                self._known_next = next_position

    def _learn_head(self, stream: str, last: EventRow) -> None:
        """Remember a head a read found (its last event, read to the end). Stale or
        not, it is safe to plan with: if the stream moved on before our last
        commit, the planned version is stored already and the unique (stream,
        version) constraint voids the transaction; if it moved on after, positions
        were taken since and begin_append refuses. Either way the batch is decided
        again from the database."""
        if self._known_next is None:
            return  # no one-round-trip path without the next position
        self._known_heads[stream] = StreamHead(last.version, last.hash, last.position)
        self._known_heads.move_to_end(stream)
        while len(self._known_heads) > _KNOWN_HEADS:
            self._known_heads.popitem(last=False)

    def _forget(self) -> None:
        self._known_heads.clear()
        self._known_next = None

    async def _write_plan(self, conn: Connection, plan: BatchPlan) -> None:
        sql = self._sql
        async with conn.cursor() as cur:
            if plan.rows:
                await cur.executemany(sql.insert_event, [_params(row) for row in plan.rows])
                await cur.executemany(
                    sql.upsert_head,
                    [(s, h.version, h.last_hash, h.last_position) for s, h in plan.heads.items()],
                )
            await self._write_runtime(cur, plan.runtime)

    async def _commit_and_notify(
        self, conn: Connection, plan: BatchPlan, recorded_at_us: int
    ) -> None:
        await conn.execute("COMMIT")
        # "<last position>" wakes subscribers; " w:<store>" wakes workers in other
        # processes (the work is claimable now; see runtime.makes_work).
        payload = str(plan.last_position) if plan.rows else ""
        if makes_work(plan.runtime, recorded_at_us):
            payload += f" w:{self._tag}"
        if payload:
            # After the commit, as a transaction of its own (in the same round trip):
            # a NOTIFY inside a write transaction holds PostgreSQL's one notification
            # lock through that commit's flush, which would serialize every writer's
            # commit again. A crash between the two leaves subscribers and workers to
            # their poll.
            await conn.execute(self._sql.notify, (self.channel, payload))

    async def _write_runtime(
        self, cur: psycopg.AsyncCursor[TupleRow], writes: Sequence[RuntimeWrite]
    ) -> None:
        """Apply the runtime rows in order, pipelined with the rest of the batch."""
        touched = _touched(writes)
        if len(touched) > 1:
            # Take the wake-up rows in id order before changing them in the batch's
            # order: release_wakeups locks in id order too, so neither can hold one
            # row while waiting for another the other holds. (Claims never wait.)
            await cur.execute(self._sql.lock_wakeups, (list(touched),))
        # Then the resource and permit rows it changes, in key order (see
        # resource_locks): acquires, renewals and releases of permits lock in that
        # order too.
        for lock, params in resource_locks(self._resource_sql, writes):
            await cur.execute(lock, params)
        statements = [
            _runtime_statement(self._sql, self._task_sql, self._resource_sql, w) for w in writes
        ]
        # A run of writes of one kind goes as one executemany; the order is kept.
        for statement, run in itertools.groupby(statements, key=lambda t: t[0]):
            await cur.executemany(statement, [params for _, params in run])
