"""The orders read model: one row per order, kept from the ledger by a projection.

Built from the order aggregate's events (``order-<id>``: created, approved, rejected)
and from how each order's process ended (the code-first workflow's ``wf.finished``,
the state machine's ``sm.transitioned``), so support can ask "which orders did alice
approve", "what is still waiting", "the biggest compensated orders" without reading
any stream:

    ledgerflow projections query orders --app read_model:ORDER_VIEW --where status=placed
    ledgerflow projections query orders --app read_model:ORDER_VIEW --where approver=alice \\
        --order-by amount_cents --desc

The engine of the demo runs it (``Engine(projections=[ORDER_VIEW])``): each batch's
rows and checkpoint commit together, so the read model never counts an order twice
or misses one, whatever crashes.
"""

from __future__ import annotations

from order import Approved, Created, Rejected

import ledgerflow

__all__ = ["ORDERS", "ORDER_VIEW"]

ORDERS = ledgerflow.Table(
    "orders",
    key="order_id",
    columns={
        "order_id": str,
        "customer": str,
        "sku": str,
        "quantity": int,
        "amount_cents": int,
        "status": str,
        "approver": str | None,
        "reason": str | None,
    },
    indexes=("status", "customer", "approver"),
)

ORDER_VIEW = ledgerflow.Projection("order_view", tables=[ORDERS])

_AGGREGATE = "order-"
_PROCESS = "wf-"


@ORDER_VIEW.on(Created)
def created(event: ledgerflow.RecordedEvent, view: ledgerflow.View) -> None:
    data: Created = event.data
    view.put(
        ORDERS,
        {
            "order_id": event.stream_id.removeprefix(_AGGREGATE),
            "customer": data.customer,
            "sku": data.sku,
            "quantity": data.quantity,
            "amount_cents": data.amount_cents,
            "status": "awaiting approval",
        },
    )


@ORDER_VIEW.on(Approved)
def approved(event: ledgerflow.RecordedEvent, view: ledgerflow.View) -> None:
    order_id = event.stream_id.removeprefix(_AGGREGATE)
    view.update(ORDERS, order_id, status="approved", approver=event.data.by)


@ORDER_VIEW.on(Rejected)
def rejected(event: ledgerflow.RecordedEvent, view: ledgerflow.View) -> None:
    order_id = event.stream_id.removeprefix(_AGGREGATE)
    view.update(
        ORDERS, order_id, status="rejected", approver=event.data.by, reason=event.data.reason
    )


@ORDER_VIEW.on("wf.finished")
async def finished(event: ledgerflow.RecordedEvent, view: ledgerflow.View) -> None:
    """How an order's process ended (other workflows' ends are not orders: no row)."""
    order_id = event.stream_id.removeprefix(_PROCESS)
    if await view.get(ORDERS, order_id) is None:
        return
    ended = event.data
    result = ended.result if isinstance(ended.result, dict) else {}
    if ended.status == "completed":
        status = str(result.get("status") or result.get("state") or "completed")
    else:
        status = str(ended.status)
    view.update(ORDERS, order_id, status=status)


@ORDER_VIEW.on("sm.transitioned")
async def moved(event: ledgerflow.RecordedEvent, view: ledgerflow.View) -> None:
    """The state-machine form: its state is the order's status as it moves."""
    order_id = event.stream_id.removeprefix(_PROCESS)
    if event.data.seq == 1 or await view.get(ORDERS, order_id) is None:
        return
    view.update(ORDERS, order_id, status="+".join(event.data.marking))
