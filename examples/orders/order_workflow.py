"""The order process of the brief as a durable saga.

    create order -> wait for a user's approval (auto-reject after 3 days)
    -> reserve stock -> charge the card -> create a purchase order in the ERP

The order itself is the event-sourced aggregate of ``order.py`` (stream
``order-<id>``: Created, then Approved or Rejected by a named user); the process
around it is the workflow below (stream ``wf-<id>``). Reserving stock and charging
the card carry compensations: when the ERP fails for good, the card is refunded and
the stock released, in that order, and the instance ends ``compensated``.

Every step is keyed by ``ledgerflow.current_step().idempotency_key``, the same on
each attempt and replay, so the fakes below (and real systems) apply it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from erp import FakeErp, PurchaseOrder
from order import ORDER, Approve, Command, Create, Order, OrderEvent, OrderRuleError, Reject

import ledgerflow

__all__ = [
    "APPROVAL_TIMEOUT",
    "AUTO_REJECTER",
    "ERP_POLICY",
    "Approval",
    "OrderInput",
    "OrderResult",
    "Payments",
    "Systems",
    "Warehouse",
    "order_workflow",
    "systems",
    "use_systems",
]

APPROVAL_TIMEOUT = timedelta(days=3)
AUTO_REJECTER = "auto-reject"
"""Who the ledger names as having rejected an order nobody decided on in time."""
ERP_POLICY = ledgerflow.Policy(
    retry=ledgerflow.Retry(max_attempts=3, initial_interval=0.02, multiplier=2.0, jitter=0.0),
    breaker=ledgerflow.Breaker(
        consecutive_failures=None, failure_rate=0.9, min_calls=8, window=60, open_for=30
    ),
    rate_limit=ledgerflow.RateLimit(rate=20, burst=100),
)
"""The ERP's policy (``Engine(policies={"erp": ERP_POLICY})``): three attempts; a
breaker that opens when 90 % of at least 8 calls within a minute fail (an ERP that is
down, not one that is flaky) and refuses calls for 30 s; at most 20 calls a second
after a burst of 100. ``ErpRejected`` says itself that it is not worth retrying. Change
it at run time with ``ledgerflow policy set erp ...``."""


# -- values in and out ----------------------------------------------------------------


@dataclass(frozen=True)
class OrderInput:
    order_id: str
    customer: str
    sku: str
    quantity: int
    amount_cents: int


@dataclass(frozen=True)
class Approval:
    """The payload of the ``approval`` signal: who decided, and what."""

    approver: str
    decision: Literal["approve", "reject"]
    reason: str | None = None


@dataclass(frozen=True)
class OrderResult:
    order_id: str
    status: Literal["placed", "rejected"]
    decided_by: str
    reason: str | None = None
    reservation: str | None = None
    charge: str | None = None
    purchase_order: str | None = None


# -- the outside world: fakes, each idempotent on the step's key ----------------------


def _ref(prefix: str, key: str) -> str:
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:8].upper()


class OutOfStock(Exception):
    pass


class Warehouse:
    def __init__(self, stock: dict[str, int] | None = None) -> None:
        self.stock: dict[str, int] = dict(stock or {})
        self.reserved: dict[str, tuple[str, int]] = {}
        """Open reservations: id -> (sku, quantity)."""
        self.released: set[str] = set()

    def reserve(self, key: str, sku: str, quantity: int) -> str:
        reservation = _ref("RSV-", key)
        if reservation in self.reserved or reservation in self.released:
            return reservation
        if self.stock.get(sku, 0) < quantity:
            raise OutOfStock(f"{sku}: {self.stock.get(sku, 0)} left, {quantity} wanted")
        self.stock[sku] -= quantity
        self.reserved[reservation] = (sku, quantity)
        return reservation

    def release(self, reservation: str) -> None:
        held = self.reserved.pop(reservation, None)
        if held is not None:  # releasing twice is releasing once
            sku, quantity = held
            self.stock[sku] += quantity
            self.released.add(reservation)


class Payments:
    def __init__(self) -> None:
        self.charges: dict[str, int] = {}
        """Charge id -> amount in cents."""
        self.refunds: dict[str, str] = {}
        """Charge id -> refund id."""

    def charge(self, key: str, customer: str, amount_cents: int) -> str:
        charge = _ref("CH-", key)
        self.charges.setdefault(charge, amount_cents)
        return charge

    def refund(self, charge: str) -> str:
        if charge not in self.charges:
            raise KeyError(f"no charge {charge}")
        return self.refunds.setdefault(charge, _ref("RF-", charge))


@dataclass
class Systems:
    """What the steps talk to. The demo and tests install their own with
    ``use_systems``; replaying a history needs none."""

    orders: ledgerflow.Repository[Order, Command, OrderEvent] | None = None
    warehouse: Warehouse = field(default_factory=Warehouse)
    payments: Payments = field(default_factory=Payments)
    erp: FakeErp = field(default_factory=FakeErp)

    @classmethod
    def on(
        cls,
        store: ledgerflow.EventStore,
        *,
        erp: FakeErp,
        stock: dict[str, int] | None = None,
    ) -> Systems:
        return cls(ledgerflow.Repository(store, ORDER), Warehouse(stock), Payments(), erp)


_systems: Systems | None = None


def use_systems(installed: Systems) -> Systems:
    global _systems
    _systems = installed
    return installed


def systems() -> Systems:
    if _systems is None:
        raise RuntimeError("no systems installed: call order_workflow.use_systems(...) first")
    return _systems


def _orders() -> ledgerflow.Repository[Order, Command, OrderEvent]:
    orders = systems().orders
    if orders is None:
        raise RuntimeError("the installed systems have no order repository")
    return orders


# -- steps ----------------------------------------------------------------------------


@ledgerflow.step(name="create_order", retry=ledgerflow.RetryPolicy(non_retryable=(OrderRuleError,)))
async def create_order(order: OrderInput) -> int:
    """Record ``order.created``; returns the order stream's version."""
    orders = _orders()
    loaded = await orders.load(order.order_id)
    if loaded.state.status != "none":  # recorded by an earlier attempt
        return loaded.version
    saved, _ = await orders.handle(
        order.order_id,
        Create(order.customer, order.sku, order.quantity, order.amount_cents),
        metadata=ledgerflow.Metadata(actor="shop", correlation_id=order.order_id),
    )
    return saved.version


