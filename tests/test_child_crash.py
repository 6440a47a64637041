"""Parents waiting on children survive kill -9 at any instant.

The bug this pins down: start ~400 parents that each start a child with one fast
step, kill -9 the process after about a second, restart: in most runs a few parents
stayed ``running`` forever, with a wake-up row whose due time was NULL and no lease,
while their child was ``completed`` (the child's end had reached nobody durable).

``tests/_child_crash_worker.py`` starts a batch of 400 parents with fixed ids (``b0-p-0``
.. ``b0-p-399``; idempotent on the id) and waits for them all. This test starts it
and kills it with SIGKILL at a random instant between 0.3 and 1.5 s, again and
again. A worker that finishes before its kill comes has nothing left to kill in, so
the next workers start a new batch of 400 as well (and the earlier ones again: they
finish whatever a kill left), until ``LEDGERFLOW_CHILD_CRASH_KILLS`` kills (default
4) have landed on a running worker. Then a last worker must finish every parent
within ``FINAL_RUN_TIMEOUT``. Afterwards, read from the store without an engine (an
engine would run what was left over):

- every parent and every child is ``completed`` with its result, and no wake-up row
  is left for any of them;
- each parent's history holds its child's end exactly once, with the child's result.

On SQLite and on PostgreSQL. ``LEDGERFLOW_CHILD_CRASH_SEED`` replays a schedule of
kill delays. A failure shows the first instances concerned: row, wake-up and history
of the parent and of its child.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow.workflow.history import ChildFinished, Finished, Started, history_registry

from ._child_crash_worker import (
    CHILD_NAME,
    PARENT_NAME,
    child_id,
    child_result,
    number,
    parent_ids,
    parent_result,
)
from .conftest import backend_url

WORKER = Path(__file__).with_name("_child_crash_worker.py")
PARENTS = 400
"""Parents per batch."""
KILLS = int(os.environ.get("LEDGERFLOW_CHILD_CRASH_KILLS", "4"))
MAX_ROUNDS = 3 * KILLS
"""Workers started at most before the final one (kills landed or not)."""
SEED = int(os.environ.get("LEDGERFLOW_CHILD_CRASH_SEED", str(random.randrange(2**32))))
KILL_AFTER = (0.3, 1.5)
"""Seconds after a worker starts at which it is killed, uniformly at random."""
FINAL_RUN_TIMEOUT = 30.0
"""The last worker needs a second or two; a parent left hanging never finishes."""


def _worker(url: str, batches: int, log: Path, gathered: bool) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), url, str(PARENTS), str(batches)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LEDGERFLOW_CHILD_CRASH_GATHER": "1" if gathered else "0"},
        )


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


async def _rows(store: Any) -> list[Any]:
    rows = []
    after: str | None = None
    while page := await store.list_instances(after=after, limit=500):
        rows.extend(page)
        after = page[-1].workflow_id
    return rows


async def _census(url: str) -> str:
    """How the kill left the instances: status counts of parents and children."""
    async with lf.open_store(url, registry=history_registry()) as store:
        rows = await _rows(store)
    counts = Counter((row.name == PARENT_NAME, row.status) for row in rows)
    parents = ", ".join(f"{n} {s}" for (p, s), n in sorted(counts.items()) if p) or "none"
    children = ", ".join(f"{n} {s}" for (p, s), n in sorted(counts.items()) if not p) or "none"
    return f"parents {parents}; children {children}"


def _describe(events: list[lf.RecordedEvent]) -> str:
    return "\n".join(f"      v{e.version} {e.type} {e.data!r}" for e in events)


async def _check(url: str, batches: int) -> tuple[list[str], list[str]]:
    """Every problem found, and the first few parents concerned, described in full."""
    problems: list[str] = []
    details: list[str] = []
    parents = parent_ids(PARENTS, batches)
    children = {child_id(p): p for p in parents}
    async with lf.open_store(url, registry=history_registry()) as store:
        rows = {row.workflow_id: row for row in await _rows(store)}
        expected = set(parents) | set(children)
        if missing := sorted(expected - set(rows)):
            problems.append(f"lost instances (no row): {missing[:50]}")
        if extra := sorted(set(rows) - expected):
            problems.append(f"unexpected instances: {extra[:50]}")
        concerned: dict[str, None] = {}
        for wid, row in rows.items():
            want = (CHILD_NAME, children[wid]) if wid in children else (PARENT_NAME, None)
            if (row.name, row.parent_id) != want:
                problems.append(f"{wid}: row says {row.name!r} of {row.parent_id!r}")
            wakeup = await store.get_wakeup(wid)
            if row.status != "completed" or wakeup is not None:
                problems.append(f"{wid}: {row.status}, wake-up {wakeup!r}")
                concerned[children.get(wid, wid)] = None

        for wid in parents:
            events = await store.read_stream(f"wf-{wid}")
            child_events = await store.read_stream(f"wf-{child_id(wid)}")
            found = _check_pair(wid, events, child_events)
            problems.extend(found)
            if found:
                concerned[wid] = None
        for wid in list(concerned)[:5]:
            cid = child_id(wid)
            details.append(
                f"  {wid}: row {rows.get(wid)!r}, wake-up {await store.get_wakeup(wid)!r}\n"
                f"{_describe(await store.read_stream(f'wf-{wid}'))}\n"
                f"    child {cid}: row {rows.get(cid)!r}, "
                f"wake-up {await store.get_wakeup(cid)!r}\n"
                f"{_describe(await store.read_stream(f'wf-{cid}'))}"
            )
    return problems, details


def _check_pair(
    wid: str, events: list[lf.RecordedEvent], child_events: list[lf.RecordedEvent]
) -> list[str]:
    problems: list[str] = []
    n = number(wid)
    cid = child_id(wid)
    for who, stream, result in (
        (wid, events, parent_result(n)),
        (cid, child_events, child_result(n)),
    ):
        if not stream or not isinstance(stream[0].data, Started):
            problems.append(f"{who}: history does not begin with Started")
            continue
        ends = [e.data for e in stream if isinstance(e.data, Finished)]
        if ends != [Finished(status="completed", result=result)]:
            problems.append(f"{who}: ends {ends!r}, expected completed with {result!r}")
        elif not isinstance(stream[-1].data, Finished):
            problems.append(f"{who}: events after Finished: {stream[-1].data!r}")
    news = [e.data for e in events if isinstance(e.data, ChildFinished)]
    wanted = ChildFinished(child_id=cid, status="completed", result=child_result(n))
    if news != [wanted]:
        problems.append(f"{wid}: the child's end delivered as {news!r}, expected [{wanted!r}]")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
@pytest.mark.parametrize("gathered", [False, True], ids=["child alone", "child and timer gathered"])
def test_every_parent_finishes_after_kills_while_children_run(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, gathered: bool
) -> None:
    url = backend_url(backend, tmp_path, request)
    rng = random.Random(SEED)
    print(
        f"\nchild crash test on {backend}: batches of {PARENTS} parents, {KILLS} kills, "
        f"seed {SEED} (LEDGERFLOW_CHILD_CRASH_SEED={SEED} to replay the delays)"
    )
    began = time.monotonic()
    logs: list[Path] = []
    landed = 0
    batches = 1
    for round_ in range(MAX_ROUNDS):
        if landed >= KILLS:
            break
        delay = rng.uniform(*KILL_AFTER)
        log = tmp_path / f"run-{round_}.log"
        logs.append(log)
        proc = _worker(url, batches, log, gathered)
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # a no-op if it exited meanwhile
            code = proc.wait()
        if code == -signal.SIGKILL:
            landed += 1
            outcome = "killed"
        elif code == 0:
            outcome = "finished before its kill"
        else:
            pytest.fail(f"run {round_}: worker exited {code}\n{_tail(log)}")
        print(
            f"  run {round_}: {batches * PARENTS} parents, {outcome} at {delay:.2f}s; "
            f"{asyncio.run(_census(url))}"
        )
        if code == 0:
            batches += 1

    log = tmp_path / "run-final.log"
    logs.append(log)
    final_began = time.monotonic()
    proc = _worker(url, batches, log, gathered)
    problems: list[str] = []
    try:
        code = proc.wait(timeout=FINAL_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        problems.append(
            f"the final, unkilled worker did not finish in {FINAL_RUN_TIMEOUT:.0f}s; "
            f"its output:\n{_tail(log)}"
        )
    else:
        if code != 0:
            pytest.fail(f"the final worker exited {code}\n{_tail(log)}")
    final = time.monotonic() - final_began
    print(
        f"  {landed} kills landed on a running worker; final run {final:.1f}s "
        f"({_tail(log, 1)}); {time.monotonic() - began:.1f}s in all"
    )
    found, details = asyncio.run(_check(url, batches))
    problems.extend(found)
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("ERROR", "CRITICAL", "Traceback")):
                problems.append(f"worker output {path.name}: {line}")
    assert landed >= KILLS, f"only {landed} of {KILLS} kills landed on a running worker"
    assert not problems, (
        f"{len(problems)} problems (seed {SEED}):\n"
        + "\n".join(problems[:40])
        + "\nthe first parents concerned:\n"
        + "\n".join(details)
    )
