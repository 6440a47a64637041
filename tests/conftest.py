"""Fixtures shared by every test: one store per backend, each on its own database.

PostgreSQL tests use a fresh schema per test, dropped afterwards. Set
LEDGERFLOW_TEST_PG to point them at another server. With CI=true a missing
PostgreSQL fails the run; elsewhere those tests skip with the reason.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest

import ledgerflow
from ledgerflow import ManualClock
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter
from ._engines import EngineFactory
from ._spans import spans  # noqa: F401 - the fixture, for every test module

if TYPE_CHECKING:
    import psycopg

PG_URL = os.environ.get("LEDGERFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["memory", "sqlite", "postgres"]


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'ledgerflow[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as con:
            con.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_URL} is not reachable: {exc}"
    return None


_PG_PROBLEM: str | bool | None = False  # False: not probed yet


def require_postgres() -> None:
    """Skip (or, under CI, fail) the calling test when PostgreSQL is missing."""
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _pg_reachable()
    if isinstance(_PG_PROBLEM, str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {_PG_PROBLEM}")
        pytest.skip(_PG_PROBLEM)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A new, empty PostgreSQL schema name; dropped with everything in it afterwards."""
    require_postgres()
    import psycopg

    name = f"lf_test_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as con:
        con.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def pg_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}schema={schema}"


def backend_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL for an empty SQLite file or PostgreSQL schema, for tests that hand the
    URL to worker processes (which cannot share a memory store)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for an empty store on each backend in turn."""
    backend: str = request.param
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    schema: str = request.getfixturevalue("pg_schema")
    return pg_url(schema)


@pytest.fixture(params=["sqlite", "postgres"])
async def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One store on a database of its own for several processes (the multi-process
    tests), created up front: the workers race on their work, not on migrations."""
    url = backend_url(request.param, tmp_path, request)
    async with ledgerflow.open_store(url) as store:
        assert await store.head_position() == 0
    return url


@pytest.fixture
def registry() -> ledgerflow.EventRegistry:
    return ledgerflow.EventRegistry()


@pytest.fixture
async def store(
    store_url: str, registry: ledgerflow.EventRegistry
) -> AsyncIterator[BaseEventStore]:
    async with open_adapter(store_url, registry=registry) as opened:
        yield opened


def raw_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    """Run statements straight on a SQLite or PostgreSQL store's database, bypassing
    ledgerflow, in one transaction; ``{t}`` is the table prefix (the schema on
    PostgreSQL). Returns the rows of the last statement."""
    rows: list[tuple[Any, ...]] = []
    if url.startswith("sqlite"):
        lite = sqlite3.connect(url[len("sqlite:///") :])
        try:
            for statement in statements:
                rows = lite.execute(statement.format(t="")).fetchall()
            lite.commit()
        finally:
            lite.close()
        return rows
    import psycopg

    schema = parse_qs(urlsplit(url).query)["schema"][0]
    with psycopg.connect(url.split("?", 1)[0]) as con:
        for statement in statements:
            cur = con.execute(statement.format(t=f"{schema}.").encode())
            rows = cur.fetchall() if cur.description is not None else []
    return rows


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def engine(store_url: str, clock: ManualClock) -> AsyncIterator[EngineFactory]:
    """Opens engines on one database; several may open it one after the other.

    The memory store lives as long as its object, so memory engines share one.
    """
    shared = None
    if store_url.startswith("memory"):
        shared = await open_adapter(store_url, clock=clock.now).open()

    @asynccontextmanager
    async def open_engine(
        *workflows: ledgerflow.WorkflowDefinition[Any, Any] | ledgerflow.Machine, **options: Any
    ) -> AsyncIterator[ledgerflow.Engine]:
        options.setdefault("clock", clock)
        options.setdefault("poll_interval", 0.05)
        target = store_url if shared is None else shared
        async with ledgerflow.Engine(target, workflows=workflows, **options) as opened:
            yield opened

    yield open_engine
    if shared is not None:
        await shared.close()


@asynccontextmanager
async def stalling_commits(schema: str, *, stream: str | None = None) -> AsyncIterator[None]:
    """Make the COMMIT of every transaction that inserts events (into ``stream`` only,
    if given) wait, inside the COMMIT, until the block ends: a deferred trigger runs
    at commit time, before the commit record is written, and takes an advisory lock
    held here. A writer frozen after taking its positions, as a paused process is."""
    import psycopg

    key = f"lf-stall-{schema}"
    only = "" if stream is None else f"WHEN (NEW.stream_id = '{stream}') "
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as con:
        await con.execute(
            f"CREATE FUNCTION {schema}.stall_commit() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock(hashtext('{key}')); RETURN NULL; END $$"
        )
        await con.execute(
            f"CREATE CONSTRAINT TRIGGER stall_commit AFTER INSERT ON {schema}.events "
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW {only}"
            f"EXECUTE FUNCTION {schema}.stall_commit()"
        )
        await con.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
        try:
            yield
        finally:
            await con.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))


async def lock_waiters(query: str, count: int) -> None:
    """Return once ``count`` PostgreSQL backends wait for a lock in a statement like
    ``query`` (a LIKE pattern)."""
    import psycopg

    async with (
        asyncio.timeout(10),
        await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as con,
    ):
        while True:
            cur = await con.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (query,),
            )
            found = await cur.fetchone()
            if found is not None and found[0] >= count:
                return
            await asyncio.sleep(0.02)


def pg_admin() -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection to the test server, outside any store."""
    import psycopg

    return psycopg.connect(PG_URL, autocommit=True)


def terminate_backends(application_name: str) -> int:
    """Kill every server connection of that application; how many there were."""
    with pg_admin() as con:
        row = con.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


NATS = os.environ.get("LEDGERFLOW_TEST_NATS", "nats://127.0.0.1:4222")


def nats_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def nats_url() -> str:
    """NATS with JetStream for the bus tests: required under CI, else skipped."""
    if not nats_answers():
        if os.environ.get("CI") == "true":
            pytest.fail(f"NATS with JetStream must answer at {NATS} under CI")
        pytest.skip(f"no NATS at {NATS}: start nats-server -js to run the JetStream tests")
    return NATS
