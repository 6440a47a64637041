"""A state machine as a diagram: Mermaid (``stateDiagram-v2``) or Graphviz DOT, with
an instance's current state, the states it went through and the transitions it took
highlighted. Guarded transitions say so; a transition whose activity may fail is
drawn a second time (dashed in DOT) to its failure states; a state's timeout labels
the transition its event takes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from datetime import timedelta

from .definition import Machine, Transition

__all__ = ["dot", "mermaid"]


_KEYWORDS = frozenset(
    # DOT's (case-insensitive) and Mermaid's stateDiagram words: not node ids.
    {"node", "edge", "graph", "digraph", "subgraph", "strict"}
    | {"state", "end", "direction", "class", "classdef", "note", "as", "style", "click"}
)
_OURS = re.compile(r"__start|__bar_\d+|fork_\d+|join_\d+")
"""The ids the diagrams give their own nodes (the start point, fork and join bars)."""


def _safe(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return safe if safe and not safe[0].isdigit() else f"s_{safe}"


def _free(name: str) -> bool:
    return name.lower() not in _KEYWORDS and not _OURS.fullmatch(name)


def _ids(machine: Machine) -> dict[str, str]:
    """Each state's node id, in both languages: its name if that is an ASCII
    identifier; else the name with other characters made ``_`` if no other state
    comes to the same; else that with a hash of the name, so that distinct states
    never share a node and an id depends on no other state's place (adding a state
    renames only those it collides with)."""
    names = list(machine.states)
    bases = {n: _safe(n) for n in names}
    plain = {n for n in names if bases[n] == n and _free(n)}
    ids: dict[str, str] = {n: n for n in plain}
    for n in names:
        if n in plain:
            continue
        base = bases[n]
        shared = base in plain or sum(b == base for b in bases.values()) > 1
        if not shared and _free(base):
            ids[n] = base
        else:
            ids[n] = f"{base}_{hashlib.sha256(n.encode()).hexdigest()[:8]}"
    taken: set[str] = set()
    for n in names:  # should 8 hex digits ever collide: still never one node
        while ids[n] in taken:
            ids[n] += "_"
        taken.add(ids[n])
    return ids


def _dot_text(text: str) -> str:
    """``text`` inside a DOT double-quoted string, shown as it is (lines centred)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return re.sub(r"\r\n|\r|\n", r"\\n", text)


def _mermaid_text(text: str) -> str:
    """``text`` as a Mermaid label: quotes, statement separators and markup as
    entity codes (Mermaid decodes ``#name;``), lines as ``<br/>``."""
    return _MERMAID_ESCAPES.sub(lambda m: _MERMAID_CODES[m.group()], text)


_MERMAID_CODES = {
    "#": "#35;",
    "&": "#amp;",
    "<": "#lt;",
    ">": "#gt;",
    '"': "#quot;",
    ";": "#59;",
    "\r\n": "<br/>",
    "\r": "<br/>",
    "\n": "<br/>",
}
_MERMAID_ESCAPES = re.compile(r'\r\n|[#&<>";\r\n]')


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
    ids = _ids(machine)
    lines = ["stateDiagram-v2"]
    for state in machine.states.values():
        if ids[state.name] != state.name:
            lines.append(f'    state "{_mermaid_text(state.name)}" as {ids[state.name]}')
    lines.append(f"    [*] --> {ids[machine.initial().name]}")
    for i, t in enumerate(machine.transitions, start=1):
        label = _mermaid_text(_edge_label(machine, t, taken))
        sources, targets = t.sources or (t.source,), t.targets or (t.target,)
        if t.failure:
            failed = f"{t.event} fails" + (" ✓" if f"{t.label()} (failed)" in taken else "")
            lines.extend(
                f"    {ids[s]} --> {ids[f]} : {_mermaid_text(failed)}"
                for s in sources
                for f in t.failure
            )
        if len(sources) == 1 and len(targets) == 1:
            lines.append(f"    {ids[sources[0]]} --> {ids[targets[0]]} : {label}")
            continue
        # A fork or join: a bar, the event on the edge that enters or leaves it.
        bar = f"{'join' if len(sources) > 1 else 'fork'}_{i}"
        lines.append(f"    state {bar} <<{'join' if len(sources) > 1 else 'fork'}>>")
        if len(sources) > 1:
            lines.extend(f"    {ids[s]} --> {bar}" for s in sources)
        else:
            lines.append(f"    {ids[sources[0]]} --> {bar} : {label}")
        if len(sources) > 1 and len(targets) == 1:
            lines.append(f"    {bar} --> {ids[targets[0]]} : {label}")
        else:
            lines.extend(f"    {bar} --> {ids[t_]}" for t_ in targets)
    for state in machine.states.values():
        if state.terminal:
            lines.append(f"    {ids[state.name]} --> [*]")
    if path:
        lines.append("    classDef visited fill:#e8f0fe,stroke:#4a6fa5")
        for name in path:
            if name in machine.states and name not in _current(machine, current):
                lines.append(f"    class {ids[name]} visited")
    now = _current(machine, current)
    if now:
        lines.append("    classDef current fill:#ffe08a,stroke:#b8860b,stroke-width:3px")
        lines.extend(f"    class {ids[name]} current" for name in now)
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
    ids = _ids(machine)
    title = _dot_text(f"{machine.name} v{machine.version}")
    lines = [f'digraph "{title}" {{', "    rankdir=LR;"]
    lines.append('    __start [shape=point, label=""];')
    for state in machine.states.values():
        attrs = ["shape=doublecircle" if state.terminal else "shape=circle"]
        if state.name in _current(machine, current):
            attrs.append('style=filled, fillcolor="#ffe08a"')
        elif state.name in path:
            attrs.append('style=filled, fillcolor="#e8f0fe"')
        lines.append(
            f'    {ids[state.name]} [label="{_dot_text(state.name)}", {", ".join(attrs)}];'
        )
    lines.append(f"    __start -> {ids[machine.initial().name]};")
    for i, t in enumerate(machine.transitions, start=1):
        label = _dot_text(_edge_label(machine, t, taken))
        bold = ', penwidth=2.5, color="#b8860b"' if t.label() in taken else ""
        sources, targets = t.sources or (t.source,), t.targets or (t.target,)
        failed = ', penwidth=2.5, color="#b8860b"' if f"{t.label()} (failed)" in taken else ""
        lines.extend(
            f'    {ids[s]} -> {ids[f]} [label="{_dot_text(t.event)} fails", style=dashed{failed}];'
            for s in sources
            for f in t.failure
        )
        if len(sources) == 1 and len(targets) == 1:
            lines.append(f'    {ids[sources[0]]} -> {ids[targets[0]]} [label="{label}"{bold}];')
            continue
        bar = f"__bar_{i}"
        lines.append(
            f'    {bar} [shape=box, style=filled, fillcolor=black, label="", '
            "height=0.05, width=0.6];"
        )
        lines.extend(f'    {ids[s]} -> {bar} [label="{label}"{bold}];' for s in sources)
        lines.extend(f"    {bar} -> {ids[t_]};" for t_ in targets)
    lines.append("}")
    return "\n".join(lines) + "\n"
