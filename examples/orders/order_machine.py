"""The order process of the brief as a state machine, verified before it runs.

    created --approve--> approved --reserve--> reserved --charge--> charged --place--> placed
       |  \\--reject / expire (3 days)--> rejected
       approved --cancel--> cancelled (stock reserved and failing: cancelled too)
       charge or place fails for good --> compensated (card refunded, stock released)

The same order, warehouse, payments and ERP as the code-first form
(``order_workflow.py``: its ``Systems`` and fakes, each idempotent on the step's key)
and the same ERP policy (``policy="erp"``). Here the process is data: states, events
and guarded transitions, each activity a step. ``ledgerflow verify
order_machine:ORDER_MACHINE`` proves every order can end, and ``ledgerflow diagram``
draws it; ``engine.execute(order_id, "approve", {"approver": "alice"})`` moves one.

What the code-first form says with control flow, the machine says with states: who
may do what, and when, is ``accepts`` of the state an order is in; an event it does
not accept is refused with the events it does (``InvalidTransition``), before
anything is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from erp import PurchaseOrder
from order import Approve, Command, Create, Order, OrderEvent, OrderRuleError, Reject
from order_workflow import (
    APPROVAL_TIMEOUT,
    AUTO_REJECTER,
    OrderInput,
    OutOfStock,
    systems,
)

import ledgerflow
from ledgerflow.statemachine import leads_to

__all__ = ["APPROVERS", "ORDER_MACHINE", "order_of"]

APPROVERS = ("alice", "bob", AUTO_REJECTER)
"""The approvers verification explores (any name is accepted at run time)."""


def order_of(call: ledgerflow.MachineCall) -> OrderInput:
    """The instance's input, typed."""
    return msgspec.convert(call.input, OrderInput)


def _repository() -> ledgerflow.Repository[Order, Command, OrderEvent]:
    orders = systems().orders
    if orders is None:
        raise RuntimeError("the installed systems have no order repository")
    return orders


@ledgerflow.step(
    name="sm.create_order", retry=ledgerflow.RetryPolicy(non_retryable=(OrderRuleError,))
)
async def create_order(call: ledgerflow.MachineCall) -> int:
    """Entering ``created``: record ``order.created`` (once, whatever the attempts)."""
    order = order_of(call)
    loaded = await _repository().load(order.order_id)
    if loaded.state.status != "none":
        return int(loaded.version)
    saved, _ = await _repository().handle(
        order.order_id,
        Create(order.customer, order.sku, order.quantity, order.amount_cents),
        metadata=ledgerflow.Metadata(actor="shop", correlation_id=order.order_id),
    )
    return int(saved.version)


@ledgerflow.step(
    name="sm.record_decision", retry=ledgerflow.RetryPolicy(non_retryable=(OrderRuleError,))
)
async def record_decision(call: ledgerflow.MachineCall) -> str:
    """Record on the order who approved or rejected it (the event names which)."""
    order = order_of(call)
    loaded = await _repository().load(order.order_id)
    if loaded.state.status != "created":
        return str(loaded.state.status)
    approver = str(call.payload.get("approver", AUTO_REJECTER))
    reason = call.payload.get("reason")
    command: Approve | Reject
    if call.event == "approve":
        command = Approve(approver)
    else:
        days = APPROVAL_TIMEOUT.days
        command = Reject(approver, str(reason or f"no decision within {days} days"))
    saved, _ = await _repository().handle(
        order.order_id,
        command,
        metadata=ledgerflow.Metadata(
            actor=approver,
            correlation_id=order.order_id,
            causation_id=ledgerflow.current_step().idempotency_key,
        ),
    )
    return str(saved.state.status)


@ledgerflow.step(name="sm.reserve_stock", retry=ledgerflow.RetryPolicy(non_retryable=(OutOfStock,)))
def reserve_stock(call: ledgerflow.MachineCall) -> str:
    order = order_of(call)
    key = ledgerflow.current_step().idempotency_key
    return systems().warehouse.reserve(key, order.sku, order.quantity)


def release_stock(call: ledgerflow.MachineCall, result: str) -> None:
    """Compensates ``reserve_stock``: ``result`` is the reservation it made."""
    systems().warehouse.release(result)


@ledgerflow.step(name="sm.charge_card")
def charge_card(call: ledgerflow.MachineCall) -> str:
    order = order_of(call)
    key = ledgerflow.current_step().idempotency_key
    return systems().payments.charge(key, order.customer, order.amount_cents)


def refund_card(call: ledgerflow.MachineCall, result: str) -> str:
    """Compensates ``charge_card``: ``result`` is the charge to refund."""
    return systems().payments.refund(result)


@ledgerflow.step(name="sm.create_purchase_order", policy="erp")
def create_purchase_order(call: ledgerflow.MachineCall) -> PurchaseOrder:
    order = order_of(call)
    return systems().erp.create_purchase_order(
        ledgerflow.current_step().idempotency_key,
        order_id=order.order_id,
        customer=order.customer,
        sku=order.sku,
        quantity=order.quantity,
        amount_cents=order.amount_cents,
    )


def build(version: int = 1) -> ledgerflow.Machine:
    m = ledgerflow.Machine(
        "order-machine",
        version=version,
        input=OrderInput,
        data={"approver": (None, *APPROVERS)},
        initial_data={"approver": None},
    )
    m.state(
        "created",
        initial=True,
        on_enter=create_order,
        timeout=APPROVAL_TIMEOUT,
        on_timeout="expire",
    )
    m.state("approved")
    m.state("reserved")
    m.state("charged")
    m.state("placed", terminal=True)
    m.state("rejected", terminal=True)
    m.state("cancelled", terminal=True)
    m.state("compensated", terminal=True)
    m.event("approve", payload={"approver": ("alice", "bob")})
    m.event("reject", payload={"approver": ("alice", "bob"), "reason": ("too expensive",)})

    def decided(data: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
        return {"approver": payload.get("approver", AUTO_REJECTER)}

    m.transition("created", "approve", "approved", update=decided, activity=record_decision)
    m.transition("created", "reject", "rejected", update=decided, activity=record_decision)
    m.transition(
        "created",
        "expire",
        "rejected",
        update=decided,
        activity=record_decision,
        name="auto-reject",
    )
    m.transition(
        "approved",
        "reserve",
        "reserved",
        activity=reserve_stock,
        compensate=release_stock,
        failure="cancelled",
    )
    m.transition("approved", "cancel", "cancelled")
    m.transition(
        "reserved",
        "charge",
        "charged",
        activity=charge_card,
        compensate=refund_card,
        failure="compensated",
    )
    m.transition(
        "charged", "place", "placed", activity=create_purchase_order, failure="compensated"
    )
    # Who approved an order is on record from then on: no order is placed unapproved.
    m.invariant(
        "placed orders were approved",
        lambda state, data: state != "placed" or data["approver"] in ("alice", "bob"),
    )
    m.property(
        "an approved order ends",
        leads_to(
            lambda state, data: state == "approved",
            lambda state, data: state in ("placed", "cancelled", "compensated"),
        ),
    )
    return m


ORDER_MACHINE = build()
"""Register it with the engine (``Engine(workflows=[ORDER_MACHINE])``), which verifies
it first."""
