"""What the ledger keeps of its own Merkle tree (ADR 019): sealed tiles of leaves and
the tree heads checkpointed over them.

A tile holds the leaves ``tile * TILE_SIZE`` up to the next multiple (the last
one, being filled, fewer): for each, the event's place (position, stream, version) and the
event hash its leaf hashes. Its root is the head of that perfect subtree, so a
proof over millions of events reads a few thousand roots and one tile's entries,
and a deleted event is named by stream and version from the tile that saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

__all__ = [
    "TILE_SIZE",
    "Checkpoint",
    "LeafRow",
    "MerkleTile",
    "TileEntry",
    "decode_entries",
    "encode_entries",
]

TILE_SIZE = 256
"""Leaves per tile: 2**8, so every tile is a perfect subtree of the log's tree."""


LeafRow = tuple[int, str, int, bytes]
"""(position, stream id, version, event hash): an event as a leaf of the tree."""


@dataclass(frozen=True, slots=True)
class TileEntry:
    """One leaf: the event at ``position`` (``stream_id`` version ``version``) whose
    chain hash was ``event_hash`` when the tile was sealed."""

    position: int
    stream_id: str
    version: int
    event_hash: bytes


@dataclass(frozen=True, slots=True)
class MerkleTile:
    tile: int
    first_position: int
    last_position: int
    root: bytes
    """MTH of the tile's leaves."""
    size: int = TILE_SIZE
    """Its leaves: TILE_SIZE once sealed. Fewer in the tile being filled, which each
    checkpoint rewrites (so even the newest events are named if they go missing)."""
    entries: tuple[TileEntry, ...] = ()
    """The leaves in log order; empty when read without them."""

    @property
    def sealed(self) -> bool:
        return self.size == TILE_SIZE


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head the ledger checkpointed: the head of its first ``tree_size``
    events (the last at ``last_position``), when, and its signature if signed."""

    tree_size: int
    last_position: int
    root: bytes
    timestamp_ms: int
    frontier: bytes
    """``merkle.CompactRange`` of the tree: where the next checkpoint goes on from."""
    key_id: bytes | None = None
    signature: bytes | None = None


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[tuple[int, str, int, bytes]]).decode


def encode_entries(entries: Sequence[TileEntry]) -> bytes:
    return _encode([(e.position, e.stream_id, e.version, e.event_hash) for e in entries])


def decode_entries(data: bytes) -> tuple[TileEntry, ...]:
    return tuple(TileEntry(*entry) for entry in _decode(data))
