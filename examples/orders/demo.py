"""`make demo`: a batch of orders through the order saga on embedded SQLite.

Each order is created, waits for a user's approval, then reserves stock, charges the
card and creates a purchase order in a fake ERP that fails at a configurable rate.
Users approve most orders and reject a few; one order is never answered and is
rejected automatically once its three days are up (on a simulated clock, so the
demo does not wait days). Where the ERP fails for good the saga refunds the card
and releases the stock. The demo prints each order's outcome, the history of one
order, and then verifies the hash chain of the whole ledger.

    python examples/orders/demo.py sqlite:///ledgerflow.db [--erp-failure-rate 0.5]

Outcomes depend only on ``--seed`` and ``--erp-failure-rate``; every run uses new
order ids, so running it again on the same database appends to the same ledger.

The three simulated days lie in the past: a run's clock starts that far back, its
orders are created and decided then, and the unanswered one is rejected at the wall
clock's present. So nothing is ever dated later than the moment it was written, and
runs on one database may follow each other at once. Such runs overlap in simulated
time: across runs, the ledger's timestamps do not rise with its positions, and the
positions give its order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import uuid4

import msgspec
import read_model
from erp import CATALOG, FakeErp
from machine_act import state_machine_act
from order import registry
from order_machine import ORDER_MACHINE
from order_workflow import (
    APPROVAL_TIMEOUT,
    ERP_POLICY,
    Approval,
    OrderInput,
    OrderResult,
    Systems,
    order_workflow,
    use_systems,
)
from outage import erp_outage
from read_model import ORDER_VIEW
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import ledgerflow

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=120)  # a log or a pipe: no terminal to fit
WIDE = 110
"""Consoles at least this wide get every column."""
STATUS_ORDER = {"placed": 0, "rejected": 1, "compensated": 2}

ORDERS = 12
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli", "stark"]
APPROVERS = ["alice", "bob", "carol"]
REJECTIONS = ["credit limit exceeded", "customer on hold", "duplicate order"]
DEFAULT_ERP_FAILURE_RATE = 0.5
DEFAULT_SEED = 8
WAIT = 30.0
"""Seconds any one order may take to reach its outcome before the demo gives up."""
OUTAGE_ROOM = timedelta(minutes=2)
"""Act 1 ends this long before the wall clock's now: act 2 spends it (the breaker's
30 s and the retries after), so nothing is ever dated after it was written."""
SIMULATED = APPROVAL_TIMEOUT + OUTAGE_ROOM + timedelta(minutes=1)
"""How far back a run's clock starts: just past the approval timeout."""

Plan = Literal["approve", "reject", "timeout"]


@dataclass(frozen=True)
class Planned:
    input: OrderInput
    plan: Plan
    approver: str
    reason: str | None


@dataclass(frozen=True)
class Outcome:
    planned: Planned
    status: str
    """placed, rejected, or how the instance ended otherwise (compensated, ...)."""
    decided_by: str
    detail: str


def make_batch(run: str, seed: int) -> list[Planned]:
    """The orders and what their approvers will do: fixed by ``seed``."""
    rng = random.Random(seed)
    plans: list[Plan] = ["timeout", "reject", "reject"]
    plans += ["approve"] * (ORDERS - len(plans))
    rng.shuffle(plans)
    batch = []
    for n, plan in enumerate(plans, start=1):
        order = OrderInput(
            order_id=f"{run}-{n:02d}",
            customer=rng.choice(CUSTOMERS),
            sku=rng.choice(sorted(CATALOG)),
            quantity=rng.randint(1, 5),
            amount_cents=rng.randint(2_000, 90_000),
        )
        approver = APPROVERS[n % len(APPROVERS)]
        reason = rng.choice(REJECTIONS) if plan == "reject" else None
        batch.append(Planned(order, plan, approver, reason))
    return batch


async def waiting_for_approval(engine: ledgerflow.Engine, workflow_id: str) -> None:
    """Until the order records its wait (and so its deadline) or ends otherwise."""
    async with asyncio.timeout(WAIT):
        while True:
            described = await engine.describe(workflow_id)
            if described.waiting_for == "signal 'approval'" or described.status != "running":
                return
            await asyncio.sleep(0.01)


async def outcome(engine: ledgerflow.Engine, planned: Planned) -> Outcome:
    workflow_id = planned.input.order_id
    try:
        result: OrderResult = await engine.handle(workflow_id, OrderResult).result(timeout=WAIT)
    except ledgerflow.WorkflowFailedError as failed:
        return Outcome(planned, failed.status, planned.approver, await undone(engine, failed))
    if result.status == "placed":
        detail = f"{result.purchase_order}"
    else:
        detail = result.reason or ""
    return Outcome(planned, result.status, result.decided_by, detail)


