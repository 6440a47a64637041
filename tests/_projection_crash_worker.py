"""The process that ``test_projection_crash`` kills with SIGKILL, again and again.

``python tests/_projection_crash_worker.py DB_URL OWNER TARGET`` runs a
``ProjectionRunner`` as ``OWNER`` (a short lease, small batches: many commits) for the
projection ``tally``, which keeps a row per stream: how many ``Tick`` events it has
applied (``count``, read then incremented) and the position of the last one
(``last_position``). An event applied twice makes a count too high; a lost one, too
low. ``Noise`` events are not handled (they only move the checkpoint). The handler
sleeps a little now and then, so kills land in the middle of batches, and prints
``handled <position>`` for each event it applies (flushed: a kill loses none of these
lines), ``ERROR`` if it is handed an event its row already counted.

It exits 0 once the projection's checkpoint has reached ``TARGET``, 2 if the projection
recorded a failure; otherwise it runs until it is killed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from dataclasses import dataclass
from datetime import timedelta

import ledgerflow as lf

NAME = "tally"
LEASE = timedelta(seconds=0.5)
BATCH_SIZE = 50
POLL_INTERVAL = 0.05
PAUSE_CHANCE = 0.5
MAX_PAUSE = 0.002


@dataclass(frozen=True)
class Tick:
    n: int


@dataclass(frozen=True)
class Noise:
    n: int


def registry() -> lf.EventRegistry:
    found = lf.EventRegistry()
    found.register(Tick, "crash.tick")
    found.register(Noise, "crash.noise")
    return found


COUNTS = lf.Table(
    "counts",
    key="stream",
    columns={"stream": str, "count": int, "last_position": int},
)
TALLY = lf.Projection(NAME, tables=[COUNTS])


@TALLY.on(Tick)
async def tick(event: lf.RecordedEvent, view: lf.View) -> None:
    row = await view.get(COUNTS, event.stream_id)
    if random.random() < PAUSE_CHANCE:
        await asyncio.sleep(random.uniform(0, MAX_PAUSE))
    if row is None:
        view.put(COUNTS, {"stream": event.stream_id, "count": 1, "last_position": event.position})
    else:
        if row["last_position"] >= event.position:
            print(f"ERROR {event.position} applied again to {row}", flush=True)
        view.update(COUNTS, event.stream_id, count=row["count"] + 1, last_position=event.position)
    print(f"handled {event.position}", flush=True)


async def main(url: str, owner: str, target: int) -> int:
    async with lf.open_store(url, registry=registry()) as store:
        runner = lf.ProjectionRunner(
            store,
            [TALLY],
            owner=owner,
            lease=LEASE,
            batch_size=BATCH_SIZE,
            poll_interval=POLL_INTERVAL,
        )
        runner.start()
        try:
            while True:
                row = await store.projection_row(NAME)
                if row is not None and row.failure is not None:
                    print(f"ERROR the projection failed: {row.failure}", flush=True)
                    return 2
                if row is not None and row.position >= target:
                    print(f"done at {row.position} (epoch {row.epoch})", flush=True)
                    return 0
                await asyncio.sleep(POLL_INTERVAL)
        finally:
            await runner.stop()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _projection_crash_worker.py DB_URL OWNER TARGET")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
