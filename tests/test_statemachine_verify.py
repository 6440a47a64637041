"""Verifying state-machine definitions: each known-bad definition is caught with a
shortest counterexample; a sound one passes; random runs never reach what the
verifier called unreachable (hypothesis)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ledgerflow import WorkflowDefinitionError
from ledgerflow.cli import app
from ledgerflow.statemachine import (
    FindingKind,
    Machine,
    always,
    eventually,
    leads_to,
    never,
    verify,
)
from ledgerflow.statemachine.verify import transition_labels


def order(stock: int = 2) -> Machine:
    """The order process: created -> approved | rejected -> placed (while stock lasts)."""
    m = Machine("order", data={"stock": range(3)}, initial_data={"stock": stock})
    m.state("created", initial=True)
    m.state("approved")
    m.state("placed", terminal=True)
    m.state("rejected", terminal=True)
    m.state("cancelled", terminal=True)
    m.event("approve", payload={"approver": ["alice", "bob"]})
    m.transition("created", "approve", "approved")
    m.transition("created", "reject", "rejected")
    m.transition(
        "approved",
        "place",
        "placed",
        guard=lambda data, payload: data["stock"] > 0,
        update=lambda data, payload: {**data, "stock": data["stock"] - 1},
    )
    m.transition("approved", "cancel", "cancelled")
    return m


def test_a_sound_definition_has_no_findings() -> None:
    report = verify(order())
    assert report.ok, [str(f) for f in report.findings]
    assert report.configurations == 5  # created, approved, placed, rejected, cancelled
    assert not report.bounded


def test_an_unreachable_state_and_a_dead_transition_are_named() -> None:
    m = order()
    m.state("archived", terminal=True)
    m.state("limbo")
    m.transition("limbo", "wake", "created")
    m.transition("approved", "gift", "placed", guard=lambda data, payload: data["stock"] > 5)
    report = verify(m)
    assert {f.subject for f in report.of(FindingKind.UNREACHABLE_STATE)} == {"archived", "limbo"}
    dead = {f.subject for f in report.of(FindingKind.DEAD_TRANSITION)}
    assert dead == {"limbo --wake--> created", "approved --gift--> placed"}


def test_a_deadlock_comes_with_the_shortest_trace_that_reaches_it() -> None:
    m = order(stock=0)  # nothing to place, and no way to cancel either:
    m.transitions = [t for t in m.transitions if t.event != "cancel"]
    report = verify(m)
    (deadlock,) = report.of(FindingKind.DEADLOCK)
    assert deadlock.subject == "approved"
    assert deadlock.trace == ("approve(approver='alice')",)
    assert deadlock.start == "created [stock=0]"
    assert "is not terminal and no event can move it" in str(deadlock)


def test_a_trap_without_completion_is_found() -> None:
    m = Machine("loop")
    m.state("start", initial=True)
    m.state("spin")
    m.state("end", terminal=True)
    m.transition("start", "go", "spin")
    m.transition("start", "finish", "end")
    m.transition("spin", "again", "spin")  # never a way out: not a deadlock, a trap
    report = verify(m)
    assert report.of(FindingKind.DEADLOCK) == []
    (trap,) = report.of(FindingKind.NO_COMPLETION)
    assert trap.subject == "spin"
    assert trap.trace == ("go",)


def test_nondeterministic_guards_are_caught_with_the_payload() -> None:
    m = Machine("approval", data={"amount": [100, 5000]})
    m.state("pending", initial=True)
    m.state("approved", terminal=True)
    m.state("escalated", terminal=True)
    m.event("review", payload={"by": ["clerk", "manager"]})
    m.transition(
        "pending",
        "review",
        "approved",
        guard=lambda d, p: d["amount"] < 1000 or p["by"] == "manager",
    )
    m.transition("pending", "review", "escalated", guard=lambda d, p: d["amount"] >= 1000)
    report = verify(m)
    (both,) = report.of(FindingKind.NONDETERMINISM)
    assert "review(by='manager') enables 2 transitions" in both.message
    assert both.start == "pending [amount=5000]"
    assert both.trace == ()


def test_a_violated_invariant_and_a_bad_update_are_reported() -> None:
    m = order(stock=1)
    m.transition(
        "approved",
        "restock",
        "approved",
        update=lambda data, payload: {**data, "stock": data["stock"] + 1},
    )
    report = verify(m, invariants={"stock never runs out": lambda state, data: data["stock"] > 0})
    (broken,) = report.of(FindingKind.INVARIANT)
    assert broken.subject == "stock never runs out"
    assert broken.trace == ("approve(approver='alice')", "place")
    (outside,) = report.of(FindingKind.OUT_OF_DOMAIN)
    assert "stock=3 outside its domain" in outside.message
    assert outside.trace == ("approve(approver='alice')", "restock")


def test_a_guard_that_raises_is_a_finding_not_a_crash() -> None:
    m = order()
    m.transition("created", "hold", "approved", guard=lambda data, payload: data["missing"])
    (raised,) = verify(m).of(FindingKind.GUARD_ERROR)
    assert "KeyError" in raised.message


def test_an_update_that_raises_or_leaves_a_field_out_is_said_so() -> None:
    """Filed as a guard's error, and "leaves the data fields ['k'] changed"."""
    m = Machine("u", data={"n": (0, 1), "k": ("a",)}, initial_data={"n": 0, "k": "a"})
    m.state("a", initial=True)
    m.state("x", terminal=True)
    m.transition("a", "go", "x", update=lambda d, p: {"n": d["missing"]})
    m.transition("a", "skip", "x", update=lambda d, p: {"n": 1})
    m.transition("a", "grow", "x", update=lambda d, p: {**d, "z": 1})
    report = verify(m)
    (raised,) = report.of(FindingKind.UPDATE_ERROR)
    assert "the update of a --go--> x raised KeyError" in raised.message
    assert not report.of(FindingKind.GUARD_ERROR)
    added, left_out = sorted(report.of(FindingKind.OUT_OF_DOMAIN), key=lambda f: f.message)
    assert "leaves out the data fields ['k'] (an update returns every field)" in left_out.message
    assert "leaves data fields ['z'] the machine does not declare" in added.message


