"""Witnesses: where signed tree heads go, outside the database they describe.

Whoever can write the ledger can rewrite it and its checkpoints consistently; they
cannot rewrite a head already handed to someone else. A witness keeps the heads it
was given and takes a new one only with a consistency proof that it extends the
last (RFC 9162 §2.1.4), so even a compromised checkpointer cannot fork the history
it holds. ``FileWitness`` (an append-only JSON-lines file, on another disk, mount or
machine) is the one shipped; a bucket or an HTTP service implements the same
``Witness`` protocol.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import WitnessError, WitnessRefusedError
from .merkle import verify_consistency
from .signing import LogVerifier, SignedTreeHead

__all__ = ["FileWitness", "Witness"]

_BLOCK = 4096


class Witness(Protocol):
    @property
    def location(self) -> str: ...

    async def heads(self) -> list[SignedTreeHead]:
        """Every head the witness holds, oldest (smallest) first."""
        ...

    async def latest(self) -> SignedTreeHead | None: ...

    async def submit(self, head: SignedTreeHead, *, old_size: int, proof: Sequence[bytes]) -> bool:
        """Keep ``head`` if the latest head held is of ``old_size`` events and
        ``proof`` (the consistency proof from ``old_size`` to ``head``) shows that
        ``head`` extends it. False, keeping nothing, when the latest head held is no
        longer of ``old_size`` (another checkpointer moved it on: read it again) or
        already covers ``head``; ``WitnessRefusedError`` when ``head`` contradicts
        what is held."""
        ...


class FileWitness:
    """Heads in a JSON-lines file, one per line, appended under an exclusive lock
    and flushed to disk before ``submit`` returns.

    ``verifier``: refuse heads not signed by its key (a witness that checks who
    signs).
    """

    def __init__(self, path: str | Path, *, verifier: LogVerifier | None = None) -> None:
        self.path = Path(path)
        self._verifier = verifier

    @property
    def location(self) -> str:
        return str(self.path)

    async def heads(self) -> list[SignedTreeHead]:
        return await asyncio.to_thread(self._read_all)

    async def latest(self) -> SignedTreeHead | None:
        return await asyncio.to_thread(self._read_latest)

    def _read_latest(self) -> SignedTreeHead | None:
        try:
            with self.path.open("rb") as file:
                return self._last(file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WitnessError(self.location, f"cannot read it: {exc.strerror or exc}") from None

    def _last(self, file: BinaryIO) -> SignedTreeHead | None:
        """The last head in ``file``, read from its end: a checkpointer asks every
        interval, and the file only grows."""
        end = file.seek(0, os.SEEK_END)
        block = b""
        start = end
        while start > 0:
            start = max(0, start - _BLOCK)
            file.seek(start)
            block = file.read(end - start)
            lines = block.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                last = lines[-1].decode()
                return self._parse(last)[-1] if last.strip() else None
        return None

    async def submit(self, head: SignedTreeHead, *, old_size: int, proof: Sequence[bytes]) -> bool:
        return await asyncio.to_thread(self._submit, head, old_size, list(proof))

    def _read_all(self) -> list[SignedTreeHead]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise WitnessError(self.location, f"cannot read it: {exc.strerror or exc}") from None
        return self._parse(text)

    def _parse(self, text: str) -> list[SignedTreeHead]:
        heads = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                heads.append(SignedTreeHead.from_json(json.loads(line)))
            except ValueError as exc:
                reason = f"line {number} is not a signed tree head: {exc}"
                raise WitnessError(self.location, reason) from None
        return heads

    def _submit(self, head: SignedTreeHead, from_size: int, proof: list[bytes]) -> bool:
        if self._verifier is not None and not self._verifier.verify(head):
            raise WitnessRefusedError(
                self.location, f"the head of {head.tree_size} events is not signed by its key"
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise WitnessError(self.location, f"cannot open it: {exc.strerror or exc}") from None
        with os.fdopen(fd, "r+b") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            latest = self._last(file)
            old_size = 0 if latest is None else latest.tree_size
            if latest is not None and head.tree_size <= latest.tree_size:
                if head.tree_size == latest.tree_size and head.root_hash != latest.root_hash:
                    raise WitnessRefusedError(
                        self.location,
                        f"it holds another head for {head.tree_size} events "
                        f"({_short(latest.root_hash)}, not {_short(head.root_hash)})",
                    )
                return False
            if from_size != old_size:
                return False  # moved on since the proof was made
            old_root = b"" if latest is None else latest.root_hash
            if latest is not None and not verify_consistency(
                old_size, head.tree_size, old_root, head.root_hash, proof
            ):
                raise WitnessRefusedError(
                    self.location,
                    f"the head of {head.tree_size} events does not extend the one of "
                    f"{old_size} it holds (consistency proof fails)",
                )
            file.write((json.dumps(head.to_json(), sort_keys=True) + "\n").encode())
            file.flush()
            os.fsync(file.fileno())
        return True


def _short(digest: bytes) -> str:
    return base64.b64encode(digest[:9]).decode()
