"""The order's life as types (typestate): an illegal transition is a type error.

``Order[Created].approve(...)`` returns an ``Order[Approved]``; ``approve`` on an
``Order[Rejected]`` does not type-check under ``mypy --strict``, so a code path that
would approve a rejected order fails in review, not in production. The phase is a
type parameter only (it costs nothing at run time); the methods say, through the type
of ``self``, in which phase they may be called.

This is the compile-time half of the order process; its run-time half is the state
machine (``ledgerflow.Machine``, verified with ``ledgerflow verify``) or the saga in
``order_workflow.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Approved", "Cancelled", "Created", "Order", "Placed", "Rejected", "new_order"]


class Created:
    """Phase: created, waiting for a decision."""


class Approved:
    """Phase: approved by a person, not yet placed."""


class Rejected:
    """Phase: rejected (final)."""


class Placed:
    """Phase: placed with the ERP (final)."""


class Cancelled:
    """Phase: cancelled after approval (final)."""


Phase = TypeVar("Phase", Created, Approved, Rejected, Placed, Cancelled)


@dataclass(frozen=True)
class Order(Generic[Phase]):
    order_id: str
    customer: str
    amount_cents: int
    decided_by: str | None = None
    reason: str | None = None
    purchase_order: str | None = None

    def approve(self: Order[Created], by: str) -> Order[Approved]:
        return Order[Approved](self.order_id, self.customer, self.amount_cents, decided_by=by)

    def reject(self: Order[Created], by: str, reason: str) -> Order[Rejected]:
        return Order[Rejected](
            self.order_id, self.customer, self.amount_cents, decided_by=by, reason=reason
        )

    def place(self: Order[Approved], purchase_order: str) -> Order[Placed]:
        return Order[Placed](
            self.order_id,
            self.customer,
            self.amount_cents,
            decided_by=self.decided_by,
            purchase_order=purchase_order,
        )

    def cancel(self: Order[Approved], reason: str) -> Order[Cancelled]:
        return Order[Cancelled](
            self.order_id,
            self.customer,
            self.amount_cents,
            decided_by=self.decided_by,
            reason=reason,
        )


def new_order(order_id: str, customer: str, amount_cents: int) -> Order[Created]:
    return Order[Created](order_id, customer, amount_cents)
