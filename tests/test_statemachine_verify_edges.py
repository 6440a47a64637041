"""Verifying state machines at the edges of what a definition declares: payload
fields without a domain (however a guard or update reads them), updates that return
something other than the data, temporal predicates that raise, and diagrams of states
whose names are no identifiers."""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ledgerflow as lf
from ledgerflow import WorkflowDefinitionError
from ledgerflow.cli import app
from ledgerflow.statemachine import (
    FindingKind,
    Machine,
    UnexploredFieldError,
    eventually,
    leads_to,
    verify,
)
from ledgerflow.statemachine.definition import UNEXPLORED, Payload
from ledgerflow.statemachine.diagram import dot, mermaid


@dataclass
class Decision:
    approver: str
    amount: int
    urgent: bool = False


VIPS = {"vera"}
LIMITS = {"alice": 100}


def _swallowing(d: Any, p: Any) -> bool:
    """A guard that hides the refusal from verify: still decided on no value."""
    try:
        return p.approver in VIPS
    except Exception:  # noqa: BLE001
        return False


def decide(guard: Callable[[Any, Any], bool]) -> Machine:
    """One typed event whose ``approver`` and ``amount`` have no domain."""
    m = Machine("decide", data={"flagged": [False, True]}, initial_data={"flagged": False})
    m.state("open", initial=True)
    m.state("approved", terminal=True)
    m.state("escalated", terminal=True)
    m.event("decide", type=Decision)
    m.transition("open", "decide", "approved", guard=guard)
    m.transition("open", "give_up", "escalated")
    return m


GUARDS: dict[str, Callable[[Any, Any], bool]] = {
    "compare": lambda d, p: p.amount >= 100,
    "set membership": lambda d, p: p.approver in VIPS,
    "not in": lambda d, p: p.approver not in VIPS,
    "by key": lambda d, p: p["approver"] in VIPS,
    "Mapping.get": lambda d, p: p.get("approver") in VIPS,
    "dict.get": lambda d, p: LIMITS.get(p.approver, 0) >= 50,
    "is None": lambda d, p: p.approver is None,
    "is not None": lambda d, p: p.approver is not None,
    "isinstance": lambda d, p: isinstance(p.amount, bool),
    "truth": lambda d, p: bool(p.approver),
    "len": lambda d, p: len(p.approver) > 3,
    "format": lambda d, p: f"{p.approver}" == "vera",
    "hash": lambda d, p: hash(p.approver) % 2 == 0,
    "getattr default": lambda d, p: getattr(p, "approver", None) is None,
    "caught": _swallowing,
    "whole payload": lambda d, p: dict(p) == {},
}


@pytest.mark.parametrize("how", list(GUARDS))
def test_a_guard_that_reads_an_unexplored_field_is_reported_however_it_reads_it(
    how: str,
) -> None:
    report = verify(decide(GUARDS[how]))
    assert not report.ok
    (error,) = report.of(FindingKind.GUARD_ERROR)
    assert error.subject == "open --decide--> approved"
    assert "read the payload field" in error.message
    assert "which has no declared domain" in error.message
    assert "decide(approver=UNEXPLORED, amount=UNEXPLORED, urgent=False)" in error.message


def test_guards_that_read_only_explored_fields_stay_sound() -> None:
    """No false alarm: asking whether a field is there, or reading the typed bool,
    reads no unexplored value; a transition without a guard reads none either."""
    m = decide(lambda d, p: "approver" in p and p.urgent and not d["flagged"])
    m.transition("open", "decide", "escalated", guard=lambda d, p: not p.urgent or d["flagged"])
    assert verify(m).ok, verify(m).findings
    plain = decide(lambda d, p: True)
    assert verify(plain).ok


