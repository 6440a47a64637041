"""The checkpointer: extends the ledger's Merkle tree over every settled event,
stores its tiles and tree head, signs the head and hands it to a witness (ADR 019).

Run one per ledger, with the signing key, apart from the workers
(``ledgerflow audit checkpoint --follow``), or from Python::

    checkpointer = Checkpointer(store, signer=LogSigner.from_file("ledger.key"),
                                witness=FileWitness("/mnt/witness/heads.jsonl"))
    await checkpointer.run(interval=10)

Two at once do no harm: tiles are deterministic and kept once, a head of the same
size is the same head, and the witness takes a head only over the latest it holds.
Events appended after the last head handed to the witness are what an attacker
with the database could still remove unseen: ``interval`` bounds that window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .errors import (
    CheckpointMismatchError,
    StoreReadOnlyError,
    StoreUnavailableError,
    WitnessError,
    WitnessRefusedError,
)
from .ledger_tree import LogTree
from .signing import LogSigner, SignedTreeHead, TreeHead
from .store.ports import EventStore
from .store.tiles import Checkpoint, MerkleTile
from .witness import Witness

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Checkpointer:
    def __init__(
        self,
        store: EventStore,
        *,
        signer: LogSigner | None = None,
        witness: Witness | None = None,
        batch_size: int = 2000,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        if witness is not None and signer is None:
            raise ValueError("a witness takes signed heads: give a signer too")
        self.store = store
        self.signer = signer
        self.witness = witness
        self.batch_size = batch_size
        self._clock_ms = clock_ms
        self._tree: LogTree | None = None
        self._latest: Checkpoint | None = None
        self._lock = asyncio.Lock()

    async def checkpoint(self) -> Checkpoint | None:
        """Extend the tree over every event settled since the last checkpoint, store
        the new tiles and head in one transaction, sign the head and hand it to the
        witness. Returns the latest checkpoint (None: an empty ledger).

        ``CheckpointMismatchError`` when the ledger no longer produces a head it
        checkpointed, or the witness holds a head the ledger does not extend;
        ``WitnessRefusedError`` when the witness refuses the new head.
        """
        async with self._lock:
            try:
                return await self._checkpoint()
            except BaseException:
                self._tree = None  # read it back from the store next time
                raise

    async def _checkpoint(self) -> Checkpoint | None:
        if self._tree is None:
            self._latest = await self.store.latest_checkpoint()
            self._tree = await LogTree.load(self.store, self._latest)
        tree = self._tree
        await self._grow(tree)
        if self.witness is not None and self.signer is not None and self._latest is not None:
            await self._witness(self.witness, self.signer, tree)
        return self._latest

    async def _grow(self, tree: LogTree) -> None:
        """Extend ``tree`` over every event settled since; store the tiles it sealed
        and its head if it grew."""
        sealed: list[MerkleTile] = []
        grown = False
        while True:
            rows = await self.store.read_leaves(
                from_position=tree.last_position + 1, limit=self.batch_size
            )
            sealed.extend(tree.extend(rows))
            grown = grown or bool(rows)
            if len(rows) < self.batch_size:
                break
        if grown:
            filling = tree.partial()
            self._latest = await self._save(tree, [*sealed, *([filling] if filling else [])])

    async def _save(self, tree: LogTree, sealed: list[MerkleTile]) -> Checkpoint:
        head = TreeHead(tree.size, tree.head(), self._clock_ms())
        signed = None if self.signer is None else self.signer.sign(head)
        checkpoint = Checkpoint(
            head.tree_size,
            tree.last_position,
            head.root_hash,
            head.timestamp_ms,
            tree.frontier(),
            None if signed is None else signed.key_id,
            None if signed is None else signed.signature,
        )
        stored = await self.store.save_checkpoint(sealed, checkpoint)
        if stored.root != checkpoint.root:
            raise CheckpointMismatchError(
                self.store.location,
                f"another checkpointer stored a different head for {stored.tree_size} events",
            )
        return stored

    async def _witness(self, witness: Witness, signer: LogSigner, tree: LogTree) -> None:
        for _ in range(5):
            held = await witness.latest()
            if held is not None and held.tree_size > tree.size:
                # Another checkpointer got further: catch up with what it saw.
                await self._grow(tree)
            if held is not None and held.tree_size > tree.size:
                raise CheckpointMismatchError(
                    self.store.location,
                    f"the witness {witness.location} holds a head of {held.tree_size} "
                    f"events, but the ledger's tree holds {tree.size}: events were removed",
                )
            if held is not None:
                await tree.prepare_for(held.tree_size)
                if tree.head_at(held.tree_size) != held.root_hash:
                    raise CheckpointMismatchError(
                        self.store.location,
                        f"the ledger's first {held.tree_size} events no longer produce the "
                        f"head the witness {witness.location} holds",
                    )
                if held.tree_size == tree.size:
                    return
            old_size = 0 if held is None else held.tree_size
            assert self._latest is not None  # the head of ``tree``, stored
            signed = _signed(signer, self._latest)
            proof = await tree.consistency(old_size, signed.tree_size)
            if await witness.submit(signed, old_size=old_size, proof=proof):
                return
        log.warning("witness %s kept moving; the head goes with the next checkpoint", witness)

    async def run(self, *, interval: float = 10.0, stop: asyncio.Event | None = None) -> None:
        """Checkpoint every ``interval`` seconds until ``stop`` is set (or the task is
        cancelled). Outages of the store or the witness are logged and retried; a
        mismatch or a refusal (tampering, a forked history) stops it with the error."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.checkpoint()
            except WitnessRefusedError:
                raise
            except (StoreUnavailableError, StoreReadOnlyError, WitnessError) as exc:
                log.warning("checkpoint failed, retrying: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _signed(signer: LogSigner, checkpoint: Checkpoint) -> SignedTreeHead:
    """The checkpoint's head as signed when stored, or signed now (stored unsigned,
    or by another key)."""
    head = TreeHead(checkpoint.tree_size, checkpoint.root, checkpoint.timestamp_ms)
    if checkpoint.key_id == signer.key_id and checkpoint.signature is not None:
        return SignedTreeHead(head, checkpoint.key_id, checkpoint.signature)
    return signer.sign(head)
