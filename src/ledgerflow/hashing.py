"""The per-stream hash chain that makes the ledger tamper-evident.

Each event's hash covers its predecessor's hash and every stored field of the event,
encoded unambiguously (msgpack of a fixed tuple), so editing, removing or reordering
any event breaks the chain at that point.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from uuid import UUID

import msgspec

__all__ = ["GENESIS_HASH", "chain_hash", "from_micros", "to_micros"]

GENESIS_HASH = bytes(32)
"""The ``prev_hash`` of the first event of every stream."""

_pack = msgspec.msgpack.Encoder().encode
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def chain_hash(
    prev_hash: bytes,
    event_id: UUID,
    stream_id: str,
    version: int,
    position: int,
    type_name: str,
    schema_version: int,
    data: bytes,
    metadata: bytes,
    recorded_at_us: int,
) -> bytes:
    """SHA-256 over the predecessor's hash and the event's stored fields."""
    return hashlib.sha256(
        _pack(
            (
                prev_hash,
                event_id.bytes,
                stream_id,
                version,
                position,
                type_name,
                schema_version,
                data,
                metadata,
                recorded_at_us,
            )
        )
    ).digest()


def to_micros(moment: datetime) -> int:
    """Whole microseconds since the Unix epoch; the unit every backend stores exactly."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)
