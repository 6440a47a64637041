"""`make demo`: the order process as an event-sourced aggregate on embedded SQLite.

Creates a batch of orders, approves some and rejects others (as named users, with
reasons in the event metadata), shows one order's history, then verifies the hash
chain of the whole ledger.
"""

from __future__ import annotations

import asyncio
import random
import sys
from uuid import uuid4

from order import ORDER, Approve, Create, OrderRuleError, Reject, registry
from rich.console import Console
from rich.table import Table

import ledgerflow

console = Console()
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli"]
APPROVERS = ["alice", "bob"]


async def main(url: str) -> int:
    async with ledgerflow.open_store(url, registry=registry) as store:
        orders = ledgerflow.Repository(store, ORDER)
        run = uuid4().hex[:6]
        rng = random.Random(42)
        table = Table(title=f"orders of run {run}")
        for column in ("order", "customer", "amount", "outcome", "by", "version"):
            table.add_column(column)
        ids = [f"{run}-{n:02d}" for n in range(1, 9)]
        for order_id in ids:
            who = ledgerflow.Metadata(actor="shop", correlation_id=order_id)
            await orders.handle(
                order_id,
                Create(rng.choice(CUSTOMERS), "SKU-1", rng.randint(1, 5), rng.randint(500, 90_000)),
                metadata=who,
            )
            approver = rng.choice(APPROVERS)
            if rng.random() < 0.7:
                command: Approve | Reject = Approve(approver)
                reason = None
            else:
                reason = "credit limit exceeded"
                command = Reject(approver, reason)
            loaded, _ = await orders.handle(
                order_id,
                command,
                metadata=ledgerflow.Metadata(
                    actor=approver, correlation_id=order_id, reason=reason
                ),
            )
            state = loaded.state
            colour = "green" if state.status == "approved" else "red"
            table.add_row(
                order_id,
                state.customer,
                f"{state.amount_cents / 100:.2f}",
                f"[{colour}]{state.status}[/]",
                state.decided_by or "",
                str(loaded.version),
            )
        console.print(table)

        try:
            await orders.handle(ids[0], Reject("mallory", "changed my mind"))
        except OrderRuleError as exc:
            console.print(f"a second decision on {ids[0]} is refused: [yellow]{exc}[/]")

        history = await store.read_stream(orders.stream_id(ids[0]))
        log = Table(title=f"history of order {ids[0]}")
        for column in ("v", "pos", "type", "data", "actor", "hash"):
            log.add_column(column)
        for event in history:
            log.add_row(
                str(event.version),
                str(event.position),
                event.type,
                repr(event.data),
                event.metadata.actor or "",
                event.hash.hex()[:12],
            )
        console.print(log)

        report = await ledgerflow.verify_ledger(store)
        verdict = "[green]intact[/]" if report.ok else "[red]TAMPERED[/]"
        console.print(
            f"ledger {url}: {report.events_checked} events in {report.streams_checked} "
            f"streams, hash chains {verdict}"
        )
        return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///ledgerflow.db")))
