"""A state machine as a diagram: Mermaid (``stateDiagram-v2``) or Graphviz DOT, with
an instance's current state, the states it went through and the transitions it took
highlighted. Guarded transitions say so; a transition whose activity may fail is
drawn a second time (dashed in DOT) to its failure states; a state's timeout labels
the transition its event takes."""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import timedelta

from .definition import Machine, Transition

__all__ = ["dot", "mermaid"]


def _id(name: str) -> str:
    """A name both languages take as an identifier."""
    safe = re.sub(r"\W", "_", name)
    return safe if safe and not safe[0].isdigit() else f"s_{safe}"


def _edge_label(machine: Machine, t: Transition, taken: Collection[str]) -> str:
    label = f"{t.event} [guard]" if t.guard is not None else t.event
    timeouts = [
        machine.states[s].timeout
        for s in t.sources
        if machine.states[s].on_timeout == t.event and machine.states[s].timeout is not None
    ]
    if timeouts and timeouts[0] is not None:
        label += f" (after {_span(timeouts[0])})"
    return f"{label} ✓" if t.label() in taken else label


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def mermaid(
    machine: Machine,
    *,
    current: str | None = None,
    path: Collection[str] = (),
    taken: Collection[str] = (),
) -> str:
    """Mermaid ``stateDiagram-v2`` source: ``[*]`` into the initial state and out of
    terminal ones; ``current`` (states joined by ``+`` in parallel regions) and the
    states of ``path`` styled apart, the transitions ``taken`` (their labels)
    ticked."""
    lines = ["stateDiagram-v2"]
    for state in machine.states.values():
        if _id(state.name) != state.name:
            lines.append(f'    state "{state.name}" as {_id(state.name)}')
    lines.append(f"    [*] --> {_id(machine.initial().name)}")
    for i, t in enumerate(machine.transitions, start=1):
        label = _edge_label(machine, t, taken)
        sources, targets = t.sources or (t.source,), t.targets or (t.target,)
        if t.failure:
            failed = f"{t.event} fails" + (" ✓" if f"{t.label()} (failed)" in taken else "")
            lines.extend(
                f"    {_id(s)} --> {_id(f)} : {failed}" for s in sources for f in t.failure
            )
        if len(sources) == 1 and len(targets) == 1:
            lines.append(f"    {_id(sources[0])} --> {_id(targets[0])} : {label}")
            continue
        # A fork or join: a bar, the event on the edge that enters or leaves it.
        bar = f"{'join' if len(sources) > 1 else 'fork'}_{i}"
        lines.append(f"    state {bar} <<{'join' if len(sources) > 1 else 'fork'}>>")
        if len(sources) > 1:
            lines.extend(f"    {_id(s)} --> {bar}" for s in sources)
        else:
            lines.append(f"    {_id(sources[0])} --> {bar} : {label}")
        if len(sources) > 1 and len(targets) == 1:
            lines.append(f"    {bar} --> {_id(targets[0])} : {label}")
        else:
            lines.extend(f"    {bar} --> {_id(t_)}" for t_ in targets)
    for state in machine.states.values():
        if state.terminal:
            lines.append(f"    {_id(state.name)} --> [*]")
    if path:
        lines.append("    classDef visited fill:#e8f0fe,stroke:#4a6fa5")
        for name in path:
            if name in machine.states and name not in _current(machine, current):
                lines.append(f"    class {_id(name)} visited")
    now = _current(machine, current)
    if now:
        lines.append("    classDef current fill:#ffe08a,stroke:#b8860b,stroke-width:3px")
        lines.extend(f"    class {_id(name)} current" for name in now)
    return "\n".join(lines) + "\n"


def _current(machine: Machine, current: str | None) -> list[str]:
    if current is None:
        return []
    names = [current] if current in machine.states else current.split("+")
    return [name for name in names if name in machine.states]


def dot(
    machine: Machine,
    *,
    current: str | None = None,
    path: Collection[str] = (),
    taken: Collection[str] = (),
) -> str:
    """Graphviz DOT source: terminal states double-circled, the initial one entered
    from a point; ``current`` filled, the states of ``path`` shaded, the transitions
    ``taken`` drawn bold; failure edges dashed."""
    lines = [f'digraph "{machine.name} v{machine.version}" {{', "    rankdir=LR;"]
    lines.append('    __start [shape=point, label=""];')
    for state in machine.states.values():
        attrs = ["shape=doublecircle" if state.terminal else "shape=circle"]
        if state.name in _current(machine, current):
            attrs.append('style=filled, fillcolor="#ffe08a"')
        elif state.name in path:
            attrs.append('style=filled, fillcolor="#e8f0fe"')
        lines.append(f'    {_id(state.name)} [label="{state.name}", {", ".join(attrs)}];')
    lines.append(f"    __start -> {_id(machine.initial().name)};")
    for i, t in enumerate(machine.transitions, start=1):
        label = _edge_label(machine, t, taken)
        bold = ', penwidth=2.5, color="#b8860b"' if t.label() in taken else ""
        sources, targets = t.sources or (t.source,), t.targets or (t.target,)
        failed = ', penwidth=2.5, color="#b8860b"' if f"{t.label()} (failed)" in taken else ""
        lines.extend(
            f'    {_id(s)} -> {_id(f)} [label="{t.event} fails", style=dashed{failed}];'
            for s in sources
            for f in t.failure
        )
        if len(sources) == 1 and len(targets) == 1:
            lines.append(f'    {_id(sources[0])} -> {_id(targets[0])} [label="{label}"{bold}];')
            continue
        bar = f"__bar_{i}"
        lines.append(
            f'    {bar} [shape=box, style=filled, fillcolor=black, label="", '
            "height=0.05, width=0.6];"
        )
        lines.extend(f'    {_id(s)} -> {bar} [label="{label}"{bold}];' for s in sources)
        lines.extend(f"    {bar} -> {_id(t_)};" for t_ in targets)
    lines.append("}")
    return "\n".join(lines) + "\n"
