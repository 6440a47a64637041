"""Tamper evidence: rows edited, deleted and reordered with raw SQL are each found.

The second half checks the verifier on rows held in memory (sealed by the same
``plan_batch`` every backend uses, then tampered with), finding by finding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import cast
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.audit import Finding, FindingKind, VerifyReport, row_hash
from ledgerflow.cli import app
from ledgerflow.events import StreamState
from ledgerflow.hashing import GENESIS_HASH, chain_hash
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store._plan import AppendRequest, EventRow, PreparedEvent, StreamHead, plan_batch
from ledgerflow.store.ports import EventStore

from ._engines import waiting_for
from .conftest import pg_url, raw_sql


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    schema: str = request.getfixturevalue("pg_schema")
    return pg_url(schema)


@pytest.fixture
async def ledger(sql_url: str) -> str:
    """Three streams a-c of four events each, interleaved: positions 1..12."""
    async with ledgerflow.open_store(sql_url) as store:
        for version in range(4):
            for stream in "abc":
                await store.append(
                    stream,
                    [ledgerflow.NewEvent("noted", {"n": version, "stream": stream})],
                    version,
                )
    return sql_url


async def verify(url: str) -> ledgerflow.VerifyReport:
    async with ledgerflow.open_store(url) as store:
        return await ledgerflow.verify_ledger(store)


def kinds(report: ledgerflow.VerifyReport) -> set[tuple[FindingKind, str | None, int | None]]:
    return {(f.kind, f.stream_id, f.version) for f in report.findings}


async def test_intact_ledger_verifies(ledger: str) -> None:
    report = await verify(ledger)
    assert report.ok, report.findings
    assert report.events_checked == 12
    assert report.streams_checked == 3


async def test_edited_data_is_found(ledger: str) -> None:
    # Stream b, version 2 sits at position 5.
    raw_sql(ledger, "UPDATE {t}events SET data = metadata WHERE position = 5")
    report = await verify(ledger)
    assert kinds(report) == {(FindingKind.EDITED, "b", 2)}
    assert report.findings[0].position == 5


async def test_edited_type_and_metadata_are_found(ledger: str) -> None:
    raw_sql(
        ledger,
        "UPDATE {t}events SET type = 'other' WHERE position = 1",
        "UPDATE {t}events SET metadata = data WHERE position = 12",
    )
    assert kinds(await verify(ledger)) == {
        (FindingKind.EDITED, "a", 1),
        (FindingKind.EDITED, "c", 4),
    }


async def test_edit_with_recomputed_hash_is_found_through_the_successor(ledger: str) -> None:
    # A careful forger re-hashes the row it edits; the next event still chains to the
    # old hash, so the edit shows.
    async with ledgerflow.open_store(ledger) as store:
        row = (await store.read_rows(from_position=4, limit=1))[0]
    forged = b'{"n":99,"stream":"a"}'
    new_hash = chain_hash(
        row.prev_hash,
        row.id,
        row.stream_id,
        row.version,
        row.position,
        row.type,
        row.schema_version,
        forged,
        row.metadata,
        row.recorded_at_us,
    )
    raw_sql(
        ledger,
        f"UPDATE {{t}}events SET data = {_blob(ledger, forged)}, "
        f"hash = {_blob(ledger, new_hash)} WHERE position = 4",
    )
    report = await verify(ledger)
    assert kinds(report) == {(FindingKind.EDITED, "a", 2)}


async def test_edit_of_a_stream_tail_is_found_through_the_stream_head(ledger: str) -> None:
    async with ledgerflow.open_store(ledger) as store:
        row = (await store.read_rows(from_position=10, limit=1))[0]
    forged = b'{"n":3,"stream":"forged"}'
    new_hash = chain_hash(
        row.prev_hash,
        row.id,
        row.stream_id,
        row.version,
        row.position,
        row.type,
        row.schema_version,
        forged,
        row.metadata,
        row.recorded_at_us,
    )
    raw_sql(
        ledger,
        f"UPDATE {{t}}events SET data = {_blob(ledger, forged)}, "
        f"hash = {_blob(ledger, new_hash)} WHERE position = 10",
    )
    assert kinds(await verify(ledger)) == {(FindingKind.EDITED, "a", 4)}


async def test_deleted_event_is_found(ledger: str) -> None:
    raw_sql(ledger, "DELETE FROM {t}events WHERE position = 8")  # stream b, version 3
    report = await verify(ledger)
    assert (FindingKind.REMOVED, "b", 3) in kinds(report)
    # The hole in the global log is a finding too where positions leave none; on
    # PostgreSQL a write that did not commit may leave one (ADR 008), so the stream's
    # chain is what tells.
    by_position = any(f.kind is FindingKind.REMOVED and f.position == 8 for f in report.findings)
    assert by_position == (not ledger.startswith("postgres"))


async def test_deleted_stream_tail_is_found(ledger: str) -> None:
    raw_sql(ledger, "DELETE FROM {t}events WHERE position = 12")  # stream c, version 4
    report = await verify(ledger)
    assert kinds(report) == {(FindingKind.REMOVED, "c", 4)}


async def test_reordered_events_are_found(ledger: str) -> None:
    # Swap the places of stream a's versions 1 and 2 (positions 1 and 4).
    raw_sql(
        ledger,
        "UPDATE {t}events SET position = -1 WHERE position = 1",
        "UPDATE {t}events SET position = 1 WHERE position = 4",
        "UPDATE {t}events SET position = 4 WHERE position = -1",
    )
    report = await verify(ledger)
    assert (FindingKind.REORDERED, "a", 1) in kinds(report)
    assert {f.stream_id for f in report.findings} == {"a"}


async def test_swapped_versions_are_found(ledger: str) -> None:
    raw_sql(
        ledger,
        "UPDATE {t}events SET version = -1 WHERE position = 2",
        "UPDATE {t}events SET version = 1 WHERE position = 5",
        "UPDATE {t}events SET version = 2 WHERE position = -1 OR version = -1",
    )
    report = await verify(ledger)
    # Named as the swap it is: neither event's contents changed.
    assert {(f.kind, f.stream_id, f.version, f.position, f.detail) for f in report.findings} == {
        (
            FindingKind.REORDERED,
            "b",
            1,
            5,
            "holds the event written as version 2: its version was changed",
        ),
        (
            FindingKind.REORDERED,
            "b",
            2,
            2,
            "holds the event written as version 1: its version was changed",
        ),
    }


async def test_events_swapped_between_streams_are_found(ledger: str) -> None:
    # Positions 1 and 2 hold version 1 of streams a and b. Swapped, every stream's
    # versions still rise in the global log: only the position in the hash shows it.
    raw_sql(
        ledger,
        "UPDATE {t}events SET position = -1 WHERE position = 1",
        "UPDATE {t}events SET position = 1 WHERE position = 2",
        "UPDATE {t}events SET position = 2 WHERE position = -1",
    )
    report = await verify(ledger)
    assert kinds(report) == {(FindingKind.REORDERED, "a", 1), (FindingKind.REORDERED, "b", 1)}
    assert {(f.stream_id, f.position, f.detail) for f in report.findings} == {
        ("a", 2, "holds the event written at position 1: it was moved"),
        ("b", 1, "holds the event written at position 2: it was moved"),
    }


async def test_a_rewritten_stream_must_still_start_the_chain(ledger: str) -> None:
    # A forger rewrites all of stream a and its head consistently, but from a first
    # event chained to something other than the genesis hash: that alone shows.
    async with ledgerflow.open_store(ledger) as store:
        rows = [r for r in await store.read_rows() if r.stream_id == "a"]
    statements = []
    prev = b"\x01" * 32
    for row in rows:
        digest = row_hash(dataclasses.replace(row, prev_hash=prev))
        statements.append(
            f"UPDATE {{t}}events SET prev_hash = {_blob(ledger, prev)}, "
            f"hash = {_blob(ledger, digest)} WHERE position = {row.position}"
        )
        prev = digest
    statements.append(
        f"UPDATE {{t}}streams SET last_hash = {_blob(ledger, prev)} WHERE stream_id = 'a'"
    )
    raw_sql(ledger, *statements)
    report = await verify(ledger)
    assert report.findings == [
        Finding(
            FindingKind.EDITED,
            "a",
            1,
            1,
            "the first event of the stream does not start the chain",
        )
    ]


async def test_a_missing_stream_head_is_found(ledger: str) -> None:
    raw_sql(ledger, "DELETE FROM {t}streams WHERE stream_id = 'b'")
    report = await verify(ledger)
    assert report.findings == [
        Finding(FindingKind.HEAD_MISMATCH, "b", None, None, "stream head is missing")
    ]
    assert report.streams_checked == 3


def _blob(url: str, data: bytes) -> str:
    return f"X'{data.hex()}'" if url.startswith("sqlite") else f"'\\x{data.hex()}'::bytea"


async def test_cli_exit_codes(ledger: str) -> None:
    # The CLI runs its own event loop, so it goes on a thread of its own here.
    runner = CliRunner()
    intact = await asyncio.to_thread(runner.invoke, app, ["audit", "verify", "--db", ledger])
    assert intact.exit_code == 0, intact.output
    assert "intact" in intact.output
    raw_sql(ledger, "DELETE FROM {t}events WHERE position = 8")
    tampered = await asyncio.to_thread(runner.invoke, app, ["audit", "verify", "--db", ledger])
    assert tampered.exit_code == 1
    assert "stream 'b', version 3" in tampered.output


async def test_the_tables_checked_at_open_are_exactly_those_migrations_make(
    sql_url: str,
) -> None:
    from ledgerflow.store._migrations import tables_of
    from ledgerflow.store._postgres_sql import migrations
    from ledgerflow.store._sqlite_schema import MIGRATIONS

    async with ledgerflow.open_store(sql_url):
        pass
    if sql_url.startswith("sqlite"):
        expected = tables_of(MIGRATIONS)
        made = raw_sql(sql_url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        schema = sql_url.rsplit("schema=", 1)[1]
        expected = tables_of(migrations(schema))
        made = raw_sql(sql_url, f"SELECT tablename FROM pg_tables WHERE schemaname = '{schema}'")
    assert {name for (name,) in made} == expected | {"schema_migrations"}


@pytest.mark.parametrize("table", ["wakeups", "projections", "events"])
async def test_a_table_dropped_by_hand_is_named_at_open_and_by_audit(
    ledger: str, table: str
) -> None:
    """A ledger missing one of its tables opened as if whole: every call on that
    table then failed as an outage to wait out (an engine waited for ever), and
    ``audit verify`` called the ledger intact when the table was not ``events``."""
    raw_sql(ledger, f"DROP TABLE {{t}}{table}")
    for create in (True, False):
        with pytest.raises(ledgerflow.StoreCorruptError, match=f"table {table} is missing"):
            async with ledgerflow.open_store(ledger, create=create):
                pass
    verified = await asyncio.to_thread(CliRunner().invoke, app, ["audit", "verify", "--db", ledger])
    assert verified.exit_code == 3, verified.output
    assert table in verified.output
    assert "Traceback" not in verified.output


async def test_a_table_dropped_while_the_store_is_open_is_corruption_not_an_outage(
    ledger: str,
) -> None:
    async with ledgerflow.open_store(ledger) as store:
        assert await store.next_wakeup() is None
        raw_sql(ledger, "DROP TABLE {t}wakeups")
        with pytest.raises(ledgerflow.StoreCorruptError, match="wakeups"):
            await store.next_wakeup()


def _damaged_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"

    async def fill() -> None:
        async with ledgerflow.open_store(f"sqlite:///{path}") as store:
            for i in range(600):
                await store.append(f"s-{i % 20}", [ledgerflow.NewEvent("x", {"pad": "p" * 200})])

    asyncio.run(fill())
    return path


def test_a_corrupted_page_exits_3_without_a_traceback(tmp_path: Path) -> None:
    path = _damaged_ledger(tmp_path)
    pages = path.stat().st_size // 4096
    with path.open("r+b") as f:  # scribble over the cells of every other page
        for page in range(2, pages, 2):
            f.seek(4096 * page + 200)
            f.write(b"\xde\xad\xbe\xef" * 64)
    result = CliRunner().invoke(app, ["audit", "verify", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 3, result.output
    assert "CORRUPT" in result.output
    assert "Traceback" not in result.output


def test_a_corrupted_index_is_not_intact(tmp_path: Path) -> None:
    """An index that no longer matches its table reads fine row by row, so the hash
    chains cannot see it; the database's own check does."""
    path = _damaged_ledger(tmp_path)
    with sqlite3.connect(path) as con:  # point two indexes at each other's pages
        (a,) = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_events_1'"
        ).fetchone()
        (b,) = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_events_2'"
        ).fetchone()
        (version,) = con.execute("PRAGMA schema_version").fetchone()
        con.execute("PRAGMA writable_schema = ON")
        con.execute(
            "UPDATE sqlite_master SET rootpage = CASE name "
            "WHEN 'sqlite_autoindex_events_1' THEN ? ELSE ? END "
            "WHERE name IN ('sqlite_autoindex_events_1', 'sqlite_autoindex_events_2')",
            (b, a),
        )
        con.execute(f"PRAGMA schema_version = {version + 1}")
    result = CliRunner().invoke(app, ["audit", "verify", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 3, result.output
    assert "index" in result.output


async def test_the_integrity_check_of_a_sound_database_finds_nothing(
    store: BaseEventStore,
) -> None:
    await store.append("s", [ledgerflow.NewEvent("x", {})])
    assert await store.integrity_check() == []


def test_cli_reports_a_missing_database_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", "--db", f"sqlite:///{tmp_path}/no.db"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


async def test_memory_store_verifies(store: BaseEventStore) -> None:
    await store.append("s", [ledgerflow.NewEvent("x", {"i": i}) for i in range(5)])
    report = await ledgerflow.verify_ledger(store)
    assert report.ok
    assert report.events_checked == 5


# -- the verifier on rows in memory ---------------------------------------------------


@dataclasses.dataclass
class _Ledger:
    """Just what ``verify_ledger`` reads of a store: rows by position, heads by id."""

    rows: list[EventRow]
    heads: dict[str, StreamHead]
    limits: set[int | None] = dataclasses.field(default_factory=set)
    """The ``limit`` of every read so far."""
    dense_positions: bool = True

    async def read_rows(self, *, from_position: int = 1, limit: int = 1000) -> list[EventRow]:
        self.limits.add(limit)
        rows = sorted(self.rows, key=lambda r: r.position)
        return [r for r in rows if r.position >= from_position][:limit]

    async def stream_heads(
        self, *, after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, StreamHead]]:
        self.limits.add(limit)
        names = sorted(s for s in self.heads if after is None or s > after)
        return [(s, self.heads[s]) for s in names[:limit]]

    async def read_snapshot(
        self, visit: Callable[[list[EventRow]], None], *, batch_size: int = 2000
    ) -> dict[str, StreamHead]:
        self.limits.add(batch_size)
        rows = sorted(self.rows, key=lambda r: r.position)
        for start in range(0, len(rows), batch_size):
            visit(rows[start : start + batch_size])
        return dict(self.heads)

    # No Merkle tree: these rows were never checkpointed (test_checkpoints has them).
    async def merkle_tiles(self, **_: object) -> list[object]:
        return []

    async def latest_checkpoint(self) -> None:
        return None

    async def checkpoints(self, **_: object) -> list[object]:
        return []

    async def verify(self, batch_size: int = 2000) -> VerifyReport:
        return await ledgerflow.verify_ledger(cast("EventStore", self), batch_size=batch_size)

    def at(self, position: int) -> EventRow:
        (row,) = (r for r in self.rows if r.position == position)
        return row

    def put(self, row: EventRow) -> None:
        """Store ``row`` in place of the row with its id."""
        self.rows = [row if r.id == row.id else r for r in self.rows]

    def drop(self, *positions: int) -> None:
        self.rows = [r for r in self.rows if r.position not in positions]


def sealed(*streams: str) -> _Ledger:
    """One event per name, in order (``sealed("a", "b", "a")``: a1 at 1, b1, a2 at 3),
    sealed by the planner every backend uses."""
    requests = [
        AppendRequest(
            stream,
            (PreparedEvent(UUID(int=i + 1), "noted", 1, b'{"i":%d}' % i, b"{}"),),
            StreamState.ANY,
        )
        for i, stream in enumerate(streams)
    ]
    plan = plan_batch(requests, {}, {}, 0, 1_700_000_000_000_000)
    return _Ledger(plan.rows, plan.heads)


def resealed(row: EventRow) -> EventRow:
    """``row`` with the hash that matches its (edited) fields: a careful forgery."""
    return dataclasses.replace(row, hash=row_hash(row))


_ONE = UUID(int=1)


def test_every_stored_field_feeds_the_chain_hash() -> None:
    def h(
        prev_hash: bytes = GENESIS_HASH,
        event_id: UUID = _ONE,
        stream_id: str = "s",
        version: int = 1,
        position: int = 1,
        type_name: str = "t",
        schema_version: int = 1,
        data: bytes = b"{}",
        metadata: bytes = b"{}",
        recorded_at_us: int = 0,
    ) -> bytes:
        return chain_hash(
            prev_hash,
            event_id,
            stream_id,
            version,
            position,
            type_name,
            schema_version,
            data,
            metadata,
            recorded_at_us,
        )

    variants = [
        h(),
        h(prev_hash=b"\x01" * 32),
        h(event_id=UUID(int=2)),
        h(stream_id="s2"),
        h(version=2),
        h(position=2),
        h(type_name="t2"),
        h(schema_version=2),
        h(data=b"[]"),
        h(metadata=b"[]"),
        h(recorded_at_us=1),
    ]
    assert len(set(variants)) == len(variants)


def test_the_chain_hash_of_a_known_event_never_changes() -> None:
    # Ledgers written by earlier releases must keep verifying: the encoding is fixed.
    digest = chain_hash(
        b"\x01" * 32,
        UUID("0190a0b0-c0d0-7e0f-8a1b-2c3d4e5f6071"),
        "order-42",
        3,
        17,
        "order.created",
        2,
        b'{"sku":"SKU-1"}',
        b'{"actor":"alice"}',
        1_700_000_000_123_456,
    )
    assert digest.hex() == "b6ef6e4fe4e107805b6c2d126d5bf44066c6acd758fec6a521be39c19ca47a98"


@given(
    streams=st.lists(st.sampled_from("abc"), min_size=1, max_size=12),
    batch_size=st.integers(min_value=1, max_value=13),
)
async def test_an_untouched_ledger_verifies_in_batches_of_any_size(
    streams: list[str], batch_size: int
) -> None:
    report = await sealed(*streams).verify(batch_size)
    assert report.ok
    assert report.findings == []
    assert (report.events_checked, report.streams_checked) == (len(streams), len(set(streams)))


@given(
    streams=st.lists(st.sampled_from("abc"), min_size=2, max_size=12),
    data=st.data(),
)
async def test_findings_do_not_depend_on_the_batch_size(
    streams: list[str], data: st.DataObject
) -> None:
    positions = st.integers(min_value=1, max_value=len(streams))
    edited = data.draw(positions, label="edited")
    removed = data.draw(st.sets(positions, max_size=3), label="removed")
    batch_size = data.draw(st.integers(min_value=1, max_value=len(streams)), label="batch")
    ledger = sealed(*streams)
    ledger.put(dataclasses.replace(ledger.at(edited), data=b"{}"))
    ledger.drop(*removed)
    whole = await ledger.verify()
    assert not whole.ok
    assert await ledger.verify(batch_size) == whole


async def test_no_read_asks_for_more_than_a_batch() -> None:
    ledger = sealed("a", "b", "c", "a", "d")
    assert (await ledger.verify(batch_size=2)).ok
    assert ledger.limits == {2}


async def test_an_empty_ledger_verifies() -> None:
    assert await _Ledger([], {}).verify() == VerifyReport(0, 0, [])


async def test_an_edited_event_is_named_with_its_place() -> None:
    ledger = sealed("a", "b", "a", "a")
    ledger.put(dataclasses.replace(ledger.at(3), data=b'{"i":99}'))
    report = await ledger.verify()
    assert report.findings == [
        Finding(FindingKind.EDITED, "a", 2, 3, "stored fields do not match the event's hash")
    ]
    assert (report.events_checked, report.streams_checked, report.ok) == (4, 2, False)
    assert str(report.findings[0]) == (
        "edited: stream 'a', version 2, position 3: stored fields do not match the event's hash"
    )


async def test_a_forged_event_is_found_through_its_successor() -> None:
    ledger = sealed("a", "a", "a")
    ledger.put(resealed(dataclasses.replace(ledger.at(2), data=b'{"i":99}')))
    assert (await ledger.verify()).findings == [
        Finding(FindingKind.EDITED, "a", 2, 2, "its hash differs from the one version 3 chained to")
    ]


async def test_an_event_chained_to_the_wrong_predecessor_is_found() -> None:
    # Version 2 re-sealed onto another hash: it is intact on its own, and its
    # predecessor is intact too; the link between them is what broke.
    ledger = sealed("a", "a")
    ledger.put(resealed(dataclasses.replace(ledger.at(2), prev_hash=b"\x07" * 32)))
    ledger.heads["a"] = dataclasses.replace(ledger.heads["a"], last_hash=ledger.at(2).hash)
    assert (await ledger.verify()).findings == [
        Finding(FindingKind.EDITED, "a", 1, 1, "its hash differs from the one version 2 chained to")
    ]


async def test_a_first_event_chained_to_anything_but_genesis_is_found() -> None:
    ledger = sealed("b", "a")
    ledger.put(resealed(dataclasses.replace(ledger.at(2), prev_hash=b"\x01" * 32)))
    ledger.heads["a"] = dataclasses.replace(ledger.heads["a"], last_hash=ledger.at(2).hash)
    assert (await ledger.verify()).findings == [
        Finding(
            FindingKind.EDITED, "a", 1, 2, "the first event of the stream does not start the chain"
        )
    ]


async def test_an_edited_first_event_is_reported_once() -> None:
    ledger = sealed("a", "a")
    ledger.put(dataclasses.replace(ledger.at(1), prev_hash=b"\x01" * 32))
    assert (await ledger.verify()).findings == [
        Finding(FindingKind.EDITED, "a", 1, 1, "stored fields do not match the event's hash")
    ]


async def test_gaps_in_the_global_log_are_named() -> None:
    ledger = sealed("a", "b", "c", "d", "e", "f", "g")
    ledger.drop(2, 4, 5)
    ledger.heads = {s: h for s, h in ledger.heads.items() if s not in "bde"}
    report = await ledger.verify()
    assert report.findings == [
        Finding(FindingKind.REMOVED, None, None, 2, "position 2 missing from the global log"),
        Finding(FindingKind.REMOVED, None, None, 4, "positions 4..5 missing from the global log"),
    ]
    assert (
        str(report.findings[1]) == "removed: position 4: positions 4..5 missing from the global log"
    )
    assert (report.events_checked, report.streams_checked) == (4, 4)


async def test_missing_versions_are_named() -> None:
    ledger = sealed("a", "a", "a", "a", "a", "a")
    ledger.drop(2, 4, 5)
    findings = (await ledger.verify()).findings
    assert [f for f in findings if f.stream_id is not None] == [
        Finding(FindingKind.REMOVED, "a", 2, None, "version 2 missing"),
        Finding(FindingKind.REMOVED, "a", 4, None, "versions 4..5 missing"),
    ]
    assert str(findings[-1]) == "removed: stream 'a', version 4: versions 4..5 missing"


async def test_missing_first_versions_are_named() -> None:
    ledger = sealed("a", "a", "a", "b")
    ledger.drop(1, 2)
    findings = (await ledger.verify()).findings
    assert [f for f in findings if f.stream_id is not None] == [
        Finding(FindingKind.REMOVED, "a", 1, None, "versions 1..2 missing")
    ]


async def test_an_event_moved_back_in_the_global_log_is_reordered() -> None:
    ledger = sealed("a", "b", "a", "a")
    one, three = ledger.at(1), ledger.at(3)
    ledger.put(dataclasses.replace(one, position=3))
    ledger.put(dataclasses.replace(three, position=1))
    report = await ledger.verify()
    # Version 1 now sits after version 2. Each hash (which covers the position)
    # matches again with the other's position: a swap, reported once per event.
    assert report.findings == [
        Finding(
            FindingKind.REORDERED, "a", 1, 3, "holds the event written at position 1: it was moved"
        ),
        Finding(
            FindingKind.REORDERED, "a", 2, 1, "holds the event written at position 3: it was moved"
        ),
    ]


async def test_an_event_moved_back_alone_is_reordered_once() -> None:
    ledger = sealed("a", "b", "a", "a")
    first = ledger.at(1)
    ledger.drop(1)
    ledger.rows.append(dataclasses.replace(first, position=5))
    report = await ledger.verify()
    assert [(f.kind, f.stream_id, f.version, f.position) for f in report.findings] == [
        (FindingKind.REMOVED, None, None, 1),
        (FindingKind.REORDERED, "a", 1, 5),
    ]


async def test_an_event_moved_to_version_zero_is_edited() -> None:
    ledger = sealed("a", "a")
    ledger.put(dataclasses.replace(ledger.at(1), version=0))
    assert (await ledger.verify()).findings == [
        Finding(FindingKind.EDITED, "a", 0, 1, "stored fields do not match the event's hash"),
        Finding(FindingKind.REMOVED, "a", 1, None, "version 1 missing"),
    ]


async def test_an_event_forged_before_the_first_version_is_found() -> None:
    # Sealed correctly from the genesis hash, as version 0, at the end of the log.
    ledger = sealed("a", "a")
    ledger.rows.append(
        resealed(dataclasses.replace(ledger.at(1), id=UUID(int=99), version=0, position=3))
    )
    assert (await ledger.verify()).findings == [
        Finding(FindingKind.REORDERED, "a", 0, 3, "appears after version 2 in the global log")
    ]


async def test_an_event_copied_into_the_log_again_is_edited() -> None:
    # Right after the original: versions do not fall, so it is not a reordering.
    ledger = sealed("a", "a")
    ledger.rows.append(dataclasses.replace(ledger.at(2), id=UUID(int=99), position=3))
    assert (await ledger.verify()).findings == [
        Finding(FindingKind.EDITED, "a", 2, 3, "stored fields do not match the event's hash")
    ]


async def test_a_head_ahead_of_the_events_means_removed_events() -> None:
    ledger = sealed("b", "a", "a", "a")
    ledger.drop(4)  # the tail of the global log: no gap there
    assert (await ledger.verify()).findings == [
        Finding(
            FindingKind.REMOVED,
            "a",
            3,
            None,
            "the stream head records version 3 but events end at 2",
        )
    ]


async def test_a_head_without_events_means_a_removed_stream() -> None:
    ledger = sealed("a", "b")
    ledger.drop(2)
    report = await ledger.verify()
    assert report.findings == [
        Finding(
            FindingKind.REMOVED,
            "b",
            1,
            None,
            "the stream head records version 1 but events end at 0",
        )
    ]
    assert (report.events_checked, report.streams_checked) == (1, 2)


async def test_a_head_behind_the_events_is_a_head_mismatch() -> None:
    ledger = sealed("a", "a", "a")
    ledger.heads["a"] = StreamHead(2, ledger.at(2).hash, 2)
    assert (await ledger.verify()).findings == [
        Finding(
            FindingKind.HEAD_MISMATCH,
            "a",
            2,
            None,
            "the stream head records version 2 but events reach 3",
        )
    ]


async def test_a_head_with_another_hash_shows_an_edited_last_event() -> None:
    ledger = sealed("a", "a")
    ledger.put(resealed(dataclasses.replace(ledger.at(2), data=b'{"i":99}')))
    assert (await ledger.verify()).findings == [
        Finding(
            FindingKind.EDITED, "a", 2, 2, "its hash differs from the one the stream head recorded"
        )
    ]


async def test_a_stream_without_a_head_is_reported() -> None:
    ledger = sealed("a", "b", "b")
    del ledger.heads["b"]
    report = await ledger.verify()
    assert report.findings == [
        Finding(FindingKind.HEAD_MISMATCH, "b", None, None, "stream head is missing")
    ]
    assert str(report.findings[0]) == "head_mismatch: stream 'b': stream head is missing"


async def test_heads_are_read_past_the_first_page() -> None:
    ledger = sealed("a", "b", "c", "d", "e")
    ledger.heads["e"] = StreamHead(2, ledger.at(5).hash, 6)
    report = await ledger.verify(batch_size=2)
    assert report.findings == [
        Finding(
            FindingKind.REMOVED,
            "e",
            2,
            None,
            "the stream head records version 2 but events end at 1",
        )
    ]


# -- a live ledger ------------------------------------------------------------------


async def test_verify_on_a_live_ledger_finds_nothing_while_writers_append(
    store: BaseEventStore,
) -> None:
    """Events and heads read as of one moment: appends landing while the walk is
    under way (to its streams and to new ones) are not reported as tampering. Read
    page by page, the heads ran ahead of the events read (a false "removed")."""
    for n in range(40):
        await store.append(f"s-{n % 8}", [ledgerflow.NewEvent("noted", {"n": n})])
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            await store.append(f"s-{n % 8}", [ledgerflow.NewEvent("noted", {"n": n})])
            if n % 5 == 0:
                await store.append(f"new-{n}", [ledgerflow.NewEvent("noted", {"n": n})])
            n += 1
            await asyncio.sleep(0)

    writing = asyncio.create_task(writer())
    try:
        for _ in range(5):
            report = await ledgerflow.verify_ledger(store, batch_size=7)
            assert report.ok, [str(f) for f in report.findings]
            assert report.events_checked >= 40
    finally:
        stop.set()
        await writing
    assert (await ledgerflow.verify_ledger(store)).ok


# -- derived tables -------------------------------------------------------------------


@ledgerflow.workflow(name="audited", version=1)
async def audited(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    if n < 0:
        await ctx.wait_for_signal("never", int)
    return n


async def instances(url: str) -> None:
    async with ledgerflow.Engine(url, workflows=[audited], poll_interval=0.05) as engine:
        for n in (1, 2):
            await (await engine.start(audited, n, id=f"done-{n}")).result(timeout=20)
        await engine.start(audited, -1, id="waits")
        await waiting_for(engine, "waits", "signal 'never'")


async def verify_cli(url: str) -> tuple[int, str]:
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["audit", "verify", "--db", url], env={"COLUMNS": "200"}
    )
    return result.exit_code, " ".join(result.output.split())


async def test_status_rows_are_checked_against_the_ledger(sql_url: str) -> None:
    """A status changed behind the ledger's back (a finished order marked failed, a
    waiting one marked completed, a row deleted) is tampering `verify` reports."""
    await instances(sql_url)
    assert (await verify_cli(sql_url))[0] == 0
    raw_sql(sql_url, "UPDATE {t}workflows SET status = 'failed' WHERE workflow_id = 'done-1'")
    raw_sql(sql_url, "UPDATE {t}workflows SET status = 'completed' WHERE workflow_id = 'waits'")
    raw_sql(sql_url, "DELETE FROM {t}workflows WHERE workflow_id = 'done-2'")
    code, output = await verify_cli(sql_url)
    assert code == 1, output
    assert (
        "derived: stream 'wf-done-1': the status row says 'failed' but the ledger says "
        "the instance ended 'completed'" in output
    )
    assert "stream 'wf-waits': the status row says 'completed' but the ledger has not" in output
    assert "stream 'wf-done-2', version 1: instance 'done-2' was started but has no" in output
    assert output.count("derived:") == 3


# -- edits no writer makes: values of other types, bytes no decoder reads ------------

GARBAGE = bytes.fromhex("ff00ff")
"""Not JSON, not UTF-8."""


@pytest.mark.parametrize("column", ["data", "metadata"])
async def test_unreadable_bytes_in_a_workflow_event_are_tampering_not_an_error(
    sql_url: str, column: str
) -> None:
    """Bytes no decoder reads, in an event of a workflow's stream: verify stopped
    with a traceback (metadata) or exit 2 'error' (data) while checking status rows,
    losing the chain check's finding; it names the event and exits 1."""
    await instances(sql_url)
    raw_sql(
        sql_url,
        f"UPDATE {{t}}events SET {column} = {_blob(sql_url, GARBAGE)} "
        "WHERE stream_id = 'wf-done-1' AND version = 2",
    )
    code, output = await verify_cli(sql_url)
    assert code == 1, output
    assert "edited: stream 'wf-done-1', version 2" in output
    assert "Traceback" not in output
    # Reading the stream says what is wrong, in the store's own terms.
    async with ledgerflow.open_store(sql_url) as store:
        with pytest.raises(ledgerflow.InvalidEventDataError):
            await store.read_stream("wf-done-1")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("data", "replace(data, '1', '7')"),  # SQLite's replace() gives TEXT
        ("metadata", "'{{}}'"),  # raw_sql formats {t}
        ("hash", "'abc'"),
        ("prev_hash", "'abc'"),
        ("version", "'two'"),
        ("recorded_at", "'yesterday'"),
        ("event_id", "'not-a-uuid'"),
        ("schema_version", "'one'"),
    ],
)
def test_sqlite_values_of_another_type_are_tampering_not_a_crash(
    tmp_path: Path, column: str, value: str
) -> None:
    """SQLite keeps whatever type an UPDATE gives a column: verify crashed on each of
    these with a TypeError or ValueError. Each is a finding now (exit 1) at the
    edited event's position."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    asyncio.run(instances(url))
    where = "WHERE stream_id = 'wf-done-1' AND version = 2"
    ((position,),) = raw_sql(url, f"SELECT position FROM events {where}")
    raw_sql(url, f"UPDATE events SET {column} = {value} {where}")
    result = CliRunner().invoke(app, ["audit", "verify", "--db", url], env={"COLUMNS": "200"})
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "stream 'wf-done-1', version" in output
    assert f"position {position}:" in output
