"""The audit layer: how fast a large ledger is verified and checkpointed, how long
proofs take, and what a running checkpointer costs the writers.

    python bench/audit.py                     # sqlite, then postgres if it answers
    python bench/audit.py --backend sqlite    # one backend
    LEDGERFLOW_BENCH_AUDIT_EVENTS=100000 python bench/audit.py   # a smaller ledger

One JSON line per backend on stdout, a fresh database each (removed afterwards):

- ``fill``: ``EVENTS`` events (1,000,000 by default) written through the store in
  appends of ``CHUNK`` events over ``STREAMS`` streams (not timed against a target).
- ``checkpoint_catch_up``: one ``Checkpointer.checkpoint()`` over all of them, signed,
  to a file witness: events/s (reading every event once more, hashing, sealing tiles).
- ``verify``: ``verify_ledger`` with the witness and the public key (hash chains,
  tiles, heads, all in one snapshot): events/s.
- ``proofs``: ``LogTree.load`` of the latest checkpoint, then ``PROOFS`` inclusion
  proofs of random events (leaf lookup by position + proof), and ``PROOFS``
  consistency proofs from random older sizes; median and p99 ms each; verifying one
  inclusion proof, µs.
- ``checkpoint_overhead``: on a second fresh database, ``WRITERS`` concurrent tasks
  each appending one event at a time (the way an app writes) for ``OVERHEAD_S``
  seconds, alternately without and with a checkpointer following in the same process
  every ``INTERVAL_S`` seconds (``ROUNDS`` of each, medians; the checkpointer is
  caught up, untimed, before each timed round): appends/s both ways and the
  overhead (1 - with / without; the target is at most 10 %), with the store's
  commit floor measured beside them.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ledgerflow as lf
from ledgerflow.ledger_tree import LogTree
from ledgerflow.merkle import leaf_hash, verify_inclusion
from modes import percentile
from store import fresh_database, main, note, ratio

EVENTS = int(os.environ.get("LEDGERFLOW_BENCH_AUDIT_EVENTS", "1000000"))
CHUNK = 1000
STREAMS = 200
PROOFS = 200
WRITERS = 8
OVERHEAD_S = 2.0
ROUNDS = 5
INTERVAL_S = 1.0


async def fill(store: lf.EventStore, events: int) -> float:
    began = time.perf_counter()
    versions = [0] * STREAMS
    written = 0
    while written < events:
        stream = (written // CHUNK) % STREAMS
        count = min(CHUNK, events - written)
        batch = [
            lf.NewEvent("bench.noted", {"n": written + i, "note": "audit"}) for i in range(count)
        ]
        await store.append(f"s{stream}", batch, versions[stream])
        versions[stream] += count
        written += count
        if written % 100_000 == 0:
            note(f"filled {written:,}")
    return time.perf_counter() - began


async def writers(store: lf.EventStore, seconds: float, tag: str) -> float:
    deadline = time.perf_counter() + seconds
    counts = [0] * WRITERS

    async def write(writer: int) -> None:
        while time.perf_counter() < deadline:
            await store.append(
                f"{tag}-{writer}", [lf.NewEvent("bench.noted", {"i": counts[writer]})]
            )
            counts[writer] += 1

    began = time.perf_counter()
    await asyncio.gather(*(write(w) for w in range(WRITERS)))
    return sum(counts) / (time.perf_counter() - began)


async def overhead(backend: str, signer: lf.LogSigner, witness_path: Path) -> dict[str, Any]:
    async with (
        fresh_database(backend, "audit_overhead") as (url, floor, _),
        lf.open_store(url) as store,
    ):
        await writers(store, 0.5, "warm")
        checkpointer = lf.Checkpointer(store, signer=signer, witness=lf.FileWitness(witness_path))
        without: list[float] = []
        with_: list[float] = []
        floors: list[float] = []
        for round_ in range(ROUNDS):
            without.append(await writers(store, OVERHEAD_S, f"plain{round_}"))
            # Caught up first (untimed): the timed window pays for following the
            # appends made in it, not for the backlog of the round before.
            await checkpointer.checkpoint()
            stop = asyncio.Event()
            follower = asyncio.create_task(checkpointer.run(interval=INTERVAL_S, stop=stop))
            with_.append(await writers(store, OVERHEAD_S, f"checkpointed{round_}"))
            stop.set()
            await follower
            floors.append(await floor.commits_per_s(1.0))
        latest = await store.latest_checkpoint()
        plain, checked = statistics.median(without), statistics.median(with_)
        commit_floor = statistics.median(floors)
        return {
            "writers": WRITERS,
            "seconds_each": OVERHEAD_S,
            "rounds": ROUNDS,
            "interval_s": INTERVAL_S,
            "appends_per_s_without": round(plain),
            "appends_per_s_with": round(checked),
            "overhead": round(1 - checked / plain, 3),
            "target_overhead": 0.10,
            "commit_floor_per_s": round(commit_floor),
            "without_vs_floor": ratio(plain, commit_floor),
            "with_vs_floor": ratio(checked, commit_floor),
            "checkpointed_events": 0 if latest is None else latest.tree_size,
        }


async def run_backend(backend: str) -> dict[str, Any]:
    keys = Path(tempfile.mkdtemp(prefix="ledgerflow-audit-keys-"))
    errors: list[str] = []
    result: dict[str, Any] = {
        "benchmark": "audit",
        "backend": backend,
        "events": EVENTS,
        "errors": errors,
    }
    try:
        signer = lf.generate_signing_key(keys / "k", keys / "k.pub")
        witness = lf.FileWitness(keys / "heads.jsonl", verifier=signer.verifier)
        async with fresh_database(backend, "audit") as (url, _floor, settings):
            result["settings"] = settings
            async with lf.open_store(url) as store:
                note(f"{backend}: filling {EVENTS:,} events")
                result["fill_s"] = round(await fill(store, EVENTS), 1)

                began = time.perf_counter()
                checkpoint = await lf.Checkpointer(
                    store, signer=signer, witness=witness
                ).checkpoint()
                took = time.perf_counter() - began
                if checkpoint is None or checkpoint.tree_size != EVENTS:
                    errors.append(f"the checkpoint covers {checkpoint} events, not {EVENTS}")
                    return result
                result["checkpoint_catch_up"] = {
                    "seconds": round(took, 2),
                    "events_per_s": round(EVENTS / took),
                }
                note(f"{backend}: checkpointed in {took:.1f}s; verifying")

                began = time.perf_counter()
                report = await lf.verify_ledger(store, witness=witness, verifier=signer.verifier)
                took = time.perf_counter() - began
                if not report.ok:
                    errors.append(f"verify found {report.findings[:3]}")
                result["verify"] = {
                    "seconds": round(took, 2),
                    "events_per_s": round(report.events_checked / took),
                    "streams": report.streams_checked,
                }
                note(f"{backend}: verified in {took:.1f}s; proofs")
                result["proofs"] = await proofs(store, checkpoint, errors)
        note(f"{backend}: checkpoint overhead on appends")
        result["checkpoint_overhead"] = await overhead(backend, signer, keys / "overhead.jsonl")
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(keys, ignore_errors=True)
    return result


async def proofs(store: lf.EventStore, checkpoint: Any, errors: list[str]) -> dict[str, Any]:
    rng = random.Random(7)
    began = time.perf_counter()
    tree = await LogTree.load(store, checkpoint)
    load_ms = (time.perf_counter() - began) * 1000
    inclusion_ms: list[float] = []
    verify_us: list[float] = []
    for _ in range(PROOFS):
        position = rng.randint(1, checkpoint.last_position)
        began = time.perf_counter()
        index = await tree.index_of(position)
        if index is None:
            errors.append(f"position {position} is not in the tree")
            continue
        proof = await tree.inclusion(index)
        inclusion_ms.append((time.perf_counter() - began) * 1000)
        (row,) = await store.read_rows(from_position=position, limit=1)
        began = time.perf_counter()
        ok = verify_inclusion(leaf_hash(row.hash), index, tree.size, proof, checkpoint.root)
        verify_us.append((time.perf_counter() - began) * 1e6)
        if not ok:
            errors.append(f"the proof of position {position} does not verify")
    consistency_ms: list[float] = []
    for _ in range(PROOFS):
        old = rng.randint(1, tree.size)
        began = time.perf_counter()
        await tree.consistency(old)
        consistency_ms.append((time.perf_counter() - began) * 1000)
    return {
        "tree_load_ms": round(load_ms, 1),
        "inclusion_ms_p50": round(percentile(inclusion_ms, 50), 3),
        "inclusion_ms_p99": round(percentile(inclusion_ms, 99), 3),
        "consistency_ms_p50": round(percentile(consistency_ms, 50), 3),
        "consistency_ms_p99": round(percentile(consistency_ms, 99), 3),
        "verify_inclusion_us_p50": round(percentile(verify_us, 50), 1),
    }


if __name__ == "__main__":
    sys.exit(main(run_backend, __doc__))
