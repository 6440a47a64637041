"""Temporal properties of a state machine, checked on its explored configurations.

- ``always(p)``: ``p`` holds in every reachable configuration;
- ``never(p)``: it holds in none;
- ``eventually(p)``: on every run from a start, some configuration satisfies ``p``;
- ``leads_to(p, q)``: from every reachable configuration satisfying ``p``, every run
  reaches one satisfying ``q``.

No fairness is assumed: a run may take any enabled transition at every step, and may
loop forever, so a cycle that avoids ``q`` is a counterexample, as is a run that stops
(in a terminal or deadlocked configuration) before ``q``. The counterexample of a
liveness property is the events from a start to where it fails, then a run that
avoids the goal: ending, or repeating (a lasso).

``p`` and ``q`` are ``pred(state, data)``, as invariants are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from .definition import Data

__all__ = ["Pred", "Property", "always", "eventually", "leads_to", "never"]

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
