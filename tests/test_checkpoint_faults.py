"""Checkpointer processes killed with SIGKILL at random moments, two at once, while
the ledger is written: the witness only ever holds consistent heads, a restarted
checkpointer carries on from what was stored, and the ledger verifies against the
witness at the end."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ledgerflow
from ledgerflow.merkle import leaf_hash

from .test_checkpoints import assert_one_history

pytestmark = pytest.mark.timeout(120)


def checkpointer(url: str, key: Path, witness: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-c",
        "from ledgerflow.cli import main; main()",
        "audit",
        "checkpoint",
        "--db",
        url,
        "--key",
        str(key),
        "--witness",
        str(witness),
        "--follow",
        "--interval",
        "0.02",
    ]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


async def test_killed_checkpointers_leave_a_consistent_witness(
    shared_url: str, tmp_path: Path
) -> None:
    signer = ledgerflow.generate_signing_key(tmp_path / "k", tmp_path / "k.pub")
    heads = tmp_path / "heads.jsonl"
    log = tmp_path / "checkpointer.log"
    rng = random.Random(18)
    stop = asyncio.Event()

    async with ledgerflow.open_store(shared_url) as store:

        async def write(writer: int) -> None:
            i = 0
            while not stop.is_set():
                batch = [ledgerflow.NewEvent("noted", {"i": i + j}) for j in range(3)]
                await store.append(f"w{writer}-{i % 5}", batch)
                i += 3
                await asyncio.sleep(0.001)

        writers = [asyncio.create_task(write(w)) for w in range(4)]
        try:
            for round_ in range(6):
                before = _lines(heads)
                running = [checkpointer(shared_url, tmp_path / "k", heads, log)]
                if round_ % 2:
                    running.append(checkpointer(shared_url, tmp_path / "k", heads, log))
                await asyncio.sleep(rng.uniform(0.6, 1.5))
                # On a loaded machine a process may not have started yet: each round
                # kills checkpointers that have handed the witness a head at least.
                for _ in range(3000):
                    if _lines(heads) > before:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                for process in running:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
        finally:
            stop.set()
            await asyncio.gather(*writers)
        # A last one, in-process, catches up; then everything is checked.
        witness = ledgerflow.FileWitness(heads, verifier=signer.verifier)
        await ledgerflow.Checkpointer(store, signer=signer, witness=witness).checkpoint()
        report = await ledgerflow.verify_ledger(store, witness=witness, verifier=signer.verifier)
        assert report.ok, report.findings
        leaves = [leaf_hash(r.hash) for r in await store.read_rows(limit=1_000_000)]

    held = await witness.heads()
    assert len(held) > 6, log.read_text()[-2000:]
    assert_one_history(held, leaves)
    # Killed, never failed: no error from any of them (a stale one catches up).
    assert "Traceback" not in log.read_text()
    assert "error" not in log.read_text().lower(), log.read_text()[-2000:]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0