def test_set_membership_on_an_unexplored_field_is_not_called_sound() -> None:
    """The reported case: verify said sound, and at run time one event enabled two
    transitions ("vera" both not blocked and a VIP)."""
    m = Machine("approval2", data={"flagged": [False, True]}, initial_data={"flagged": False})
    m.state("open", initial=True)
    m.state("approved", terminal=True)
    m.state("fast_tracked", terminal=True)
    m.event("approve", type=Decision)
    m.transition(
        "open", "flag", "open", guard=lambda d, p: not d["flagged"], update=lambda d, p: {**d}
    )
    m.transition("open", "approve", "approved", guard=lambda d, p: p.approver not in {"mallory"})
    m.transition("open", "approve", "fast_tracked", guard=lambda d, p: p.approver in VIPS)
    report = verify(m)
    assert not report.ok
    assert len(report.of(FindingKind.GUARD_ERROR)) == 2
    with pytest.raises(WorkflowDefinitionError, match="no declared domain"):
        lf.Engine("memory://", workflows=[m])


REFUSED: dict[str, Callable[[Any], object]] = {
    "==": lambda v: v == "x",
    "!=": lambda v: v != "x",
    "<": lambda v: v < 1,
    "hash": hash,
    "in a set": lambda v: v in {"x"},
    "bool": bool,
    "len": len,
    "iter": iter,
    "contains": lambda v: "x" in v,
    "str": str,
    "format": lambda v: f"{v}",
    "index": lambda v: [1, 2][v],
    "int": int,
    "float": float,
    "+": lambda v: v + 1,
    "radd": lambda v: 1 + v,
    "-": lambda v: -v,
    "%": lambda v: v % 2,
}


@pytest.mark.parametrize("op", list(REFUSED))
def test_the_unexplored_value_refuses_every_operation_a_decision_could_use(op: str) -> None:
    """Should the value get out of its payload some other way, it still decides
    nothing; only its repr and identity remain, and copies are itself."""
    with pytest.raises(UnexploredFieldError, match="no declared domain"):
        REFUSED[op](UNEXPLORED)
    assert repr(UNEXPLORED) == "UNEXPLORED"
    assert copy.deepcopy(UNEXPLORED) is UNEXPLORED
    assert pickle.loads(pickle.dumps(UNEXPLORED)) is UNEXPLORED


def test_a_payload_at_run_time_reads_as_before() -> None:
    p = Payload({"approver": "vera", "amount": 5})
    assert p.approver == p["approver"] == p.get("approver") == "vera"
    assert dict(p) == {"approver": "vera", "amount": 5}
    assert "amount" in p
    assert "missing" not in p
    with pytest.raises(AttributeError, match="no field 'missing'"):
        _ = p.missing
    assert getattr(p, "missing", None) is None


# -- updates -----------------------------------------------------------------------------


def recorder() -> Machine:
    """The docs' pattern: a typed event, a str field without a domain, copied to data."""
    m = Machine(
        "approval", data={"approver": [None, "alice", "bob"]}, initial_data={"approver": None}
    )
    m.state("open", initial=True)
    m.state("approved", terminal=True)
    m.event("approve", type=Decision)
    m.transition("open", "approve", "approved", update=lambda d, p: {"approver": p.approver})
    return m


MACHINES = """
from dataclasses import dataclass
import ledgerflow as lf

@dataclass
class Decision:
    approver: str

copies = lf.Machine("approval", data={"approver": [None, "alice"]}, initial_data={"approver": None})
copies.state("open", initial=True)
copies.state("approved", terminal=True)
copies.event("approve", type=Decision)
copies.transition("open", "approve", "approved", update=lambda d, p: {"approver": p.approver})

def forgot_return(d, p):
    d = dict(d)
    d["n"] = 1

forgets = lf.Machine("forgets", data={"n": [0, 1]}, initial_data={"n": 0})
forgets.state("a", initial=True)
forgets.state("b", terminal=True)
forgets.transition("a", "e", "b", update=forgot_return)
"""


def test_an_update_that_copies_an_unexplored_field_is_a_finding_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = verify(recorder())
    (error,) = report.of(FindingKind.UPDATE_ERROR)
    assert "the update of open --approve--> approved read the payload field 'approver'" in (
        error.message
    )
    assert "so the data it makes cannot be explored" in error.message
    assert not report.of(FindingKind.OUT_OF_DOMAIN)
    with pytest.raises(WorkflowDefinitionError, match="update_error"):
        lf.Engine("memory://", workflows=[recorder()])
    (tmp_path / "sm_edges.py").write_text(MACHINES)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = CliRunner().invoke(app, ["verify", "sm_edges:copies"], env={"COLUMNS": "200"})
    assert out.exit_code == 1, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert "update_error" in out.stdout


