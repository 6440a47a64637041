"""The Merkle tree over the ledger's global log (ADR 019).

Leaf ``i`` is the ``i``-th event in position order among those settled (on
PostgreSQL, positions a write took and did not commit are not leaves), and its
entry is the event's chain hash: that hash already covers every stored field and
its predecessor in the stream, so the tree commits to the events and their
streams' chains at once. ``leaf_hash(event.hash)`` is the leaf hash.

A ``LogTree`` holds what proofs need without the leaves before it: the roots of
the sealed tiles (one per ``TILE_SIZE`` leaves, stored by the checkpointer), the
entries after the last sealed tile, and the compact range that gives the head.
Proofs read one tile's entries at most besides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from .errors import CheckpointMismatchError
from .merkle import (
    EMPTY,
    CompactRange,
    consistency_path,
    inclusion_path,
    leaf_hash,
    node_hash,
    subtree_head,
    tree_head,
)
from .store.ports import EventStore
from .store.tiles import TILE_SIZE, Checkpoint, LeafRow, MerkleTile, TileEntry

__all__ = ["LogTree"]

_sha256 = hashlib.sha256

_MEMO_FROM = 16 * TILE_SIZE
"""Perfect subtrees this large are remembered once computed: they never change, and
a checkpointer's consistency proofs ask for the same ones every time."""


