"""Replay and determinism: golden histories of the order workflow, replayed by a test.

``tests/golden/order_<path>.json`` were recorded by ``tests/golden/make_golden.py``,
one per path the order saga can take. The current workflow must replay each of them
(running instances recorded those paths); a workflow whose commands differ must fail
with a ``NonDeterminismError`` naming the first command where code and record part.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = ROOT / "examples" / "orders"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from order_workflow import (  # noqa: E402
    APPROVAL_TIMEOUT,
    Approval,
    OrderInput,
    OrderResult,
    charge_card,
    create_order,
    create_purchase_order,
    order_workflow,
    record_decision,
    refund_card,
    release_stock,
    reserve_stock,
)

import ledgerflow  # noqa: E402
from ledgerflow.workflow import replay  # noqa: E402

PATHS = ("placed", "rejected", "timeout", "compensated")


def golden(path: str) -> list[dict[str, Any]]:
    with (GOLDEN / f"order_{path}.json").open() as file:
        history: list[dict[str, Any]] = json.load(file)
    return history


def commands(history: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(seq, event type, name) of each command event, in order."""
    return [
        (event["data"]["seq"], event["type"], event["data"]["name"])
        for event in history
        if "seq" in event["data"]
    ]


# -- the golden files are what their names say --------------------------------------


def test_every_path_has_a_golden_history() -> None:
    assert sorted(p.name for p in GOLDEN.glob("order_*.json")) == sorted(
        f"order_{path}.json" for path in PATHS
    )


@pytest.mark.parametrize(
    ("path", "status", "outcome"),
    [
        ("placed", "completed", "placed"),
        ("rejected", "completed", "rejected"),
        ("timeout", "completed", "rejected"),
        ("compensated", "compensated", None),
    ],
)
def test_golden_history_records_its_path(path: str, status: str, outcome: str | None) -> None:
    history = golden(path)
    finished = history[-1]
    assert finished["type"] == "wf.finished"
    assert finished["data"]["status"] == status
    if outcome is not None:
        assert finished["data"]["result"]["status"] == outcome
    types = [event["type"] for event in history]
    if path == "timeout":
        assert "wf.signal_timed_out" in types
        assert finished["data"]["result"]["decided_by"] == "auto-reject"
    if path == "compensated":
        # Compensations ran in reverse order of their steps: refund, then release.
        assert commands(history)[-3:] == [
            (6, "wf.step_failed", "create_purchase_order"),
            (7, "wf.compensation_done", "charge_card"),
            (8, "wf.compensation_done", "reserve_stock"),
        ]


# -- the current code replays every recorded path ------------------------------------


@pytest.mark.parametrize(
    ("path", "stage"),
    [
        ("placed", "placed"),
        ("rejected", "rejected"),
        ("timeout", "rejected"),
        # The saga failed in the ERP step: the last thing it exposed came before.
        ("compensated", "fulfilling"),
    ],
)
async def test_current_workflow_replays_golden_history(path: str, stage: str) -> None:
    exposed = await replay(order_workflow, golden(path))
    assert exposed == {"stage": stage}


# -- changed code is caught at the first command that differs ------------------------


@ledgerflow.workflow(name="order", version=1)
async def charge_before_reserve(ctx: ledgerflow.WorkflowContext, order: OrderInput) -> OrderResult:
    """The order saga with two steps swapped: charge the card, then reserve stock."""
    ctx.expose({"stage": "created"})
    await ctx.step(create_order, order)
    ctx.expose({"stage": "awaiting approval"})
    approval = await ctx.wait_for_signal("approval", Approval, timeout=APPROVAL_TIMEOUT)
    if approval is None:
        approval = Approval("auto-reject", "reject", "no decision within 3 days")
    await ctx.step(record_decision, order, approval)
    if approval.decision == "reject":
        ctx.expose({"stage": "rejected"})
        return OrderResult(order.order_id, "rejected", approval.approver, approval.reason)
    ctx.expose({"stage": "fulfilling"})
    charge = await ctx.step(charge_card, order, compensate=refund_card)
    reservation = await ctx.step(reserve_stock, order, compensate=release_stock)
    purchase = await ctx.step(create_purchase_order, order)
    ctx.expose({"stage": "placed"})
    return OrderResult(
        order.order_id, "placed", approval.approver, None, reservation, charge, purchase.number
    )


@ledgerflow.workflow(name="order", version=1)
async def renamed_erp_step(ctx: ledgerflow.WorkflowContext, order: OrderInput) -> OrderResult:
    """The order saga with the ERP step recorded under another name."""
    await ctx.step(create_order, order)
    approval = await ctx.wait_for_signal("approval", Approval, timeout=APPROVAL_TIMEOUT)
    if approval is None:
        approval = Approval("auto-reject", "reject", "no decision within 3 days")
    await ctx.step(record_decision, order, approval)
    if approval.decision == "reject":
        return OrderResult(order.order_id, "rejected", approval.approver, approval.reason)
    reservation = await ctx.step(reserve_stock, order, compensate=release_stock)
    charge = await ctx.step(charge_card, order, compensate=refund_card)
    purchase = await ctx.step(create_purchase_order, order, name="erp_purchase_order")
    return OrderResult(
        order.order_id, "placed", approval.approver, None, reservation, charge, purchase.number
    )


