"""How a configuration moves: the one firing rule that verification explores and the
runtime applies, so what ``verify`` proved is what instances do.

A marking is the sorted tuple of states a configuration is in (several with parallel
regions). A transition is enabled when the marking holds each of its sources (as
often as it names them) and its guard holds; firing it takes its sources out and
puts its targets in. A transition whose activity fails moves to its ``failure``
states instead, if it names any, and otherwise leaves the marking as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .definition import Machine, Transition

__all__ = ["by_source", "candidates", "ended", "final", "fire", "fire_to"]


def by_source(machine: Machine) -> dict[str, list[tuple[int, Transition]]]:
    """Each transition (with its index) under its first source: the lookup
    ``candidates`` takes."""
    found: dict[str, list[tuple[int, Transition]]] = {}
    for index, t in enumerate(machine.transitions):
        found.setdefault(t.sources[0], []).append((index, t))
    return found


def candidates(
    by_source: Mapping[str, list[tuple[int, Transition]]], marking: tuple[str, ...]
) -> list[tuple[int, Transition]]:
    """The transitions whose sources the marking holds (each as often as it needs),
    in declaration order."""
    held: dict[str, int] = {}
    for state in marking:
        held[state] = held.get(state, 0) + 1
    found: list[tuple[int, Transition]] = []
    for state in held:
        for index, t in by_source.get(state, ()):
            need: dict[str, int] = {}
            for source in t.sources:
                need[source] = need.get(source, 0) + 1
            if all(held.get(s, 0) >= n for s, n in need.items()):
                found.append((index, t))
    found.sort(key=lambda pair: pair[0])
    return found


def fire_to(
    marking: tuple[str, ...], sources: Sequence[str], targets: Sequence[str]
) -> tuple[str, ...]:
    left = list(marking)
    for source in sources:
        left.remove(source)
    return tuple(sorted([*left, *targets]))


def fire(marking: tuple[str, ...], t: Transition) -> tuple[str, ...]:
    return fire_to(marking, t.sources, t.targets)


def final(machine: Machine, marking: tuple[str, ...]) -> bool:
    """Completed: in one terminal state alone."""
    return len(marking) == 1 and machine.states[marking[0]].terminal


def ended(machine: Machine, marking: tuple[str, ...]) -> bool:
    """Some region reached a terminal state."""
    return any(machine.states[s].terminal for s in marking)