class LogTree:
    """The tree over the first ``size`` leaves of ``store``'s log."""

    def __init__(
        self,
        store: EventStore,
        *,
        roots: Sequence[bytes] = (),
        tail: Sequence[LeafRow] = (),
        last_position: int = 0,
    ) -> None:
        self.store = store
        self.roots = list(roots)
        self.tail = list(tail)
        self.last_position = last_position
        self._tail_leaves = [leaf_hash(t[3]) for t in self.tail]
        self._tile_range = CompactRange()
        """The compact range over the sealed tiles' roots (each a leaf of it): with
        the tail's, the compact range of the whole tree."""
        self._tiles: dict[int, list[bytes]] = {}
        self._perfect: dict[tuple[int, int], bytes] = {}
        if len(self.tail) >= TILE_SIZE:
            raise ValueError(f"a tail holds fewer than {TILE_SIZE} leaves")

    @property
    def size(self) -> int:
        return len(self.roots) * TILE_SIZE + len(self.tail)

    # -- building ---------------------------------------------------------------------

    @classmethod
    async def load(cls, store: EventStore, checkpoint: Checkpoint | None) -> LogTree:
        """The tree of ``checkpoint`` (empty for None), read back from the store's
        tiles and the events after them. ``CheckpointMismatchError`` when they no
        longer produce the checkpoint's head."""
        if checkpoint is None:
            return cls(store)
        full, rest = divmod(checkpoint.tree_size, TILE_SIZE)
        roots: list[bytes] = []
        after = 0
        while len(roots) < full:
            tiles = await store.merkle_tiles(first=len(roots), limit=min(full - len(roots), 5000))
            if not tiles or tiles[0].tile != len(roots):
                raise CheckpointMismatchError(
                    store.location,
                    f"Merkle tile {len(roots)} of the checkpoint of "
                    f"{checkpoint.tree_size} events is missing",
                )
            for tile in tiles:
                if tile.tile != len(roots) or tile.first_position <= after or not tile.sealed:
                    raise CheckpointMismatchError(
                        store.location, f"Merkle tile {tile.tile} is out of order"
                    )
                roots.append(tile.root)
                after = tile.last_position
        tail = await _entries_between(store, after, checkpoint.last_position)
        if len(tail) != rest:
            raise CheckpointMismatchError(
                store.location,
                f"the checkpoint of {checkpoint.tree_size} events ends at position "
                f"{checkpoint.last_position}, but the log holds {full * TILE_SIZE + len(tail)} "
                "events there",
            )
        tree = cls(store, roots=roots[:full], tail=tail, last_position=checkpoint.last_position)
        # The frontier's first heads are the sealed tiles' (the size's bits above the
        # tile's), the rest the tail's, which the tail's leaves give again.
        frontier = CompactRange.from_bytes(checkpoint.tree_size, checkpoint.frontier)
        tree._tile_range = CompactRange(full, frontier.heads[: full.bit_count()])
        if tree.frontier() != checkpoint.frontier or tree.head() != checkpoint.root:
            raise CheckpointMismatchError(
                store.location,
                f"the ledger's first {checkpoint.tree_size} events no longer produce "
                "the head it checkpointed",
            )
        return tree

    def append(self, leaf_row: LeafRow) -> MerkleTile | None:
        """Add the next settled event; the tile it completes, if any, to store."""
        sealed = self.extend((leaf_row,))
        return sealed[0] if sealed else None

    def extend(self, leaf_rows: Iterable[LeafRow]) -> list[MerkleTile]:
        """Add the next settled events, in order; the tiles they complete, to store.

        The hot loop of a checkpointer that follows a busy ledger: one hash per
        event, and one per event again, in a tight loop, when its tile is sealed."""
        sealed: list[MerkleTile] = []
        tail, leaves = self.tail, self._tail_leaves
        last = self.last_position
        for leaf_row in leaf_rows:
            if leaf_row[0] <= last:
                raise ValueError(f"position {leaf_row[0]} is not after {last}")
            last = leaf_row[0]
            tail.append(leaf_row)
            leaves.append(_sha256(b"\x00" + leaf_row[3]).digest())
            if len(leaves) == TILE_SIZE:
                sealed.append(self._seal(tail, leaves))
                self.tail, self._tail_leaves = tail, leaves = [], []
        self.last_position = last
        return sealed

    def _seal(self, tail: list[LeafRow], leaves: list[bytes]) -> MerkleTile:
        level = leaves
        while len(level) > 1:
            level = [
                _sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)
            ]
        root = level[0]
        number = len(self.roots)
        self.roots.append(root)
        self._tile_range.append(root)
        self._tiles[number] = leaves
        entries = tuple(TileEntry(*t) for t in tail)
        return MerkleTile(number, tail[0][0], tail[-1][0], root, TILE_SIZE, entries)

    def partial(self) -> MerkleTile | None:
        """The tile being filled, as far as it goes (None when the tail is empty)."""
        if not self.tail:
            return None
        return MerkleTile(
            len(self.roots),
            self.tail[0][0],
            self.tail[-1][0],
            tree_head(self._tail_leaves),
            len(self.tail),
            tuple(TileEntry(*t) for t in self.tail),
        )

    def head(self) -> bytes:
        heads = self._heads()
        if not heads:
            return EMPTY
        result = heads[-1]
        for left in reversed(heads[:-1]):
            result = node_hash(left, result)
        return result

    def _heads(self) -> list[bytes]:
        """The compact range of the whole tree: the sealed tiles', then the tail's
        perfect subtrees (one per set bit of its length, largest first)."""
        heads = list(self._tile_range.heads)
        leaves, start = self._tail_leaves, 0
        for bit in reversed(range(TILE_SIZE.bit_length())):
            width = 1 << bit
            if len(leaves) - start >= width:
                heads.append(tree_head(leaves[start : start + width]))
                start += width
        return heads

    def frontier(self) -> bytes:
        return b"".join(self._heads())

    # -- proofs -----------------------------------------------------------------------

    def head_at(self, size: int) -> bytes:
        """MTH of the first ``size`` leaves; ``prepare_for(size)`` first when it
        ends inside a sealed tile."""
        self._check(size)
        return subtree_head(0, size, self._block, self._leaf) if size else EMPTY

    async def prepare_for(self, *sizes_or_indexes: int) -> None:
        """Read the entries of the sealed tiles that hold the given boundaries (a
        tree size ending inside one, or a leaf index): proofs need their leaves."""
        for n in sizes_or_indexes:
            number = n // TILE_SIZE
            if number < len(self.roots) and number not in self._tiles:
                tiles = await self.store.merkle_tiles(first=number, limit=1, entries=True)
                if not tiles or tiles[0].tile != number:
                    raise CheckpointMismatchError(
                        self.store.location, f"Merkle tile {number} is missing"
                    )
                self._tiles[number] = [leaf_hash(e.event_hash) for e in tiles[0].entries]

    async def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[size]) (size: the whole tree by default)."""
        size = self.size if size is None else size
        self._check(size)
        await self.prepare_for(index, size)
        return inclusion_path(index, size, self._subtree)

    async def consistency(self, old_size: int, size: int | None = None) -> list[bytes]:
        """PROOF(old_size, D[size]) (size: the whole tree by default)."""
        size = self.size if size is None else size
        self._check(size)
        await self.prepare_for(old_size, size)
        return consistency_path(old_size, size, self._subtree)

    async def index_of(self, position: int) -> int | None:
        """The leaf index of the event at ``position``, if it is in the tree."""
        if self.tail and self.tail[0][0] <= position <= self.tail[-1][0]:
            for offset, leaf_row in enumerate(self.tail):
                if leaf_row[0] == position:
                    return len(self.roots) * TILE_SIZE + offset
            return None
        tile = await self.store.merkle_tile_of(position)
        if tile is None or tile.tile >= len(self.roots):
            return None
        for offset, entry in enumerate(tile.entries):
            if entry.position == position:
                self._tiles.setdefault(tile.tile, [leaf_hash(e.event_hash) for e in tile.entries])
                return tile.tile * TILE_SIZE + offset
        return None

    def _check(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"the tree holds {self.size} leaves, not {size}")

    def _subtree(self, lo: int, hi: int) -> bytes:
        return subtree_head(lo, hi, self._block, self._leaf)

    def _block(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == TILE_SIZE and lo % TILE_SIZE == 0 and lo // TILE_SIZE < len(self.roots):
            return self.roots[lo // TILE_SIZE]
        if n >= _MEMO_FROM and n & (n - 1) == 0 and hi <= len(self.roots) * TILE_SIZE:
            known = self._perfect.get((lo, hi))
            if known is None:
                half = n // 2
                known = self._perfect[(lo, hi)] = node_hash(
                    self._subtree(lo, lo + half), self._subtree(lo + half, hi)
                )
            return known
        return b""

    def _leaf(self, index: int) -> bytes:
        number, offset = divmod(index, TILE_SIZE)
        if number == len(self.roots):
            return self._tail_leaves[offset]
        leaves = self._tiles.get(number)
        if leaves is None:
            raise LookupError(f"the leaves of Merkle tile {number} were not read")
        return leaves[offset]


async def _entries_between(store: EventStore, after: int, last: int) -> list[LeafRow]:
    """The settled events at positions ``after < p <= last``, as leaves."""
    entries: list[LeafRow] = []
    position = after + 1
    while position <= last:
        rows = await store.read_leaves(from_position=position, limit=TILE_SIZE)
        if not rows:
            break
        entries.extend(r for r in rows if r[0] <= last)
        if rows[-1][0] >= last:
            break
        position = rows[-1][0] + 1
    return entries
