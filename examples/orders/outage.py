"""The demo's second act: the ERP goes down for a while.

A burst of approved orders meets an ERP that fails every call. The ERP's policy
(``order_workflow.ERP_POLICY``) opens its circuit breaker once 90 % of at least 8
calls within a minute fail: from then on calls are refused without reaching the ERP,
each refusal recorded in its order's history, and none uses up an attempt. While the
orders wait, an operator changes the policy (more attempts; recorded with who and
why); the running orders' next attempts run under the new version. The ERP comes
back; after the breaker's 30 s a single probe goes through, succeeds and closes it,
and the waiting orders are placed. Every move of the breaker is an event in the
ledger (stream ``breaker-erp``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from erp import CATALOG, FakeErp
from order_workflow import Approval, OrderInput, order_workflow
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import ledgerflow
from ledgerflow.workflow.history import StepAttemptFailed, StepDone

__all__ = ["erp_outage"]

OUTAGE_ORDERS = 12
WAIT = 30.0
"""Seconds the act may take in all before the demo gives up (never a speed bound)."""
STEP = "create_purchase_order"


@dataclass(frozen=True)
class Seen:
    order_id: str
    status: str
    erp_calls: int
    refused: int
    policy_version: int | None


async def _settled(engine: ledgerflow.Engine, order_id: str) -> bool:
    """Ended, or waiting for the ERP's breaker (a refused call, retried later)."""
    described = await engine.describe(order_id)
    if described.status != "running":
        return True
    waiting = described.waiting_for or ""
    return waiting.startswith(f"retry of step {STEP!r}") and "CircuitOpenError" in waiting


async def _until(
    engine: ledgerflow.Engine, ids: Sequence[str], clock: ledgerflow.ManualClock | None = None
) -> None:
    """Until every order has settled (``clock`` None), or ended (the clock moving on a
    second at a time meanwhile, as a waiting world's does)."""
    async with asyncio.timeout(WAIT):
        while True:
            if clock is None:
                if all([await _settled(engine, i) for i in ids]):
                    return
            else:
                described = [await engine.describe(i) for i in ids]
                if all(d.status != "running" for d in described):
                    return
                # Never past the wall clock: nothing is dated after it was written.
                room = datetime.now(UTC) - clock.now()
                if room > timedelta(0):
                    clock.advance(min(timedelta(seconds=1), room))
            await asyncio.sleep(0.05)


async def _seen(engine: ledgerflow.Engine, erp: FakeErp, order_id: str) -> Seen:
    events = [e.data for e in await engine.history(order_id)]
    refused = sum(1 for e in events if isinstance(e, StepAttemptFailed) and e.refused)
    done = [e for e in events if isinstance(e, StepDone) and e.name == STEP]
    status = (await engine.describe(order_id)).status
    version = done[-1].policy_version if done else None
    return Seen(order_id, status, erp.calls.get(order_id, 0), refused, version)


def _orders(run: str, seed: int) -> list[OrderInput]:
    rng = random.Random(seed * 7919)
    return [
        OrderInput(
            order_id=f"{run}-x{n:02d}",
            customer=f"outage-{n}",
            sku=rng.choice(sorted(CATALOG)),
            quantity=rng.randint(1, 3),
            amount_cents=rng.randint(2_000, 50_000),
        )
        for n in range(1, OUTAGE_ORDERS + 1)
    ]


async def erp_outage(
    engine: ledgerflow.Engine,
    clock: ledgerflow.ManualClock,
    erp: FakeErp,
    run: str,
    seed: int,
    console: Console,
) -> None:
    console.rule("act 2: the ERP goes down")
    before = (await engine.policies.get("erp")).version
    erp.failure_rate = 1.0
    orders = _orders(run, seed)
    ids = [o.order_id for o in orders]
    for order in orders:
        await engine.start(order_workflow, order, id=order.order_id)
    for order in orders:
        async with asyncio.timeout(WAIT):
            while (await engine.describe(order.order_id)).waiting_for != "signal 'approval'":  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await engine.signal(order.order_id, "approval", Approval("dave", "approve"))
    await _until(engine, ids)
    during = [await _seen(engine, erp, i) for i in ids]
    calls = sum(s.erp_calls for s in during)
    refused = sum(s.refused for s in during)
    ended = sum(s.status != "running" for s in during)
    console.print(
        f"{len(orders)} approved orders met a dead ERP: {calls} calls reached it and failed, "
        f"then the breaker opened and {refused} call(s) were refused without reaching it"
        + (f"; {ended} order(s) had used up their attempts first." if ended else ".")
    )
    changed = await engine.policies.update(
        "erp",
        {"retry.max_attempts": 5, "retry.initial_interval": 0.05},
        reason="ERP maintenance window: be more patient",
        actor="ops@demo",
    )
    console.print(
        f"ops changes policy erp v{before} -> v{changed.version} while the orders wait "
        f"({'; '.join(changed.changes)}), reason: {changed.reason!r}"
    )
    erp.failure_rate = 0.0
    console.print(
        "the ERP is back; 30 s later the breaker half-opens and lets one probe through..."
    )
    clock.advance(timedelta(seconds=31))
    await _until(engine, ids, clock)
    after = [await _seen(engine, erp, i) for i in ids]
    console.print(_outcomes(after))
    console.print(await _moves(engine))


def _outcomes(seen: Sequence[Seen]) -> Table:
    table = Table(title="orders of act 2")
    for column in ("order", "status", "ERP calls", "refused", "placed under policy"):
        table.add_column(column, no_wrap=True)
    for s in seen:
        version = f"erp v{s.policy_version}" if s.policy_version is not None else "-"
        table.add_row(escape(s.order_id), s.status, str(s.erp_calls), str(s.refused), version)
    return table


async def _moves(engine: ledgerflow.Engine) -> Table:
    table = Table(title="stream breaker-erp: every move of the ERP's circuit breaker")
    for column in ("v", "recorded at", "move", "why", "tripped by"):
        table.add_column(column, overflow="fold")
    for event in await engine.store.read_stream("breaker-erp"):
        moved = event.data
        table.add_row(
            str(event.version),
            f"{event.recorded_at:%H:%M:%S.%f}"[:-3],
            f"{moved.previous} -> {moved.state}",
            escape(moved.reason),
            escape(moved.workflow_id or "-"),
        )
    return table
