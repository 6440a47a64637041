"""Numbered schema migrations, shared shape for every SQL backend."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SchemaVersionError

__all__ = ["Migration", "pending"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def pending(migrations: tuple[Migration, ...], applied: int) -> tuple[Migration, ...]:
    """The migrations still to apply over a database at schema version ``applied``.

    Raises ``SchemaVersionError`` when the database is newer than this code, so old
    code never writes into a schema it does not understand.
    """
    known = migrations[-1].version if migrations else 0
    if applied > known:
        raise SchemaVersionError(applied, known)
    return tuple(m for m in migrations if m.version > applied)
