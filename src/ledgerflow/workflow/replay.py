"""Replaying a recorded history against workflow code, outside any engine.

Used to check a deploy before it reaches running instances: export histories of
real instances (``export_history``), keep them as golden files, and ``replay`` them
against the new code in tests. A changed path raises ``NonDeterminismError`` naming
the first command that differs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec

from ..errors import NonDeterminismError
from ..events import Metadata, RecordedEvent
from ..hashing import to_micros
from ..registry import EventRegistry
from .definition import WorkflowDefinition
from .history import History, history_registry
from .host import Park, ReplayHost, Suspend
from .run import _Run

__all__ = ["export_history", "replay"]

_registry: EventRegistry = history_registry()


def export_history(events: list[RecordedEvent]) -> list[dict[str, Any]]:
    """A workflow stream as plain JSON-ready dicts: version, type and data."""
    return [
        {
            "stream_id": e.stream_id,
            "version": e.version,
            "type": e.type,
            "data": msgspec.to_builtins(e.data),
        }
        for e in events
    ]


async def replay(
    definition: WorkflowDefinition[Any, Any],
    history: list[dict[str, Any]] | list[RecordedEvent],
) -> Any:
    """Re-run ``definition`` over ``history`` without acting; returns what the
    workflow last exposed. Raises ``NonDeterminismError`` where code and record part.
    """
    events: list[RecordedEvent] = []
    for index, item in enumerate(history):
        if isinstance(item, RecordedEvent):
            events.append(item)
        else:
            assert isinstance(item, dict)
            events.append(_recorded(index, item))
    workflow_id = events[0].stream_id.removeprefix("wf-") if events else "replay"
    indexed = History.of(workflow_id, events)
    run = _Run(ReplayHost(to_micros(datetime.now(UTC))), definition, indexed, query=True)
    try:
        exposed = (await run.execute()).exposed
    except Suspend:
        exposed = run.exposed
    except Park as park:
        raise park.error from None
    for seq, name, location in run.retyped_waits:
        # Not a divergence while running (the engine records the new type's schema
        # with the wait), but until the instance runs again its senders are checked
        # against the old one, and the code refuses what fits it: a deploy to gate.
        raise NonDeterminismError(
            workflow_id,
            seq,
            f"signal {name!r} awaited with another type (senders check payloads "
            "against its schema)",
            f"signal {name!r} with a type whose schema differs: keep the type, or wait "
            "for a new signal name behind ctx.patched",
            location,
        )
    return exposed


def _recorded(index: int, item: dict[str, Any]) -> RecordedEvent:
    data = _registry.decode(item["type"], 1, msgspec.json.encode(item["data"]))
    version = int(item.get("version", index + 1))
    return RecordedEvent(
        id=UUID(int=version),
        stream_id=str(item.get("stream_id", "wf-replay")),
        version=version,
        position=version,
        type=item["type"],
        schema_version=1,
        data=data,
        metadata=Metadata(),
        recorded_at=datetime.fromtimestamp(0, UTC),
        hash=b"",
        prev_hash=b"",
    )
