"""Who did what: the events people and services recorded (each event whose
metadata names an actor), filtered by actor, tenant, time and event type, for
auditors, as CSV or JSON. Read from the raw log: an event whose data no longer
decodes still shows who wrote it."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

import msgspec

from .events import Metadata
from .hashing import from_micros, to_micros
from .store.ports import EventStore
from .tenants import is_tenant_name
from .workflow.journal import STREAM_PREFIX

__all__ = ["Action", "actions", "actions_csv", "actions_json"]

_METADATA = msgspec.json.Decoder(Metadata)


@dataclass(frozen=True, slots=True)
class Action:
    """One event with an actor: where it is, when, who, for which tenant, and why."""

    position: int
    recorded_at: datetime
    stream_id: str
    version: int
    type: str
    actor: str
    tenant: str | None
    reason: str | None
    correlation_id: str | None


def _tenant(stream_id: str, metadata: Metadata) -> str | None:
    """The tenant the event is for: its metadata's, or the namespace of the workflow
    instance whose stream it is in (``wf-<tenant>/<id>``)."""
    if metadata.tenant:
        return metadata.tenant
    if stream_id.startswith(STREAM_PREFIX) and "/" in stream_id:
        # Only a prefix that can name a tenant is one: an id such as "<b>x</b>/1"
        # (an all-tenants caller's) belongs to nobody's namespace.
        prefix = stream_id[len(STREAM_PREFIX) :].split("/", 1)[0]
        return prefix if is_tenant_name(prefix) else None
    return None


async def actions(
    store: EventStore,
    *,
    actor: str | None = None,
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Collection[str] = (),
    batch_size: int = 2000,
) -> AsyncIterator[Action]:
    """Every event with an actor, in the log's order, that matches each filter given:
    ``actor`` and ``tenant`` exactly, recorded in [``since``, ``until``), of one of
    ``types``."""
    since_us = None if since is None else to_micros(since)
    until_us = None if until is None else to_micros(until)
    position = 1
    while rows := await store.read_rows(from_position=position, limit=batch_size):
        position = rows[-1].position + 1
        for row in rows:
            if since_us is not None and row.recorded_at_us < since_us:
                continue
            if until_us is not None and row.recorded_at_us >= until_us:
                continue
            if types and row.type not in types:
                continue
            try:
                metadata = _METADATA.decode(row.metadata) if row.metadata else Metadata()
            except msgspec.DecodeError:
                metadata = Metadata()  # unreadable metadata names nobody (verify reports it)
            if metadata.actor is None or (actor is not None and metadata.actor != actor):
                continue
            owner = _tenant(row.stream_id, metadata)
            if tenant is not None and owner != tenant:
                continue
            yield Action(
                row.position,
                from_micros(row.recorded_at_us),
                row.stream_id,
                row.version,
                row.type,
                metadata.actor,
                owner,
                metadata.reason,
                metadata.correlation_id,
            )


_FIELDS = [
    "position",
    "recorded_at",
    "stream_id",
    "version",
    "type",
    "actor",
    "tenant",
    "reason",
    "correlation_id",
]


def _plain(action: Action) -> dict[str, object]:
    row = asdict(action)
    row["recorded_at"] = action.recorded_at.isoformat()
    return row


def _inert(value: object) -> object:
    # A cell a spreadsheet would run as a formula (a reason typed into the API may
    # start with "="): quoted as text, as OWASP's CSV-injection advice has it.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def actions_csv(found: Iterable[Action]) -> str:
    """RFC 4180 CSV with a header row; text that a spreadsheet would take for a
    formula starts with a quote."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for action in found:
        writer.writerow({k: _inert(v) for k, v in _plain(action).items()})
    return buffer.getvalue()


def actions_json(found: Iterable[Action]) -> str:
    """A JSON array of objects, one per action."""
    return json.dumps([_plain(a) for a in found], ensure_ascii=False, indent=1)