@ledgerflow.workflow(name="order", version=1)
async def no_approval(ctx: ledgerflow.WorkflowContext, order: OrderInput) -> OrderResult:
    """The order saga without the approval: every order goes straight to fulfilment."""
    await ctx.step(create_order, order)
    reservation = await ctx.step(reserve_stock, order, compensate=release_stock)
    charge = await ctx.step(charge_card, order, compensate=refund_card)
    purchase = await ctx.step(create_purchase_order, order)
    return OrderResult(
        order.order_id, "placed", "nobody", None, reservation, charge, purchase.number
    )


@ledgerflow.workflow(name="order", version=1)
async def stops_early(ctx: ledgerflow.WorkflowContext, order: OrderInput) -> OrderResult:
    """Creates the order and ends: the recorded history goes on without it."""
    await ctx.step(create_order, order)
    return OrderResult(order.order_id, "rejected", "nobody", "closed")


CHANGED: list[tuple[Any, str, int, str, str]] = [
    # (changed workflow, golden path, seq, recorded, attempted)
    (charge_before_reserve, "placed", 4, "step 'reserve_stock'", "step 'charge_card'"),
    (charge_before_reserve, "compensated", 4, "step 'reserve_stock'", "step 'charge_card'"),
    (
        renamed_erp_step,
        "placed",
        6,
        "step 'create_purchase_order'",
        "step 'erp_purchase_order'",
    ),
    (
        renamed_erp_step,
        "compensated",
        6,
        "step 'create_purchase_order'",
        "step 'erp_purchase_order'",
    ),
    (no_approval, "placed", 2, "signal 'approval'", "step 'reserve_stock'"),
    (no_approval, "timeout", 2, "signal 'approval'", "step 'reserve_stock'"),
    (stops_early, "rejected", 2, "signal 'approval'", "no further command (the workflow ended)"),
]


@pytest.mark.parametrize(
    ("changed", "path", "seq", "recorded", "attempted"),
    CHANGED,
    ids=[f"{c[0].fn.__name__}-{c[1]}" for c in CHANGED],
)
async def test_changed_workflow_fails_replay_at_first_mismatch(
    changed: ledgerflow.WorkflowDefinition[OrderInput, OrderResult],
    path: str,
    seq: int,
    recorded: str,
    attempted: str,
) -> None:
    history = golden(path)
    with pytest.raises(ledgerflow.NonDeterminismError) as caught:
        await replay(changed, history)
    error = caught.value
    assert (error.seq, error.recorded, error.attempted) == (seq, recorded, attempted)
    # The seq and name are those the golden history recorded for that command.
    name = recorded.partition(" ")[2].strip("'")
    assert (seq, name) in {(s, n) for s, _, n in commands(history)}
    assert recorded in str(error)
    assert attempted in str(error)


@pytest.mark.parametrize("path", ["rejected", "timeout"])
async def test_change_on_a_path_not_taken_replays(path: str) -> None:
    # Rejected orders never reached the swapped steps: their histories still replay,
    # which is why each path needs its own golden history.
    assert await replay(charge_before_reserve, golden(path)) == {"stage": "rejected"}


@ledgerflow.workflow(name="order", version=1)
async def no_refund(ctx: ledgerflow.WorkflowContext, order: OrderInput) -> OrderResult:
    """The order saga with the card charge no longer compensated."""
    ctx.expose({"stage": "created"})
    await ctx.step(create_order, order)
    ctx.expose({"stage": "awaiting approval"})
    approval = await ctx.wait_for_signal("approval", Approval, timeout=APPROVAL_TIMEOUT)
    if approval is None:
        approval = Approval("auto-reject", "reject", "no decision within 3 days")
    await ctx.step(record_decision, order, approval)
    if approval.decision == "reject":
        ctx.expose({"stage": "rejected"})
        return OrderResult(order.order_id, "rejected", approval.approver, approval.reason)
    ctx.expose({"stage": "fulfilling"})
    reservation = await ctx.step(reserve_stock, order, compensate=release_stock)
    charge = await ctx.step(charge_card, order)
    purchase = await ctx.step(create_purchase_order, order)
    ctx.expose({"stage": "placed"})
    return OrderResult(
        order.order_id, "placed", approval.approver, None, reservation, charge, purchase.number
    )


async def test_changed_compensations_fail_replay() -> None:
    with pytest.raises(ledgerflow.NonDeterminismError) as caught:
        await replay(no_refund, golden("compensated"))
    assert (caught.value.seq, caught.value.recorded, caught.value.attempted) == (
        7,
        "compensation 'charge_card'",
        "compensation 'reserve_stock'",
    )
