"""The process ``test_relay_crash`` kills with SIGKILL: a relay publishing a ledger to
NATS JetStream.

Run as ``python tests/_relay_crash_worker.py DB_URL NATS_URL STREAM ROOT MODE`` (MODE:
``pipelined`` or ``one-by-one``, how the bus publishes a stream's messages): it runs a
``Relay`` (small batches, a 0.5 s lease, a short poll) that publishes every
``crash.placed`` event of the ledger to the JetStream stream ``STREAM`` under the
subject root ``ROOT``, and exits 0 once its checkpoint has reached the ledger's head.
Each publish sleeps a little first (``_SlowBus``), so kills land between publishing
a batch and recording its checkpoint as often as elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import ledgerflow as lf
from ledgerflow.bus import JetStreamBus, Message, Relay, Route

TYPE = "crash.placed"


@dataclass(frozen=True)
class Placed:
    n: int


@dataclass(frozen=True)
class Noise:
    n: int


def registry() -> lf.EventRegistry:
    found = lf.EventRegistry()
    found.register(Placed, TYPE)
    found.register(Noise, "crash.noise")
    return found


class _SlowBus(JetStreamBus):
    async def publish(self, messages: Sequence[Message]) -> list[bool]:
        done = await super().publish(messages)
        await asyncio.sleep(random.uniform(0, 0.03))  # a kill may land right here
        return done


async def main(db: str, nats_url: str, stream: str, root: str, pipelined: str) -> int:
    bus = _SlowBus(
        nats_url,
        stream=stream,
        subjects=[f"{root}.>"],
        timeout=2.0,
        pipelined=pipelined == "pipelined",
    )
    await bus.open()
    async with lf.open_store(db, registry=registry()) as store:
        relay = Relay(
            store,
            bus,
            [Route(subject=root + ".{category}.{type}", types={TYPE})],
            batch_size=25,
            lease=timedelta(seconds=0.5),
            poll_interval=0.05,
        )
        relay.start()
        try:
            while True:
                row = await store.projection_row("relay_main")
                if row is not None and row.position >= await store.head_position():
                    return 0
                await asyncio.sleep(0.05)
        finally:
            await relay.stop()
            await bus.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main(*sys.argv[1:6])))