def counter(size: int) -> Machine:
    """Counts up to ``size - 1``, and may stop at any time: ``size + 1`` configurations."""
    m = Machine("counter", data={"n": range(size)}, initial_data={"n": 0})
    m.state("counting", initial=True)
    m.state("done", terminal=True)
    m.transition(
        "counting",
        "tick",
        "counting",
        guard=lambda d, p: d["n"] < size - 1,
        update=lambda d, p: {"n": d["n"] + 1},
    )
    m.transition("counting", "stop", "done")
    return m


def test_exploration_is_bounded_and_says_what_it_skipped() -> None:
    m = counter(1000)
    report = verify(m, max_configurations=100)
    assert report.bounded
    assert not report.ok
    assert (
        "unreachable states, dead transitions, completion and liveness were not checked"
        in report.notes[1]
    )
    assert verify(m).ok  # unbounded: 1,001 configurations, all fine


def test_bad_definitions_are_refused_as_they_are_declared() -> None:
    m = Machine("x", data={"n": [1, 2]})
    m.state("a", initial=True)
    with pytest.raises(WorkflowDefinitionError, match="two initial states"):
        m.state("b", initial=True)
    with pytest.raises(WorkflowDefinitionError, match="undeclared state 'zz'"):
        m.transition("a", "go", "zz")
    m.state("end", terminal=True)
    with pytest.raises(WorkflowDefinitionError, match="terminal state 'end' has no way out"):
        m.transition("end", "go", "a")
    with pytest.raises(WorkflowDefinitionError, match="finite domain"):
        Machine("y", data={"n": "abc"})
    with pytest.raises(WorkflowDefinitionError, match="not in its domain"):
        Machine("y", data={"n": [1]}, initial_data={"n": 2})


def test_verify_refuses_what_the_runtime_refuses_as_the_cli_and_the_engine_do() -> None:
    """``verify(m).ok`` was True for machines that registration and ``ledgerflow
    verify`` refuse: a test of the report passed, then the deploy failed."""
    nowhere = Machine("nowhere")
    nowhere.state("a", initial=True, timeout=timedelta(seconds=1), on_timeout="expire")
    nowhere.state("done", terminal=True)
    nowhere.transition("a", "fin", "done")
    with pytest.raises(WorkflowDefinitionError, match="times out with 'expire'"):
        verify(nowhere)
    idle = Machine("idle")
    idle.state("a", initial=True)
    idle.state("done", terminal=True)
    idle.state("failed", terminal=True)
    idle.transition("a", "fin", "done", failure="failed")
    with pytest.raises(WorkflowDefinitionError, match="failure= but no activity"):
        verify(idle)


# -- random runs never reach what verify called unreachable ---------------------------