def test_an_update_with_a_sampled_field_still_explores_it() -> None:
    m = recorder()
    m.event("hire", payload={"who": ["alice"]})
    report = verify(m, sample=5, seed=1)
    assert report.of(FindingKind.OUT_OF_DOMAIN)  # drawn strings are no approvers
    assert not report.of(FindingKind.UPDATE_ERROR)


@pytest.mark.parametrize("returned", [None, 5, "n", ["n"], [("n", 1)]])
def test_an_update_that_returns_no_mapping_is_an_update_error(returned: object) -> None:
    m = Machine("upd", data={"n": [0, 1]}, initial_data={"n": 0})
    m.state("a", initial=True)
    m.state("b", terminal=True)
    m.transition("a", "e", "b", update=lambda d, p: returned)  # type: ignore[arg-type,return-value]
    report = verify(m)
    (error,) = report.of(FindingKind.UPDATE_ERROR)
    assert f"returned {returned!r}, not the data (a mapping of every field)" in error.message
    assert ("forget to return" in error.message) == (returned is None)
    assert not report.of(FindingKind.OUT_OF_DOMAIN)


def test_the_cli_reports_an_update_that_forgot_to_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sm_forgets.py").write_text(MACHINES)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = CliRunner().invoke(app, ["verify", "sm_forgets:forgets"], env={"COLUMNS": "200"})
    assert out.exit_code == 1, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)
    assert "returned None, not the data" in out.stdout


# -- temporal predicates that raise --------------------------------------------------------


def hold(fairness: str) -> Machine:
    m = Machine("hold", fairness=fairness)
    m.state("open", initial=True)
    m.state("on_hold")
    m.state("done", terminal=True)
    m.transition("open", "hold", "on_hold")
    m.transition("on_hold", "resume", "open")
    m.transition("open", "finish", "done")
    return m


@pytest.mark.parametrize("fairness", ["none", "strong"])
def test_a_liveness_predicate_that_raises_says_so(fairness: str) -> None:
    m = hold(fairness)
    m.property("raises", eventually(lambda s, d: d["x"]))
    m.property("trigger raises", leads_to(lambda s, d: d["y"], lambda s, d: s == "done"))
    m.property("goal raises", leads_to(lambda s, d: s == "on_hold", lambda s, d: 1 / 0 > 0))
    found = {f.subject: f for f in verify(m).of(FindingKind.PROPERTY)}
    assert found["raises"].message == (
        "eventually property 'raises': its goal raised KeyError('x') in open"
    )
    assert "its trigger raised KeyError('y') in open" in found["trigger raises"].message
    assert "its goal raised ZeroDivisionError" in found["goal raises"].message
    assert found["raises"].trace == ()
    assert found["raises"].start == "open"


def test_a_liveness_predicate_that_holds_is_still_checked() -> None:
    m = hold("strong")
    m.property("ends", eventually(lambda s, d: s == "done"))
    assert verify(m).ok
    m = hold("none")
    m.property("ends", eventually(lambda s, d: s == "done"))
    (failed,) = verify(m).of(FindingKind.PROPERTY)
    assert "not every run from the start reaches its goal" in failed.message


# -- diagrams --------------------------------------------------------------------------


def review(*first: str) -> Machine:
    m = Machine("review")
    for name in first:
        m.state(name)
    m.state("in review", initial=True)
    m.state("in-review")
    m.state("in_review")
    m.state("done", terminal=True)
    m.transition("in review", "escalate", "in-review")
    m.transition("in-review", "escalate", "in_review")
    m.transition("in_review", "close", "done")
    for name in first:
        m.transition(name, "close", "done")
    return m


def _node_ids(chart: str) -> dict[str, str]:
    return dict(re.findall(r'    state "(.*)" as (\w+)', chart))


