"""Which executor runs a pass over an instance: a definition's kind decides.

The engine runs passes through this door only (``host.Executor``), so it imports
neither kind: a code-first workflow replays its function (``run._Run``), a state
machine folds its recorded transitions and acts on the event in turn
(``statemachine.runtime.MachineRun``).
"""

from __future__ import annotations

from typing import Any

from ..statemachine.definition import Machine
from ..statemachine.runtime import MachineRun
from .definition import WorkflowDefinition
from .history import History
from .host import Executor, RunHost
from .run import _Run

__all__ = ["Definition", "executor"]

Definition = WorkflowDefinition[Any, Any] | Machine
"""What an engine runs instances of."""


def executor(
    definition: Definition, host: RunHost, history: History, *, query: bool = False
) -> Executor:
    if isinstance(definition, Machine):
        return MachineRun(host, definition, history, query=query)
    return _Run(host, definition, history, query=query)
