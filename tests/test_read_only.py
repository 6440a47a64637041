"""Opening a ledger without creating one, and databases that cannot be written.

``open_store(url, create=False)`` (what every CLI command uses) never creates,
migrates or converts anything: where there is no ledger it raises
``LedgerNotFoundError``, for an older schema ``SchemaOutdatedError``. Opening for
writing (the default) checks that the database can be written, so a read-only one
fails at open with ``StoreReadOnlyError`` instead of at the first append.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow import NewEvent, SchemaVersionError
from ledgerflow.cli import app
from ledgerflow.errors import (
    LedgerNotFoundError,
    SchemaOutdatedError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from ledgerflow.store.postgres import _migrations as _pg_migrations
from ledgerflow.store.sqlite import MIGRATIONS, SQLiteEventStore

from .conftest import PG_URL, pg_url, raw_sql, require_postgres

KNOWN = MIGRATIONS[-1].version
PG_KNOWN = _pg_migrations("ledgerflow")[-1].version


def _files(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` and its bytes: what a read-only open must not change."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _other_app(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO customers (name) VALUES ('ada')")
    con.commit()
    con.close()


def _rails_app(path: Path) -> None:
    """Another framework's migrations table, under the name ledgerflow uses."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_migrations (version varchar NOT NULL PRIMARY KEY)")
    con.execute("INSERT INTO schema_migrations VALUES ('20240101120000')")
    con.commit()
    con.close()


def _events_app(path: Path) -> None:
    """Another application's table that happens to be called ``events``."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    con.commit()
    con.close()


NO_LEDGER: dict[str, Callable[[Path], object]] = {
    "missing file": lambda path: None,
    "empty file": lambda path: path.touch(),
    "another application's database": _other_app,
    "another application's schema_migrations": _rails_app,
    "a file that is not a database": lambda path: path.write_bytes(b"not a database " * 100),
}


async def _old_ledger(url: str) -> None:
    """A ledger as the release that knew only migration 1 left it: nothing of the
    later migrations (2: workflows and wakeups; 3: lease epochs, and on PostgreSQL
    the check_fences function; 4: workers; then task queues, guarded resources,
    projections, the audit tables) and
    none of their rows in schema_migrations."""
    async with ledgerflow.open_store(url) as store:
        await store.append("s", [NewEvent("E", {})])
    later = [] if url.startswith("sqlite") else ["DROP FUNCTION {t}check_fences"]
    raw_sql(
        url,
        *later,
        "DROP TABLE {t}workflows",
        "DROP TABLE {t}wakeups",
        "DROP TABLE {t}workers",
        "DROP TABLE {t}tasks",
        "DROP TABLE {t}queues",
        "DROP TABLE {t}resources",
        "DROP TABLE {t}permits",
        "DROP TABLE {t}projections",
        "DROP TABLE {t}inbox",
        "DROP TABLE {t}merkle_tiles",
        "DROP TABLE {t}checkpoints",
        "DROP TABLE {t}subject_keys",
        "DELETE FROM {t}schema_migrations WHERE version > 1",
    )


# -- SQLite ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(NO_LEDGER))
async def test_sqlite_without_create_finds_no_ledger_and_changes_nothing(
    tmp_path: Path, case: str
) -> None:
    path = tmp_path / "ledger.db"
    NO_LEDGER[case](path)
    before = _files(tmp_path)
    url = f"sqlite:///{path}"
    store = ledgerflow.open_store(url, create=False)
    with pytest.raises(LedgerNotFoundError) as caught:
        await store.open()
    assert caught.value.location == url
    assert str(caught.value).startswith(f"no ledger at {url}")
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    "make", [_rails_app, _events_app], ids=["schema_migrations", "events table"]
)
async def test_sqlite_with_create_never_takes_over_another_applications_tables(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    path = tmp_path / "ledger.db"
    make(path)
    before = _files(tmp_path)
    with pytest.raises(LedgerNotFoundError, match="another application"):
        await ledgerflow.open_store(f"sqlite:///{path}").open()
    assert _files(tmp_path) == before


async def test_sqlite_older_schema_is_refused_without_create_and_left_alone(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    await _old_ledger(url)
    with pytest.raises(SchemaOutdatedError) as caught:
        await ledgerflow.open_store(url, create=False).open()
    assert (caught.value.found, caught.value.known) == (1, KNOWN)
    assert "open it once from a process that writes" in str(caught.value)
    assert raw_sql(url, "SELECT version FROM schema_migrations") == [(1,)]
    # A process that writes migrates it, as before.
    async with ledgerflow.open_store(url) as store:
        assert await store.head_position() == 1
    assert len(raw_sql(url, "SELECT version FROM schema_migrations")) == KNOWN


async def test_sqlite_newer_schema_is_refused_without_create(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url) as store:
        await store.append("s", [NewEvent("E", {})])
    raw_sql(url, f"INSERT INTO schema_migrations VALUES ({KNOWN + 1}, 'future', 'x')")
    with pytest.raises(SchemaVersionError):
        await ledgerflow.open_store(url, create=False).open()


async def test_an_existing_ledger_opens_without_create_and_takes_appends(store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("a memory store never holds a ledger before it is opened")
    async with ledgerflow.open_store(store_url) as store:
        await store.append("s", [NewEvent("E", {})])
    async with ledgerflow.open_store(store_url, create=False) as store:
        assert [e.type for e in await store.read_all()] == ["E"]
        assert (await store.append("s", [NewEvent("F", {})], expected_version=1)).positions == (2,)


async def test_a_memory_store_without_create_has_no_ledger() -> None:
    with pytest.raises(LedgerNotFoundError, match="no ledger at memory://"):
        await ledgerflow.open_store("memory://", create=False).open()


# -- PostgreSQL ---------------------------------------------------------------------


def _pg(sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(PG_URL, autocommit=True) as con:
        cur = con.execute(sql.encode(), params)
        return cur.fetchall() if cur.description is not None else []


def _schema_exists(schema: str, url: str = PG_URL) -> bool:
    with psycopg.connect(url, autocommit=True) as con:
        row = con.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))
        found = row.fetchone()
    return found is not None and found[0] == 1


@pytest.mark.postgres
async def test_postgres_mistyped_schema_finds_no_ledger_and_creates_nothing(
    pg_schema: str,
) -> None:
    url = pg_url(pg_schema)
    with pytest.raises(LedgerNotFoundError) as caught:
        await ledgerflow.open_store(url, create=False).open()
    message = str(caught.value)
    assert message.startswith("no ledger at postgresql://")
    assert f"schema={pg_schema}" in message
    assert "has no schema" in message
    assert not _schema_exists(pg_schema)


@pytest.mark.postgres
async def test_postgres_mistyped_database_finds_no_ledger(pg_schema: str) -> None:
    """It said the store was unavailable (retry), which no wait can cure."""
    base = pg_url(pg_schema).split("?", 1)[0].rsplit("/", 1)[0]
    url = f"{base}/no_such_database_{pg_schema}"
    with pytest.raises(LedgerNotFoundError) as caught:
        await ledgerflow.open_store(url, create=False).open()
    assert str(caught.value).startswith(f"no ledger at {base}/no_such_database_")
    assert "(its database does not exist)" in str(caught.value)


@pytest.fixture
def postgres_db_url() -> Iterator[str]:
    """A fresh schema name in the server's ``postgres`` database; dropped afterwards."""
    require_postgres()
    base = PG_URL.split("?", 1)[0].rsplit("/", 1)[0]
    url = f"{base}/postgres"
    schema = f"lf_test_{uuid.uuid4().hex[:16]}"
    yield f"{url}?schema={schema}"
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


