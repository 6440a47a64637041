"""The public API's types catch wrong calls under ``mypy --strict``.

Workflow code is only run when a pass replays it, so a wrong argument to a step or
a child would otherwise surface days later, inside a running instance. Each line
marked ``# E`` below must be an error; the rest must type-check.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mypy import api

SNIPPET = """
from dataclasses import dataclass

import ledgerflow
import ledgerflow.statemachine
from ledgerflow import WorkflowContext


@dataclass(frozen=True)
class Order:
    sku: str
    amount: int


def reserve(order: Order, quantity: int) -> str:
    return order.sku


async def charge(order: Order) -> int:
    return order.amount


class Payment:
    def execute(self, order: Order) -> int:
        return order.amount

    def compensate(self, order: Order) -> None:
        return None


@ledgerflow.workflow(name="child", version=1)
async def child(ctx: WorkflowContext, n: int) -> str:
    return str(n)


@ledgerflow.workflow(name="typed", version=1)
async def typed(ctx: WorkflowContext, order: Order) -> int:
    good: str = await ctx.step(reserve, order, 2)
    paid: int = await ctx.step(charge, order)
    by_class: int = await ctx.step(Payment(), order)
    kid: str = await ctx.child(child, 3)
    await ctx.step(reserve, order)  # E: too few arguments
    await ctx.step(reserve, order, "2")  # E: wrong argument type
    await ctx.step(charge, "not an order")  # E: wrong argument type
    wrong: str = await ctx.step(charge, order)  # E: the result is an int
    await ctx.child(child, "3")  # E: the child takes an int
    wrong_kid: int = await ctx.child(child, 3)  # E: the child returns a str
    await ctx.step(Payment(), "x")  # E: wrong argument for execute
    return paid + len(good) + by_class + len(kid)


@dataclass(frozen=True)
class Payment2:
    amount: int


def big(data: ledgerflow.statemachine.Data, p: Payment2) -> bool:
    return p.amount >= 100


def misread(data: ledgerflow.statemachine.Data, p: Payment2) -> bool:
    return p.cents >= 100  # E: the payload type has no such field


def notify(call: ledgerflow.MachineCall) -> str:
    return call.instance_id


def undo(call: ledgerflow.MachineCall, result: str) -> None:
    return None


def wrong_activity(order: Order) -> str:
    return order.sku


machine = ledgerflow.Machine("m")
machine.event("pay", type=Payment2, payload={"amount": [5, 500]})
machine.state("due", initial=True, on_enter=notify)
machine.state("review", terminal=True)
machine.state("paid", terminal=True)
machine.transition("due", "pay", "review", guard=big, activity=notify, compensate=undo)
machine.transition("due", "pay", "paid", guard=lambda data, p: p["amount"] < 100)
machine.transition("due", "pay", "paid", activity=wrong_activity)  # E: not a MachineCall
machine.state("x", on_exit=wrong_activity)  # E: not a MachineCall


async def start(engine: ledgerflow.Engine) -> None:
    handle = await engine.start(typed, Order("a", 1), id="t-1")
    result: int = await handle.result()
    await engine.start(typed, "not an order")  # E: wrong input type
    text: str = await handle.result()  # E: the workflow returns an int
    by_name = await engine.start("typed", {"sku": "a", "amount": 1})  # by name: unchecked
"""


@pytest.mark.slow
def test_mypy_strict_refuses_wrong_steps_children_starts_and_activities(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(SNIPPET)
    out, err, _ = api.run(
        [
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(source),
        ]
    )
    flagged = {int(m[1]) for m in re.finditer(r"snippet\.py:(\d+): error", out)}
    lines = SNIPPET.splitlines()
    expected = {n for n, line in enumerate(lines, start=1) if "# E" in line}
    assert expected, "the snippet marks no errors"
    missed = sorted(expected - flagged)
    unexpected = sorted(flagged - expected)
    assert not missed, f"mypy accepted wrong lines {[lines[n - 1] for n in missed]}\n{out}{err}"
    assert not unexpected, f"mypy refused good lines {[lines[n - 1] for n in unexpected]}\n{out}"


TYPESTATE = """
from typestate import Order, Approved, Created, Placed, Rejected, new_order

created: Order[Created] = new_order("o-1", "acme", 1250)
approved: Order[Approved] = created.approve("alice")
placed: Order[Placed] = approved.place("PO-1")
rejected: Order[Rejected] = new_order("o-2", "acme", 10).reject("bob", "credit limit")
cancelled = created.approve("carol").cancel("customer withdrew")
rejected.approve("alice")  # E: a rejected order cannot be approved
placed.cancel("too late")  # E: a placed order cannot be cancelled
created.place("PO-2")  # E: an order is placed only once approved
approved.approve("dave")  # E: approved twice
wrong: Order[Approved] = created  # E: a created order is not an approved one
"""


@pytest.mark.slow
def test_the_order_typestate_makes_illegal_transitions_type_errors(tmp_path: Path) -> None:
    """The pattern of examples/orders/typestate.py (brief §3.1): each line marked
    ``# E`` must fail ``mypy --strict``, and the legal path must type-check."""
    source = tmp_path / "snippet.py"
    source.write_text(TYPESTATE)
    example = Path(__file__).parent.parent / "examples" / "orders"
    out, err = _mypy_with_path(tmp_path, source, example)
    flagged = {int(m[1]) for m in re.finditer(r"snippet\.py:(\d+): error", out)}
    lines = TYPESTATE.splitlines()
    expected = {n for n, line in enumerate(lines, start=1) if "# E" in line}
    missed = sorted(expected - flagged)
    unexpected = sorted(flagged - expected)
    assert not missed, (
        f"mypy accepted illegal transitions {[lines[n - 1] for n in missed]}\n{out}{err}"
    )
    assert not unexpected, f"mypy refused legal lines {[lines[n - 1] for n in unexpected]}\n{out}"


def _mypy_with_path(tmp_path: Path, source: Path, extra: Path) -> tuple[str, str]:
    """mypy --strict on ``source``, with ``extra`` on its module search path."""
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {extra}\n")
    out, err, _ = api.run(
        [
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(source),
        ]
    )
    return out, err