@st.composite
def machines(draw: st.DrawFn) -> Machine:
    states = draw(st.integers(2, 7))
    m = Machine("random", data={"n": range(3)}, initial_data={"n": 0})
    terminal = draw(st.sets(st.integers(1, states - 1), min_size=1, max_size=2))
    for i in range(states):
        m.state(f"s{i}", initial=i == 0, terminal=i in terminal)
    events = ["a", "b", "c"]
    for _ in range(draw(st.integers(1, 12))):
        source = draw(st.sampled_from([i for i in range(states) if i not in terminal]))
        target = draw(st.integers(0, states - 1))
        bump = draw(st.booleans())
        limit = draw(st.integers(0, 3))
        m.transition(
            f"s{source}",
            draw(st.sampled_from(events)),
            f"s{target}",
            guard=_below(limit),
            update=_bump if bump else None,
        )
    return m


def _below(limit: int) -> Callable[[Mapping[str, Any], Mapping[str, Any]], bool]:
    return lambda data, payload: bool(data["n"] < limit)


def _bump(data: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    return {"n": min(2, data["n"] + 1)}


@given(machines(), st.integers(0, 2**32 - 1))
def test_random_runs_never_reach_what_verify_called_unreachable(m: Machine, seed: int) -> None:
    report = verify(m)
    unreachable = {f.subject for f in report.of(FindingKind.UNREACHABLE_STATE)}
    dead = {f.subject for f in report.of(FindingKind.DEAD_TRANSITION)}
    labels = transition_labels(m)
    rng = random.Random(seed)
    state, data = "s0", {"n": 0}
    for _ in range(30):
        assert state not in unreachable
        enabled = [
            t for t in m.transitions if t.source == state and (t.guard is None or t.guard(data, {}))
        ]
        if not enabled:
            break
        t = rng.choice(enabled)
        assert labels[m.transitions.index(t)] not in dead
        data = dict(t.update(data, {})) if t.update else data
        state = t.target
    assert state not in unreachable
    # Where verify saw no deadlock and no trap, every run can still complete: an
    # independent search from where the random run got to finds a terminal state.
    if not report.of(FindingKind.DEADLOCK) and not report.of(FindingKind.NO_COMPLETION):
        assert _can_complete(m, state, data)


def _can_complete(m: Machine, state: str, data: Mapping[str, Any]) -> bool:
    todo, seen = [(state, tuple(sorted(data.items())))], set()
    while todo:
        at, frozen = todo.pop()
        if m.states[at].terminal:
            return True
        if (at, frozen) in seen:
            continue
        seen.add((at, frozen))
        values = dict(frozen)
        for t in m.transitions:
            if t.source == at and (t.guard is None or t.guard(values, {})):
                after = dict(t.update(values, {})) if t.update else values
                todo.append((t.target, tuple(sorted(after.items()))))
    return False


# -- the CLI -----------------------------------------------------------------------------

MACHINES = """
from ledgerflow.statemachine import Machine

def _order(place: bool) -> Machine:
    m = Machine("order")
    m.state("created", initial=True)
    m.state("approved")
    m.state("placed", terminal=True)
    m.transition("created", "approve", "approved")
    if place:
        m.transition("approved", "place", "placed")
    return m

sound = _order(True)
stuck = _order(False)
made = lambda: _order(True)
not_a_machine = 42

def _versioned(version: int, place: bool) -> Machine:
    m = Machine("order", version=version)
    m.state("created", initial=True)
    m.state("approved")
    m.state("placed", terminal=True)
    m.transition("created", "approve", "approved")
    if place:
        m.transition("approved", "place", "placed")
    return m

old_unsound = [_versioned(1, False), _versioned(2, True)]

def _no_initial(version: int) -> Machine:
    m = Machine("order", version=version)
    m.state("created")
    return m

one_broken = [_no_initial(1), _versioned(2, True)]

class Payload:
    def __init__(self, a: int) -> None:
        self.a = a

def needs(x: int) -> Machine:
    return _order(True)

def raises() -> Machine:
    raise RuntimeError("no machine today")
"""


def test_the_cli_verifies_a_definition_with_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sm_defs.py").write_text(MACHINES)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", "sm_defs:sound"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "order v1: sound (3 configurations explored)" in ok.stdout
    assert runner.invoke(app, ["verify", "sm_defs:made"]).exit_code == 0
    bad = runner.invoke(app, ["verify", "sm_defs:stuck"], env={"COLUMNS": "200"})
    assert bad.exit_code == 1
    assert "NOT SOUND" in bad.stdout
    assert "deadlock: approved is not terminal" in bad.stdout
    assert "from created: approve" in bad.stdout
    report = json.loads(runner.invoke(app, ["verify", "sm_defs:stuck", "--json"]).stdout)
    assert report["ok"] is False
    kinds = {f["kind"] for f in report["findings"]}
    assert kinds == {"deadlock", "no_completion", "unreachable_state"}
    # Every version of a list (only the newest was, while an engine refuses it).
    both = runner.invoke(app, ["verify", "sm_defs:old_unsound"], env={"COLUMNS": "200"})
    assert both.exit_code == 1
    assert "order v1: NOT SOUND" in both.stdout
    assert "order v2: sound" in both.stdout
    # A version that cannot be verified at all: the others are still reported (only
    # its error was), and with --json the error is a JSON line too (plain stderr).
    broken = runner.invoke(app, ["verify", "sm_defs:one_broken"], env={"COLUMNS": "200"})
    assert broken.exit_code == 2
    assert "order v2: sound" in broken.stdout
    assert "order v1:" in broken.stderr
    lines = runner.invoke(app, ["verify", "sm_defs:one_broken", "--json"]).stdout.splitlines()
    by_version = {json.loads(line)["version"]: json.loads(line) for line in lines}
    assert by_version[2]["ok"] is True
    assert "initial" in by_version[1]["error"]
    for target, said in [
        ("sm_defs:not_a_machine", "expected a state machine"),
        ("sm_defs", "expected module:attribute"),
        ("no_such_module:x", "cannot import"),
        ("sm_defs:nothing", "module 'sm_defs' has no 'nothing'"),
        # Classes and functions that take arguments are not called (a traceback).
        ("sm_defs:Payload", "expected a state machine"),
        ("sm_defs:needs", "calling it failed: TypeError"),
        ("sm_defs:raises", "calling it failed: RuntimeError: no machine today"),
    ]:
        refused = runner.invoke(app, ["verify", target])
        assert refused.exit_code == 2, (target, refused.output)
        assert said in refused.stderr
        assert refused.exception is None or isinstance(refused.exception, SystemExit)


# -- temporal properties -------------------------------------------------------------------


def test_safety_properties_are_checked_on_every_configuration() -> None:
    m = order(stock=1)
    m.property("placed orders took stock", never(lambda s, d: s == "placed" and d["stock"] == 1))
    m.property("stock lasts", always(lambda s, d: d["stock"] > 0))
    report = verify(m)
    (failed,) = report.of(FindingKind.PROPERTY)
    assert failed.subject == "stock lasts"
    assert "always property 'stock lasts' does not hold in placed [stock=0]" in failed.message
    assert failed.trace == ("approve(approver='alice')", "place")


def test_eventually_fails_on_a_cycle_that_avoids_the_goal() -> None:
    m = order()
    m.state("on_hold")
    m.transition("approved", "hold", "on_hold")
    m.transition("on_hold", "resume", "approved")
    m.property("completes", eventually(lambda s, d: m.states[s].terminal))
    report = verify(m)
    assert report.of(FindingKind.NO_COMPLETION) == []  # completion stays possible...
    (failed,) = report.of(FindingKind.PROPERTY)  # ...but is not forced: no fairness
    assert failed.trace == ("approve(approver='alice')", "hold", "resume")
    assert "repeats hold -> resume from approved [stock=2] forever" in failed.message
    assert any("no fairness" in note for note in report.notes)


def test_leads_to_names_the_run_that_never_gets_there() -> None:
    m = order()
    m.property(
        "approval leads to an end",
        leads_to(lambda s, d: s == "approved", lambda s, d: m.states[s].terminal),
    )
    m.property(
        "creation leads to placing",
        leads_to(lambda s, d: s == "created", lambda s, d: s == "placed"),
    )
    report = verify(m)
    (failed,) = report.of(FindingKind.PROPERTY)
    assert failed.subject == "creation leads to placing"
    assert failed.trace == ("approve(approver='alice')", "cancel")
    assert "and stops in cancelled [stock=2]" in failed.message


def test_liveness_is_not_guessed_on_a_bounded_exploration() -> None:
    m = counter(500)
    m.property("ends", eventually(lambda s, d: s == "done"))
    report = verify(m, max_configurations=50)
    assert report.bounded
    assert report.of(FindingKind.PROPERTY) == []
    assert "liveness were not checked" in report.notes[1]
    assert (
        report.notes[0]
        == "explored over the declared domains: n (500 values); bound 50 configurations"
    )
    full = verify(m)  # a run may tick up to 499 and stop there: fine; stop is always on
    assert full.of(FindingKind.PROPERTY) == []


# -- diagrams -------------------------------------------------------------------------------


def test_diagrams_draw_every_state_and_transition_and_highlight_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ledgerflow.statemachine.diagram import dot, mermaid

    m = order()
    m.state("on hold")  # a name that is no identifier
    m.transition("approved", "hold", "on hold")
    m.transition("on hold", "resume", "approved")
    chart = mermaid(m, current="approved", path=["created"])
    assert chart.startswith("stateDiagram-v2\n")
    assert "    [*] --> created" in chart
    assert "    approved --> placed : place [guard]" in chart
    assert '    state "on hold" as on_hold' in chart
    assert "    approved --> on_hold : hold" in chart
    for terminal in ("placed", "rejected", "cancelled"):
        assert f"    {terminal} --> [*]" in chart
    assert "    class approved current" in chart
    assert "    class created visited" in chart
    graph = dot(m, current="approved")
    assert graph.startswith('digraph "order v1" {')
    assert 'placed [label="placed", shape=doublecircle];' in graph
    assert 'approved [label="approved", shape=circle, style=filled, fillcolor="#ffe08a"];' in graph
    assert 'on_hold -> approved [label="resume"];' in graph
    # From the CLI.
    (tmp_path / "sm_diagram.py").write_text(MACHINES)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    out = runner.invoke(app, ["diagram", "sm_diagram:sound", "--current", "approved"])
    assert out.exit_code == 0, out.output
    assert "class approved current" in out.stdout
    as_dot = runner.invoke(app, ["diagram", "sm_diagram:sound", "--format", "dot"])
    assert as_dot.stdout.startswith('digraph "order v1"')
    bad = runner.invoke(app, ["diagram", "sm_diagram:sound", "--current", "nowhere"])
    assert bad.exit_code == 2
    assert "has no state 'nowhere'" in bad.stderr


# -- parallel regions: fork and join, verified as a workflow net -------------------------


def fulfilment(*, early_exit: bool = False, dead_branch: bool = False) -> Machine:
    """approved -> fork (reserve stock | charge card) -> join -> placed."""
    m = Machine("fulfilment")
    m.state("approved", initial=True)
    for name in ("reserving", "reserved", "charging", "charged"):
        m.state(name)
    m.state("placed", terminal=True)
    if early_exit:
        m.state("failed", terminal=True)
    m.transition("approved", "start", ["reserving", "charging"])
    m.transition("reserving", "reserve", "reserved")
    if not dead_branch:
        m.transition("charging", "charge", "charged")
    m.transition(["reserved", "charged"], "place", "placed")
    if early_exit:  # the card is declined: the process ends, the warehouse still works
        m.transition("charging", "decline", "failed")
    return m


def test_a_sound_fork_and_join_verify_as_a_workflow_net() -> None:
    report = verify(fulfilment())
    assert report.ok, [str(f) for f in report.findings]
    # approved; reserving+charging; reserved+charging; reserving+charged; reserved+charged; placed
    assert report.configurations == 6


def test_ending_one_region_while_another_runs_is_improper_completion() -> None:
    report = verify(fulfilment(early_exit=True))
    improper, later = report.of(FindingKind.IMPROPER_COMPLETION)  # the shortest first
    assert later.subject == "failed+reserved"
    assert improper.subject == "failed+reserving"
    assert improper.trace == ("start", "decline")
    assert "reached an end while other regions still run" in improper.message


def test_a_join_waiting_for_a_region_that_cannot_arrive_deadlocks() -> None:
    report = verify(fulfilment(dead_branch=True))
    (stuck,) = report.of(FindingKind.DEADLOCK)
    assert stuck.subject == "charging+reserved"
    assert stuck.trace == ("start", "reserve")
    assert {f.subject for f in report.of(FindingKind.DEAD_TRANSITION)} == {
        "reserved+charged --place--> placed"
    }
    assert {f.subject for f in report.of(FindingKind.UNREACHABLE_STATE)} == {"charged", "placed"}


def test_forks_and_joins_are_drawn_as_bars() -> None:
    from ledgerflow.statemachine.diagram import dot, mermaid

    chart = mermaid(fulfilment())
    assert "    state fork_1 <<fork>>" in chart
    assert "    approved --> fork_1 : start" in chart
    assert "    fork_1 --> reserving" in chart
    assert "    state join_4 <<join>>" in chart
    assert "    charged --> join_4" in chart
    assert "    join_4 --> placed : place" in chart
    graph = dot(fulfilment())
    assert '__bar_1 [shape=box, style=filled, fillcolor=black, label=""' in graph
    assert "__bar_4 -> placed;" in graph


# -- a cross-check against an independent soundness check --------------------------------


@st.composite
def nets(draw: st.DrawFn) -> Machine:
    """Random fork/join definitions without data: each transition has its own event
    (so nondeterminism cannot arise) and one or two sources and targets."""
    size = draw(st.integers(2, 6))
    ends = draw(st.sets(st.integers(1, size - 1), min_size=1, max_size=2))
    m = Machine("net")
    for i in range(size):
        m.state(f"p{i}", initial=i == 0, terminal=i in ends)
    inner = [i for i in range(size) if i not in ends]
    for n in range(draw(st.integers(1, 8))):
        sources = draw(st.lists(st.sampled_from(inner), min_size=1, max_size=2, unique=True))
        targets = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=2))
        m.transition([f"p{i}" for i in sources], f"e{n}", [f"p{i}" for i in targets])
    return m


