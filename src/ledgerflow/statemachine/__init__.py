"""State-machine workflows: declarative definitions, verified before they run.

A definition (``Machine``) is a value: ``verify`` explores it, the engine runs its
instances (``engine.start(machine, input)``, ``engine.execute(id, event, payload)``;
``runtime`` and ``client``), and ``diagram`` draws it."""

from __future__ import annotations

from .definition import (
    Activity,
    Data,
    Event,
    Machine,
    Payload,
    State,
    Transition,
    UnexploredFieldError,
)
from .instance import MachineCall, MachineOutcome, MachineState
from .temporal import Property, always, eventually, leads_to, never
from .verify import Config, Finding, FindingKind, Report, verify

__all__ = [
    "Activity",
    "Config",
    "Data",
    "Event",
    "Finding",
    "FindingKind",
    "Machine",
    "MachineCall",
    "MachineOutcome",
    "MachineState",
    "Payload",
    "Property",
    "Report",
    "State",
    "Transition",
    "UnexploredFieldError",
    "always",
    "eventually",
    "leads_to",
    "never",
    "verify",
]
