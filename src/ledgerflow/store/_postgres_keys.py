"""The PostgreSQL store's advisory lock keys, in one place: the modules that take
them import nothing of each other through it."""

from __future__ import annotations

import hashlib

__all__ = ["allocator_key", "inbox_key", "stream_key"]


def allocator_key(schema: str) -> int:
    """The first half of the (int, int) advisory lock key that orders position
    taking in ``schema`` (two-int keys never meet the one-bigint stream keys)."""
    return int.from_bytes(hashlib.blake2b(schema.encode(), digest_size=4).digest(), signed=True)


def stream_key(schema: str, stream_id: str) -> int:
    """The advisory lock that serializes writers of one stream (bigint key space)."""
    digest = hashlib.blake2b(f"{schema}\0{stream_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, signed=True)


def inbox_key(schema: str, consumer: str) -> int:
    """The advisory lock an inbox's commits take: a stream's key under a name no
    stream id can have (it holds NUL)."""
    return stream_key(schema, f"\0inbox\0{consumer}")
