"""A code-first workflow instance as a diagram of what its history shows: the
commands its code issued (steps, timers, signals, children, compensations), in order,
each with its outcome, from the start to its end or the wait it is in. Mermaid
(``flowchart LR``) or Graphviz DOT; ``ledgerflow diagram --instance`` prints it.

The code is not needed: a history says which commands ran and how they ended, which
is what someone asking "where is this order, and what happened to it" wants.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..events import RecordedEvent
from .history import (
    ChildDone,
    ChildStarted,
    CompensationDone,
    CompensationFailed,
    CompensationScheduled,
    Finished,
    SignalTaken,
    SignalTimedOut,
    SignalWaiting,
    Started,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    StepParked,
    StepScheduled,
    TimerFired,
    TimerStarted,
)

__all__ = ["Node", "history_dot", "history_mermaid", "history_nodes"]


@dataclass(frozen=True, slots=True)
class Node:
    key: str
    label: str
    kind: str
    """``done``, ``failed``, ``waiting`` or ``neutral``: how it is drawn."""


def history_nodes(events: list[RecordedEvent]) -> list[Node]:
    """The start, each command (by seq) with its outcome, and the end if any."""
    nodes: list[Node] = []
    commands: dict[int, list[Any]] = {}
    finished: Finished | None = None
    for event in events:
        data = event.data
        if isinstance(data, Started):
            nodes.append(Node("start", f"started: {data.name} v{data.version}", "neutral"))
        elif isinstance(data, Finished):
            finished = data
        elif hasattr(data, "seq") and hasattr(data, "kind"):
            commands.setdefault(data.seq, []).append(data)
    for seq in sorted(commands):
        if commands[seq][0].kind in ("now", "machine"):
            continue  # clock readings: no step of the process; machines have their own
        nodes.append(_command(seq, commands[seq]))
    if finished is not None:
        kind = "done" if finished.status == "completed" else "failed"
        said = (
            finished.status
            if finished.message is None
            else f"{finished.status}: {finished.message}"
        )
        nodes.append(Node("finish", said, kind))
    return nodes


def _command(seq: int, events: list[Any]) -> Node:
    first, last = events[0], events[-1]
    name = f"{first.kind} {first.name}"
    retries = sum(isinstance(e, StepAttemptFailed) for e in events)
    tries = f", {retries + 1} attempts" if retries else ""
    where = f" on {first.queue}" if isinstance(first, StepScheduled | CompensationScheduled) else ""
    outcome: tuple[str, str]
    if isinstance(last, StepDone | SignalTaken | TimerFired | CompensationDone):
        outcome = ("done", "done")
    elif isinstance(last, ChildDone):
        outcome = ("done" if last.status == "completed" else "failed", last.status)
    elif isinstance(last, StepFailed | CompensationFailed):
        outcome = ("failed", f"failed: {last.error_type}")
    elif isinstance(last, StepParked):
        outcome = ("waiting", "parked for an operator")
    elif isinstance(last, SignalTimedOut):
        outcome = ("done", "timed out")
    elif isinstance(last, SignalWaiting | TimerStarted | ChildStarted):
        outcome = ("waiting", "waiting")
    elif isinstance(last, StepAttemptFailed):
        outcome = ("waiting", "retrying")
    else:
        outcome = ("waiting", "running")
    kind, said = outcome
    return Node(f"c{seq}", f"{seq}. {name}{where}<br/>{said}{tries}", kind)


_STYLES = {
    "done": "fill:#e6f4ea,stroke:#2e7d32",
    "failed": "fill:#fdecea,stroke:#c62828",
    "waiting": "fill:#ffe08a,stroke:#b8860b,stroke-width:3px",
}


def _text(label: str) -> str:
    return label.replace('"', "'")


def history_mermaid(events: list[RecordedEvent]) -> str:
    nodes = history_nodes(events)
    lines = ["flowchart LR"]
    for node in nodes:
        shape = (
            f'(["{_text(node.label)}"])'
            if node.key in ("start", "finish")
            else f'["{_text(node.label)}"]'
        )
        lines.append(f"    {node.key}{shape}")
    lines.extend(f"    {a.key} --> {b.key}" for a, b in itertools.pairwise(nodes))
    for kind, style in _STYLES.items():
        members = [n.key for n in nodes if n.kind == kind]
        if members:
            lines.append(f"    classDef {kind} {style}")
            lines.append(f"    class {','.join(members)} {kind}")
    return "\n".join(lines) + "\n"


def history_dot(events: list[RecordedEvent], title: str = "history") -> str:
    nodes = history_nodes(events)
    fills = {"done": "#e6f4ea", "failed": "#fdecea", "waiting": "#ffe08a"}
    lines = [f'digraph "{_text(title)}" {{', "    rankdir=LR;", "    node [shape=box];"]
    for node in nodes:
        label = _text(node.label).replace("<br/>", "\\n")
        fill = fills.get(node.kind)
        style = f', style=filled, fillcolor="{fill}"' if fill else ""
        lines.append(f'    {node.key} [label="{label}"{style}];')
    lines.extend(f"    {a.key} -> {b.key};" for a, b in itertools.pairwise(nodes))
    lines.append("}")
    return "\n".join(lines) + "\n"
