"""Invariants 1 and 2 across OS processes: several processes write one SQLite file or
one PostgreSQL schema at once, and the ledger they leave behind is checked whole.

The workers (``tests/_workers.py``) report every append that was acknowledged to them;
the ledger must hold exactly those events, each once, at the version acknowledged.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ledgerflow
from ledgerflow.hashing import GENESIS_HASH, chain_hash

from . import _workers
from .conftest import pg_url, require_postgres

RESULT_TIMEOUT = 240.0
"""Guard against a hung worker, never an expectation of speed."""

ctx = multiprocessing.get_context("spawn")


@pytest.fixture(params=["sqlite", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One database for several processes: a SQLite file or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    require_postgres()
    schema: str = request.getfixturevalue("pg_schema")
    return pg_url(schema)


def run_workers(
    target: Callable[..., None], n: int, args: Callable[[int], tuple[Any, ...]]
) -> dict[int, Any]:
    """Start ``n`` processes with a shared barrier of ``n`` and a result queue as the
    last two arguments; return each worker's payload, failing on any worker error."""
    start = ctx.Barrier(n)
    results: Any = ctx.Queue()
    processes = [
        ctx.Process(target=target, args=(*args(w), start, results), daemon=True) for w in range(n)
    ]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=RESULT_TIMEOUT) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=RESULT_TIMEOUT)
            if process.is_alive():
                process.kill()
    errors = [f"worker {w}:\n{payload}" for kind, w, payload in reports if kind != "ok"]
    assert not errors, "\n".join(errors)
    assert all(process.exitcode == 0 for process in processes)
    return {w: payload for _, w, payload in reports}


async def check_chains(url: str) -> list[ledgerflow.RecordedEvent]:
    """The whole ledger, after checking its order, versions and hash chains."""
    async with ledgerflow.open_store(url) as store:
        events = await store.read_all()
        rows = await store.read_rows(limit=len(events) + 1)
        assert await store.head_position() == (events[-1].position if events else 0)
        dense = store.dense_positions
    positions = [e.position for e in events]
    if dense:
        assert positions == list(range(1, len(events) + 1))
    else:  # PostgreSQL: positions a refused or lost write took stay unused (ADR 008)
        assert positions == sorted(set(positions))
    last: dict[str, tuple[int, bytes]] = {}
    for event, row in zip(events, rows, strict=True):
        version, prev = last.get(event.stream_id, (0, GENESIS_HASH))
        assert event.version == version + 1
        assert event.prev_hash == prev
        assert event.hash == chain_hash(
            prev,
            event.id,
            event.stream_id,
            event.version,
            event.position,
            event.type,
            event.schema_version,
            row.data,
            row.metadata,
            row.recorded_at_us,
        )
        last[event.stream_id] = (event.version, event.hash)
    return events


async def prepare(url: str) -> None:
    """Create the schema up front, so that the workers measure appends, not migrations."""
    async with ledgerflow.open_store(url) as store:
        assert await store.head_position() == 0


async def test_processes_appending_to_one_stream_and_their_own(shared_url: str) -> None:
    workers, count = 4, 12
    await prepare(shared_url)
    reports = run_workers(_workers.contend, workers, lambda w: (shared_url, w, count))

    acks = [tuple(a) for report in reports.values() for a in report["acks"]]
    conflicts = [tuple(c) for report in reports.values() for c in report["conflicts"]]
    events = await check_chains(shared_url)

    # Every acknowledged event is stored once, where it was acknowledged, and nothing
    # that was not acknowledged is stored.
    stored = Counter((str(e.id), e.stream_id, e.version, e.position) for e in events)
    assert sorted(stored) == sorted(acks)
    assert set(stored.values()) == {1}
    assert len({a[0] for a in acks}) == len(acks) == 2 * workers * count
    # No stream version was acknowledged to two writers.
    contested = Counter((stream, version) for _, stream, version, _ in acks)
    assert set(contested.values()) == {1}
    versions = sorted(v for _, s, v, _ in acks if s == "shared")
    assert versions == list(range(1, workers * count + 1))
    for w in range(workers):
        own = sorted(v for _, s, v, _ in acks if s == f"own-{w}")
        assert own == list(range(1, count + 1))
    # Each worker's events on the shared stream are in the order it appended them.
    for w in range(workers):
        mine = [e.data["i"] for e in events if e.stream_id == "shared" and e.data["worker"] == w]
        assert mine == list(range(count))
    # Every refusal named the stream, the version the writer read and a newer one.
    for stream, expected, actual, read in conflicts:
        assert stream == "shared"
        assert expected == read
        assert isinstance(actual, int)
        assert actual > read


async def test_racing_processes_exactly_one_wins(shared_url: str) -> None:
    workers, rounds = 6, 3
    await prepare(shared_url)
    reports = run_workers(_workers.race, workers, lambda w: (shared_url, w, "raced", rounds))

    for round_ in range(rounds):
        outcomes = [tuple(reports[w][round_]) for w in range(workers)]
        won = [o for o in outcomes if o[0] == "won"]
        lost = [o for o in outcomes if o[0] == "lost"]
        assert won == [("won", round_ + 1)]
        assert lost == [("lost", "raced", round_, round_ + 1)] * (workers - 1)
    events = await check_chains(shared_url)
    assert [(e.stream_id, e.version) for e in events] == [
        ("raced", v) for v in range(1, rounds + 1)
    ]
    winners = {
        w: [r for r, outcome in enumerate(reports[w]) if outcome[0] == "won"]
        for w in range(workers)
    }
    assert [(e.data["worker"], e.data["round"]) for e in events] == sorted(
        ((w, r) for w, rs in winners.items() for r in rs), key=lambda wr: wr[1]
    )


async def test_processes_opening_a_new_database_at_once(shared_url: str) -> None:
    workers = 4
    reports = run_workers(_workers.open_fresh, workers, lambda w: (shared_url, w))
    assert reports == dict.fromkeys(range(workers), 1)
    events = await check_chains(shared_url)
    assert sorted(e.stream_id for e in events) == [f"w-{w}" for w in range(workers)]


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    yield
    assert multiprocessing.active_children() == []
