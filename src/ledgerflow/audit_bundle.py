"""Evidence bundles: one stream's events with the proof that they are in the ledger,
checkable offline by anyone with the log's public key (ADR 019).

A bundle holds every event of the stream up to a signed tree head, each with all
its stored fields, its leaf index and its inclusion proof, plus the signed head
and, when known, the definition the instance ran. ``check_bundle`` needs nothing
else: it recomputes each event's chain hash from its fields, follows the chain
from the genesis hash, checks every inclusion proof against the head and the
head's signature against the key. An event left out, added, edited or reordered,
or a head not signed by the key, fails it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from ._base64 import from_text, to_text
from .audit import row_hash
from .errors import AuditError
from .hashing import GENESIS_HASH, from_micros
from .ledger_tree import LogTree
from .merkle import leaf_hash, verify_inclusion
from .signing import LogVerifier, SignedTreeHead, TreeHead
from .store import EventRow
from .store.ports import EventStore

__all__ = ["FORMAT", "BundleReport", "check_bundle", "dumps", "make_bundle"]

FORMAT = "ledgerflow-audit-bundle/1"


async def make_bundle(
    store: EventStore, stream_id: str, *, definition: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle of ``stream_id`` up to the latest checkpoint, which must be signed.

    ``AuditError`` when there is none, it is unsigned, or it covers none of the
    stream's events. Events after the checkpoint are counted, not included: a
    later checkpoint covers them.
    """
    checkpoint = await store.latest_checkpoint()
    if checkpoint is None or checkpoint.signature is None or checkpoint.key_id is None:
        state = "no checkpoint" if checkpoint is None else "only an unsigned checkpoint"
        raise AuditError(
            f"{store.location} has {state}: run `ledgerflow audit checkpoint --key ...` first"
        )
    rows: list[EventRow] = []
    while True:
        batch = await store.read_stream_rows(stream_id, from_version=len(rows) + 1, limit=1000)
        rows.extend(batch)
        if len(batch) < 1000:
            break
    if not rows:
        raise AuditError(f"no stream {stream_id!r} in {store.location}")
    covered = [r for r in rows if r.position <= checkpoint.last_position]
    if not covered:
        raise AuditError(
            f"the latest checkpoint ({checkpoint.tree_size} events) predates stream "
            f"{stream_id!r}: checkpoint again first"
        )
    tree = await LogTree.load(store, checkpoint)
    events = []
    for row in covered:
        index = await tree.index_of(row.position)
        if index is None:
            raise AuditError(
                f"stream {stream_id!r} version {row.version} (position {row.position}) is "
                "not in the ledger's tree: run `ledgerflow audit verify`"
            )
        proof = await tree.inclusion(index)
        events.append(_event_json(row, index, proof))
    head = SignedTreeHead(
        TreeHead(checkpoint.tree_size, checkpoint.root, checkpoint.timestamp_ms),
        checkpoint.key_id,
        checkpoint.signature,
    )
    return {
        "format": FORMAT,
        "stream_id": stream_id,
        "created_at": datetime.now(UTC).isoformat(),
        "source": store.location,
        "tree_head": head.to_json(),
        "events": events,
        "events_after_head": len(rows) - len(covered),
        "definition": definition,
    }


def _event_json(row: EventRow, index: int, proof: list[bytes]) -> dict[str, Any]:
    return {
        "position": row.position,
        "event_id": str(row.id),
        "stream_id": row.stream_id,
        "version": row.version,
        "type": row.type,
        "schema_version": row.schema_version,
        "recorded_at": from_micros(row.recorded_at_us).isoformat(),
        "recorded_at_us": row.recorded_at_us,
        "data": to_text(row.data),
        "metadata": to_text(row.metadata),
        "prev_hash": to_text(row.prev_hash),
        "hash": to_text(row.hash),
        "leaf_index": index,
        "inclusion_proof": [to_text(p) for p in proof],
    }


@dataclass(frozen=True, slots=True)
class BundleReport:
    stream_id: str | None
    events: int
    tree_size: int | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_bundle(data: Any, verifier: LogVerifier) -> BundleReport:
    """Verify a bundle (parsed JSON) with nothing but the log's public key."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return BundleReport(None, 0, None, [f"not a {FORMAT} bundle"])
    problems: list[str] = []
    stream_id = data.get("stream_id")
    try:
        head = SignedTreeHead.from_json(data.get("tree_head"))
    except ValueError as exc:
        return BundleReport(stream_id, 0, None, [f"tree_head: {exc}"])
    if not verifier.verify(head):
        problems.append(f"the tree head of {head.tree_size} events is not signed by the given key")
    events = data.get("events")
    if not isinstance(events, list) or not events:
        return BundleReport(stream_id, 0, head.tree_size, [*problems, "the bundle has no events"])
    prev = GENESIS_HASH
    last_index = -1
    expected = 1
    for number, event in enumerate(events, 1):
        where = f"event {number}"
        try:
            row, index, proof = _parse_event(event)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
            break
        where = f"version {row.version} (position {row.position})"
        if row.stream_id != stream_id:
            problems.append(f"{where} belongs to stream {row.stream_id!r}, not {stream_id!r}")
        if row.version > expected:
            missing = (
                f"version {expected}"
                if row.version == expected + 1
                else (f"versions {expected}..{row.version - 1}")
            )
            problems.append(f"{where}: {missing} missing before it")
        elif row.version < expected:
            problems.append(f"{where}: out of order (after version {expected - 1})")
        elif row.prev_hash != prev:
            problems.append(f"{where} does not chain to the event before it")
        if row_hash(row) != row.hash:
            problems.append(f"{where}: its fields do not produce its hash (edited)")
        if index <= last_index:
            problems.append(f"{where}: its leaf index does not follow the previous event's")
        if not verify_inclusion(leaf_hash(row.hash), index, head.tree_size, proof, head.root_hash):
            problems.append(f"{where}: its inclusion proof does not lead to the signed head")
        prev, last_index, expected = row.hash, index, row.version + 1
    return BundleReport(stream_id, len(events), head.tree_size, problems)


def _parse_event(event: Any) -> tuple[EventRow, int, list[bytes]]:
    if not isinstance(event, dict):
        raise ValueError("not an object")
    ints = ("position", "version", "schema_version", "recorded_at_us", "leaf_index")
    for name in ints:
        if not isinstance(event[name], int) or isinstance(event[name], bool):
            raise ValueError(f"{name} is not an integer")
    for name in ("stream_id", "type", "event_id"):
        if not isinstance(event[name], str):
            raise ValueError(f"{name} is not a string")
    proof = event["inclusion_proof"]
    if not isinstance(proof, list):
        raise ValueError("inclusion_proof is not a list")
    # The readable time is not hashed (recorded_at_us is): it must say the same.
    shown = event.get("recorded_at")
    if shown is not None and shown != from_micros(event["recorded_at_us"]).isoformat():
        raise ValueError(f"recorded_at {shown!r} is not the hashed recorded_at_us")
    row = EventRow(
        event["position"],
        UUID(event["event_id"]),
        event["stream_id"],
        event["version"],
        event["type"],
        event["schema_version"],
        from_text(event["data"], "data"),
        from_text(event["metadata"], "metadata"),
        event["recorded_at_us"],
        from_text(event["prev_hash"], "prev_hash"),
        from_text(event["hash"], "hash"),
    )
    return row, event["leaf_index"], [from_text(p, "inclusion_proof") for p in proof]


def dumps(bundle: dict[str, Any]) -> str:
    return json.dumps(bundle, indent=2, sort_keys=True) + "\n"
