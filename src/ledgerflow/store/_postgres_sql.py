"""The PostgreSQL store's schema: its migrations, and every statement it sends.

Kept apart from the adapter (``postgres.py``) so that each reads on its own: here
what the tables, functions and queries are; there when and why each is sent.
"""

from __future__ import annotations

from ._migrations import Migration
from ._postgres_keys import allocator_key, stream_key
from ._postgres_merkle import merkle_migration
from ._postgres_projections import projection_migration
from ._postgres_resources import resource_migration

__all__ = ["Sql", "allocator_key", "migrations", "stream_key"]


def migrations(schema: str) -> tuple[Migration, ...]:
    # COLLATE "C" orders stream ids by code point, as SQLite and the memory store do,
    # whatever the database's locale.
    return (
        Migration(
            1,
            "events, streams, snapshots and head",
            (
                f"""CREATE TABLE {schema}.events (
                    position bigint PRIMARY KEY,
                    event_id uuid NOT NULL UNIQUE,
                    stream_id text COLLATE "C" NOT NULL,
                    version bigint NOT NULL,
                    type text NOT NULL,
                    schema_version integer NOT NULL,
                    data bytea NOT NULL,
                    metadata bytea NOT NULL,
                    recorded_at timestamptz NOT NULL,
                    prev_hash bytea NOT NULL,
                    hash bytea NOT NULL,
                    UNIQUE (stream_id, version)
                )""",
                f"""CREATE TABLE {schema}.streams (
                    stream_id text COLLATE "C" PRIMARY KEY,
                    version bigint NOT NULL,
                    last_hash bytea NOT NULL,
                    last_position bigint NOT NULL
                )""",
                f"""CREATE TABLE {schema}.snapshots (
                    stream_id text COLLATE "C" PRIMARY KEY,
                    version bigint NOT NULL,
                    type text NOT NULL,
                    schema_version integer NOT NULL,
                    state bytea NOT NULL,
                    recorded_at timestamptz NOT NULL
                )""",
                f"""CREATE TABLE {schema}.head (
                    id boolean PRIMARY KEY DEFAULT true CHECK (id),
                    position bigint NOT NULL
                )""",
                f"INSERT INTO {schema}.head (id, position) VALUES (true, 0)",
            ),
        ),
        # Times are bigint microseconds since the epoch, as the runtime's clock gives
        # them: they are only compared with it, never shown.
        Migration(
            2,
            "workflow instances and wake-ups",
            (
                f"""CREATE TABLE {schema}.workflows (
                    workflow_id text COLLATE "C" PRIMARY KEY,
                    name text NOT NULL,
                    version integer NOT NULL,
                    status text NOT NULL,
                    parent_id text,
                    created_at bigint NOT NULL,
                    updated_at bigint NOT NULL
                )""",
                f"CREATE INDEX workflows_by_status ON {schema}.workflows (status, workflow_id)",
                f"""CREATE TABLE {schema}.wakeups (
                    workflow_id text COLLATE "C" PRIMARY KEY,
                    due_at bigint,
                    lease_owner text,
                    lease_until bigint
                )""",
                f"CREATE INDEX wakeups_by_due ON {schema}.wakeups (due_at) "
                "WHERE due_at IS NOT NULL",
            ),
        ),
        Migration(
            3,
            "lease epochs (fencing)",
            (
                f"ALTER TABLE {schema}.wakeups ADD COLUMN lease_epoch bigint NOT NULL DEFAULT 0",
                # For the one-round-trip append, which cannot read before it writes:
                # lock the wake-up rows the batch touches (in id order, as every
                # writer does) and fail the transaction if a fence does not hold.
                # check_violation is an integrity error: the writer then decides the
                # batch again from what it reads, request by request.
                f"""CREATE FUNCTION {schema}.check_fences(
                    lock_ids text[], ids text[], owners text[], epochs bigint[]
                ) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM 1 FROM {schema}.wakeups WHERE workflow_id = ANY(lock_ids)
                        ORDER BY workflow_id FOR UPDATE;
                    IF EXISTS (
                        SELECT 1 FROM unnest(ids, owners, epochs) AS f(id, owner, epoch)
                        LEFT JOIN {schema}.wakeups w ON w.workflow_id = f.id
                        WHERE w.workflow_id IS NULL OR w.lease_owner IS DISTINCT FROM f.owner
                            OR w.lease_epoch <> f.epoch
                    ) THEN
                        RAISE EXCEPTION 'ledgerflow: a lease fence does not hold'
                            USING ERRCODE = 'check_violation';
                    END IF;
                END $$""",
            ),
        ),
        Migration(
            4,
            "global order by transaction visibility (no head lock)",
            (
                # Positions come from a sequence, taken under a lock held for
                # microseconds inside begin_append, never across a commit (ADR 008).
                f"CREATE SEQUENCE {schema}.positions AS bigint MINVALUE 0 START 1",
                f"SELECT setval('{schema}.positions', position, true) FROM {schema}.head",
                # The transaction that wrote each event. Rows from before this
                # migration are all committed: 0 reads as older than any snapshot.
                f"ALTER TABLE {schema}.events ADD COLUMN xid xid8 NOT NULL DEFAULT '0'",
                f"ALTER TABLE {schema}.events ALTER COLUMN xid SET DEFAULT pg_current_xact_id()",
                # Writers of older versions locked this row; with it gone they fail
                # loudly instead of taking positions another way.
                f"DROP TABLE {schema}.head",
                # The first statement of every write transaction. It locks the
                # streams the batch touches (in key order: no deadlocks between
                # batches), then, only if the batch has events, takes the
                # transaction's id and the batch's positions together under one
                # short lock. So transaction ids and positions rise together, which
                # is what readers rely on: all rows of transactions older than their
                # snapshot's xmin form a prefix of the log (see read_all).
                # ``expected``: fail (raise_exception) unless the next position is that one, for
                # the one-round-trip path that planned positions from memory.
                f"""CREATE FUNCTION {schema}.begin_append(
                    stream_keys bigint[], n integer, expected bigint
                ) RETURNS bigint LANGUAGE plpgsql AS $$
                DECLARE
                    k bigint;
                    last bigint;
                BEGIN
                    FOR k IN SELECT DISTINCT u FROM unnest(stream_keys) u ORDER BY u LOOP
                        PERFORM pg_advisory_xact_lock(k);
                    END LOOP;
                    IF n = 0 THEN
                        RETURN NULL;
                    END IF;
                    PERFORM pg_advisory_lock({allocator_key(schema)}, 0);
                    BEGIN
                        PERFORM pg_current_xact_id();
                        SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
                            INTO last FROM {schema}.positions;
                        IF expected IS NOT NULL AND last + 1 <> expected THEN
                            RAISE EXCEPTION 'ledgerflow: positions moved on';
                        END IF;
                        PERFORM setval('{schema}.positions', last + n, true);
                    EXCEPTION WHEN OTHERS THEN
                        PERFORM pg_advisory_unlock({allocator_key(schema)}, 0);
                        RAISE;
                    END;
                    PERFORM pg_advisory_unlock({allocator_key(schema)}, 0);
                    RETURN last + 1;
                END $$""",
                # A batch that used fewer positions than it took gives the rest back,
                # if nobody has taken positions since (else they stay a gap).
                f"""CREATE FUNCTION {schema}.give_back(taken_to bigint, used_to bigint)
                RETURNS boolean LANGUAGE plpgsql AS $$
                DECLARE
                    last bigint;
                BEGIN
                    PERFORM pg_advisory_lock({allocator_key(schema)}, 0);
                    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
                        INTO last FROM {schema}.positions;
                    IF last = taken_to THEN
                        PERFORM setval('{schema}.positions', used_to, true);
                    END IF;
                    PERFORM pg_advisory_unlock({allocator_key(schema)}, 0);
                    RETURN last = taken_to;
                END $$""",
            ),
        ),
        Migration(
            5,
            "the registry of workers",
            (
                # queues and workflows are text[], not JSON: psycopg maps them to and
                # from lists of str with no encoding of ours, and routing by task
                # queue will want "queue = ANY(queues)" (or a GIN index) in SQL.
                # worker_id keeps the default collation, as wakeups.lease_owner does,
                # since the two are compared; listings order by COLLATE "C".
                f"""CREATE TABLE {schema}.workers (
                    worker_id text PRIMARY KEY,
                    host text NOT NULL,
                    pid integer NOT NULL,
                    queues text[] NOT NULL,
                    workflows text[] NOT NULL,
                    version text NOT NULL,
                    started_at bigint NOT NULL,
                    heartbeat_at bigint NOT NULL,
                    lease_us bigint NOT NULL,
                    in_flight integer NOT NULL,
                    stopping boolean NOT NULL
                )""",
                # Reaping looks at held leases only: few rows (the instances running a
                # pass), however many instances wait.
                f"CREATE INDEX wakeups_by_owner ON {schema}.wakeups (lease_owner) "
                "WHERE lease_owner IS NOT NULL",
            ),
        ),
        Migration(
            6,
            "task queues",
            (
                # Columns in TaskRow's order (runtime.TASK_COLUMNS). payload is text,
                # not jsonb: kept byte for byte. attempt counts the claims. Ids
                # order by code point, as elsewhere; lease_owner keeps the default
                # collation, as wakeups.lease_owner and workers.worker_id do.
                f"""CREATE TABLE {schema}.tasks (
                    task_id text COLLATE "C" PRIMARY KEY,
                    workflow_id text COLLATE "C" NOT NULL,
                    seq integer NOT NULL,
                    kind text NOT NULL,
                    name text NOT NULL,
                    queue text NOT NULL,
                    payload text NOT NULL,
                    due_at bigint NOT NULL,
                    attempt integer NOT NULL,
                    lease_owner text,
                    lease_until bigint,
                    lease_epoch bigint NOT NULL,
                    created_at bigint NOT NULL
                )""",
                f"CREATE INDEX tasks_by_queue ON {schema}.tasks (queue, due_at)",
                f"CREATE INDEX tasks_by_workflow ON {schema}.tasks (workflow_id)",
                # Reaping, releases and the running counts of limited queues look at
                # held leases only.
                f"CREATE INDEX tasks_by_owner ON {schema}.tasks (lease_owner) "
                "WHERE lease_owner IS NOT NULL",
                f"""CREATE TABLE {schema}.queues (
                    queue text PRIMARY KEY,
                    max_concurrent integer
                )""",
            ),
        ),
        resource_migration(schema),
        projection_migration(schema),
        Migration(
            9,
            "instances listed newest first",
            (f"CREATE INDEX workflows_by_created ON {schema}.workflows (created_at, workflow_id)",),
        ),
        merkle_migration(schema),
        Migration(
            11,
            "task attempts lost with their workers",
            (
                f"ALTER TABLE {schema}.tasks "
                "ADD COLUMN recorded_attempt integer NOT NULL DEFAULT 0",
                # As on SQLite: what is queued already is taken as recorded.
                f"UPDATE {schema}.tasks SET recorded_attempt = attempt",
            ),
        ),
        Migration(
            12,
            "task attempts handed back unfinished",
            (f"ALTER TABLE {schema}.tasks ADD COLUMN handed_back boolean NOT NULL DEFAULT false",),
        ),
    )


