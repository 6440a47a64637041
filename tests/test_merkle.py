"""RFC 9162 Merkle trees: RFC 6962's published vectors, and properties over random
logs (every inclusion and consistency proof verifies; an altered one does not)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledgerflow.merkle import (
    EMPTY,
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    subtree_head,
    tree_head,
    verify_consistency,
    verify_inclusion,
)

# The Certificate Transparency reference entries and the tree heads of their first
# 0..8 (RFC 6962's test data, as published with its reference implementations).
ENTRIES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
HEADS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
LEAVES = [leaf_hash(e) for e in ENTRIES]


def hexes(hashes: list[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


def test_tree_heads_match_the_published_vectors() -> None:
    assert EMPTY.hex() == HEADS[0]
    for size in range(len(LEAVES) + 1):
        assert tree_head(LEAVES[:size]).hex() == HEADS[size], size


def test_proofs_match_the_published_vectors() -> None:
    assert hexes(inclusion_proof(LEAVES, 0)) == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert hexes(inclusion_proof(LEAVES, 5)) == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
    assert hexes(consistency_proof(LEAVES, 2)) == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    # From one entry, the proof is that entry's path.
    assert consistency_proof(LEAVES, 1) == inclusion_proof(LEAVES, 0)
    head = bytes.fromhex(HEADS[8])
    assert verify_inclusion(LEAVES[5], 5, 8, inclusion_proof(LEAVES, 5), head)
    assert verify_consistency(2, 8, bytes.fromhex(HEADS[2]), head, consistency_proof(LEAVES, 2))


# Distinct entries, as a ledger's are (each leaf is an event with its own id and hash).
LOGS = st.lists(st.binary(max_size=8), min_size=1, max_size=70, unique=True).map(
    lambda entries: [leaf_hash(e) for e in entries]
)


@settings(max_examples=150, deadline=None)
@given(leaves=LOGS, data=st.data())
def test_every_inclusion_proof_verifies_and_no_altered_one_does(
    leaves: list[bytes], data: st.DataObject
) -> None:
    size = len(leaves)
    head = tree_head(leaves)
    index = data.draw(st.integers(0, size - 1))
    proof = inclusion_proof(leaves, index)
    assert len(proof) <= size.bit_length()
    assert verify_inclusion(leaves[index], index, size, proof, head)
    assert not verify_inclusion(leaf_hash(b"other"), index, size, proof, head)
    if size > 1:
        other = data.draw(st.integers(0, size - 1).filter(lambda i: i != index))
        assert not verify_inclusion(leaves[index], other, size, proof, head)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1))
        bent = [*proof[:at], bytes(32), *proof[at + 1 :]]
        assert not verify_inclusion(leaves[index], index, size, bent, head)
        assert not verify_inclusion(leaves[index], index, size, proof[:-1], head)
        assert not verify_inclusion(leaves[index], index, size, [*proof, bytes(32)], head)


@settings(max_examples=150, deadline=None)
@given(leaves=LOGS, data=st.data())
def test_every_consistency_proof_verifies_and_a_rewritten_past_does_not(
    leaves: list[bytes], data: st.DataObject
) -> None:
    size = len(leaves)
    old = data.draw(st.integers(0, size))
    proof = consistency_proof(leaves, old)
    old_head, new_head = tree_head(leaves[:old]), tree_head(leaves)
    assert verify_consistency(old, size, old_head, new_head, proof)
    if 0 < old < size:
        # A log that rewrote an entry of the old tree cannot prove it extends it.
        changed = data.draw(st.integers(0, old - 1))
        rewritten = [*leaves[:changed], leaf_hash(b"forged"), *leaves[changed + 1 :]]
        forged_proof = consistency_proof(rewritten, old)
        assert not verify_consistency(old, size, old_head, tree_head(rewritten), forged_proof)
        assert not verify_consistency(old, size, old_head, new_head, proof[:-1])
        assert not verify_consistency(old, size, bytes(32), new_head, proof)
        # Nor can a truncated log: the new head must match what the proof builds.
        assert not verify_consistency(old, size, old_head, tree_head(leaves[:-1]), proof)


@settings(max_examples=60, deadline=None)
@given(leaves=LOGS)
def test_a_compact_range_gives_the_head_of_every_prefix(leaves: list[bytes]) -> None:
    compact = CompactRange()
    assert compact.head() == EMPTY
    for n, leaf in enumerate(leaves, 1):
        compact.append(leaf)
        assert compact.head() == tree_head(leaves[:n])
        # What a checkpoint stores is enough to go on from.
        restored = CompactRange.from_bytes(n, compact.to_bytes())
        assert restored.head() == compact.head()
    assert len(compact.to_bytes()) == 32 * len(leaves).bit_count()


@settings(max_examples=60, deadline=None)
@given(leaves=LOGS, block=st.sampled_from([2, 4, 8]))
def test_heads_from_stored_blocks_equal_heads_from_leaves(leaves: list[bytes], block: int) -> None:
    # A store that knows the heads of aligned full blocks (the ledger's tiles)
    # answers without the leaves under them, and gets the same heads.
    full = len(leaves) // block
    known = {i: tree_head(leaves[i * block : (i + 1) * block]) for i in range(full)}
    read: set[int] = set()

    def stored(lo: int, hi: int) -> bytes:
        if hi - lo == block and lo % block == 0 and lo // block in known:
            return known[lo // block]
        return b""

    def leaf(i: int) -> bytes:
        read.add(i)
        return leaves[i]

    assert subtree_head(0, len(leaves), stored, leaf) == tree_head(leaves)
    assert all(i >= full * block for i in read)
    with pytest.raises(ValueError, match="2 subtree heads"):
        CompactRange(3, [bytes(32)])
