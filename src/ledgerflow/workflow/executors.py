"""Which executor runs a pass over an instance: a definition's kind decides.

The engine runs passes through this door only (``host.Executor``), so it imports
neither kind: a code-first workflow replays its function (``run._Run``), a state
machine folds its recorded transitions and acts on the event in turn
(``statemachine.runtime.MachineRun``).
"""

from __future__ import annotations

from typing import Any

from ..errors import WorkflowDefinitionError
from ..statemachine.definition import Machine
from ..statemachine.runtime import MachineRun
from .definition import WorkflowDefinition
from .history import History
from .host import Executor, RunHost
from .run import _Run

__all__ = ["Definition", "executor", "other_kind"]

Definition = WorkflowDefinition[Any, Any] | Machine
"""What an engine runs instances of."""


def executor(
    definition: Definition,
    host: RunHost,
    history: History,
    *,
    query: bool = False,
    keep: bool = False,
) -> Executor:
    """``keep``: a pass that waits may end with its body alive, for the host to keep
    and resume (code-first workflows; a state machine's pass holds no body)."""
    if isinstance(definition, Machine):
        return MachineRun(host, definition, history, query=query)
    run = _Run(host, definition, history, query=query)
    run.keep = keep and not query
    return run


def other_kind(definition: Definition, history: History) -> WorkflowDefinitionError | None:
    """Why ``definition`` must not run this instance: it is of the other kind (a
    state machine's under a code-first workflow's name and version, or the reverse,
    registered by engines in different processes). Run, each would write its
    records into the other's history; parked, the instance waits for an engine of
    its own kind, which resumes it."""
    kind = history.instance_kind()
    if kind is None or (kind == "machine") == isinstance(definition, Machine):
        return None
    machine = kind == "machine"
    started = history.started
    mine, theirs = ("a code-first workflow", "a state machine")
    if not machine:
        mine, theirs = theirs, mine
    return WorkflowDefinitionError(
        f"instance {history.workflow_id!r} is {theirs} {started.name!r} "
        f"v{history.definition_version}, and this engine registers {mine} of that name "
        "and version: give the two different names (a name and version must be unique "
        "across the engines on one database)"
    )
