"""The order aggregate of the brief: Created, then Approved by a user or Rejected.

A pure decider over frozen values: ``decide`` checks the rules and returns events,
``evolve`` folds them. Nothing here touches the store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import ledgerflow

registry = ledgerflow.EventRegistry()


@registry.event("order.created", version=1)
@dataclass(frozen=True)
class Created:
    customer: str
    sku: str
    quantity: int
    amount_cents: int


@registry.event("order.approved", version=1)
@dataclass(frozen=True)
class Approved:
    by: str


@registry.event("order.rejected", version=1)
@dataclass(frozen=True)
class Rejected:
    by: str
    reason: str


OrderEvent = Created | Approved | Rejected


@dataclass(frozen=True)
class Create:
    customer: str
    sku: str
    quantity: int
    amount_cents: int


@dataclass(frozen=True)
class Approve:
    by: str


@dataclass(frozen=True)
class Reject:
    by: str
    reason: str


Command = Create | Approve | Reject


@dataclass(frozen=True)
class Order:
    status: Literal["none", "created", "approved", "rejected"] = "none"
    customer: str = ""
    amount_cents: int = 0
    decided_by: str | None = None
    reason: str | None = None


class OrderRuleError(ledgerflow.LedgerflowError):
    """A command the order's current state does not allow."""


def decide(order: Order, command: Command) -> list[OrderEvent]:
    match command:
        case Create():
            if order.status != "none":
                raise OrderRuleError("the order already exists")
            if command.quantity < 1 or command.amount_cents < 0:
                raise OrderRuleError("quantity must be positive and amount not negative")
            return [Created(command.customer, command.sku, command.quantity, command.amount_cents)]
        case Approve():
            if order.status != "created":
                raise OrderRuleError(f"cannot approve an order that is {order.status}")
            return [Approved(command.by)]
        case Reject():
            if order.status != "created":
                raise OrderRuleError(f"cannot reject an order that is {order.status}")
            return [Rejected(command.by, command.reason)]


def evolve(order: Order, event: OrderEvent) -> Order:
    match event:
        case Created():
            return replace(
                order, status="created", customer=event.customer, amount_cents=event.amount_cents
            )
        case Approved():
            return replace(order, status="approved", decided_by=event.by)
        case Rejected():
            return replace(order, status="rejected", decided_by=event.by, reason=event.reason)


ORDER: ledgerflow.Aggregate[Order, Command, OrderEvent] = ledgerflow.Aggregate(
    name="order",
    initial=Order(),
    decide=decide,
    evolve=evolve,
    state_type=Order,
    snapshot_every=50,
)