Marking = tuple[str, ...]
Graph = dict[Marking, list[Marking]]


def _own_graph(m: Machine, limit: int) -> tuple[Graph, set[int]] | None:
    """The reachability graph of the net by a search of our own written apart from
    verify (markings, and the transitions that fired); None past ``limit`` markings."""
    from collections import Counter

    def fire(marking: Marking, sources: Marking, targets: Marking) -> Marking | None:
        held = Counter(marking)
        if any(held[s] < n for s, n in Counter(sources).items()):
            return None
        held.subtract(sources)
        held.update(targets)
        return tuple(sorted(held.elements()))

    start: Marking = (m.initial().name,)
    seen, stack = {start}, [start]
    graph: Graph = {}
    fired: set[int] = set()
    while stack:
        marking = stack.pop()
        graph[marking] = []
        for i, t in enumerate(m.transitions):
            after = fire(marking, t.sources, t.targets)
            if after is None:
                continue
            fired.add(i)
            graph[marking].append(after)
            if after not in seen:
                seen.add(after)
                if len(seen) > limit:
                    return None
                stack.append(after)
    return graph, fired


def _snakes_graph(m: Machine, limit: int) -> tuple[Graph, set[int]] | None:
    """The same graph built by SNAKES, a Petri-net library that shares no code or
    author with ledgerflow: the definition as a place/transition net (a place per
    state, a transition per transition, arcs weighted by multiplicity), its
    marking graph explored by SNAKES' own firing rule."""
    import warnings
    from collections import Counter

    with warnings.catch_warnings():
        # SNAKES tries the old ``imp`` module first (and falls back without it).
        warnings.simplefilter("ignore", DeprecationWarning)
        from snakes.nets import MultiArc, PetriNet, Place, StateGraph, Value, dot
        from snakes.nets import Transition as NetTransition

    def arc(weight: int) -> object:
        return Value(dot) if weight == 1 else MultiArc([Value(dot)] * weight)

    net = PetriNet("definition")
    for name, state in m.states.items():
        net.add_place(Place(name, [dot] if state.initial else []))
    for i, t in enumerate(m.transitions):
        net.add_transition(NetTransition(f"t{i}"))
        for place, weight in Counter(t.sources).items():
            net.add_input(place, f"t{i}", arc(weight))
        for place, weight in Counter(t.targets).items():
            net.add_output(place, f"t{i}", arc(weight))
    states = StateGraph(net)
    for n, _ in enumerate(states):
        if n >= limit:
            return None
    markings: dict[int, Marking] = {}
    for number in range(len(states)):
        states.goto(number)
        held = states.net.get_marking()
        markings[number] = tuple(sorted(p for p in held for _ in range(len(held[p]))))
    graph: Graph = {k: [] for k in markings.values()}
    fired: set[int] = set()
    for number, marking in markings.items():
        for target, transition, _mode in states.successors(number):
            graph[marking].append(markings[target])
            fired.add(int(transition.name[1:]))
    return graph, fired