@pytest.mark.postgres
async def test_postgres_the_postgres_database_has_no_ledger_and_gets_none(
    postgres_db_url: str,
) -> None:
    with pytest.raises(LedgerNotFoundError, match="/postgres"):
        await ledgerflow.open_store(postgres_db_url, create=False).open()
    base, _, schema = postgres_db_url.partition("?schema=")
    assert not _schema_exists(schema, base)


@pytest.mark.postgres
async def test_postgres_schema_of_another_application_is_no_ledger(pg_schema: str) -> None:
    _pg(f"CREATE SCHEMA {pg_schema}")
    _pg(f"CREATE TABLE {pg_schema}.customers (id int)")
    with pytest.raises(LedgerNotFoundError, match="holds no ledgerflow tables"):
        await ledgerflow.open_store(pg_url(pg_schema), create=False).open()
    tables = _pg(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", pg_schema
    )
    assert tables == [("customers",)]


@pytest.mark.postgres
@pytest.mark.parametrize("create", [False, True])
async def test_postgres_foreign_schema_migrations_is_never_migrated(
    pg_schema: str, create: bool
) -> None:
    _pg(f"CREATE SCHEMA {pg_schema}")
    _pg(f"CREATE TABLE {pg_schema}.schema_migrations (version varchar PRIMARY KEY)")
    _pg(f"INSERT INTO {pg_schema}.schema_migrations VALUES ('20240101120000')")
    with pytest.raises(LedgerNotFoundError, match="another application"):
        await ledgerflow.open_store(pg_url(pg_schema), create=create).open()
    tables = _pg(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", pg_schema
    )
    assert tables == [("schema_migrations",)]


