"""API keys, kept in the ledger: created and revoked by events in one stream, so
who issued or revoked which key, when and why, is audited like everything else.

A key is shown once, when created: ``lfk_<key id>_<secret>``. The ledger holds the
SHA-256 of the secret only; the secret has 256 bits of entropy, so a fast hash is
enough (a slow one guards low-entropy passwords, which these are not). A server
folds the stream into memory and follows it: a revoked key stops working within
``REFRESH_S`` on every server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import msgspec

from ..errors import ConcurrencyError, WorkflowInputError
from ..events import Metadata, RecordedEvent
from ..registry import EventRegistry
from ..store import WorkflowStore
from ..tenants import ALL_TENANTS, check_tenant
from .followed import Followed
from .principals import Principal, Role

__all__ = ["KEY_STREAM", "ApiKey", "ApiKeys", "NewKey"]

KEY_STREAM = "ledgerflow-api-keys"
KEY_CREATED = "ledgerflow.api_key_created"
KEY_REVOKED = "ledgerflow.api_key_revoked"

_FORMAT = re.compile(r"lfk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class KeyCreated(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    name: str
    role: str
    tenant: str
    secret_sha256: str
    by: str


class KeyRevoked(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    by: str
    reason: str


def key_registry(registry: EventRegistry) -> EventRegistry:
    """``registry`` with the key events registered."""
    if registry.class_of(KEY_CREATED) is None:
        registry.register(KeyCreated, KEY_CREATED)
        registry.register(KeyRevoked, KEY_REVOKED)
    return registry


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as listed: never its secret."""

    key_id: str
    name: str
    role: Role
    tenant: str
    created_by: str
    created_at: datetime
    revoked: bool
    revoked_by: str | None = None
    revoked_reason: str | None = None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just created; ``secret`` is the whole key, shown this once."""

    key: ApiKey
    secret: str


@dataclass(slots=True)
class _Entry:
    key: ApiKey
    digest: bytes


class ApiKeys(Followed):
    """The API keys of one ledger: create, revoke, list, and authenticate."""

    stream = KEY_STREAM

    def __init__(self, store: WorkflowStore) -> None:
        key_registry(store.registry)
        super().__init__(store)
        self._keys: dict[str, _Entry] = {}

    async def create(self, name: str, role: Role, tenant: str, *, by: str) -> NewKey:
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise WorkflowInputError("api key", "a key needs a name of 1-200 characters")
        if tenant != ALL_TENANTS:
            check_tenant(tenant)
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        event = KeyCreated(
            key_id=key_id,
            name=name.strip(),
            role=role.label,
            tenant=tenant,
            secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
            by=by,
        )
        await self.store.append(KEY_STREAM, [event], metadata=Metadata(actor=by, tenant=tenant))
        await self.refresh(force=True)
        return NewKey(self._keys[key_id].key, f"lfk_{key_id}_{secret}")

    async def revoke(
        self, key_id: str, *, by: str, reason: str, tenant: str = ALL_TENANTS
    ) -> ApiKey:
        """Revoke a key (of ``tenant`` only, unless ALL_TENANTS). ``KeyError`` if there
        is no such key there."""
        if not isinstance(reason, str) or not reason.strip():
            raise WorkflowInputError("api key", "a reason is required to revoke a key")
        while True:
            await self.refresh(force=True)
            entry = self._keys.get(key_id)
            if entry is None or (tenant != ALL_TENANTS and entry.key.tenant != tenant):
                raise KeyError(key_id)
            if entry.key.revoked:
                return entry.key
            try:
                await self.store.append(
                    KEY_STREAM,
                    [KeyRevoked(key_id=key_id, by=by, reason=reason)],
                    self._version,
                    metadata=Metadata(actor=by, reason=reason, tenant=entry.key.tenant),
                )
            except ConcurrencyError:
                continue
            await self.refresh(force=True)
            return self._keys[key_id].key

    async def list(self, tenant: str = ALL_TENANTS) -> list[ApiKey]:
        await self.refresh(force=True)
        return [
            e.key
            for e in sorted(self._keys.values(), key=lambda e: (e.key.created_at, e.key.key_id))
            if tenant == ALL_TENANTS or e.key.tenant == tenant
        ]

    async def authenticate(self, presented: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for anything else."""
        found = _FORMAT.fullmatch(presented)
        if found is None:
            return None
        key_id, secret = found.groups()
        await self.refresh()
        entry = self._keys.get(key_id)
        if entry is None:
            await self.refresh_on_miss()
            entry = self._keys.get(key_id)
        if entry is None or entry.key.revoked:
            return None
        if not hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), entry.digest):
            return None
        return Principal(f"key:{key_id}", entry.key.role, entry.key.tenant)

    async def principal_of(self, key_id: str) -> Principal | None:
        """The principal of key ``key_id`` if it is known and not revoked (a UI
        session opened with it stands for it while it is)."""
        await self.refresh()
        entry = self._keys.get(key_id)
        if entry is None or entry.key.revoked:
            return None
        return Principal(f"key:{key_id}", entry.key.role, entry.key.tenant)

    def _apply(self, event: RecordedEvent) -> None:
        data = event.data
        if isinstance(data, KeyCreated):
            key = ApiKey(
                key_id=data.key_id,
                name=data.name,
                role=Role.parse(data.role),
                tenant=data.tenant,
                created_by=data.by,
                created_at=event.recorded_at,
                revoked=False,
            )
            self._keys[data.key_id] = _Entry(key, bytes.fromhex(data.secret_sha256))
        elif isinstance(data, KeyRevoked) and data.key_id in self._keys:
            entry = self._keys[data.key_id]
            entry.key = dataclasses.replace(
                entry.key, revoked=True, revoked_by=data.by, revoked_reason=data.reason
            )
