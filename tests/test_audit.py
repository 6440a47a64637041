"""Tamper evidence: rows edited, deleted and reordered with raw SQL are each found."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.audit import FindingKind
from ledgerflow.cli import app
from ledgerflow.hashing import chain_hash
from ledgerflow.store._base import BaseEventStore

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
    assert any(f.kind is FindingKind.REMOVED and f.position == 8 for f in report.findings)


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
    assert not report.ok
    assert {f.stream_id for f in report.findings} == {"b"}
    assert FindingKind.REORDERED in {f.kind for f in report.findings}


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


def test_cli_reports_a_missing_database_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", "--db", f"sqlite:///{tmp_path}/no.db"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


async def test_memory_store_verifies(store: BaseEventStore) -> None:
    await store.append("s", [ledgerflow.NewEvent("x", {"i": i}) for i in range(5)])
    report = await ledgerflow.verify_ledger(store)
    assert report.ok
    assert report.events_checked == 5