@pytest.mark.postgres
async def test_postgres_older_schema_is_refused_without_create_and_left_alone(
    pg_schema: str,
) -> None:
    url = pg_url(pg_schema)
    await _old_ledger(url)
    with pytest.raises(SchemaOutdatedError) as caught:
        await ledgerflow.open_store(url, create=False).open()
    assert (caught.value.found, caught.value.known) == (1, PG_KNOWN)
    assert _pg(f"SELECT version FROM {pg_schema}.schema_migrations") == [(1,)]
    assert not _pg("SELECT to_regclass(%s)::text", f"{pg_schema}.workflows")[0][0]
    assert not _pg("SELECT to_regproc(%s)::text", f"{pg_schema}.check_fences")[0][0]


# -- the CLI ------------------------------------------------------------------------

COMMANDS = {
    "audit verify": ["audit", "verify"],
    "workflows list": ["workflows", "list"],
    "workflows show": ["workflows", "show", "wf-1"],
    "workflows history": ["workflows", "history", "wf-1"],
    "workflows signal": ["workflows", "signal", "wf-1", "go", "--payload", "true"],
    "workflows cancel": ["workflows", "cancel", "wf-1"],
    "workers list": ["workers", "list"],
}


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    return result.exit_code, result.stdout, result.stderr


def _one_error_line(stderr: str, prefix: str) -> None:
    assert stderr.startswith(f"error: {prefix}"), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", ["missing file", "empty file", "another application's database"])
def test_cli_commands_on_a_sqlite_file_without_ledger_exit_2_and_create_nothing(
    tmp_path: Path, command: str, case: str
) -> None:
    path = tmp_path / "ledger.db"
    NO_LEDGER[case](path)
    before = _files(tmp_path)
    url = f"sqlite:///{path}"
    code, stdout, stderr = _cli(*COMMANDS[command], "--db", url)
    assert code == 2, stdout + stderr
    _one_error_line(stderr, f"no ledger at {url}")
    assert "intact" not in stdout
    assert _files(tmp_path) == before


@pytest.mark.postgres
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_commands_on_a_mistyped_postgres_schema_exit_2_and_create_nothing(
    pg_schema: str, command: str
) -> None:
    code, stdout, stderr = _cli(*COMMANDS[command], "--db", pg_url(pg_schema))
    assert code == 2, stdout + stderr
    _one_error_line(stderr, "no ledger at postgresql://")
    assert f"schema={pg_schema}" in stderr
    assert not _schema_exists(pg_schema)