def _soundness(m: Machine, found: tuple[Graph, set[int]] | None) -> dict[str, bool] | None:
    """Workflow-net soundness, condition by condition, read off a reachability graph
    (None: too large to judge here)."""
    if found is None:
        return None
    graph, fired = found

    def final(marking: Marking) -> bool:
        return len(marking) == 1 and m.states[marking[0]].terminal

    can_finish = {k for k in graph if final(k)}
    changed = True
    while changed:
        changed = False
        for k, outs in graph.items():
            if k not in can_finish and any(o in can_finish for o in outs):
                can_finish.add(k)
                changed = True
    option_to_complete = all(k in can_finish for k in graph)
    proper = all(final(k) or not any(m.states[s].terminal for s in k) for k in graph)
    no_dead = len(fired) == len(m.transitions)
    marked = {s for k in graph for s in k}
    return {
        "option to complete": option_to_complete,
        "proper completion": proper,
        "no dead transitions": no_dead,
        "every state reached": marked == set(m.states),
    }


def _verify_says(m: Machine) -> tuple[dict[str, bool], bool] | None:
    report = verify(m, max_configurations=400)
    if report.bounded:
        return None
    kinds = {f.kind for f in report.findings}
    said = {
        "option to complete": not kinds & {FindingKind.DEADLOCK, FindingKind.NO_COMPLETION},
        "proper completion": FindingKind.IMPROPER_COMPLETION not in kinds,
        "no dead transitions": FindingKind.DEAD_TRANSITION not in kinds,
        "every state reached": FindingKind.UNREACHABLE_STATE not in kinds,
    }
    return said, report.ok


