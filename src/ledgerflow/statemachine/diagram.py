"""A state machine as a diagram: Mermaid (``stateDiagram-v2``) or Graphviz DOT, with
states to highlight (an instance's current state, the path it took)."""

from __future__ import annotations

import re
from collections.abc import Collection

from .definition import Machine

__all__ = ["dot", "mermaid"]


def _id(name: str) -> str:
    """A name both languages take as an identifier."""
    safe = re.sub(r"\W", "_", name)
    return safe if safe and not safe[0].isdigit() else f"s_{safe}"


def _edge_label(event: str, guarded: bool) -> str:
    return f"{event} [guard]" if guarded else event


def mermaid(machine: Machine, *, current: str | None = None, path: Collection[str] = ()) -> str:
    """Mermaid ``stateDiagram-v2`` source: ``[*]`` into the initial state and out of
    terminal ones; ``current`` and the states of ``path`` styled apart."""
    lines = ["stateDiagram-v2"]
    for state in machine.states.values():
        if _id(state.name) != state.name:
            lines.append(f'    state "{state.name}" as {_id(state.name)}')
    lines.append(f"    [*] --> {_id(machine.initial().name)}")
    for i, t in enumerate(machine.transitions, start=1):
        label = _edge_label(t.event, t.guard is not None)
        sources, targets = t.sources or (t.source,), t.targets or (t.target,)
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
            if name in machine.states and name != current:
                lines.append(f"    class {_id(name)} visited")
    if current is not None and current in machine.states:
        lines.append("    classDef current fill:#ffe08a,stroke:#b8860b,stroke-width:3px")
        lines.append(f"    class {_id(current)} current")
    return "\n".join(lines) + "\n"


def dot(machine: Machine, *, current: str | None = None, path: Collection[str] = ()) -> str:
    """Graphviz DOT source: terminal states double-circled, the initial one entered
    from a point; ``current`` filled, the states of ``path`` shaded."""
    lines = [f'digraph "{machine.name} v{machine.version}" {{', "    rankdir=LR;"]
    lines.append('    __start [shape=point, label=""];')
    for state in machine.states.values():
        attrs = ["shape=doublecircle" if state.terminal else "shape=circle"]
        if state.name == current:
            attrs.append('style=filled, fillcolor="#ffe08a"')
        elif state.name in path:
            attrs.append('style=filled, fillcolor="#e8f0fe"')
        lines.append(f'    {_id(state.name)} [label="{state.name}", {", ".join(attrs)}];')
    lines.append(f"    __start -> {_id(machine.initial().name)};")
    for i, t in enumerate(machine.transitions, start=1):
        label = _edge_label(t.event, t.guard is not None)
        sources, targets = t.sources or (t.source,), t.targets or (t.target,)
        if len(sources) == 1 and len(targets) == 1:
            lines.append(f'    {_id(sources[0])} -> {_id(targets[0])} [label="{label}"];')
            continue
        bar = f"__bar_{i}"
        lines.append(
            f'    {bar} [shape=box, style=filled, fillcolor=black, label="", '
            "height=0.05, width=0.6];"
        )
        lines.extend(f'    {_id(s)} -> {bar} [label="{label}"];' for s in sources)
        lines.extend(f"    {bar} -> {_id(t_)};" for t_ in targets)
    lines.append("}")
    return "\n".join(lines) + "\n"
