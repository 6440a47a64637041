"""Record the golden histories of the order workflow, one per path it can take.

    python tests/golden/make_golden.py

Runs ``order_workflow`` (examples/orders) once per path on an in-memory store with a
manual clock and fixed ids, and writes each instance's history, as
``ledgerflow.workflow.export_history`` gives it, to ``tests/golden/order_<path>.json``.
``tests/test_golden_replay.py`` replays them against the current code. Regenerate
only when a change to the workflow is meant to break replay of running instances
(and then give the workflow a new version instead).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples" / "orders"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from erp import CATALOG, FakeErp  # noqa: E402
from order import registry  # noqa: E402
from order_workflow import (  # noqa: E402
    APPROVAL_TIMEOUT,
    Approval,
    OrderInput,
    Systems,
    order_workflow,
    use_systems,
)

import ledgerflow  # noqa: E402
from ledgerflow.workflow import export_history  # noqa: E402

PATHS = ("placed", "rejected", "timeout", "compensated")


def order(path: str) -> OrderInput:
    return OrderInput(f"golden-{path}", "acme", "SKU-DESK", 2, 45_000)


async def waiting_for_approval(engine: ledgerflow.Engine, workflow_id: str) -> None:
    """Signal only once the wait is recorded, so every history has the same shape."""
    async with asyncio.timeout(10):
        while True:
            if (await engine.describe(workflow_id)).waiting_for == "signal 'approval'":
                return
            await asyncio.sleep(0.005)


async def record(path: str) -> list[dict[str, object]]:
    clock = ledgerflow.ManualClock()
    failing = path == "compensated"
    async with ledgerflow.Engine(
        "memory://", workflows=[order_workflow], clock=clock, registry=registry
    ) as engine:
        erp = FakeErp(failure_rate=1.0 if failing else 0.0, seed=0)
        use_systems(Systems.on(engine.store, erp=erp, stock=dict.fromkeys(CATALOG, 10)))
        given = order(path)
        handle = await engine.start(order_workflow, given, id=given.order_id)
        await waiting_for_approval(engine, handle.id)
        decide: dict[str, Callable[[], Awaitable[None]]] = {
            "placed": lambda: handle.signal("approval", Approval("alice", "approve")),
            "compensated": lambda: handle.signal("approval", Approval("alice", "approve")),
            "rejected": lambda: handle.signal(
                "approval", Approval("bob", "reject", "credit limit exceeded")
            ),
        }
        if path in decide:
            await decide[path]()
        else:
            clock.advance(APPROVAL_TIMEOUT + timedelta(minutes=1))
        try:
            await handle.result(timeout=10)
        except ledgerflow.WorkflowFailedError as failed:
            if not failing or failed.status != "compensated":
                raise
        return export_history(await engine.history(handle.id))


async def main() -> None:
    for path in PATHS:
        history = await record(path)
        target = HERE / f"order_{path}.json"
        target.write_text(json.dumps(history, indent=2) + "\n")
        print(f"{target.name}: {len(history)} events")


if __name__ == "__main__":
    asyncio.run(main())