@settings(deadline=None)
@given(nets())
def test_verify_agrees_with_an_independent_soundness_check(m: Machine) -> None:
    expected = _soundness(m, _own_graph(m, 400))
    verified = _verify_says(m)
    if expected is None or verified is None:
        return  # too large (or unbounded) for the independent search: nothing to compare
    said, ok = verified
    assert said == expected
    assert ok == all(expected.values())


@settings(deadline=None, max_examples=150)
@given(nets())
def test_verify_agrees_with_the_marking_graph_snakes_builds(m: Machine) -> None:
    """The third-party cross-check: SNAKES builds the marking graph with its own
    firing rule; verify's soundness findings must match what that graph says."""
    expected = _soundness(m, _snakes_graph(m, 400))
    verified = _verify_says(m)
    if expected is None or verified is None:
        return
    said, ok = verified
    assert said == expected
    assert ok == all(expected.values())
    # The two graph builders agree with each other too (same markings, same edges).
    own = _own_graph(m, 400)
    theirs = _snakes_graph(m, 400)
    assert own is not None
    assert theirs is not None
    assert {k: sorted(v) for k, v in own[0].items()} == {k: sorted(v) for k, v in theirs[0].items()}
    assert own[1] == theirs[1]


# -- activities that may fail, timeouts: what verify explores and diagrams draw ----------


