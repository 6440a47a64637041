"""Web UI sessions, kept in the ledger beside the API keys they were opened with.

Signing in with a key opens a session: a random token of its own goes in the
browser's cookie, never the key, and the ledger records the SHA-256 of the token,
the key it stands for and when it ends (so who signed in to the UI, and when, is
audited too). Signing out closes it for every server within ``REFRESH_S``; so does
revoking its key, and its end (``SESSION_HOURS`` after sign-in). A cookie taken
from a browser is worth that session only, not the key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

import msgspec

from ..events import Metadata, RecordedEvent
from ..registry import EventRegistry
from ..store import WorkflowStore
from .followed import Followed
from .keys import ApiKeys
from .principals import Principal

__all__ = ["SESSION_HOURS", "SESSION_STREAM", "Sessions"]

SESSION_STREAM = "ledgerflow-ui-sessions"
SESSION_OPENED = "ledgerflow.ui_session_opened"
SESSION_CLOSED = "ledgerflow.ui_session_closed"
SESSION_HOURS = 12
"""How long a session lasts after sign-in."""
_SWEEP_EVERY = 1024
"""Sessions opened between two sweeps of the ended ones from memory."""

_FORMAT = re.compile(r"lfs_[A-Za-z0-9_-]{43}")


class SessionOpened(msgspec.Struct, frozen=True, kw_only=True):
    token_sha256: str
    key_id: str
    ends_at_us: int


class SessionClosed(msgspec.Struct, frozen=True, kw_only=True):
    token_sha256: str


def session_registry(registry: EventRegistry) -> EventRegistry:
    """``registry`` with the session events registered."""
    if registry.class_of(SESSION_OPENED) is None:
        registry.register(SessionOpened, SESSION_OPENED)
        registry.register(SessionClosed, SESSION_CLOSED)
    return registry


@dataclass(frozen=True, slots=True)
class _Session:
    key_id: str
    ends_at_us: int


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions(Followed):
    """The UI sessions of one ledger: open, close, and find whom a cookie names."""

    stream = SESSION_STREAM

    def __init__(self, store: WorkflowStore, keys: ApiKeys) -> None:
        session_registry(store.registry)
        super().__init__(store)
        self.keys = keys
        self._open: dict[str, _Session] = {}

    async def open(self, key: str, *, now_us: int) -> tuple[str, Principal] | None:
        """A new session for a valid key: (the cookie's token, its principal); None
        if the key is not valid."""
        principal = await self.keys.authenticate(key)
        if principal is None:
            return None
        token = f"lfs_{secrets.token_urlsafe(32)}"
        key_id = principal.subject.removeprefix("key:")
        ends = now_us + SESSION_HOURS * 3600 * 1_000_000
        await self.store.append(
            SESSION_STREAM,
            [SessionOpened(token_sha256=_digest(token), key_id=key_id, ends_at_us=ends)],
            metadata=Metadata(actor=principal.subject, tenant=principal.tenant),
        )
        await self.refresh(force=True)
        return token, principal

    async def close(self, token: str) -> None:
        """End the session (nothing if it is not open)."""
        digest = _digest(token)
        await self.refresh(force=True)
        found = self._open.get(digest)
        if found is None:
            return
        await self.store.append(
            SESSION_STREAM,
            [SessionClosed(token_sha256=digest)],
            metadata=Metadata(actor=f"key:{found.key_id}"),
        )
        await self.refresh(force=True)

    async def principal(self, token: str, *, now_us: int) -> Principal | None:
        """Whom the cookie's token stands for: an open session, not past its end,
        whose key is valid still; None for anything else."""
        if _FORMAT.fullmatch(token) is None:
            return None
        await self.refresh()
        digest = _digest(token)
        found = self._open.get(digest)
        if found is None:
            await self.refresh_on_miss()
            found = self._open.get(digest)
        if found is None:
            return None
        if found.ends_at_us <= now_us:
            self._open.pop(digest, None)
            return None
        return await self.keys.principal_of(found.key_id)

    def _apply(self, event: RecordedEvent) -> None:
        data = event.data
        if isinstance(data, SessionOpened):
            self._open[data.token_sha256] = _Session(data.key_id, data.ends_at_us)
            if len(self._open) % _SWEEP_EVERY == 0:
                # Sessions nobody presents again were dropped only when presented.
                now = time.time_ns() // 1000
                for digest in [d for d, s in self._open.items() if s.ends_at_us <= now]:
                    del self._open[digest]
        elif isinstance(data, SessionClosed):
            self._open.pop(data.token_sha256, None)
