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
from collections.abc import Callable, Sequence

__all__ = [
    "EMPTY",
    "CompactRange",
    "Subtree",
    "consistency_path",
    "consistency_proof",
    "inclusion_path",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "subtree_head",
    "tree_head",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY = hashlib.sha256(b"").digest()
"""The head of the empty tree."""


def leaf_hash(entry: bytes) -> bytes:
    """HASH(0x00 || entry): a leaf, which no interior node can pass for."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """HASH(0x01 || left || right): an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


_node = node_hash


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


Subtree = Callable[[int, int], bytes]
"""MTH(D[lo:hi]): the head of the subtree over leaves ``lo`` to ``hi`` (exclusive).
The proofs ask only for the subtrees RFC 9162's recursion visits, which start at a
multiple of a power of two: a store that keeps the heads of aligned blocks of leaves
(the ledger's tiles) answers most of them without reading a leaf."""


def tree_head(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of the leaf hashes."""
    n = len(leaves)
    if n == 0:
        return EMPTY
    if n == 1:
        return leaves[0]
    k = _split(n)
    return _node(tree_head(leaves[:k]), tree_head(leaves[k:]))


def subtree_head(lo: int, hi: int, block: Subtree, leaf: Callable[[int], bytes]) -> bytes:
    """MTH(D[lo:hi]) from ``leaf(i)`` below blocks and ``block(lo, hi)`` for the
    aligned ranges ``block`` answers (it returns ``b""`` for those it does not)."""
    n = hi - lo
    if n == 1:
        return leaf(lo)
    known = block(lo, hi)
    if known:
        return known
    k = _split(n)
    return _node(subtree_head(lo, lo + k, block, leaf), subtree_head(lo + k, hi, block, leaf))


def _of(leaves: Sequence[bytes]) -> Subtree:
    return lambda lo, hi: tree_head(leaves[lo:hi])


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]): the hashes that lead from leaf ``index`` to the head."""
    return inclusion_path(index, len(leaves), _of(leaves))


def inclusion_path(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """PATH(index, D[size]) with the subtree heads that ``subtree`` gives."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
    path.reverse()  # the recursion's order: from the leaf up
    return path


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
    return consistency_path(old_size, len(leaves), _of(leaves))


def consistency_path(old_size: int, size: int, subtree: Subtree) -> list[bytes]:
    """PROOF(old_size, D[size]) with the subtree heads that ``subtree`` gives."""
    if not 0 <= old_size <= size:
        raise ValueError(f"a tree of {size} cannot extend one of {old_size}")
    if old_size in (0, size):
        return []
    path: list[bytes] = []
    m, lo, hi, whole = old_size, 0, size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            m -= k
            lo += k
            whole = False
    if not whole:
        path.append(subtree(lo, hi))
    path.reverse()
    return path


class CompactRange:
    """The heads of the perfect subtrees a log of ``size`` leaves splits into (one
    per set bit of ``size``, largest first): enough to append leaves and compute the
    tree head without the leaves before them. What a checkpointer keeps between
    checkpoints (RFC 9162's trees extend by merging equal neighbours)."""

    __slots__ = ("_heads", "size")

    def __init__(self, size: int = 0, heads: Sequence[bytes] = ()) -> None:
        if size < 0 or len(heads) != size.bit_count():
            raise ValueError(f"a log of {size} leaves has {size.bit_count()} subtree heads")
        self.size = size
        self._heads = list(heads)

    def append(self, leaf: bytes) -> None:
        heads = self._heads
        heads.append(leaf)
        self.size += 1
        # Appending carries as binary addition does: one merge of equal neighbours
        # per trailing zero bit of the new size.
        merges = (self.size & -self.size).bit_length() - 1
        for _ in range(merges):
            right = heads.pop()
            heads[-1] = _node(heads[-1], right)

    @property
    def heads(self) -> tuple[bytes, ...]:
        """The perfect subtrees' heads, largest (leftmost) first."""
        return tuple(self._heads)

    def head(self) -> bytes:
        """MTH of the leaves appended so far."""
        if not self._heads:
            return EMPTY
        result = self._heads[-1]
        for left in reversed(self._heads[:-1]):
            result = _node(left, result)
        return result

    def to_bytes(self) -> bytes:
        return b"".join(self._heads)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> CompactRange:
        if len(data) != 32 * size.bit_count():
            raise ValueError(f"a log of {size} leaves has {size.bit_count()} subtree heads")
        return cls(size, [data[i : i + 32] for i in range(0, len(data), 32)])


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
