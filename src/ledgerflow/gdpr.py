"""Erasing a data subject's personal data (GDPR art. 17) without breaking the chain.

``erase_subject`` records a ``ledgerflow.subject_erased`` event naming only the
subject key's random id and the reason (the actor goes in its metadata), destroys
the key in the store's key vault, and drops the snapshots of every stream that
holds data sealed with it (snapshots are caches, and may hold it in the clear). No
event is rewritten: the hash chains, Merkle tiles and signed heads still verify,
and what was sealed with the key can no longer be read (see ``personal``).

The record comes first and has an id derived from the key's: if the process dies
between the two steps, erasing again completes it without a second record.
"""

from __future__ import annotations

import uuid

from .events import Metadata, NewEvent
from .store.ports import EventStore

__all__ = ["ERASURE_STREAM", "ERASURE_TYPE", "erase_subject"]

ERASURE_STREAM = "ledgerflow-erasures"
ERASURE_TYPE = "ledgerflow.subject_erased"
_NAMESPACE = uuid.UUID("6f1c2a8e-5b0e-4c8e-9f43-2d7d1f0b9a11")


async def erase_subject(
    store: EventStore, subject: str, *, reason: str, actor: str | None = None
) -> str | None:
    """Erase ``subject``'s personal data; the id of the key destroyed (None: the
    subject has no key, never had or already erased)."""
    if not reason.strip():
        raise ValueError("an erasure needs a reason")
    vault = store.key_vault
    key_id = await vault.key_id_of(subject)
    if key_id is None:
        return None
    record = NewEvent(
        ERASURE_TYPE,
        {"key_id": key_id, "reason": reason},
        id=uuid.uuid5(_NAMESPACE, key_id),
    )
    await store.append(ERASURE_STREAM, [record], metadata=Metadata(actor=actor, reason=reason))
    await vault.destroy(subject)
    await store.purge_snapshots(mentioning=key_id)
    return key_id
