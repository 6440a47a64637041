"""Payload fields without a finite domain, explored over values hypothesis draws
(``verify(sample=N)``, ``Machine(sample=N)``, ``ledgerflow verify --sample``): a
guard over an ``int`` is checked instead of refused, the report says the exploration
covered a sample, and the same seed draws the same values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import strategies as st
from typer.testing import CliRunner

import ledgerflow as lf
from ledgerflow.cli import app
from ledgerflow.statemachine import Data, FindingKind, Machine, Payload, verify


@dataclass(frozen=True)
class Payment:
    amount: int


def payments(
    amounts: st.SearchStrategy[int] | None = None,
    *,
    overlap: bool = True,
    sample: int = 0,
    seed: int = 0,
) -> Machine:
    """Big payments go to review, positive ones are paid: with ``overlap`` the guards
    both hold above 100 (a nondeterminism an int domain hides until values are
    explored). ``amounts``: a strategy the event declares for its field."""
    m = Machine("payments", sample=sample, seed=seed)
    m.event("pay", type=Payment, payload=None if amounts is None else {"amount": amounts})
    m.state("due", initial=True)
    m.state("paid", terminal=True)
    m.state("review", terminal=True)
    m.transition("due", "pay", "review", guard=lambda data, p: p["amount"] >= 100)
    if overlap:
        m.transition("due", "pay", "paid", guard=lambda data, p: p["amount"] > 0)
    else:
        m.transition("due", "pay", "paid", guard=lambda data, p: 0 < p["amount"] < 100)
    return m


def test_without_sampling_a_guard_over_an_unbounded_field_is_reported_unexplored() -> None:
    m = payments()
    report = verify(m)
    assert report.of(FindingKind.GUARD_ERROR)
    assert not report.sampled
    assert "pay.amount (unexplored)" in report.notes[0]


def test_sampled_values_of_the_fields_type_find_what_its_domain_hid() -> None:
    m = payments()
    report = verify(m, sample=40, seed=7)
    assert report.sampled
    assert not report.of(FindingKind.GUARD_ERROR)
    (overlap,) = report.of(FindingKind.NONDETERMINISM)
    # Its counterexample names a sampled value on which both guards hold.
    amount = int(overlap.message.split("pay(amount=")[1].split(")")[0])
    assert amount >= 100
    (said,) = [n for n in report.notes if "sampled, not exhausted" in n]
    assert "pay.amount" in said
    assert "seed 7" in said
    # The same seed draws the same values: the same report.
    again = verify(m, sample=40, seed=7)
    assert again.findings == report.findings
    assert again.notes == report.notes


def test_a_strategy_the_event_declares_is_what_is_sampled() -> None:
    m = payments(st.integers(-5, 500), overlap=False)
    report = verify(m, sample=30)
    assert report.ok, [str(f) for f in report.findings]  # sound, over the sample
    assert report.sampled
    assert any("integers(min_value=-5, max_value=500)" in n for n in report.notes)
    # Unsampled, the declared strategy's field is unexplored, as a typed one is.
    assert verify(m, sample=0).of(FindingKind.GUARD_ERROR)
    # Small amounts only: the review is never reached, and verify says so.
    small = verify(payments(st.integers(1, 99), overlap=False), sample=30)
    assert [f.kind for f in small.findings] == [
        FindingKind.UNREACHABLE_STATE,
        FindingKind.DEAD_TRANSITION,
    ]


def test_the_machine_can_ask_for_sampling_and_registration_uses_it() -> None:
    m = payments(st.integers(-5, 500), overlap=False, sample=20, seed=1)
    assert verify(m).sampled
    lf.Engine("memory://", workflows=[m])  # refused at registration were it unexplored
    unsampled = payments(st.integers(-5, 500), overlap=False)
    with pytest.raises(lf.WorkflowDefinitionError, match="guard"):
        lf.Engine("memory://", workflows=[unsampled])


def test_bad_sampling_settings_are_refused() -> None:
    with pytest.raises(lf.WorkflowDefinitionError, match="sample"):
        Machine("m", sample=-1)
    nothing = payments(st.nothing())
    with pytest.raises(lf.WorkflowDefinitionError, match="drew no values"):
        verify(nothing, sample=5)


MACHINES = """
from dataclasses import dataclass

from ledgerflow.statemachine import Machine


@dataclass(frozen=True)
class Payment:
    amount: int


payments = Machine("payments")
payments.state("due", initial=True)
payments.state("paid", terminal=True)
payments.state("review", terminal=True)
payments.event("pay", type=Payment)
payments.transition("due", "pay", "review", guard=lambda d, p: p["amount"] >= 100)
payments.transition("due", "pay", "paid", guard=lambda d, p: p["amount"] > 0)
"""


def test_the_cli_samples_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sampled_defs.py").write_text(MACHINES)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    plain = runner.invoke(app, ["verify", "sampled_defs:payments", "--json"])
    assert plain.exit_code == 1
    assert {f["kind"] for f in json.loads(plain.stdout)["findings"]} >= {"guard_error"}
    sampled = runner.invoke(
        app, ["verify", "sampled_defs:payments", "--json", "--sample", "40", "--seed", "7"]
    )
    assert sampled.exit_code == 1
    report = json.loads(sampled.stdout)
    assert report["sampled"] is True
    assert {f["kind"] for f in report["findings"]} == {"nondeterminism"}
    text = runner.invoke(
        app, ["verify", "sampled_defs:payments", "--sample", "40"], env={"COLUMNS": "200"}
    )
    assert "sampled, not exhausted" in text.stdout


def big(data: Data, payment: Payment) -> bool:
    """A guard typed with the event's payload type: mypy checks the field it reads."""
    return payment.amount >= 100


def typed(name: str) -> Machine:
    """Big payments to review (a guard typed with ``Payment``), small ones paid (a
    guard reading by attribute, as the typed one does, on an untyped lambda)."""
    m = Machine(name)
    m.event("pay", type=Payment, payload={"amount": [5, 500]})
    m.state("due", initial=True)
    m.state("review", terminal=True)
    m.state("paid", terminal=True)
    m.transition("due", "pay", "review", guard=big)
    m.transition("due", "pay", "paid", guard=lambda data, p: p.amount < 100)
    return m


def test_a_guard_may_read_the_payload_by_attribute_as_its_type_declares() -> None:
    m = typed("typed")
    assert verify(m).ok, [str(f) for f in verify(m).findings]
    view = Payload({"amount": 5})
    assert (view.amount, view["amount"], dict(view)) == (5, 5, {"amount": 5})
    with pytest.raises(AttributeError, match="no field 'cents'"):
        _ = view.cents
    with pytest.raises(AttributeError, match="read-only"):
        view.amount = 6


async def test_at_run_time_the_typed_guard_reads_the_payload_sent() -> None:
    m = typed("typed_run")
    async with lf.Engine("memory://", workflows=[m]) as engine:
        await engine.start(m, None, id="t-1")
        moved = await engine.execute("t-1", "pay", {"amount": 500}, timeout=10)
        small = await engine.start(m, None, id="t-2")
        assert (await engine.execute("t-2", "pay", {"amount": 5}, timeout=10)).state == "paid"
        assert (await small.result(timeout=10)).state == "paid"
    assert moved.state == "review"