@ledgerflow.step(
    name="record_decision", retry=ledgerflow.RetryPolicy(non_retryable=(OrderRuleError,))
)
async def record_decision(order: OrderInput, approval: Approval) -> str:
    """Record the approver's decision on the order; returns the order's status."""
    orders = _orders()
    loaded = await orders.load(order.order_id)
    if loaded.state.status != "created":  # decided by an earlier attempt
        return loaded.state.status
    command: Approve | Reject
    if approval.decision == "approve":
        command = Approve(approval.approver)
    else:
        command = Reject(approval.approver, approval.reason or "rejected")
    saved, _ = await orders.handle(
        order.order_id,
        command,
        metadata=ledgerflow.Metadata(
            actor=approval.approver,
            correlation_id=order.order_id,
            causation_id=ledgerflow.current_step().idempotency_key,
            reason=approval.reason,
        ),
    )
    return saved.state.status


@ledgerflow.step(name="reserve_stock", retry=ledgerflow.RetryPolicy(non_retryable=(OutOfStock,)))
async def reserve_stock(order: OrderInput) -> str:
    key = ledgerflow.current_step().idempotency_key
    return systems().warehouse.reserve(key, order.sku, order.quantity)


async def release_stock(order: OrderInput, result: str) -> None:
    """Compensates ``reserve_stock``: ``result`` is the reservation it made."""
    systems().warehouse.release(result)


@ledgerflow.step(name="charge_card")
async def charge_card(order: OrderInput) -> str:
    key = ledgerflow.current_step().idempotency_key
    return systems().payments.charge(key, order.customer, order.amount_cents)


async def refund_card(order: OrderInput, result: str) -> str:
    """Compensates ``charge_card``: ``result`` is the charge id to refund."""
    return systems().payments.refund(result)


@ledgerflow.step(name="create_purchase_order", policy="erp")
async def create_purchase_order(order: OrderInput) -> PurchaseOrder:
    return systems().erp.create_purchase_order(
        ledgerflow.current_step().idempotency_key,
        order_id=order.order_id,
        customer=order.customer,
        sku=order.sku,
        quantity=order.quantity,
        amount_cents=order.amount_cents,
    )


# -- the workflow ---------------------------------------------------------------------


@ledgerflow.workflow(name="order", version=1)
async def order_workflow(ctx: ledgerflow.WorkflowContext, order: OrderInput) -> OrderResult:
    ctx.expose({"stage": "created"})
    await ctx.step(create_order, order)

    ctx.expose({"stage": "awaiting approval"})
    approval = await ctx.wait_for_signal("approval", Approval, timeout=APPROVAL_TIMEOUT)
    if approval is None:
        days = APPROVAL_TIMEOUT.days
        approval = Approval(AUTO_REJECTER, "reject", f"no decision within {days} days")
    await ctx.step(record_decision, order, approval)
    if approval.decision == "reject":
        ctx.expose({"stage": "rejected"})
        return OrderResult(order.order_id, "rejected", approval.approver, approval.reason)

    ctx.expose({"stage": "fulfilling"})
    reservation = await ctx.step(reserve_stock, order, compensate=release_stock)
    charge = await ctx.step(charge_card, order, compensate=refund_card)
    # If the ERP fails for good this raises: the card is refunded, then the stock
    # released, and the instance ends "compensated".
    purchase = await ctx.step(create_purchase_order, order)

    ctx.expose({"stage": "placed"})
    return OrderResult(
        order.order_id,
        "placed",
        approval.approver,
        reservation=reservation,
        charge=charge,
        purchase_order=purchase.number,
    )