async def undone(engine: ledgerflow.Engine, failed: ledgerflow.WorkflowFailedError) -> str:
    """Which step failed and what the compensations undid, read from the history."""
    results: dict[str, Any] = {}
    cause = f"{failed.error_type}: {failed.message}"
    reverted = []
    for event in await engine.history(failed.workflow_id):
        data = msgspec.to_builtins(event.data)
        if event.type == "wf.step_done":
            results[data["name"]] = data["result"]
        elif event.type == "wf.step_failed":
            cause = f"{data['name']} failed ({data['error_type']})"
        elif event.type == "wf.compensation_done":
            verb = {"charge_card": "refunded", "reserve_stock": "released"}.get(
                data["name"], "undid"
            )
            reverted.append(f"{verb} {results.get(data['name'], data['name'])}")
    return "; ".join([cause, *reverted])


def outcome_table(run: str, outcomes: Sequence[Outcome], erp: FakeErp, *, wide: bool) -> Table:
    table = Table(
        title=f"orders of run {run} (ERP failure rate {erp.failure_rate:.0%}, seed {erp.seed})"
    )
    table.add_column("order", no_wrap=True)
    if wide:
        table.add_column("customer", no_wrap=True)
        table.add_column("amount", justify="right", no_wrap=True)
    table.add_column("approver", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("purchase order / reason", overflow="fold", min_width=20)
    table.add_column("ERP\ncalls", justify="right")
    colours = {"placed": "green", "rejected": "yellow"}
    for item in outcomes:
        order = item.planned.input
        colour = colours.get(item.status, "red")
        cells = [order.order_id]
        if wide:
            cells += [order.customer, f"{order.amount_cents / 100:,.2f}"]
        cells += [
            item.decided_by,
            f"[{colour}]{item.status}[/]",
            escape(item.detail),
            str(erp.calls.get(order.order_id, 0) or ""),
        ]
        table.add_row(*cells)
    return table


def _detail(data: dict[str, Any]) -> str:
    fields = []
    for key, value in data.items():
        if key in {"seq", "name"} or value is None:
            continue
        if key.endswith("_us") and isinstance(value, int):
            moment = datetime.fromtimestamp(value / 1_000_000, UTC)
            fields.append(f"{key.removesuffix('_us')}={moment:%Y-%m-%d %H:%M}")
        else:
            fields.append(f"{key}={msgspec.json.encode(value).decode()}")
    return ", ".join(fields)


def history_table(
    workflow_id: str, events: Sequence[ledgerflow.RecordedEvent], *, wide: bool
) -> Table:
    table = Table(title=f"history of order {workflow_id} (stream wf-{workflow_id})")
    table.add_column("v", justify="right", no_wrap=True)
    if wide:
        table.add_column("recorded at", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("name", no_wrap=True)
    table.add_column("data", overflow="fold", min_width=30 if wide else None)
    if wide:
        table.add_column("hash", no_wrap=True)
    for event in events:
        data = msgspec.to_builtins(event.data)
        cells = [str(event.version)]
        if wide:
            cells.append(f"{event.recorded_at:%m-%d %H:%M:%S}")
        cells += [
            event.type.removeprefix("wf."),
            str(data.get("seq", "")),
            str(data.get("name", "")),
            escape(_detail(data)),
        ]
        if wide:
            cells.append(event.hash.hex()[:8])
        table.add_row(*cells)
    return table


async def order_stream(store: ledgerflow.EventStore, order_id: str) -> str:
    """The order aggregate's own stream, in one line: what happened, and who did it."""
    events = await store.read_stream(f"order-{order_id}")
    said = [f"{event.type} by {event.metadata.actor}" for event in events]
    return f"stream order-{order_id}: " + ", then ".join(said)


def summary(outcomes: Sequence[Outcome], systems: Systems) -> str:
    counts = Counter(item.status for item in outcomes)
    statuses = ", ".join(
        f"{counts[status]} {status}"
        for status in sorted(counts, key=lambda s: (STATUS_ORDER.get(s, len(STATUS_ORDER)), s))
    )
    warehouse, payments, erp = systems.warehouse, systems.payments, systems.erp
    return (
        f"{statuses}\n"
        f"warehouse: {len(warehouse.reserved)} reservations held, "
        f"{len(warehouse.released)} released; "
        f"payments: {len(payments.charges)} charges, {len(payments.refunds)} refunded; "
        f"ERP: {len(erp.purchase_orders)} purchase orders from {sum(erp.calls.values())} calls"
    )


async def read_model_summary(engine: ledgerflow.Engine, ids: Sequence[str]) -> str:
    """What the orders read model (``read_model.py``) says of this batch, once its
    projection has caught up with the ledger."""
    async with asyncio.timeout(30):
        while True:
            row = await engine.store.projection_row(ORDER_VIEW.name)
            if row is not None and row.position >= await engine.store.head_position():
                break
            await asyncio.sleep(0.02)
    model = ledgerflow.ReadModel(engine.store, ORDER_VIEW)
    rows = [r for r in [await model.get(read_model.ORDERS, i) for i in ids] if r is not None]
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    approved_by_alice = sum(1 for r in rows if r["approver"] == "alice")
    counted = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    return (
        f"read model order_view (projection at position {row.position}): {counted}; "
        f"{approved_by_alice} decided by alice"
    )


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", nargs="?", default="sqlite:///ledgerflow.db")
    parser.add_argument(
        "--erp-failure-rate",
        type=float,
        default=DEFAULT_ERP_FAILURE_RATE,
        help="chance that one ERP call fails (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    run = uuid4().hex[:6]
    batch = make_batch(run, args.seed)
    erp = FakeErp(args.erp_failure_rate, args.seed)
    # Start in the past, so that moving on past the approval timeout lands on the
    # present instead of days ahead of it (see the module docstring).
    clock = ledgerflow.ManualClock((datetime.now(UTC) - SIMULATED).replace(microsecond=0))
    engine = ledgerflow.Engine(
        args.url,
        workflows=[order_workflow, ORDER_MACHINE],
        clock=clock,
        registry=registry,
        policies={"erp": ERP_POLICY},
        projections=[ORDER_VIEW],
    )
    systems = use_systems(Systems.on(engine.store, erp=erp, stock=dict.fromkeys(CATALOG, 1_000)))
    async with engine:
        # Each run starts from the shipped policy, whatever act 2 of an earlier run
        # left in force (a change made at run time otherwise outlives restarts).
        await engine.policies.set("erp", ERP_POLICY, reason="the demo starts from its policy")
        for planned in batch:
            await engine.start(order_workflow, planned.input, id=planned.input.order_id)
        for planned in batch:
            await waiting_for_approval(engine, planned.input.order_id)

        decided = [planned for planned in batch if planned.plan != "timeout"]
        for planned in decided:
            decision: Literal["approve", "reject"] = (
                "approve" if planned.plan == "approve" else "reject"
            )
            approval = Approval(planned.approver, decision, planned.reason)
            await engine.signal(planned.input.order_id, "approval", approval)
        outcomes = dict(
            zip(
                [p.input.order_id for p in decided],
                await asyncio.gather(*(outcome(engine, p) for p in decided)),
                strict=True,
            )
        )

        silent = [planned for planned in batch if planned.plan == "timeout"]
        console.print(
            f"[dim]{len(silent)} order(s) got no answer; "
            f"the clock moves on by {APPROVAL_TIMEOUT.days} days...[/]"
        )
        # The clock started SIMULATED before the wall clock's now at the start of the
        # run, so OUTAGE_ROOM before the wall clock's now is past every deadline the
        # batch set.
        clock.set(datetime.now(UTC) - OUTAGE_ROOM)
        for planned in silent:
            outcomes[planned.input.order_id] = await outcome(engine, planned)

        ordered = [outcomes[planned.input.order_id] for planned in batch]
        wide = console.width >= WIDE
        console.print(outcome_table(run, ordered, erp, wide=wide))
        console.print(summary(ordered, systems))
        console.print(await read_model_summary(engine, [p.input.order_id for p in batch]))

        shown = next((o for o in ordered if o.status == "compensated"), ordered[0])
        shown_id = shown.planned.input.order_id
        console.print(history_table(shown_id, await engine.history(shown_id), wide=wide))
        console.print(escape(await order_stream(engine.store, shown_id)))

        await erp_outage(engine, clock, erp, run, args.seed, console)
        await state_machine_act(engine, erp, run, console, args.url)

        report = await ledgerflow.verify_ledger(engine.store)
        verdict = "[green]intact[/]" if report.ok else "[red]TAMPERED[/]"
        console.print(
            f"ledger {args.url}: {report.events_checked} events in {report.streams_checked} "
            f"streams, hash chains {verdict}"
        )
        return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
