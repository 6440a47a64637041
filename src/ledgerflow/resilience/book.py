"""The policy book: named policies as versioned documents in the ledger.

Each policy is a stream, ``policy-<name>``, of ``PolicyChanged`` events: version n of
the policy is event n, carrying the whole document, who changed it and why. Nothing
else holds policies, so every worker on the store reads the same ones, a change made
from any process (or the CLI) reaches running workers without a restart, and the
history of a policy is the history of its stream, hash-chained like every event.

Workers read policies on the hot path through ``current``: a cached version, checked
against the ledger at most every ``refresh_s`` seconds (one small read per policy in
use), so a change is in force everywhere within that time. A worker that cannot reach
the store keeps the version it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import hashlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from ..errors import (
    ConcurrencyError,
    InvalidPolicyError,
    PolicyNotFoundError,
    StoreClosedError,
    StoreReadOnlyError,
    StoreUnavailableError,
    StreamNotFoundError,
)
from ..events import NO_STREAM, Metadata, NewEvent, RecordedEvent
from ..registry import EventRegistry
from ..store.ports import EventStore
from .policy import Policy, check_policy, check_policy_name, policy_changes, with_settings

__all__ = [
    "POLICY_CHANGED",
    "POLICY_STREAM_PREFIX",
    "PolicyBook",
    "PolicyChanged",
    "PolicyVersion",
    "default_actor",
    "policy_registry",
]

log = logging.getLogger("ledgerflow.policy")

POLICY_STREAM_PREFIX = "policy-"
POLICY_CHANGED = "ledgerflow.policy_changed"
REFRESH_S = 0.5
"""How stale a worker's copy of a policy may get: changes are in force within this."""
UPDATE_TRIES = 10
"""Read-change-write rounds an ``update`` makes while others change the same policy."""
_IDS = uuid.UUID("0f4a3c2e-8b71-4d0c-9e55-7a1d6c2b9f30")


class PolicyChanged(msgspec.Struct, frozen=True, kw_only=True):
    """Version ``version`` of policy ``name``: the whole document (fields at their
    defaults left out), who set it, why, and what changed from the version before."""

    name: str
    version: int
    document: dict[str, Any]
    actor: str
    reason: str
    changes: list[str] = msgspec.field(default_factory=list)


def policy_registry(registry: EventRegistry) -> EventRegistry:
    """``registry`` with the policy book's event type registered."""
    if registry.class_of(POLICY_CHANGED) is None:
        registry.register(PolicyChanged, POLICY_CHANGED)
    return registry


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One version of a named policy, as the ledger holds it."""

    name: str
    version: int
    policy: Policy
    actor: str
    reason: str
    at: datetime
    changes: tuple[str, ...]


@functools.cache
def default_actor() -> str:
    """Who acts (changes a policy, sends an event) when the caller does not say:
    ``user@host``, looked up once a process (without ``USER`` in the environment
    the lookup reads the password database)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's numeric user)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(slots=True)
class _Cached:
    version: PolicyVersion
    checked: float
    """The book's monotonic clock at the last look at the ledger."""