def charging() -> Machine:
    def charge(call: object) -> str:
        return "C-1"

    m = Machine("charging")
    m.state("due", initial=True, timeout=timedelta(days=2), on_timeout="lapse")
    m.state("paid", terminal=True)
    m.state("refunded", terminal=True)
    m.state("lapsed", terminal=True)
    m.transition("due", "pay", "paid", activity=charge, failure="refunded")
    m.transition("due", "lapse", "lapsed")
    return m


def test_a_failing_activity_is_explored_towards_its_failure_states() -> None:
    report = verify(charging())
    assert report.ok, [str(f) for f in report.findings]
    assert report.configurations == 4  # due, paid, refunded (the charge failed), lapsed
    m = charging()
    m.state("stuck")
    m.transition("due", "hold", "stuck", activity=lambda call: None, failure="stuck")
    (deadlock,) = verify(m).of(FindingKind.DEADLOCK)
    assert deadlock.subject == "stuck"


def test_diagrams_draw_failure_edges_timeouts_and_the_transitions_taken() -> None:
    from ledgerflow.statemachine.diagram import dot, mermaid

    chart = mermaid(
        charging(), current="refunded", path=["due"], taken=["due --pay--> paid (failed)"]
    )
    assert "    due --> refunded : pay fails ✓" in chart
    assert "    due --> paid : pay\n" in chart
    assert "    due --> lapsed : lapse (after 2d)" in chart
    assert "    class refunded current" in chart
    graph = dot(charging(), taken=["due --lapse--> lapsed"])
    assert 'due -> refunded [label="pay fails", style=dashed];' in graph
    assert 'due -> lapsed [label="lapse (after 2d) ✓", penwidth=2.5, color="#b8860b"];' in graph


# -- fairness ------------------------------------------------------------------------------


def test_under_strong_fairness_an_optional_loop_is_left_some_day() -> None:
    m = order()
    m.state("on_hold")
    m.transition("approved", "hold", "on_hold")
    m.transition("on_hold", "resume", "approved")
    m.property("completes", eventually(lambda s, d: m.states[s].terminal))
    report = verify(m, fairness="strong")
    assert report.ok, [str(f) for f in report.findings]
    assert any("strong fairness" in note for note in report.notes)
    # Declared on the machine, it is what registration and the CLI verify with.
    fair = order()
    fair.fairness = "strong"
    fair.state("on_hold")
    fair.transition("approved", "hold", "on_hold")
    fair.transition("on_hold", "resume", "approved")
    fair.property("completes", eventually(lambda s, d: fair.states[s].terminal))
    assert verify(fair).ok


