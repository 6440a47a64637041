"""What the store keeps of a projection: its checkpoint, lease, failure, and the
generation of its tables (and the one a rebuild is making)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProjectionFailure", "ProjectionLease", "ProjectionRow", "Rebuild"]


@dataclass(frozen=True, slots=True)
class ProjectionLease:
    """A runner's hold on a projection: every commit checks it is still this one."""

    name: str
    owner: str
    epoch: int
    position: int
    """The checkpoint when it was claimed."""


@dataclass(frozen=True, slots=True)
class ProjectionFailure:
    position: int
    event_id: str
    event_type: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True)
class ProjectionRow:
    name: str
    position: int
    """The checkpoint: every event up to it is applied."""
    event_at_us: int | None
    """When the last applied event was recorded."""
    owner: str | None
    epoch: int
    lease_until_us: int | None
    failure: ProjectionFailure | None
    failed_at_us: int | None
    updated_at_us: int
    generation: int = 0
    """The tables' generation queries read (a rebuild makes the next one)."""
    version: int = 0
    """The projection's version the live generation was built by."""
    rebuild: Rebuild | None = None


@dataclass(frozen=True, slots=True)
class Rebuild:
    """A generation being built from position 0 beside the live one; it replaces it
    once it has caught up with the log."""

    generation: int
    version: int
    position: int
