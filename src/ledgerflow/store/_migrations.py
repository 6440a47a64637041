"""Numbered schema migrations, shared shape for every SQL backend."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SchemaVersionError

__all__ = ["Migration", "missing_tables", "pending", "tables_of"]


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


_CREATED = re.compile(r"\bCREATE TABLE (?:IF NOT EXISTS )?(?:\w+\.)?(\w+)", re.IGNORECASE)
_DROPPED = re.compile(r"\bDROP TABLE (?:IF EXISTS )?(?:\w+\.)?(\w+)", re.IGNORECASE)


def tables_of(migrations: tuple[Migration, ...]) -> frozenset[str]:
    """The tables a database has once ``migrations`` are applied: those they create,
    less those they drop (``schema_migrations`` is the backend's own)."""
    tables: set[str] = set()
    for migration in migrations:
        for statement in migration.statements:
            tables.update(_CREATED.findall(statement))
            tables.difference_update(_DROPPED.findall(statement))
    return frozenset(tables)


def missing_tables(missing: set[str] | frozenset[str]) -> str:
    """Why a ledger missing ``missing`` cannot be used, for ``StoreCorruptError``."""
    names = ", ".join(sorted(missing))
    which = f"tables {names} are" if len(missing) > 1 else f"table {names} is"
    return f"its {which} missing (dropped outside ledgerflow): restore the database from a backup"
