"""CQRS read models built from the ledger: declared tables, handlers per event type,
a runner that commits each batch's writes with its checkpoint (exactly once), one
runner per projection at a time. See ``docs/adr/015-projections.md``."""

from __future__ import annotations

from .definition import Handler, Projection
from .readmodel import ReadModel
from .runner import ProjectionRunner
from .state import ProjectionFailure, ProjectionLease, ProjectionRow
from .tables import Table
from .view import View

__all__ = [
    "Handler",
    "Projection",
    "ProjectionFailure",
    "ProjectionLease",
    "ProjectionRow",
    "ProjectionRunner",
    "ReadModel",
    "Table",
    "View",
]
