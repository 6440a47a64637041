"""The process that ``test_child_crash`` kills with SIGKILL.

Run as ``python tests/_child_crash_worker.py DB_URL N BATCHES``: it opens an Engine
on the ledger at ``DB_URL`` (SQLite or PostgreSQL, default concurrency), starts the
parents ``b0-p-0`` .. ``b0-p-{N-1}``, then those of batch ``b1`` and so on up to
batch ``BATCHES - 1``, one after the other (starting is idempotent on the id, so a
restart gets the handles of the parents an earlier, killed run started), each of
which starts a child (``<parent id>.1``) with one fast step, and exits 0 once every
parent has finished. It prints how long starting them took and when it was done.

Its lease is ``LEDGERFLOW_CRASH_LEASE`` seconds (default 0.5): the next worker reaps a
killed one once its last heartbeat is older than that (ADR 009).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import ledgerflow as lf

PARENT_NAME = "child-crash-parent"
CHILD_NAME = "child-crash-child"


@dataclass(frozen=True)
class Job:
    n: int


def label(job: Job) -> str:
    return child_result(job.n)


def child_id(parent_id: str) -> str:
    """The id ``ctx.child`` gives the child: ``<parent id>.<seq>``, seq 1 here."""
    return f"{parent_id}.1"


def parent_ids(count: int, batches: int) -> list[str]:
    return [f"b{b}-p-{n}" for b in range(batches) for n in range(count)]


def number(parent_id: str) -> int:
    """``n`` of parent ``b<batch>-p-<n>``: its input."""
    return int(parent_id.rsplit("-", 1)[1])


def child_result(n: int) -> str:
    return f"item-{n}"


def parent_result(n: int) -> str:
    return f"parent {n}: item-{n}"


@lf.workflow(name=CHILD_NAME, version=1)
async def child(ctx: lf.WorkflowContext, job: Job) -> str:
    return await ctx.step(label, job)


GATHERED = os.environ.get("LEDGERFLOW_CHILD_CRASH_GATHER") == "1"
"""The parent awaits its child together with a short timer (``asyncio.gather``): a
pass ends with both waits held (ADR 025), kill -9 or not."""


@lf.workflow(name=PARENT_NAME, version=1)
async def parent(ctx: lf.WorkflowContext, job: Job) -> str:
    if GATHERED:
        made, _ = await asyncio.gather(ctx.child(child, job), ctx.sleep(0.05))
    else:
        made = await ctx.child(child, job)
    return f"parent {job.n}: {made}"


WORKFLOWS = (parent, child)


async def main(db_url: str, count: int, batches: int) -> None:
    began = time.monotonic()
    ids = parent_ids(count, batches)
    lease = timedelta(seconds=float(os.environ.get("LEDGERFLOW_CRASH_LEASE", "0.5")))
    async with lf.Engine(db_url, workflows=WORKFLOWS, lease=lease) as engine:
        handles = [await engine.start(parent, Job(number(i)), id=i) for i in ids]
        print(f"started {len(ids)} parents in {time.monotonic() - began:.2f}s", flush=True)
        results = await asyncio.gather(*(h.result() for h in handles))
    wrong = [r for i, r in zip(ids, results, strict=True) if r != parent_result(number(i))]
    print(
        f"finished {len(results)} parents in {time.monotonic() - began:.2f}s; "
        f"{len(wrong)} wrong results {wrong[:5]}",
        flush=True,
    )
    if wrong:
        sys.exit(3)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _child_crash_worker.py DB_URL N BATCHES")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
