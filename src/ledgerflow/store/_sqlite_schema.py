"""The SQLite ledger's schema (its numbered migrations) and the statements of the
runtime rows: those appends write (``apply_runtime``) and those the store's hooks
run (``_sqlite_runtime``)."""

from __future__ import annotations

import sqlite3

from ._migrations import Migration
from ._sqlite_merkle import MERKLE_MIGRATION
from ._sqlite_projections import PROJECTION_MIGRATION
from ._sqlite_resources import RESOURCE_MIGRATION, RESOURCE_SQL
from ._sqlite_tasks import (
    HANDED_BACK_MIGRATION,
    RECORDED_ATTEMPT_MIGRATION,
    TASK_MIGRATION,
    TASK_SQL,
)
from .runtime import RuntimeWrite, as_row

__all__ = ["MIGRATIONS", "RUNTIME_SQL", "apply_runtime"]

MIGRATIONS = (
    Migration(
        1,
        "events, streams and snapshots",
        (
            """CREATE TABLE events (
                position INTEGER PRIMARY KEY,
                event_id TEXT NOT NULL UNIQUE,
                stream_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                type TEXT NOT NULL,
                schema_version INTEGER NOT NULL,
                data BLOB NOT NULL,
                metadata BLOB NOT NULL,
                recorded_at INTEGER NOT NULL,
                prev_hash BLOB NOT NULL,
                hash BLOB NOT NULL,
                UNIQUE (stream_id, version)
            )""",
            """CREATE TABLE streams (
                stream_id TEXT PRIMARY KEY,
                version INTEGER NOT NULL,
                last_hash BLOB NOT NULL,
                last_position INTEGER NOT NULL
            ) WITHOUT ROWID""",
            """CREATE TABLE snapshots (
                stream_id TEXT PRIMARY KEY,
                version INTEGER NOT NULL,
                type TEXT NOT NULL,
                schema_version INTEGER NOT NULL,
                state BLOB NOT NULL,
                recorded_at INTEGER NOT NULL
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        2,
        "workflow instances and wake-ups",
        (
            """CREATE TABLE workflows (
                workflow_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                version INTEGER NOT NULL,
                status TEXT NOT NULL,
                parent_id TEXT,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX workflows_by_status ON workflows (status, workflow_id)",
            """CREATE TABLE wakeups (
                workflow_id TEXT PRIMARY KEY,
                due_at INTEGER,
                lease_owner TEXT,
                lease_until INTEGER
            ) WITHOUT ROWID""",
            "CREATE INDEX wakeups_by_due ON wakeups (due_at) WHERE due_at IS NOT NULL",
        ),
    ),
    Migration(
        3,
        "lease epochs (fencing)",
        ("ALTER TABLE wakeups ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0",),
    ),
    Migration(
        4,
        "the registry of workers",
        (
            # queues and workflows are JSON arrays of strings: SQLite has no array
            # type, and json_each() can still search them when task queues come.
            # stopping is 0 or 1. Times are µs on the database's clock, as in wakeups.
            """CREATE TABLE workers (
                worker_id TEXT PRIMARY KEY,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                queues TEXT NOT NULL,
                workflows TEXT NOT NULL,
                version TEXT NOT NULL,
                started_at INTEGER NOT NULL,
                heartbeat_at INTEGER NOT NULL,
                lease_us INTEGER NOT NULL,
                in_flight INTEGER NOT NULL,
                stopping INTEGER NOT NULL
            ) WITHOUT ROWID""",
            # Reaping looks at held leases only: few rows (the instances running a
            # pass), however many instances wait.
            "CREATE INDEX wakeups_by_owner ON wakeups (lease_owner) WHERE lease_owner IS NOT NULL",
        ),
    ),
    TASK_MIGRATION,
    RESOURCE_MIGRATION,
    PROJECTION_MIGRATION,
    Migration(
        8,
        "instances listed newest first",
        ("CREATE INDEX workflows_by_created ON workflows (created_at, workflow_id)",),
    ),
    MERKLE_MIGRATION,
    RECORDED_ATTEMPT_MIGRATION,
    HANDED_BACK_MIGRATION,
)

_PUT_INSTANCE = (
    "INSERT INTO workflows VALUES (?,?,?,?,?,?,?) ON CONFLICT (workflow_id) DO UPDATE SET "
    "name = excluded.name, version = excluded.version, status = excluded.status, "
    "parent_id = excluded.parent_id, updated_at = excluded.updated_at"
)
# A lease given (an owner set) takes the next epoch; one given back keeps it.
_SCHEDULE = (
    "INSERT INTO wakeups (workflow_id, due_at, lease_owner, lease_until, lease_epoch) "
    "VALUES (?1,?2,?3,?4, CASE WHEN ?3 IS NULL THEN 0 ELSE 1 END) "
    "ON CONFLICT (workflow_id) DO UPDATE SET "
    "due_at = excluded.due_at, lease_owner = excluded.lease_owner, "
    "lease_until = excluded.lease_until, lease_epoch = CASE WHEN excluded.lease_owner "
    "IS NULL THEN lease_epoch ELSE lease_epoch + 1 END"
)
_NUDGE = (
    "INSERT INTO wakeups (workflow_id, due_at) VALUES (?,?) "
    "ON CONFLICT (workflow_id) DO UPDATE SET "
    "due_at = CASE WHEN due_at IS NULL THEN excluded.due_at "
    "ELSE min(due_at, excluded.due_at) END"
)
# Only instances of the given (name, version) pairs, if any: a JSON array of pairs.
_OF_KINDS = (
    "EXISTS (SELECT 1 FROM workflows w, json_each(?) j WHERE w.workflow_id = k.workflow_id "
    "AND w.name = json_extract(j.value, '$[0]') AND w.version = json_extract(j.value, '$[1]'))"
)
_CLAIM = (
    "UPDATE wakeups SET lease_owner = ?, lease_until = ?, lease_epoch = lease_epoch + 1 "
    "WHERE workflow_id IN ("
    "SELECT k.workflow_id FROM wakeups k WHERE k.due_at IS NOT NULL AND k.due_at <= ? "
    "AND (k.lease_owner IS NULL OR k.lease_until < ?) AND {of_kinds} "
    "ORDER BY k.due_at, k.workflow_id LIMIT ?) "
    "RETURNING workflow_id, due_at, lease_epoch"
)
_NEXT_WAKEUP = (
    "SELECT min(CASE WHEN k.lease_owner IS NULL THEN k.due_at "
    "ELSE max(k.due_at, coalesce(k.lease_until, 0) + 1) END) "
    "FROM wakeups k WHERE k.due_at IS NOT NULL AND {of_kinds}"
)
_WAKEUP_COLUMNS = "workflow_id, due_at, lease_owner, lease_until, lease_epoch"
_WORKER_COLUMNS = (
    "worker_id, host, pid, queues, workflows, version, started_at, heartbeat_at, lease_us, "
    "in_flight, stopping"
)
_REGISTER_WORKER = (
    f"INSERT INTO workers ({_WORKER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT (worker_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
    "queues = excluded.queues, workflows = excluded.workflows, version = excluded.version, "
    "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
    "lease_us = excluded.lease_us, in_flight = excluded.in_flight, stopping = excluded.stopping"
)
_DEAD = "heartbeat_at + lease_us < ?1"
# The leases of the dead, and expired leases of owners with no row (engines from
# before the registry); epochs are kept, as release_wakeups keeps them.
_REAP_LEASES = (
    "UPDATE wakeups SET lease_owner = NULL, lease_until = NULL "
    "WHERE lease_owner IS NOT NULL AND ("
    f"lease_owner IN (SELECT worker_id FROM workers WHERE {_DEAD}) "
    "OR (lease_until < ?1 AND lease_owner NOT IN (SELECT worker_id FROM workers)))"
)
_INSTANCE_COLUMNS = "workflow_id, name, version, status, parent_id, created_at, updated_at"


RUNTIME_SQL = {
    "put": _PUT_INSTANCE,
    "schedule": _SCHEDULE,
    "nudge": _NUDGE,
    "unschedule": "DELETE FROM wakeups WHERE workflow_id = ?",
    **TASK_SQL,
    **RESOURCE_SQL,
}


def apply_runtime(con: sqlite3.Connection, write: RuntimeWrite) -> None:
    """Run the statement that writes ``write``, in the caller's transaction."""
    kind, params = as_row(write)
    con.execute(RUNTIME_SQL[kind], params)
