"""The ledger against its own Merkle tree (ADR 019): the tiles the checkpointer
sealed, the tree heads it checkpointed, and the signed heads a witness holds.

The hash chains catch an edit made without the code; they cannot catch a forger who
re-chains a stream and its head, removes the newest events, or removes a whole
stream with its head. Those change the tree: a tile's root names the range (and its
entries the stream and version) where the log differs from what was sealed, and
the witness's head, kept outside the database, shows the log was cut or rewritten
even when the tiles and checkpoints were rewritten with it.

Everything read here is read *before* the snapshot that ``verify_ledger`` walks:
a tile or head only ever covers events settled before it was written, so all of
them are in that later snapshot, and appends made during the walk are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from .merkle import CompactRange, leaf_hash, tree_head
from .signing import LogVerifier, SignedTreeHead, TreeHead
from .store import EventRow
from .store.ports import EventStore
from .store.tiles import TILE_SIZE, Checkpoint, MerkleTile
from .witness import Witness

__all__ = ["TreeCheck", "TreeFinding"]


@dataclass(frozen=True, slots=True)
class TreeFinding:
    """What the tree shows: ``kind`` is a ``FindingKind`` value (``audit`` maps it)."""

    kind: str
    stream_id: str | None
    version: int | None
    position: int | None
    detail: str


def _ledger_wide(detail: str) -> TreeFinding:
    """A finding about the log as a whole (its heads, its tiles), not one event."""
    return TreeFinding("checkpoint", None, None, None, detail)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class TreeCheck:
    def __init__(
        self,
        store: EventStore,
        *,
        witness: Witness | None = None,
        verifier: LogVerifier | None = None,
    ) -> None:
        self.store = store
        self.witness = witness
        self.verifier = verifier
        self.tiles: list[MerkleTile] = []
        self.latest: Checkpoint | None = None
        self.witnessed: list[SignedTreeHead] = []
        self.at_witness: Checkpoint | None = None
        self.checkpoints_read = 0
        self._range = CompactRange()
        self._wanted: set[int] = set()
        self._heads: dict[int, bytes] = {}
        self._tile = 0
        self._collected: list[bytes] = []
        self._suspects: set[int] = set()

    async def prepare(self) -> None:
        """Read the tiles, the checkpoints and the witness's heads (before the walk)."""
        while True:
            found = await self.store.merkle_tiles(first=len(self.tiles), limit=5000)
            self.tiles.extend(found)
            if len(found) < 5000:
                break
        self.latest = await self.store.latest_checkpoint()
        if self.witness is not None:
            self.witnessed = await self.witness.heads()
        if self.witnessed:
            size = self.witnessed[-1].tree_size
            found_at = await self.store.checkpoints(after_size=size - 1, limit=1)
            self.at_witness = found_at[0] if found_at and found_at[0].tree_size == size else None
        self._wanted = {c.tree_size for c in (self.latest, self.at_witness) if c is not None}
        self._wanted.update(h.tree_size for h in self.witnessed[-1:])

    # -- the walk (synchronous: it runs wherever the snapshot's rows are read) --------

    def visit(self, row: EventRow) -> None:
        leaf = leaf_hash(row.hash)
        self._range.append(leaf)
        if self._range.size in self._wanted:
            self._heads[self._range.size] = self._range.head()
        tiles = self.tiles
        while self._tile < len(tiles) and row.position > tiles[self._tile].last_position:
            self._close_tile()
        if self._tile < len(tiles):
            if row.position >= tiles[self._tile].first_position:
                self._collected.append(leaf)
            else:  # between two tiles' ranges: a row the sealed log did not have
                self._suspects.add(self._tile)

    def _close_tile(self) -> None:
        tile = self.tiles[self._tile]
        if tree_head(self._collected) != tile.root:
            self._suspects.add(self._tile)
        self._collected = []
        self._tile += 1

    def end(self) -> None:
        while self._tile < len(self.tiles):
            self._close_tile()

    @property
    def leaves(self) -> int:
        return self._range.size

    # -- after the walk ---------------------------------------------------------------

    async def findings(self) -> list[TreeFinding]:
        found: list[TreeFinding] = [
            _ledger_wide(f"Merkle tile {number} was removed") for number in self._missing_tiles()
        ]
        for number in sorted(self._suspects):
            found.extend(await self._explain(self.tiles[number]))
        found.extend(self._checkpoint_findings())
        found.extend(self._witness_findings())
        return found

    def _missing_tiles(self) -> list[int]:
        numbers = [t.tile for t in self.tiles]
        expected = (self.latest.tree_size // TILE_SIZE) if self.latest else len(numbers)
        return sorted(set(range(max(expected, len(numbers)))) - set(numbers))

    async def _explain(self, tile: MerkleTile) -> list[TreeFinding]:
        """Name each event where the log differs from what ``tile`` sealed."""
        sealed = await self.store.merkle_tile_of(tile.first_position)
        entries = sealed.entries if sealed is not None and sealed.tile == tile.tile else ()
        rows: dict[int, EventRow] = {}
        position = tile.first_position
        while position <= tile.last_position:
            batch = await self.store.read_rows(from_position=position, limit=1000)
            rows.update((r.position, r) for r in batch if r.position <= tile.last_position)
            if not batch or batch[-1].position >= tile.last_position:
                break
            position = batch[-1].position + 1
        where = f"Merkle tile {tile.tile} (positions {tile.first_position}..{tile.last_position})"
        found: list[TreeFinding] = []
        for entry in entries:
            row = rows.pop(entry.position, None)
            if row is None:
                found.append(
                    TreeFinding(
                        "removed",
                        entry.stream_id,
                        entry.version,
                        entry.position,
                        f"sealed in {where}, missing from the log",
                    )
                )
            elif (row.stream_id, row.version) != (entry.stream_id, entry.version):
                found.append(
                    TreeFinding(
                        "reordered",
                        row.stream_id,
                        row.version,
                        row.position,
                        f"{where} sealed stream {entry.stream_id!r} version {entry.version} "
                        "at this position",
                    )
                )
            elif row.hash != entry.event_hash:
                found.append(
                    TreeFinding(
                        "edited",
                        row.stream_id,
                        row.version,
                        row.position,
                        f"its hash differs from the one {where} sealed",
                    )
                )
        found.extend(
            TreeFinding(
                "edited",
                row.stream_id,
                row.version,
                row.position,
                f"not in the log when {where} was sealed",
            )
            for row in rows.values()
        )
        if not entries:
            found.append(
                TreeFinding("checkpoint", None, None, tile.first_position, f"{where} is unreadable")
            )
        elif not found:  # the rows match the entries: the tile's root was changed
            found.append(
                TreeFinding(
                    "checkpoint", None, None, tile.first_position, f"{where}: its root was changed"
                )
            )
        return found

    def _checkpoint_findings(self) -> list[TreeFinding]:
        found: list[TreeFinding] = []
        for checkpoint in {c.tree_size: c for c in (self.latest, self.at_witness) if c}.values():
            what = (
                f"the head checkpointed for {checkpoint.tree_size} events "
                f"({_when(checkpoint.timestamp_ms)})"
            )
            found.extend(self._against(checkpoint.tree_size, checkpoint.root, what))
            if self.verifier is not None:
                signed = SignedTreeHead(
                    TreeHead(checkpoint.tree_size, checkpoint.root, checkpoint.timestamp_ms),
                    checkpoint.key_id or b"",
                    checkpoint.signature or b"",
                )
                if not self.verifier.verify(signed):
                    found.append(
                        _ledger_wide(
                            f"the checkpoint of {checkpoint.tree_size} events is not signed "
                            "by the given key",
                        )
                    )
        return found

    def _witness_findings(self) -> list[TreeFinding]:
        if not self.witnessed:
            return []
        found: list[TreeFinding] = []
        if self.verifier is not None:
            found.extend(
                _ledger_wide(
                    f"the witness's head of {h.tree_size} events ({_when(h.head.timestamp_ms)}) "
                    "is not signed by the given key",
                )
                for h in self.witnessed
                if not self.verifier.verify(h)
            )
        head = self.witnessed[-1]
        when = _when(head.head.timestamp_ms)
        what = f"the head of {head.tree_size} events the witness holds ({when})"
        found.extend(self._against(head.tree_size, head.root_hash, what))
        at = self.at_witness
        if at is None:
            found.append(
                _ledger_wide(
                    f"the ledger has no checkpoint of {head.tree_size} events, though the "
                    "witness holds its head: checkpoints were removed",
                )
            )
        elif at.root != head.root_hash:
            found.append(
                _ledger_wide(
                    f"the ledger's checkpoint of {head.tree_size} events differs from "
                    f"{what}: checkpoints were rewritten",
                )
            )
        return found

    def _against(self, size: int, root: bytes, what: str) -> list[TreeFinding]:
        if size > self.leaves:
            return [
                _ledger_wide(
                    f"{what} covers {size} events, the ledger holds {self.leaves}: "
                    "events were removed",
                )
            ]
        if self._heads.get(size) != root:
            return [
                _ledger_wide(
                    f"the ledger's first {size} events no longer produce {what}: events "
                    "were changed, removed or re-chained",
                )
            ]
        return []
