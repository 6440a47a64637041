"""A fake ERP that fails at a configurable rate, as real ones do.

``FakeErp(failure_rate, seed)`` creates purchase orders. Each call fails with
probability ``failure_rate`` (``ErpUnavailable``, worth retrying). Whether a call
fails is a pure function of the seed, the request's content and the attempt number
for that request, so a batch of orders meets the same failures whatever order its
calls arrive in, in every run.

Calls are keyed by an idempotency key (the workflow step's
``ledgerflow.current_step().idempotency_key``): a key that already produced a
purchase order gets that same order back, so a retried or replayed step never
creates a second one.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass

__all__ = ["ErpError", "ErpRejected", "ErpUnavailable", "FakeErp", "PurchaseOrder"]

CATALOG = frozenset({"SKU-CHAIR", "SKU-DESK", "SKU-LAMP", "SKU-SHELF"})


class ErpError(Exception):
    """Anything the ERP answers instead of a purchase order."""


class ErpUnavailable(ErpError):
    """The ERP did not answer in time; trying again may work."""


class ErpRejected(ErpError):
    """The ERP refused the request itself; trying again will not help (retryability
    is data: step retries read ``retryable``, and the ERP's breaker does not count it
    as a failure of the ERP)."""

    retryable = False


@dataclass(frozen=True)
class PurchaseOrder:
    number: str
    order_id: str
    customer: str
    sku: str
    quantity: int
    amount_cents: int


class FakeErp:
    def __init__(self, failure_rate: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError("failure_rate must be between 0 and 1")
        self.failure_rate = failure_rate
        self.seed = seed
        self.purchase_orders: dict[str, PurchaseOrder] = {}
        """By idempotency key: at most one purchase order per key."""
        self.calls: Counter[str] = Counter()
        """Calls per order id, failed ones included."""
        self._attempts: Counter[str] = Counter()

    def create_purchase_order(
        self,
        key: str,
        *,
        order_id: str,
        customer: str,
        sku: str,
        quantity: int,
        amount_cents: int,
    ) -> PurchaseOrder:
        self.calls[order_id] += 1
        self._attempts[key] += 1
        known = self.purchase_orders.get(key)
        if known is not None:
            return known  # a retry of a call that did go through: the same order
        if sku not in CATALOG:
            raise ErpRejected(f"unknown article {sku!r}")
        attempt = self._attempts[key]
        fate = f"{self.seed}|{customer}|{sku}|{quantity}|{amount_cents}|{attempt}"
        draw = random.Random(fate).random()
        if draw < self.failure_rate:
            raise ErpUnavailable("ERP did not answer within 5 s (HTTP 504)")
        number = "PO-" + hashlib.sha256(key.encode()).hexdigest()[:8].upper()
        order = PurchaseOrder(number, order_id, customer, sku, quantity, amount_cents)
        self.purchase_orders[key] = order
        return order