class PolicyBook:
    """Named policies in the ledger: set, change, read and list them (from Python;
    the CLI's ``ledgerflow policy`` does the same), and the cached reads workers use."""

    def __init__(
        self,
        store: EventStore,
        *,
        refresh_s: float = REFRESH_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        policy_registry(store.registry)
        self.store = store
        self.refresh_s = refresh_s
        self._monotonic = monotonic
        """How old a cached copy is, judged by this (tests move it)."""
        self._cache: dict[str, _Cached] = {}
        self._loading: dict[str, asyncio.Future[PolicyVersion]] = {}

    # -- reading ----------------------------------------------------------------------

    async def get(self, name: str) -> PolicyVersion:
        """The version in force, read from the ledger now."""
        check_policy_name(name)
        try:
            newest = await self.store.read_stream(_stream(name), backwards=True, limit=1)
        except StreamNotFoundError:
            newest = []
        if not newest:  # (or created by another process between the store's two reads)
            raise PolicyNotFoundError(name)
        found = _version(newest[0])
        self._remember(found)
        return found

    def fresh(self, name: str) -> PolicyVersion | None:
        """The cached version if it is at most ``refresh_s`` seconds old, else None."""
        cached = self._cache.get(name)
        if cached is not None and self._monotonic() - cached.checked < self.refresh_s:
            return cached.version
        return None

    async def current(self, name: str) -> PolicyVersion:
        """The version in force as this process knows it: at most ``refresh_s``
        seconds old. What steps run under; cheap enough to ask on every attempt."""
        cached = self._cache.get(name)
        if cached is not None and self._monotonic() - cached.checked < self.refresh_s:
            return cached.version
        loading = self._loading.get(name)
        if loading is None:
            loading = asyncio.ensure_future(self._refresh(name, cached))
            self._loading[name] = loading
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(loading)

    async def history(self, name: str) -> list[PolicyVersion]:
        """Every version of the policy, oldest first."""
        check_policy_name(name)
        try:
            events = await self.store.read_stream(_stream(name))
        except StreamNotFoundError:
            events = []
        if not events:
            raise PolicyNotFoundError(name)
        return [_version(e) for e in events]

    async def list(self) -> list[PolicyVersion]:
        """The version in force of every policy, by name."""
        names: list[str] = []
        after = POLICY_STREAM_PREFIX
        while True:
            heads = await self.store.stream_heads(after=after, limit=500)
            ours = [sid for sid, _ in heads if sid.startswith(POLICY_STREAM_PREFIX)]
            names.extend(sid[len(POLICY_STREAM_PREFIX) :] for sid in ours)
            if len(ours) < len(heads) or len(heads) < 500:
                break
            after = heads[-1][0]
        return [await self.get(name) for name in names]

    # -- changing ---------------------------------------------------------------------

    async def set(
        self,
        name: str,
        policy: Policy | Mapping[str, Any],
        *,
        reason: str,
        actor: str | None = None,
        expected_version: int | None = None,
    ) -> PolicyVersion:
        """Make ``policy`` the version in force (checked first: an invalid document is
        an ``InvalidPolicyError`` and the version in force stays). ``expected_version``
        (the version you read): ``ConcurrencyError`` if someone changed it since. The
        same document as the one in force records nothing and returns that version."""
        check_policy_name(name)
        checked = check_policy(name, policy if isinstance(policy, Policy) else dict(policy))
        _check_reason(name, reason)
        try:
            now = await self.get(name)
        except PolicyNotFoundError:
            now = None
        version = now.version if now is not None else 0
        if expected_version is not None and expected_version != version:
            raise ConcurrencyError(_stream(name), expected_version, version)
        if now is not None and now.policy == checked:
            return now
        return await self._record(name, now, checked, reason, actor)

    async def update(
        self,
        name: str,
        settings: Mapping[str, Any],
        *,
        reason: str,
        actor: str | None = None,
        create: bool = False,
    ) -> PolicyVersion:
        """Change some fields of the version in force: ``{"retry.max_attempts": 10}``
        (``None`` removes a section, or sets a field to null). Others may
        change the policy meanwhile: the change is made on top of theirs. ``create``:
        start from an empty policy if there is none yet."""
        check_policy_name(name)
        _check_reason(name, reason)
        seen = 0
        for _ in range(UPDATE_TRIES):
            try:
                now: PolicyVersion | None = await self.get(name)
            except PolicyNotFoundError:
                if not create:
                    raise
                now = None
            seen = now.version if now is not None else 0
            changed = with_settings(name, now.policy if now else None, dict(settings))
            if now is not None and now.policy == changed:
                return now
            try:
                return await self._record(name, now, changed, reason, actor)
            except ConcurrencyError:
                continue
        raise ConcurrencyError(_stream(name), seen, seen + 1)  # others kept changing it

    async def declare(self, policies: Mapping[str, Policy], *, actor: str) -> None:
        """Record version 1 of each policy the ledger does not hold yet: the defaults
        an application ships with. A policy already in the ledger keeps its version
        (changes made at run time outlive a deploy)."""
        checked = {check_policy_name(n): check_policy(n, p) for n, p in policies.items()}
        for name, policy in checked.items():
            try:
                await self.get(name)
                continue
            except PolicyNotFoundError:
                pass
            with contextlib.suppress(ConcurrencyError):  # another process declared it
                await self._record(name, None, policy, "declared by the application", actor)

    async def _record(
        self,
        name: str,
        now: PolicyVersion | None,
        policy: Policy,
        reason: str,
        actor: str | None,
    ) -> PolicyVersion:
        version = (now.version if now is not None else 0) + 1
        who = actor or default_actor()
        changed = PolicyChanged(
            name=name,
            version=version,
            document=msgspec.to_builtins(policy),
            actor=who,
            reason=reason,
            changes=policy_changes(now.policy if now else None, policy),
        )
        digest = hashlib.sha256(msgspec.json.encode(changed)).hexdigest()
        event = NewEvent(
            POLICY_CHANGED,
            msgspec.to_builtins(changed),
            metadata=Metadata(actor=who, reason=reason),
            id=uuid.uuid5(_IDS, f"{name}/{version}/{digest}"),
        )
        await self.store.append(_stream(name), [event], NO_STREAM if now is None else now.version)
        log.info("policy %s is now version %d (%s): %s", name, version, who, reason)
        return await self.get(name)

    # -- the cache --------------------------------------------------------------------

    def _remember(self, found: PolicyVersion) -> None:
        cached = self._cache.get(found.name)
        if cached is None or cached.version.version <= found.version:
            self._cache[found.name] = _Cached(found, self._monotonic())

    async def _refresh(self, name: str, cached: _Cached | None) -> PolicyVersion:
        if cached is None:
            return await self.get(name)
        try:
            newer = await self.store.read_stream(
                _stream(name), from_version=cached.version.version + 1
            )
        except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
            # Keep running under the version we have; look again next time.
            log.warning(
                "policy %s: could not check for changes (%s); keeping v%d",
                name,
                exc,
                cached.version.version,
            )
            return cached.version
        if newer:
            self._remember(_version(newer[-1]))
        else:
            cached.checked = self._monotonic()
        return self._cache[name].version


def _stream(name: str) -> str:
    return f"{POLICY_STREAM_PREFIX}{name}"


def _check_reason(name: str, reason: object) -> None:
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidPolicyError(name, "", "a change needs a reason (who reads history asks why)")


def _version(event: RecordedEvent) -> PolicyVersion:
    data = event.data
    if not isinstance(data, PolicyChanged):  # pragma: no cover - the registry decodes it
        data = msgspec.convert(data, PolicyChanged)
    try:
        policy = msgspec.convert(data.document, Policy)
    except msgspec.ValidationError as exc:
        raise InvalidPolicyError(
            data.name, "", f"version {data.version} cannot be read: {exc}"
        ) from None
    return PolicyVersion(
        name=data.name,
        version=event.version,
        policy=policy,
        actor=data.actor,
        reason=data.reason,
        at=event.recorded_at,
        changes=tuple(data.changes),
    )
