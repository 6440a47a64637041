"""Who calls the HTTP API: a principal with a role and a tenant scope."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..tenants import ALL_TENANTS

__all__ = ["Principal", "Role"]


class Role(enum.IntEnum):
    """What a principal may do; each role may do what the ones below it may."""

    VIEWER = 1
    """Read: list, describe, history, query."""
    OPERATOR = 2
    """And act: start, signal, cancel, retry, skip, compensate, resume."""
    ADMIN = 3
    """And manage the API keys of its tenant."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(r.label for r in cls)
            raise ValueError(f"unknown role {text!r}: one of {names}") from None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``subject`` names it in the events it records (its
    actor: ``key:<id>`` for an API key, the token's subject for a JWT)."""

    subject: str
    role: Role
    tenant: str
    """A tenant's name, or ``*`` (ALL_TENANTS): every instance, ids shown whole."""

    @property
    def everywhere(self) -> bool:
        return self.tenant == ALL_TENANTS

    def may(self, role: Role) -> bool:
        return self.role >= role
