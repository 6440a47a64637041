"""Temporal properties of a state machine, checked on its explored configurations.

- ``always(p)``: ``p`` holds in every reachable configuration;
- ``never(p)``: it holds in none;
- ``eventually(p)``: on every run from a start, some configuration satisfies ``p``;
- ``leads_to(p, q)``: from every reachable configuration satisfying ``p``, every run
  reaches one satisfying ``q``.

By default no fairness is assumed: a run may take any enabled transition at every
step, and may loop forever, so a cycle that avoids ``q`` is a counterexample, as is a
run that stops (in a terminal or deadlocked configuration) before ``q``. Under strong
fairness (``fairness="strong"``: a transition enabled infinitely often is taken
infinitely often) only fair cycles count: one that keeps passing a configuration
where a way out is enabled, and never takes it, is not a run. The counterexample of a
liveness property is the events from a start to where it fails, then a run that
avoids the goal: ending, or repeating (a lasso).

``p`` and ``q`` are ``pred(state, data)``, as invariants are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .definition import Data

__all__ = [
    "Fairness",
    "Pred",
    "Property",
    "always",
    "eventually",
    "fair_escape",
    "fair_run",
    "leads_to",
    "never",
]

Fairness = Literal["none", "strong"]
"""What liveness assumes of runs: ``none``, any run (one may loop for ever on an
optional cycle); ``strong``, a transition enabled infinitely often is taken
infinitely often (a hold/resume loop is left some day if ``approve`` is enabled
again and again)."""

Pred = Callable[[str, Data], bool]


@dataclass(frozen=True, slots=True)
class Property:
    kind: Literal["always", "never", "eventually", "leads_to"]
    p: Pred
    q: Pred | None = None


def always(p: Pred) -> Property:
    return Property("always", p)


def never(p: Pred) -> Property:
    return Property("never", p)


def eventually(p: Pred) -> Property:
    return Property("eventually", p)


def leads_to(p: Pred, q: Pred) -> Property:
    return Property("leads_to", p, q)


def must_reach(
    configs: Iterable[object],
    edges: Mapping[object, Mapping[object, str]],
    goal: Callable[[object], bool],
) -> set[object]:
    """The configurations from which every run reaches ``goal`` (AF goal): those in
    it, and those with successors that all must reach it (a least fixpoint)."""
    every = list(configs)
    inside = {c for c in every if goal(c)}
    back: dict[object, list[object]] = {}
    left: dict[object, int] = {}
    for c in every:
        outs = edges.get(c, {})
        left[c] = len(outs)
        for t in outs:
            back.setdefault(t, []).append(c)
    todo = deque(inside)
    while todo:
        for source in back.get(todo.popleft(), ()):
            if source in inside:
                continue
            left[source] -= 1
            if left[source] == 0:
                inside.add(source)
                todo.append(source)
    return inside


def avoiding_run(
    start: object,
    edges: Mapping[object, Mapping[object, str]],
    inside: set[object],
    name: Callable[[object], str],
) -> tuple[tuple[str, ...], str]:
    """From ``start`` (outside ``inside``), a run that never enters it: its events,
    and how it ends (stops in a configuration, or repeats from one)."""
    steps: list[str] = []
    seen: dict[object, int] = {}
    at = start
    while True:
        seen[at] = len(steps)
        outside = sorted(
            ((label, t) for t, label in edges.get(at, {}).items() if t not in inside),
            key=lambda pair: pair[0],
        )
        if not outside:
            return tuple(steps), f"and stops in {name(at)}"
        label, nxt = outside[0]
        steps.append(label)
        if nxt in seen:
            loop = " -> ".join(steps[seen[nxt] :])
            return tuple(steps), f"and repeats {loop} from {name(nxt)} forever"
        at = nxt


Moves = Mapping[object, Sequence[tuple[int, object, str]]]
"""Each configuration's moves: (transition index, target, event label)."""


def fair_escape(
    configs: Iterable[object], moves: Moves, goal: Callable[[object], bool]
) -> tuple[set[object], set[object], set[object]]:
    """Under strong fairness (a transition enabled infinitely often is taken
    infinitely often), the configurations outside ``goal`` from which some run avoids
    it for ever: one that stops (no move at all) or one that stays, fairly, in a
    cycle outside it. Returns them, the stops and the fair cycles' configurations.

    A fair cycle is found as in Emerson and Lei's algorithm: a strongly connected
    set of configurations outside the goal is fair if every transition enabled in
    it is also taken inside it; else the configurations enabling a transition that
    is never taken inside are dropped and what is left is searched again."""
    outside = [c for c in configs if not goal(c)]
    region = set(outside)
    stops = {c for c in outside if not moves.get(c)}
    cycles: set[object] = set()
    pending = [region]
    while pending:
        nodes = pending.pop()
        for component in _components(nodes, moves):
            inner = {
                index
                for c in component
                for index, target, _ in moves.get(c, ())
                if target in component
            }
            if not inner:
                continue  # a single configuration without a loop: no cycle here
            enabled = {index for c in component for index, _, _ in moves.get(c, ())}
            unfair = enabled - inner
            if not unfair:
                cycles |= component
                continue
            left = {
                c for c in component if not any(index in unfair for index, _, _ in moves.get(c, ()))
            }
            if left:
                pending.append(left)
    # Back from the stops and the fair cycles, through configurations outside goal.
    back: dict[object, list[object]] = {}
    for c in outside:
        for _, target, _ in moves.get(c, ()):
            if target in region:
                back.setdefault(target, []).append(c)
    escaping = stops | cycles
    todo = deque(escaping)
    while todo:
        for source in back.get(todo.popleft(), ()):
            if source not in escaping:
                escaping.add(source)
                todo.append(source)
    return escaping, stops, cycles


def fair_run(
    start: object,
    moves: Moves,
    escaping: set[object],
    stops: set[object],
    cycles: set[object],
    name: Callable[[object], str],
) -> tuple[tuple[str, ...], str]:
    """From ``start``, the shortest run (within ``escaping``) to a stop or a fair
    cycle, and how it goes on from there."""
    parent: dict[object, tuple[object, str] | None] = {start: None}
    todo = deque([start])
    while todo:
        at = todo.popleft()
        if at in stops or at in cycles:
            steps: list[str] = []
            node = at
            while (link := parent[node]) is not None:
                node, label = link
                steps.append(label)
            if at in stops:
                return tuple(reversed(steps)), f"and stops in {name(at)}"
            return tuple(reversed(steps)), (
                f"and can then cycle for ever through {name(at)} and the configurations "
                "it reaches without the goal, every transition enabled there taken "
                "again and again (a strongly fair run)"
            )
        for _, target, label in sorted(moves.get(at, ()), key=lambda m: m[2]):
            if target in escaping and target not in parent:
                parent[target] = (at, label)
                todo.append(target)
    raise AssertionError("start does not escape")  # pragma: no cover - callers check


def _components(nodes: set[object], moves: Moves) -> list[set[object]]:
    """The strongly connected components of the moves among ``nodes`` (Tarjan's
    algorithm, iterative: explored graphs are deep)."""
    index: dict[object, int] = {}
    low: dict[object, int] = {}
    on_stack: set[object] = set()
    stack: list[object] = []
    found: list[set[object]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[object, Iterator[object]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, iter([t for _, t, _ in moves.get(root, ()) if t in nodes])))
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter([t for _, t, _ in moves.get(succ, ()) if t in nodes])))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent_node = work[-1][0]
                low[parent_node] = min(low[parent_node], low[node])
            if low[node] == index[node]:
                component: set[object] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
    return found
