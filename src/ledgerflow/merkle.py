"""Merkle trees of RFC 9162 (Certificate Transparency 2.0, §2.1; the same hashing as
RFC 6962): the tree head of a log's first n entries, the proof that an entry is in a
tree (inclusion), and the proof that a tree extends an earlier one (consistency).

Pure functions over leaf hashes (``leaf_hash(entry)``), so a verifier needs nothing
but the proof, the two sizes and the heads. The ledger's tree heads, exported
outside the database, are what make truncation and re-chaining detectable (issue
18); these are its building blocks, checked against RFC 6962's published vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "tree_head",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY = hashlib.sha256(b"").digest()
"""The head of the empty tree."""


def leaf_hash(entry: bytes) -> bytes:
    """HASH(0x00 || entry): a leaf, which no interior node can pass for."""
    return hashlib.sha256(b"\x00" + entry).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_head(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf hashes."""
    n = len(leaves)
    if n == 0:
        return EMPTY
    if n == 1:
        return leaves[0]
    k = _split(n)
    return _node(tree_head(leaves[:k]), tree_head(leaves[k:]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]): the hashes that lead from leaf ``index`` to the head."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(leaves[:k], index), tree_head(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), tree_head(leaves[:k])]


def _up_the_right_edge(fn: int, sn: int) -> tuple[int, int]:
    """Both indexes shifted right until ``fn`` is odd or 0: the step of RFC 9162's
    verification algorithms past a node that was the right edge of its level."""
    while True:
        fn >>= 1
        sn >>= 1
        if fn & 1 or fn == 0:
            return fn, sn


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], head: bytes
) -> bool:
    """Whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree of ``size``
    whose head is ``head`` (RFC 9162 §2.1.3.2)."""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                fn, sn = _up_the_right_edge(fn, sn)
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == head


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]): the hashes that show the tree of ``old_size`` leaves is a prefix
    of the tree of ``len(leaves)`` (empty when the sizes are equal or m is 0)."""
    n = len(leaves)
    if not 0 <= old_size <= n:
        raise ValueError(f"a tree of {n} cannot extend one of {old_size}")
    if old_size in (0, n):
        return []
    return _subproof(old_size, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [tree_head(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), tree_head(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), tree_head(leaves[:k])]


def verify_consistency(
    old_size: int, new_size: int, old_head: bytes, new_head: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree of ``new_size`` with head ``new_head`` extends
    the tree of ``old_size`` with head ``old_head`` (RFC 9162 §2.1.4.2)."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_head == new_head
    if old_size == 0:
        return not proof  # every tree extends the empty one
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old head starts the path
        path.insert(0, old_head)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            if not fn & 1:
                fn, sn = _up_the_right_edge(fn, sn)
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_head and sr == new_head
