"""What an operator does to a projection, and what they read of it.

- ``status``: each projection's checkpoint, how far behind the log it is (positions,
  and seconds since the oldest event it has not applied was recorded), its runner and
  its failure, if stopped.
- ``retry``: clear the failure; the runner tries the event again.
- ``skip``: move the checkpoint past the failed event, with a reason.
- ``rebuild``: build the read model anew from position 0 into fresh tables, swapped
  in once caught up (a projection whose ``version`` changed is rebuilt by its runner
  without asking).

Both actions are recorded first in the ledger stream ``projection-<name>``
(``ProjectionRetried``, ``ProjectionSkipped``: who, why, which event), then applied:
an event is never skipped without a record of it (a crash in between leaves a record
of a skip not yet applied, visible, and the action can be repeated).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import ProjectionNotFailedError, ProjectionNotFoundError
from ..events import Metadata
from ..registry import EventRegistry
from ..resilience.book import default_actor
from .state import ProjectionFailure, ProjectionRow, Rebuild

if TYPE_CHECKING:
    from ..store import WorkflowStore

__all__ = [
    "ProjectionRebuildRequested",
    "ProjectionRetried",
    "ProjectionSkipped",
    "ProjectionStatus",
    "projection_registry",
    "rebuild",
    "retry",
    "skip",
    "status",
]

STREAM_PREFIX = "projection-"


class ProjectionRetried(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    event_id: str
    error_type: str
    message: str
    actor: str
    reason: str | None = None


class ProjectionRebuildRequested(msgspec.Struct, frozen=True, kw_only=True):
    generation: int
    version: int
    actor: str
    reason: str


class ProjectionSkipped(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    event_id: str
    event_type: str
    error_type: str
    message: str
    actor: str
    reason: str


def projection_registry(registry: EventRegistry) -> EventRegistry:
    for cls, name in (
        (ProjectionRetried, "projection.retried"),
        (ProjectionSkipped, "projection.skipped"),
        (ProjectionRebuildRequested, "projection.rebuild_requested"),
    ):
        if registry.class_of(name) is None:
            registry.register(cls, name)
    return registry


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    name: str
    position: int
    head: int
    behind: int
    """Positions between the checkpoint and the log's head (on PostgreSQL, gaps in
    the positions count too: an upper bound of the events)."""
    seconds_behind: float
    """Since the oldest event not applied yet was recorded; 0 when caught up."""
    owner: str | None
    lease_until_us: int | None
    failure: ProjectionFailure | None
    generation: int = 0
    rebuild: Rebuild | None = None
    """A generation under way (queries read the live one until it has caught up)."""


async def status(store: WorkflowStore, name: str | None = None) -> list[ProjectionStatus]:
    rows = await store.list_projections()
    if name is not None:
        rows = [r for r in rows if r.name == name]
        if not rows:
            raise ProjectionNotFoundError(name)
    head = await store.head_position()
    now = time.time_ns() // 1_000
    found = []
    for row in rows:
        seconds = 0.0
        if row.position < head:
            # The row, not the event: its time is all we need, and an event this code
            # cannot decode (erased personal data, a type it lacks) must not stop
            # the listing.
            nxt = await store.read_rows(from_position=row.position + 1, limit=1)
            if nxt:
                seconds = max(0.0, (now - nxt[0].recorded_at_us) / 1_000_000)
        found.append(
            ProjectionStatus(
                row.name,
                row.position,
                head,
                max(0, head - row.position),
                round(seconds, 3),
                row.owner,
                row.lease_until_us,
                row.failure,
                row.generation,
                row.rebuild,
            )
        )
    return found


async def rebuild(
    store: WorkflowStore, name: str, *, reason: str, actor: str | None = None
) -> Rebuild:
    """Build the projection's read model anew from position 0 into fresh tables; its
    runner swaps them in once caught up (queries read the old ones until then)."""
    if not reason or not reason.strip():
        raise ProjectionNotFailedError(name, "a rebuild needs a reason (it is recorded)")
    if name.startswith("relay_"):
        # Accepted, it was never carried out (the relay has no tables to swap), and
        # its status showed a rebuild under way for ever.
        raise ProjectionNotFailedError(
            name, "a relay publishes messages and keeps no read model to rebuild"
        )
    row = await store.projection_row(name)
    if row is None:
        raise ProjectionNotFoundError(name)
    who = actor or default_actor()
    planned = row.rebuild or Rebuild(row.generation + 1, row.version, 0)
    requested = ProjectionRebuildRequested(
        generation=planned.generation, version=planned.version, actor=who, reason=reason
    )
    await _record(store, name, requested, who, reason)
    return await store.begin_rebuild(name, version=row.version)


async def _failed(store: WorkflowStore, name: str) -> tuple[ProjectionRow, ProjectionFailure]:
    row = await store.projection_row(name)
    if row is None:
        raise ProjectionNotFoundError(name)
    if row.failure is None:
        raise ProjectionNotFailedError(name)
    return row, row.failure


async def _record(
    store: WorkflowStore, name: str, event: Any, who: str, reason: str | None
) -> None:
    """An operator's action, in ``projection-<name>``, before it takes effect."""
    projection_registry(store.registry)
    await store.append(STREAM_PREFIX + name, [event], metadata=Metadata(actor=who, reason=reason))


async def retry(
    store: WorkflowStore, name: str, *, actor: str | None = None, reason: str | None = None
) -> ProjectionFailure:
    """Clear the projection's failure (recorded first); the failure it had."""
    _, failure = await _failed(store, name)
    who = actor or default_actor()
    retried = ProjectionRetried(
        position=failure.position,
        event_id=failure.event_id,
        error_type=failure.error_type,
        message=failure.message,
        actor=who,
        reason=reason,
    )
    await _record(store, name, retried, who, reason)
    if not await store.retry_projection(name):
        raise ProjectionNotFailedError(name, "its failure was cleared meanwhile")
    return failure


async def skip(
    store: WorkflowStore,
    name: str,
    *,
    reason: str,
    actor: str | None = None,
    position: int | None = None,
) -> ProjectionFailure:
    """Move the checkpoint past the failed event (``position``, if given, must be
    it), recorded first with who and why; the failure skipped."""
    if not reason or not reason.strip():
        raise ProjectionNotFailedError(name, "a skip needs a reason (it is recorded)")
    _, failure = await _failed(store, name)
    if position is not None and position != failure.position:
        raise ProjectionNotFailedError(
            name, f"it failed at position {failure.position}, not {position}"
        )
    who = actor or default_actor()
    skipped = ProjectionSkipped(
        position=failure.position,
        event_id=failure.event_id,
        event_type=failure.event_type,
        error_type=failure.error_type,
        message=failure.message,
        actor=who,
        reason=reason,
    )
    await _record(store, name, skipped, who, reason)
    if not await store.skip_projection(name, failure.position):
        raise ProjectionNotFailedError(name, "it moved meanwhile: look again")
    return failure