def test_a_fair_cycle_that_avoids_the_goal_still_fails() -> None:
    # In the loop, the way out is never enabled: fairness cannot force it.
    m = Machine("spin", data={"n": [0]}, initial_data={"n": 0})
    m.state("a", initial=True)
    m.state("b")
    m.state("z", terminal=True)
    m.transition("a", "go", "b")
    m.transition("b", "back", "a")
    m.transition("a", "leave", "z", guard=lambda d, p: False)
    m.property("ends", eventually(lambda s, d: s == "z"))
    report = verify(m, fairness="strong")
    (failed,) = report.of(FindingKind.PROPERTY)
    assert "strongly fair run" in failed.message
    with pytest.raises(WorkflowDefinitionError, match="fairness"):
        verify(m, fairness="weak")  # type: ignore[arg-type]
    with pytest.raises(WorkflowDefinitionError, match="fairness"):
        Machine("x", fairness="sometimes")


@st.composite
def loopy(draw: st.DrawFn) -> Machine:
    """Small graphs without data, with loops, one event per transition."""
    states = draw(st.integers(2, 5))
    m = Machine("loopy")
    terminal = draw(st.integers(1, states - 1))
    for i in range(states):
        m.state(f"s{i}", initial=i == 0, terminal=i == terminal)
    for k in range(draw(st.integers(1, 8))):
        source = draw(st.sampled_from([i for i in range(states) if i != terminal]))
        m.transition(f"s{source}", f"e{k}", f"s{draw(st.integers(0, states - 1))}")
    goal = f"s{draw(st.integers(0, states - 1))}"
    m.property("reaches", eventually(_is(goal)))
    return m


def _is(goal: str) -> Callable[[str, Mapping[str, Any]], bool]:
    return lambda state, data: state == goal


@settings(max_examples=200)
@given(loopy())
def test_strong_fairness_agrees_with_a_brute_force_search_for_fair_lassos(m: Machine) -> None:
    fails = bool(verify(m, fairness="strong").of(FindingKind.PROPERTY))
    assert fails == _has_fair_counterexample(m)


def _has_fair_counterexample(m: Machine) -> bool:
    """Independently: some run from s0 avoids the goal for ever, either stopping or
    ending in a loop (a set of states visited again and again, strongly connected by
    the transitions it uses) in which every transition enabled is used."""
    goal = m.properties["reaches"].p
    out = {
        s: [(k, t.target) for k, t in enumerate(m.transitions) if t.source == s] for s in m.states
    }
    avoid = {s for s in m.states if not goal(s, {})}
    if "s0" not in avoid:
        return False
    reach, todo = {"s0"}, ["s0"]
    while todo:
        for _, t in out[todo.pop()]:
            if t in avoid and t not in reach:
                reach.add(t)
                todo.append(t)
    if any(not out[s] for s in reach):
        return True  # a run that stops
    # Every non-empty subset of reachable states and subset of its internal edges that
    # is strongly connected and fair: exponential, fine for five states.
    states = sorted(reach)
    for mask in range(1, 2 ** len(states)):
        chosen = {states[i] for i in range(len(states)) if mask >> i & 1}
        inner = [(k, s, t) for s in chosen for k, t in out[s] if t in chosen]
        enabled = {k for s in chosen for k, _ in out[s]}
        if not inner or enabled - {k for k, _, _ in inner}:
            continue
        if all(_reaches(a, b, inner) for a in chosen for b in chosen):
            return True
    return False


def _reaches(a: str, b: str, edges: list[tuple[int, str, str]]) -> bool:
    seen, todo = {a}, [a]
    while todo:
        at = todo.pop()
        for _, s, t in edges:
            if s == at and t not in seen:
                seen.add(t)
                todo.append(t)
    return b in seen and (a != b or any(s == a for _, s, _ in edges))


def test_an_event_only_a_transition_names_close_to_a_declared_one_is_pointed_out() -> None:
    m = Machine("typo")
    m.event("approve", payload={"by": ["alice"]})
    m.state("created", initial=True)
    m.state("approved", terminal=True)
    m.state("rejected", terminal=True)
    m.transition("created", "aprove", "approved")  # meant "approve"
    m.transition("created", "reject", "rejected")  # another event: nothing said
    report = verify(m)
    assert [n for n in report.notes if "never declared" in n] == [
        "event 'aprove' is named by a transition but never declared: did you mean 'approve'?"
    ]
