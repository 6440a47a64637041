"""The ledger's Merkle tree: tiles and checkpoints on every backend, proofs read
back from them, signed heads, the file witness, and what tampering does to them."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

import ledgerflow
from ledgerflow.audit import row_hash
from ledgerflow.checkpoints import Checkpointer
from ledgerflow.errors import CheckpointMismatchError, WitnessError, WitnessRefusedError
from ledgerflow.ledger_tree import LogTree
from ledgerflow.merkle import (
    consistency_proof,
    leaf_hash,
    tree_head,
    verify_consistency,
    verify_inclusion,
)
from ledgerflow.signing import (
    LogSigner,
    LogVerifier,
    SignedTreeHead,
    TreeHead,
    generate_signing_key,
)
from ledgerflow.store.ports import EventStore
from ledgerflow.store.tiles import TILE_SIZE
from ledgerflow.witness import FileWitness

from .conftest import raw_sql


@pytest.fixture
def signer(tmp_path: Path) -> LogSigner:
    return generate_signing_key(tmp_path / "log.key", tmp_path / "log.pub")


@pytest.fixture
def witness(tmp_path: Path, signer: LogSigner) -> FileWitness:
    return FileWitness(tmp_path / "heads.jsonl", verifier=signer.verifier)


async def fill(store: EventStore, count: int, *, streams: int = 7, start: int = 0) -> None:
    for i in range(start, start + count):
        stream = f"s{i % streams}"
        version = await store.stream_version(stream)
        await store.append(stream, [ledgerflow.NewEvent("noted", {"n": i})], version)


def assert_one_history(held: list[SignedTreeHead], leaves: list[bytes]) -> None:
    """Each head the witness holds extends the one before, up to the whole log."""
    assert held[-1].tree_size == len(leaves)
    for before, after in itertools.pairwise(held):
        assert before.tree_size < after.tree_size
        proof = consistency_proof(leaves[: after.tree_size], before.tree_size)
        assert verify_consistency(
            before.tree_size, after.tree_size, before.root_hash, after.root_hash, proof
        )


async def leaves_of(store: EventStore) -> list[bytes]:
    rows = await store.read_rows(limit=100_000)
    return [leaf_hash(r.hash) for r in rows]


async def test_checkpoints_seal_tiles_and_heads_of_the_whole_log(store: EventStore) -> None:
    checkpointer = Checkpointer(store)
    assert await checkpointer.checkpoint() is None  # an empty ledger has no head
    await fill(store, 600)
    first = await checkpointer.checkpoint()
    assert first is not None
    leaves = await leaves_of(store)
    assert (first.tree_size, first.root) == (600, tree_head(leaves))
    tiles = await store.merkle_tiles(entries=True)
    # Two sealed, and the one being filled (its events named too if they go).
    assert [(t.tile, t.size, t.sealed) for t in tiles] == [
        (0, 256, True),
        (1, 256, True),
        (2, 88, False),
    ]
    assert tiles[2].root == tree_head(leaves[512:])
    assert tiles[0].root == tree_head(leaves[:TILE_SIZE])
    assert [e.position for e in tiles[1].entries] == list(range(257, 513))
    assert await checkpointer.checkpoint() == first  # nothing new: the same head

    # Another checkpointer goes on from the stored frontier and tail.
    await fill(store, 100, start=600)
    second = await Checkpointer(store).checkpoint()
    assert second is not None
    assert (second.tree_size, second.root) == (700, tree_head(await leaves_of(store)))
    assert [c.tree_size for c in await store.checkpoints()] == [600, 700]
    assert [c.tree_size for c in await store.checkpoints(after_size=600)] == [700]
    assert await store.latest_checkpoint() == second


async def test_proofs_read_from_tiles_verify_for_every_event(store: EventStore) -> None:
    await fill(store, 300)
    await Checkpointer(store).checkpoint()
    await fill(store, 290, start=300)
    latest = await Checkpointer(store).checkpoint()
    assert latest is not None
    leaves = await leaves_of(store)
    rows = await store.read_rows(limit=1000)
    tree = await LogTree.load(store, latest)
    for index in [0, 1, 255, 256, 257, 299, 300, 511, 512, 589]:
        assert await tree.index_of(rows[index].position) == index
        proof = await tree.inclusion(index)
        assert verify_inclusion(leaves[index], index, 590, proof, latest.root)
        if index < 300:
            path = await tree.inclusion(index, 300)
            assert verify_inclusion(leaves[index], index, 300, path, tree_head(leaves[:300]))
    for old in [1, 2, 255, 256, 257, 300, 512, 589, 590]:
        proof = await tree.consistency(old)
        assert proof == consistency_proof(leaves, old)
        assert verify_consistency(old, 590, tree_head(leaves[:old]), latest.root, proof)
    assert await tree.index_of(10_000) is None


async def test_heads_cover_only_settled_events_while_writers_append(
    store: EventStore,
) -> None:
    # Checkpoints taken while eight writers append: every head is the head of a
    # prefix of the final log, ending where it says (on PostgreSQL, a position a
    # slower transaction fills in later is never passed).
    checkpointer = Checkpointer(store, batch_size=50)
    stop = asyncio.Event()

    async def write(writer: int) -> None:
        for i in range(60):
            await store.append(f"w{writer}-{i % 3}", [ledgerflow.NewEvent("noted", {"i": i})])

    async def checkpoint() -> None:
        while not stop.is_set():
            await checkpointer.checkpoint()
            await asyncio.sleep(0)

    task = asyncio.create_task(checkpoint())
    await asyncio.gather(*(write(w) for w in range(8)))
    stop.set()
    await task
    await checkpointer.checkpoint()
    rows = await store.read_rows(limit=10_000)
    leaves = [leaf_hash(r.hash) for r in rows]
    heads = await store.checkpoints()
    assert heads[-1].tree_size == len(rows) == 480
    for head in heads:
        assert head.root == tree_head(leaves[: head.tree_size])
        assert head.last_position == rows[head.tree_size - 1].position


async def test_two_checkpointers_at_once_agree(
    store: EventStore, signer: LogSigner, witness: FileWitness
) -> None:
    await fill(store, 400)
    one = Checkpointer(store, signer=signer, witness=witness)
    two = Checkpointer(store, signer=signer, witness=witness)
    for _ in range(3):
        await asyncio.gather(one.checkpoint(), two.checkpoint())
        await fill(store, 150, start=await store.head_position())
    await asyncio.gather(one.checkpoint(), two.checkpoint())
    leaves = await leaves_of(store)
    held = await witness.heads()
    assert_one_history(held, leaves)
    assert all(signer.verifier.verify(h) for h in held)


def test_a_tree_head_is_signed_as_rfc_9162_tree_head_data(signer: LogSigner) -> None:
    head = TreeHead(tree_size=7, root_hash=bytes(range(32)), timestamp_ms=1_700_000_000_000)
    data = head.signed_bytes()
    assert data == struct.pack(">QQB", 1_700_000_000_000, 7, 32) + bytes(range(32)) + b"\0\0"
    signed = signer.sign(head)
    assert signer.verifier.verify(signed)
    assert SignedTreeHead.from_json(json.loads(json.dumps(signed.to_json()))) == signed
    for forged in (
        SignedTreeHead(
            TreeHead(8, head.root_hash, head.timestamp_ms), signed.key_id, signed.signature
        ),
        SignedTreeHead(TreeHead(7, bytes(32), head.timestamp_ms), signed.key_id, signed.signature),
        SignedTreeHead(head, bytes(32), signed.signature),
        SignedTreeHead(head, signed.key_id, bytes(64)),
    ):
        assert not signer.verifier.verify(forged)


def test_keys_load_from_pem_files_and_bad_files_are_named(
    tmp_path: Path, signer: LogSigner
) -> None:
    loaded = LogSigner.from_file(tmp_path / "log.key")
    assert loaded.key_id == signer.key_id
    assert LogVerifier.from_file(tmp_path / "log.pub").key_id == signer.key_id
    assert (tmp_path / "log.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ledgerflow.ConfigurationError, match="not overwriting"):
        generate_signing_key(tmp_path / "log.key", tmp_path / "other.pub")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ledgerflow.ConfigurationError, match=r"junk\.pem"):
        LogSigner.from_file(tmp_path / "junk.pem")
    with pytest.raises(ledgerflow.ConfigurationError, match=r"junk\.pem"):
        LogVerifier.from_file(tmp_path / "junk.pem")
    with pytest.raises(ledgerflow.ConfigurationError, match=r"missing\.pem"):
        LogVerifier.from_file(tmp_path / "missing.pem")
    with pytest.raises(ledgerflow.ConfigurationError, match="not an Ed25519"):
        LogVerifier.from_pem(_rsa_public_pem())


def _rsa_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_the_witness_takes_only_heads_that_extend_the_last(
    tmp_path: Path, signer: LogSigner, witness: FileWitness
) -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(20)]

    def head(n: int, root: bytes | None = None) -> SignedTreeHead:
        return signer.sign(TreeHead(n, root or tree_head(leaves[:n]), 1000 + n))

    assert await witness.submit(head(5), old_size=0, proof=[])
    assert await witness.submit(head(9), old_size=5, proof=consistency_proof(leaves[:9], 5))
    # A proof from a size the witness no longer holds: nothing kept, read again.
    assert not await witness.submit(head(12), old_size=5, proof=consistency_proof(leaves[:12], 5))
    # Already covered: nothing to do.
    assert not await witness.submit(head(7), old_size=9, proof=[])
    with pytest.raises(WitnessRefusedError, match="another head for 9 events"):
        await witness.submit(head(9, bytes(32)), old_size=9, proof=[])
    forked = [*leaves[:3], leaf_hash(b"forged"), *leaves[4:]]
    with pytest.raises(WitnessRefusedError, match="does not extend"):
        await witness.submit(
            head(12, tree_head(forked[:12])),
            old_size=9,
            proof=consistency_proof(forked[:12], 9),
        )
    stranger = generate_signing_key(tmp_path / "x.key", tmp_path / "x.pub")
    with pytest.raises(WitnessRefusedError, match="not signed by its key"):
        await witness.submit(
            stranger.sign(TreeHead(12, tree_head(leaves[:12]), 1)),
            old_size=9,
            proof=consistency_proof(leaves[:12], 9),
        )
    assert [h.tree_size for h in await witness.heads()] == [5, 9]
    (tmp_path / "heads.jsonl").write_text('{"tree_size": 1}\n')
    with pytest.raises(WitnessError, match="line 1 is not a signed tree head"):
        await witness.latest()


async def test_a_rewritten_event_stops_the_next_checkpoint(
    shared_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    async with ledgerflow.open_store(shared_url) as store:
        await fill(store, 300)
        assert await Checkpointer(store, signer=signer, witness=witness).checkpoint()
    # Re-chain stream s3 from its second event as a forger would: the chain and the
    # stream head agree again, the checkpointed tree does not.
    await rechain(shared_url, "s3", from_version=2)
    async with ledgerflow.open_store(shared_url) as store:
        with pytest.raises(CheckpointMismatchError, match="no longer produce"):
            await Checkpointer(store, signer=signer, witness=witness).checkpoint()


async def test_truncation_is_caught_against_the_witness(
    shared_url: str, signer: LogSigner, witness: FileWitness
) -> None:
    async with ledgerflow.open_store(shared_url) as store:
        await fill(store, 100)
        assert await Checkpointer(store, signer=signer, witness=witness).checkpoint()
    # Remove the newest events, their stream heads' moves, and every checkpoint.
    raw_sql(
        shared_url,
        "DELETE FROM {t}events WHERE position > 90",
        "DELETE FROM {t}checkpoints",
        "DELETE FROM {t}merkle_tiles",
    )
    async with ledgerflow.open_store(shared_url) as store:
        with pytest.raises(CheckpointMismatchError, match="holds a head of 100 events"):
            await Checkpointer(store, signer=signer, witness=witness).checkpoint()


async def rechain(url: str, stream: str, *, from_version: int) -> None:
    """Edit ``stream``'s event ``from_version`` and recompute the chain after it and
    the stream head, as someone with write access and the code would."""
    async with ledgerflow.open_store(url) as store:
        rows = [r for r in await store.read_rows(limit=10_000) if r.stream_id == stream]
    statements = []
    prev = rows[from_version - 2].hash
    for row in rows[from_version - 1 :]:
        data = b'{"n":-1}' if row.version == from_version else row.data
        digest = row_hash(dataclasses.replace(row, prev_hash=prev, data=data))
        statements.append(
            f"UPDATE {{t}}events SET data = {blob(url, data)}, prev_hash = {blob(url, prev)}, "
            f"hash = {blob(url, digest)} WHERE position = {row.position}"
        )
        prev = digest
    statements.append(
        f"UPDATE {{t}}streams SET last_hash = {blob(url, prev)} WHERE stream_id = '{stream}'"
    )
    raw_sql(url, *statements)


def blob(url: str, data: bytes) -> str:
    return f"X'{data.hex()}'" if url.startswith("sqlite") else f"'\\x{data.hex()}'::bytea"


async def test_a_checkpointer_behind_the_witness_catches_up_instead_of_crying_removal(
    store: EventStore, signer: LogSigner, witness: FileWitness
) -> None:
    # Another checkpointer hands the witness a larger head between this one's read
    # of the log and its look at the witness (the race two processes run into).
    await fill(store, 100)
    other = Checkpointer(store, signer=signer, witness=witness)

    class Racing:
        location = witness.location
        raced = False

        async def heads(self) -> list[SignedTreeHead]:
            return await witness.heads()

        async def latest(self) -> SignedTreeHead | None:
            if not self.raced:
                self.raced = True
                await fill(store, 50, start=100)
                await other.checkpoint()
            return await witness.latest()

        async def submit(
            self, head: SignedTreeHead, *, old_size: int, proof: Sequence[bytes]
        ) -> bool:
            return await witness.submit(head, old_size=old_size, proof=proof)

    latest = await Checkpointer(store, signer=signer, witness=Racing()).checkpoint()
    assert latest is not None
    assert latest.tree_size == 150
    assert [h.tree_size for h in await witness.heads()] == [150]


async def test_the_witness_reads_its_latest_head_from_the_end(
    tmp_path: Path, signer: LogSigner
) -> None:
    path = tmp_path / "heads.jsonl"
    witness = FileWitness(path)
    assert await witness.latest() is None
    path.write_text("")
    assert await witness.latest() is None
    heads = [signer.sign(TreeHead(n, bytes([n % 256]) * 32, n)) for n in range(1, 3001)]
    path.write_text("".join(json.dumps(h.to_json()) + "\n" for h in heads))
    assert await witness.latest() == heads[-1]
    path.write_text(path.read_text().rstrip("\n"))  # no newline after the last
    assert await witness.latest() == heads[-1]
    assert len(await witness.heads()) == 3000


async def test_the_same_tiles_saved_at_once_by_two_checkpointers_are_kept_once(
    store: EventStore,
) -> None:
    # Two processes sealing the same tile race on its row: ON CONFLICT settles it
    # (a second unique index on the position would fail the later one instead).
    await fill(store, 3 * TILE_SIZE + 10)
    rows = await store.read_leaves(limit=10_000)
    for attempt in range(10):
        trees = [LogTree(store), LogTree(store)]
        sealed = [tree.extend(rows[: (attempt % 3 + 1) * TILE_SIZE]) for tree in trees]
        heads = [
            ledgerflow.store.tiles.Checkpoint(
                tree.size, tree.last_position, tree.head(), attempt, tree.frontier()
            )
            for tree in trees
        ]
        saved = await asyncio.gather(
            *(store.save_checkpoint(s, h) for s, h in zip(sealed, heads, strict=True))
        )
        assert saved[0].root == saved[1].root == heads[0].root
    tiles = await store.merkle_tiles()
    assert [t.tile for t in tiles] == [0, 1, 2]
