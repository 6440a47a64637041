"""Signed tree heads: the ledger's Merkle tree head, its size and time, signed with
Ed25519 (RFC 8032) so that anyone holding the public key can check a head, a
bundle or a witness's copy without the database or any secret.

The signed bytes are RFC 9162's ``TreeHeadDataV2`` (§4.10) in TLS presentation:
``uint64 timestamp`` (milliseconds since the epoch), ``uint64 tree_size``,
``opaque root_hash<32..2^8-1>`` and empty ``sth_extensions<0..2^16-1>``. A key is
named by its id, the SHA-256 of its DER SubjectPublicKeyInfo (as RFC 6962 names
logs), so a head says which key signed it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._base64 import from_text, to_text
from .errors import ConfigurationError

__all__ = [
    "LogSigner",
    "LogVerifier",
    "SignedTreeHead",
    "TreeHead",
    "generate_signing_key",
]


@dataclass(frozen=True, slots=True)
class TreeHead:
    """The head of the ledger's first ``tree_size`` events, at ``timestamp_ms``."""

    tree_size: int
    root_hash: bytes
    timestamp_ms: int

    def signed_bytes(self) -> bytes:
        """RFC 9162 TreeHeadDataV2, the bytes a signature covers."""
        return (
            struct.pack(">QQB", self.timestamp_ms, self.tree_size, len(self.root_hash))
            + self.root_hash
            + b"\x00\x00"
        )


@dataclass(frozen=True, slots=True)
class SignedTreeHead:
    head: TreeHead
    key_id: bytes
    signature: bytes

    @property
    def tree_size(self) -> int:
        return self.head.tree_size

    @property
    def root_hash(self) -> bytes:
        return self.head.root_hash

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.head.tree_size,
            "timestamp_ms": self.head.timestamp_ms,
            "root_hash": to_text(self.head.root_hash),
            "key_id": to_text(self.key_id),
            "signature": to_text(self.signature),
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedTreeHead:
        """A head as ``to_json`` wrote it; ``ValueError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a signed tree head is a JSON object")
        try:
            size, at = data["tree_size"], data["timestamp_ms"]
            if not (isinstance(size, int) and isinstance(at, int)) or size < 0 or at < 0:
                raise ValueError("tree_size and timestamp_ms are non-negative integers")
            root = from_text(data["root_hash"], "root_hash")
            if len(root) != 32:
                raise ValueError("root_hash is 32 bytes")
            return cls(
                TreeHead(size, root, at),
                from_text(data["key_id"], "key_id"),
                from_text(data["signature"], "signature"),
            )
        except KeyError as missing:
            raise ValueError(f"a signed tree head needs {missing}") from None


def _key_id(public: Ed25519PublicKey) -> bytes:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


class LogVerifier:
    """Checks tree heads signed by one key: all an auditor needs."""

    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self._key = public_key
        self.key_id = _key_id(public_key)

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "public key") -> LogVerifier:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise ConfigurationError(f"{source}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigurationError(f"{source}: not an Ed25519 public key")
        return cls(key)

    @classmethod
    def from_file(cls, path: str | Path) -> LogVerifier:
        return cls.from_pem(_read(path), source=str(path))

    def public_pem(self) -> str:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def verify(self, head: SignedTreeHead) -> bool:
        """Whether this key signed ``head`` (and the head is as signed)."""
        if head.key_id != self.key_id:
            return False
        try:
            self._key.verify(head.signature, head.head.signed_bytes())
        except InvalidSignature:
            return False
        return True


class LogSigner:
    """Signs tree heads. Keep its key out of the database it signs for: a head is
    worth only as much as the key's distance from whoever can write the ledger."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.verifier = LogVerifier(private_key.public_key())

    @property
    def key_id(self) -> bytes:
        return self.verifier.key_id

    @classmethod
    def from_file(cls, path: str | Path) -> LogSigner:
        try:
            key = serialization.load_pem_private_key(_read(path), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"{path}: not an unencrypted PEM private key ({exc})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"{path}: not an Ed25519 private key")
        return cls(key)

    def sign(self, head: TreeHead) -> SignedTreeHead:
        return SignedTreeHead(head, self.key_id, self._key.sign(head.signed_bytes()))


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None


def generate_signing_key(private_path: str | Path, public_path: str | Path) -> LogSigner:
    """A new Ed25519 key: the private half to ``private_path`` (PKCS#8 PEM, readable
    by its owner only, never overwritten), the public half to ``public_path``."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{private_path} exists: not overwriting a key") from None
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    signer = LogSigner(key)
    Path(public_path).write_text(signer.verifier.public_pem())
    return signer