_COLUMNS = (
    "position, event_id, stream_id, version, type, schema_version, data, metadata, "
    "recorded_at, prev_hash, hash"
)
_INSTANCE_COLUMNS = "workflow_id, name, version, status, parent_id, created_at, updated_at"
_WORKER_COLUMNS = (
    "worker_id, host, pid, queues, workflows, version, started_at, heartbeat_at, lease_us, "
    "in_flight, stopping"
)


class Sql:
    """Every statement the store sends, qualified with its schema."""

    def __init__(self, schema: str) -> None:
        s = schema
        self.s = schema
        self.begin_append = f"SELECT {s}.begin_append(%s, %s, %s)"
        self.give_back = f"SELECT {s}.give_back(%s, %s)"
        self.heads_of = (
            "SELECT stream_id, version, last_hash, last_position "
            f"FROM {s}.streams WHERE stream_id = ANY(%s::text[])"
        )
        self.events_by_id = f"SELECT {_COLUMNS} FROM {s}.events WHERE event_id = ANY(%s::uuid[])"
        self.sealed_between = (
            f"SELECT position, event_id, hash FROM {s}.events WHERE position BETWEEN %s AND %s"
        )
        self.insert_event = (
            f"INSERT INTO {s}.events ({_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
        )
        self.upsert_head = (
            f"INSERT INTO {s}.streams (stream_id, version, last_hash, last_position) "
            "VALUES (%s,%s,%s,%s) ON CONFLICT (stream_id) DO UPDATE SET "
            "version = excluded.version, last_hash = excluded.last_hash, "
            "last_position = excluded.last_position"
        )
        # Sent after the batch's COMMIT, as a transaction of its own. A notifying
        # transaction is given an id and holds PostgreSQL's one notification lock
        # until its commit ends, so waiting for its flush made every writer process
        # queue for the disk a second time, one after another. It need not wait:
        # what it announces was flushed before it (for this transaction only).
        self.notify = "SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, %s)"
        self.stream_forward = (
            f"SELECT {_COLUMNS} FROM {s}.events WHERE stream_id = %s AND version >= %s "
            "ORDER BY version LIMIT %s"
        )
        self.stream_backward = (
            f"SELECT {_COLUMNS} FROM {s}.events WHERE stream_id = %s AND version <= %s "
            "ORDER BY version DESC LIMIT %s"
        )
        # Only rows of transactions older than every transaction still running: by
        # begin_append's ordering those are a prefix of the log, so a reader never
        # passes a position that a slower transaction fills in later.
        settled = "xid < pg_snapshot_xmin(pg_current_snapshot())"
        self.read_all = (
            f"SELECT {_COLUMNS} FROM {s}.events WHERE position >= %s AND {settled} "
            "ORDER BY position LIMIT %s"
        )
        self.read_leaves = (
            f"SELECT position, stream_id, version, hash FROM {s}.events "
            f"WHERE position >= %s AND {settled} ORDER BY position LIMIT %s"
        )
        self.stream_head = (
            f"SELECT version, last_hash, last_position FROM {s}.streams WHERE stream_id = %s"
        )
        self.snapshot_rows = (
            f"SELECT {_COLUMNS} FROM {s}.events WHERE position >= %s ORDER BY position LIMIT %s"
        )
        self.all_heads = f"SELECT stream_id, version, last_hash, last_position FROM {s}.streams"
        self.stream_heads = (
            f"SELECT stream_id, version, last_hash, last_position FROM {s}.streams "
            "WHERE stream_id > %s ORDER BY stream_id LIMIT %s"
        )
        self.committed_tip = f"SELECT max(position) FROM {s}.events"
        self.head_position = (
            f"SELECT position FROM {s}.events WHERE {settled} ORDER BY position DESC LIMIT 1"
        )
        self.save_snapshot = (
            f"INSERT INTO {s}.snapshots AS kept "
            "(stream_id, version, type, schema_version, state, recorded_at) "
            "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (stream_id) DO UPDATE SET "
            "version = excluded.version, type = excluded.type, "
            "schema_version = excluded.schema_version, state = excluded.state, "
            "recorded_at = excluded.recorded_at WHERE excluded.version >= kept.version"
        )
        self.load_snapshot = (
            "SELECT stream_id, version, type, schema_version, state, recorded_at "
            f"FROM {s}.snapshots WHERE stream_id = %s"
        )
        # -- runtime rows, written in the append transaction (see store.runtime)
        self.put_instance = (
            f"INSERT INTO {s}.workflows ({_INSTANCE_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (workflow_id) DO UPDATE SET name = excluded.name, "
            "version = excluded.version, status = excluded.status, "
            "parent_id = excluded.parent_id, updated_at = excluded.updated_at"
        )
        # A lease given (an owner set) takes the next epoch; one given back keeps it.
        self.schedule = (
            f"INSERT INTO {s}.wakeups AS kept "
            "(workflow_id, due_at, lease_owner, lease_until, lease_epoch) "
            "VALUES (%(wid)s, %(due)s, %(owner)s, %(until)s, "
            "CASE WHEN %(owner)s::text IS NULL THEN 0 ELSE 1 END) "
            "ON CONFLICT (workflow_id) DO UPDATE SET "
            "due_at = excluded.due_at, lease_owner = excluded.lease_owner, "
            "lease_until = excluded.lease_until, lease_epoch = CASE WHEN "
            "excluded.lease_owner IS NULL THEN kept.lease_epoch ELSE kept.lease_epoch + 1 END"
        )
        # least() ignores NULL: a row waiting for no time becomes due at the nudge's.
        self.nudge = (
            f"INSERT INTO {s}.wakeups AS kept (workflow_id, due_at) VALUES (%s,%s) "
            "ON CONFLICT (workflow_id) DO UPDATE SET "
            "due_at = least(kept.due_at, excluded.due_at)"
        )
        self.unschedule = f"DELETE FROM {s}.wakeups WHERE workflow_id = %s"
        self.lock_wakeups = (
            f"SELECT workflow_id, lease_owner, lease_epoch FROM {s}.wakeups "
            "WHERE workflow_id = ANY(%s::text[]) ORDER BY workflow_id FOR UPDATE"
        )
        self.check_fences = f"SELECT {s}.check_fences(%s, %s, %s, %s)"
        self.renew = (
            "WITH held AS MATERIALIZED ("
            f"SELECT w.workflow_id FROM {s}.wakeups w "
            "JOIN unnest(%(ids)s::text[], %(epochs)s::bigint[]) AS l(id, epoch) "
            "ON w.workflow_id = l.id AND w.lease_epoch = l.epoch "
            "WHERE w.lease_owner = %(owner)s ORDER BY w.workflow_id FOR UPDATE) "
            f"UPDATE {s}.wakeups SET lease_until = %(until)s "
            "WHERE workflow_id IN (SELECT workflow_id FROM held) "
            "RETURNING workflow_id, lease_epoch"
        )
        # SKIP LOCKED: concurrent claimers never wait for each other (nor for a writer)
        # and never take the same row; a row whose lease changed while we looked is
        # re-checked against the WHERE once locked. MATERIALIZED runs the selection
        # exactly once: as a plain IN (subquery) the planner may rescan it inside a
        # nested loop and lease more than LIMIT rows.
        # Only instances of the given (name, version) pairs, when a worker says which
        # it can run (an instance's row is written with its first wake-up).
        of_kinds = (
            f"EXISTS (SELECT 1 FROM {s}.workflows w "
            "JOIN unnest(%(names)s::text[], %(versions)s::int[]) AS d(name, version) "
            "ON w.name = d.name AND w.version = d.version "
            "WHERE w.workflow_id = k.workflow_id)"
        )
        claim = (
            "WITH due AS MATERIALIZED ("
            f"SELECT k.workflow_id FROM {s}.wakeups k "
            "WHERE k.due_at IS NOT NULL AND k.due_at <= %(now)s "
            "AND (k.lease_owner IS NULL OR k.lease_until < %(now)s) AND {of_kinds} "
            "ORDER BY k.due_at, k.workflow_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            f"UPDATE {s}.wakeups SET lease_owner = %(owner)s, lease_until = %(until)s, "
            "lease_epoch = lease_epoch + 1 "
            "WHERE workflow_id IN (SELECT workflow_id FROM due) "
            "RETURNING workflow_id, due_at, lease_epoch"
        )
        self.claim = {False: claim.format(of_kinds="true"), True: claim.format(of_kinds=of_kinds)}
        next_wakeup = (
            "SELECT min(CASE WHEN k.lease_owner IS NULL THEN k.due_at "
            "ELSE greatest(k.due_at, coalesce(k.lease_until, 0) + 1) END) "
            f"FROM {s}.wakeups k WHERE k.due_at IS NOT NULL AND {{of_kinds}}"
        )
        self.next_wakeup = {
            False: next_wakeup.format(of_kinds="true"),
            True: next_wakeup.format(of_kinds=of_kinds),
        }
        # Locks in id order, as a write transaction does (see lock_wakeups), so a
        # release and an append that touch the same rows cannot deadlock.
        release = (
            "WITH held AS MATERIALIZED ("
            f"SELECT workflow_id FROM {s}.wakeups WHERE {{held}} "
            "ORDER BY workflow_id FOR UPDATE) "
            f"UPDATE {s}.wakeups SET lease_owner = NULL, lease_until = NULL "
            "WHERE workflow_id IN (SELECT workflow_id FROM held) RETURNING workflow_id"
        )
        self.release_owner = release.format(held="lease_owner = %s")
        self.release_all = release.format(held="lease_owner IS NOT NULL")
        self.get_wakeup = (
            "SELECT workflow_id, due_at, lease_owner, lease_until, lease_epoch "
            f"FROM {s}.wakeups WHERE workflow_id = %s"
        )
        self.get_instance = f"SELECT {_INSTANCE_COLUMNS} FROM {s}.workflows WHERE workflow_id = %s"
        self.get_instances = (
            f"SELECT {_INSTANCE_COLUMNS} FROM {s}.workflows WHERE workflow_id = ANY(%s::text[])"
        )
        # -- the registry of workers
        self.register_worker = (
            f"INSERT INTO {s}.workers ({_WORKER_COLUMNS}) "
            "VALUES (%s,%s,%s,%s::text[],%s::text[],%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (worker_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
            "queues = excluded.queues, workflows = excluded.workflows, "
            "version = excluded.version, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, lease_us = excluded.lease_us, "
            "in_flight = excluded.in_flight, stopping = excluded.stopping"
        )
        self.heartbeat_worker = (
            f"UPDATE {s}.workers SET heartbeat_at = %s, in_flight = %s, stopping = %s "
            "WHERE worker_id = %s RETURNING worker_id"
        )
        self.deregister_worker = f"DELETE FROM {s}.workers WHERE worker_id = %s"
        self.list_workers = (
            f'SELECT {_WORKER_COLUMNS} FROM {s}.workers ORDER BY worker_id COLLATE "C"'
        )
        # One statement, so one transaction. SKIP LOCKED: a worker whose heartbeat
        # (or registration) is being written is alive, and one a concurrent reaper
        # holds is that reaper's to remove. Releasing only the leases of the rows this
        # statement deleted (dead's RETURNING) means a worker that beat meanwhile
        # keeps its leases. The wake-up rows are locked in id order, as every writer
        # locks them (see lock_wakeups), so a reap and an append cannot deadlock;
        # a lease claimed while we waited for its row is re-checked once locked.
        # Owners with no row whose lease expired are engines from before the
        # registry: their leases go too (sibling CTEs see the workers table as the
        # statement began, so the dead still have rows there; the IN covers them).
        # Task leases go the same way, their rows locked in task_id order and only
        # after every wake-up row, as a write transaction takes them. Left to
        # itself PostgreSQL finishes the data-modifying CTEs nothing reads last
        # declared first (released_tasks before released), so held_tasks reads
        # released: an initplan, evaluated before any task row reaches the lock.
        self.reap_workers = (
            "WITH doomed AS MATERIALIZED ("
            f"SELECT worker_id FROM {s}.workers WHERE heartbeat_at + lease_us < %(now)s "
            "ORDER BY worker_id FOR UPDATE SKIP LOCKED), "
            f"dead AS (DELETE FROM {s}.workers "
            "WHERE worker_id IN (SELECT worker_id FROM doomed) RETURNING worker_id), "
            f"held AS MATERIALIZED (SELECT k.workflow_id FROM {s}.wakeups k "
            "WHERE k.lease_owner IS NOT NULL AND ("
            "k.lease_owner IN (SELECT worker_id FROM dead) "
            "OR (k.lease_until < %(now)s AND NOT EXISTS ("
            f"SELECT 1 FROM {s}.workers w WHERE w.worker_id = k.lease_owner))) "
            "ORDER BY k.workflow_id FOR UPDATE), "
            f"released AS (UPDATE {s}.wakeups SET lease_owner = NULL, lease_until = NULL "
            "WHERE workflow_id IN (SELECT workflow_id FROM held) RETURNING workflow_id), "
            f"held_tasks AS MATERIALIZED (SELECT t.task_id FROM {s}.tasks t "
            "WHERE (SELECT count(*) FROM released) >= 0 AND t.lease_owner IS NOT NULL AND ("
            "t.lease_owner IN (SELECT worker_id FROM dead) "
            "OR (t.lease_until < %(now)s AND NOT EXISTS ("
            f"SELECT 1 FROM {s}.workers w WHERE w.worker_id = t.lease_owner))) "
            "ORDER BY t.task_id FOR UPDATE), "
            f"released_tasks AS (UPDATE {s}.tasks SET lease_owner = NULL, lease_until = NULL "
            "WHERE task_id IN (SELECT task_id FROM held_tasks) RETURNING task_id) "
            'SELECT worker_id FROM dead ORDER BY worker_id COLLATE "C"'
        )
        # Filled in with runtime_rows.instance_filter's clauses (values as parameters).
        self.list_instances = (
            f"SELECT {_INSTANCE_COLUMNS} FROM {s}.workflows "
            "WHERE {where} ORDER BY {order} LIMIT %s"
        )