def test_states_whose_names_differ_in_punctuation_are_distinct_nodes() -> None:
    chart = mermaid(review())
    ids = _node_ids(chart)
    assert set(ids) == {"in review", "in-review"}
    assert len({*ids.values(), "in_review"}) == 3
    assert f"    [*] --> {ids['in review']}" in chart
    assert f"    {ids['in review']} --> {ids['in-review']} : escalate" in chart
    assert f"    {ids['in-review']} --> in_review : escalate" in chart
    graph = dot(review())
    assert f'{ids["in review"]} [label="in review", shape=circle];' in graph
    assert f'{ids["in-review"]} [label="in-review", shape=circle];' in graph
    assert 'in_review [label="in_review", shape=circle];' in graph
    # Stable: a state declared before them, or one more that collides, changes no id.
    assert _node_ids(mermaid(review("a b", "in:review"))).items() >= ids.items()


def test_names_that_need_no_change_keep_their_ids() -> None:
    m = Machine("plain")
    m.state("on hold", initial=True)
    m.state("done", terminal=True)
    m.transition("on hold", "go", "done")
    assert '    state "on hold" as on_hold' in mermaid(m)


def test_keywords_and_the_diagrams_own_node_names_are_not_state_ids() -> None:
    m = Machine("words")
    m.state("node", initial=True)
    for name in ("end", "fork_1", "__start", "join_2"):
        m.state(name)
    m.state("done", terminal=True)
    m.transition("node", "split", ["end", "fork_1"])
    m.transition(["end", "fork_1"], "join", "__start")
    m.transition("__start", "fin", "join_2")
    m.transition("join_2", "fin", "done")
    ids = _node_ids(mermaid(m))
    assert set(ids) == {"node", "end", "fork_1", "__start", "join_2"}
    for name, node in ids.items():
        assert node != name
        assert node.startswith(name + "_")
    graph = dot(m)
    assert "\n    node [" not in graph
    assert f'{ids["node"]} [label="node"' in graph


def test_labels_with_quotes_newlines_and_markup_are_escaped() -> None:
    m = Machine('say "hi"\nthen go')
    m.state("entwurf 📝", initial=True)
    m.state('geprüft\n"quoted"')
    m.state("fertig;}\\", terminal=True)
    m.transition("entwurf 📝", "prüfen", 'geprüft\n"quoted"')
    m.transition('geprüft\n"quoted"', "ab-->schluss<b>#1", "fertig;}\\")
    graph = dot(m)
    for line in graph.splitlines()[1:-1]:
        # Every statement on one line, its strings closed: no raw quote inside them.
        assert line.endswith(";"), line
        assert len(re.sub(r"\\.", "", line).split('"')) % 2 == 1, line
    assert graph.startswith('digraph "say \\"hi\\"\\nthen go v1" {')
    assert '[label="geprüft\\n\\"quoted\\"", shape=circle];' in graph
    assert '[label="fertig;}\\\\", shape=doublecircle];' in graph
    chart = mermaid(m)
    assert len(chart.splitlines()) == chart.count("\n")
    assert '    state "geprüft<br/>#quot;quoted#quot;" as ' in chart
    assert '    state "fertig#59;}\\" as ' in chart
    assert " : ab--#gt;schluss#lt;b#gt;#35;1" in chart
    assert '"' not in "".join(re.findall(r'state "(.*)" as', chart))


# -- memory ------------------------------------------------------------------------------


def test_the_explored_graph_costs_little_memory_per_configuration() -> None:
    """Each edge kept its own copy of the configuration it led to and its own label
    (~45 KB a configuration here, so the default bound needed tens of GB): edges now
    share the first copy and one label per event and payload."""
    import tracemalloc

    fields = {f"f{i}": list(range(10)) for i in range(3)}
    m = Machine("roam", data=fields, initial_data=dict.fromkeys(fields, 0))
    m.state("a", initial=True)
    m.state("done", terminal=True)
    m.event("set", payload={"k": list(fields), "v": list(range(10))})
    m.transition("a", "set", "a", update=lambda d, p: {**d, p["k"]: p["v"]})
    m.transition("a", "fin", "done")
    tracemalloc.start()
    try:
        report = verify(m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok
    assert report.configurations == 2000  # a and done, over 1000 data values
    assert peak / report.configurations < 3_000, peak / report.configurations
