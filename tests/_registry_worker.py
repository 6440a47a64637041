"""The workflow of ``test_workers_registry``'s kill -9 test, in a module of its own so
that a ``ledgerflow worker --app tests._registry_worker`` process and the test's own
engine run the same definition (and the worker imports nothing from pytest).

Its one step stalls for a minute in a process whose environment sets
``LEDGERFLOW_TEST_STALL`` (the worker the test kills, so it dies holding the
instances) and returns at once anywhere else (the engine that takes them over).
"""

from __future__ import annotations

import os
import time

import ledgerflow as lf

STALL = "LEDGERFLOW_TEST_STALL"


def work(n: int) -> int:
    if os.environ.get(STALL):
        time.sleep(60)
    return n * 10


@lf.workflow(name="registry.stall", version=1)
async def stall(ctx: lf.WorkflowContext, n: int) -> int:
    return await ctx.step(work, n)