def test_cli_on_an_older_schema_exits_2_without_migrating(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    asyncio.run(_old_ledger(url))
    code, _, stderr = _cli("audit", "verify", "--db", url)
    assert code == 2
    _one_error_line(stderr, f"the ledger at {url} has schema version 1")
    assert raw_sql(url, "SELECT version FROM schema_migrations") == [(1,)]


def test_cli_version_prints_the_package_version() -> None:
    code, stdout, _ = _cli("--version")
    assert code == 0
    assert stdout.strip() == f"ledgerflow {importlib.metadata.version('ledgerflow')}"


# -- databases that cannot be written -------------------------------------------------


async def test_sqlite_read_only_file_is_refused_at_open_not_at_the_first_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    async with ledgerflow.open_store(url) as store:
        await store.append("s", [NewEvent("E", {})])
    # From now on the file opens read-only, as when its permissions, its directory or
    # its mount deny writing: SQLite then opens it read-only without a word, as with
    # mode=ro. (Tests run as root, whom file permissions do not stop.)
    monkeypatch.setattr(SQLiteEventStore, "_uri", lambda self: f"file:{self.path}?mode=ro")

    with pytest.raises(StoreReadOnlyError) as caught:
        await ledgerflow.open_store(url).open()
    assert caught.value.location == url
    assert str(caught.value).startswith(f"cannot write to the ledger at {url}: ")
    assert "readonly" in caught.value.reason
    assert not caught.value.retryable

    with pytest.raises(StoreReadOnlyError):
        async with ledgerflow.Engine(url, workflows=[]):
            pass

    # Reading needs no writing: without create it opens, and an append is refused
    # with the same error (not as a passing outage).
    async with ledgerflow.open_store(url, create=False) as reader:
        assert [e.type for e in await reader.read_all()] == ["E"]
        with pytest.raises(StoreReadOnlyError) as refused:
            await reader.append("s", [NewEvent("F", {})])
        assert not isinstance(refused.value, StoreUnavailableError)


@pytest.mark.postgres
async def test_postgres_read_only_sessions_are_refused_at_open(pg_schema: str) -> None:
    read_only = f"{pg_url(pg_schema)}&options=-c%20default_transaction_read_only%3Don"
    # A new ledger cannot be created there either: refused before any DDL is tried.
    with pytest.raises(StoreReadOnlyError, match="read-only"):
        await ledgerflow.open_store(read_only).open()
    assert not _schema_exists(pg_schema)

    async with ledgerflow.open_store(pg_url(pg_schema)) as store:
        await store.append("s", [NewEvent("E", {})])
    with pytest.raises(StoreReadOnlyError, match="default_transaction_read_only") as caught:
        await ledgerflow.open_store(read_only).open()
    assert f"schema={pg_schema}" in caught.value.location

    async with ledgerflow.open_store(read_only, create=False) as reader:
        assert [e.type for e in await reader.read_all()] == ["E"]
        with pytest.raises(StoreReadOnlyError):
            await reader.append("s", [NewEvent("F", {})])
        # What a readiness probe asks: the store answers, but takes no writes.
        with pytest.raises(StoreReadOnlyError, match="default_transaction_read_only"):
            await reader.check_ready()
    async with ledgerflow.open_store(pg_url(pg_schema), create=False) as writer:
        await writer.check_ready()


@pytest.mark.postgres
async def test_postgres_readiness_follows_the_database_back_to_writable(pg_schema: str) -> None:
    """Made read-only and then writable again, the database took writes at once, but
    the readiness check kept saying read-only: it asked pooled sessions opened while
    it was read-only, which keep the setting they started with (for an hour)."""
    role = f"lf_flip_{uuid.uuid4().hex[:12]}"
    _pg(f"CREATE ROLE {role} LOGIN")
    try:
        async with ledgerflow.open_store(pg_url(pg_schema)) as store:
            await store.append("s", [NewEvent("E", {})])
        _pg(f"GRANT ALL ON SCHEMA {pg_schema} TO {role}")
        _pg(f"GRANT ALL ON ALL TABLES IN SCHEMA {pg_schema} TO {role}")
        _pg(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {pg_schema} TO {role}")
        info = psycopg.conninfo.conninfo_to_dict(PG_URL.split("?", 1)[0])
        host, port, db = info.get("host"), info.get("port") or 5432, info.get("dbname")
        url = f"postgresql://{role}@{host}:{port}/{db}?schema={pg_schema}"
        async with ledgerflow.open_store(url, create=False) as store:
            await store.check_ready()
            _pg(f"ALTER ROLE {role} SET default_transaction_read_only = on")
            # Its sessions end (a restart, a fail-over): the pool's new ones are
            # read-only.
            _pg("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", role)
            for _ in range(3):
                with pytest.raises(StoreReadOnlyError):
                    await store.check_ready()
            _pg(f"ALTER ROLE {role} RESET default_transaction_read_only")
            for _ in range(5):  # a pooled session or two of the read-only time, at most
                with contextlib.suppress(StoreReadOnlyError):
                    await store.check_ready()
                    break
            else:
                raise AssertionError("still not ready once the database took writes")
            await store.check_ready()
    finally:
        _pg("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", role)
        _pg(f"DROP OWNED BY {role}")
        _pg(f"DROP ROLE {role}")


@pytest.fixture
def reading_role(pg_schema: str) -> Iterator[str]:
    """A login role that may read the test schema but not write it."""
    role = f"lf_reader_{uuid.uuid4().hex[:12]}"
    _pg(f"CREATE ROLE {role} LOGIN")
    try:
        yield role
    finally:
        _pg(f"DROP OWNED BY {role}")
        _pg(f"DROP ROLE {role}")


@pytest.mark.postgres
async def test_postgres_role_without_write_privileges_is_refused_at_open(
    pg_schema: str, reading_role: str
) -> None:
    async with ledgerflow.open_store(pg_url(pg_schema)) as store:
        await store.append("s", [NewEvent("E", {})])
    _pg(f"GRANT USAGE ON SCHEMA {pg_schema} TO {reading_role}")
    _pg(f"GRANT SELECT ON ALL TABLES IN SCHEMA {pg_schema} TO {reading_role}")
    info = psycopg.conninfo.conninfo_to_dict(PG_URL.split("?", 1)[0])
    host, port, db = info.get("host"), info.get("port") or 5432, info.get("dbname")
    url = f"postgresql://{reading_role}@{host}:{port}/{db}?schema={pg_schema}"
    with pytest.raises(StoreReadOnlyError, match=f"lacks INSERT on {pg_schema}.events"):
        await ledgerflow.open_store(url).open()
    async with ledgerflow.open_store(url, create=False) as reader:
        assert [e.type for e in await reader.read_all()] == ["E"]
