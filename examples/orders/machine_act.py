"""The demo's third act: the same order process as a state machine.

``order_machine.ORDER_MACHINE`` was verified when the engine registered it (an unsound
definition is refused). Three orders move event by event (``engine.execute``): one is
approved, reserved, charged and placed; one is sent ``charge`` before anyone approved
it, which its state refuses, with the events it accepts and nothing recorded, and is
then rejected; one meets the ERP down for good at ``place``, so its charge is refunded
and its stock released, newest first, and it ends ``compensated``.
"""

from __future__ import annotations

import os
from pathlib import Path

from erp import FakeErp
from order_machine import ORDER_MACHINE
from order_workflow import OrderInput
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import ledgerflow

__all__ = ["state_machine_act"]

HERE = Path(__file__).resolve().parent
"""Where the machine's module is imported from (``ledgerflow diagram`` imports it from
the directory it runs in)."""

WAIT = 30.0
"""Seconds one event may take before the demo gives up (never a speed bound)."""


async def state_machine_act(
    engine: ledgerflow.Engine, erp: FakeErp, run: str, console: Console, url: str
) -> None:
    console.rule("act 3: the same process as a state machine")
    report = ledgerflow.verify_machine(ORDER_MACHINE)
    console.print(
        f"{ORDER_MACHINE.name} v{ORDER_MACHINE.version}: "
        f"{'sound' if report.ok else 'NOT SOUND'} ({report.configurations} configurations "
        "explored: every order can end, no deadlock, no dead transition, placed orders "
        "were approved)"
    )
    orders = {
        plan: OrderInput(f"{run}-sm-{plan}", "acme", "SKU-DESK", 1, 45_000)
        for plan in ("placed", "refused", "failing")
    }
    for order in orders.values():
        await engine.start(ORDER_MACHINE, order, id=order.order_id)

    placed = orders["placed"].order_id
    await engine.execute(placed, "approve", {"approver": "alice"}, actor="alice", timeout=WAIT)
    for event in ("reserve", "charge", "place"):
        await engine.execute(placed, event, actor="fulfilment", timeout=WAIT)

    refused = orders["refused"].order_id
    try:
        await engine.execute(refused, "charge", timeout=WAIT)
    except ledgerflow.InvalidTransition as exc:
        console.print(f"refused, nothing recorded: {escape(str(exc))}")
    await engine.execute(
        refused, "reject", {"approver": "bob", "reason": "too expensive"}, timeout=WAIT
    )

    failing = orders["failing"].order_id
    await engine.execute(failing, "approve", {"approver": "bob"}, timeout=WAIT)
    await engine.execute(failing, "reserve", timeout=WAIT)
    await engine.execute(failing, "charge", timeout=WAIT)
    erp.failure_rate = 1.0
    try:
        await engine.execute(failing, "place", timeout=WAIT)
    except ledgerflow.TransitionFailedError as exc:
        console.print(f"the ERP failed for good: {escape(str(exc))}")
    finally:
        erp.failure_rate = 0.0

    table = Table(title="orders of act 3 (state machine)")
    for column in ("order", "state", "states it went through"):
        table.add_column(column, overflow="fold")
    for order in orders.values():
        state = await engine.machine_state(order.order_id)
        table.add_row(escape(order.order_id), state.state, " -> ".join(state.visited))
    console.print(table)
    console.print(
        f"[dim]draw one: cd {escape(str(HERE))} && ledgerflow diagram "
        f"order_machine:ORDER_MACHINE --instance {escape(failing)} "
        f"--db {escape(_absolute(url))}[/]",
        soft_wrap=True,
    )


def _absolute(url: str) -> str:
    """A SQLite URL with a relative path, made absolute: read from another directory."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(url.removeprefix("sqlite:///"))
    return url
