"""State-machine workflows: declarative definitions, verified before they run.

This part holds the definitions (``Machine``) and their verification (``verify``);
running instances on the engine comes with the executor interface (issue 15)."""

from __future__ import annotations

from .definition import Event, Machine, State, Transition
from .temporal import Property, always, eventually, leads_to, never
from .verify import Config, Finding, FindingKind, Report, verify

__all__ = [
    "Config",
    "Event",
    "Finding",
    "FindingKind",
    "Machine",
    "Property",
    "Report",
    "State",
    "Transition",
    "always",
    "eventually",
    "leads_to",
    "never",
    "verify",
]
