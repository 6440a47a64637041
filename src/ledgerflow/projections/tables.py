"""Read-model tables: declared columns, checked rows, and the writes that change them.

A table belongs to one projection. It has a key column and typed columns; the store
creates it (``rm_<projection>_<table>`` in the ledger's own database, or in memory)
and is the only one to write it, from the writes a projection's handlers make. Names
are checked identifiers, so the SQL the store builds from them needs no quoting.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import msgspec

from ..errors import ConfigurationError

__all__ = [
    "Column",
    "ColumnKind",
    "Patch",
    "Put",
    "Remove",
    "Table",
    "TableWrite",
    "check_name",
]

ColumnKind = Literal["text", "integer", "real", "boolean", "json"]

_NAME = re.compile(r"^(?=.{1,24}$)[a-z](?:_?[a-z0-9])*$")
_KINDS: dict[Any, ColumnKind] = {str: "text", int: "integer", float: "real", bool: "boolean"}
_INT64 = (-(2**63), 2**63 - 1)


def check_name(name: object, what: str) -> str:
    """A lower-case identifier of at most 24 characters, without ``__`` (names are
    joined with it into a table's
    name in SQL)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"{what} {name!r} must be a lower-case identifier (a-z, 0-9 and single _ "
            "between them; starting with a letter; at most 24 characters)"
        )
    return name


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: ColumnKind
    nullable: bool

    def check(self, table: str, value: Any) -> Any:
        """``value`` if it fits the column (ints as floats for ``real``)."""
        if value is None:
            if self.nullable:
                return None
            raise ConfigurationError(f"table {table!r}: column {self.name!r} cannot be None")
        kind = self.kind
        fits = (
            (kind == "text" and isinstance(value, str) and "\x00" not in value)
            or (
                kind == "integer"
                and isinstance(value, int)
                and not isinstance(value, bool)
                and _INT64[0] <= value <= _INT64[1]
            )
            or (kind == "boolean" and isinstance(value, bool))
            or (
                kind == "real"
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            or (kind == "json" and not _holds_nul(value))
        )
        if not fits:
            why = " (a NUL character, which PostgreSQL cannot store)" if _has_nul(value) else ""
            raise ConfigurationError(
                f"table {table!r}: column {self.name!r} ({kind}) cannot hold {value!r:.200}{why}"
            )
        return float(value) if kind == "real" else value


def _has_nul(value: Any) -> bool:
    return (isinstance(value, str) and "\x00" in value) or _holds_nul(value)


def _holds_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character in a string or a key: PostgreSQL
    refuses it in text and jsonb alike, so no backend takes it (a read model behaves
    the same on each)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    if isinstance(value, int | float) or value is None:
        return False
    try:  # a Struct, a dataclass...: as it will be stored
        return _holds_nul(msgspec.to_builtins(value))
    except (TypeError, ValueError, OverflowError):
        return False  # not JSON: the store says so when it writes it


class Table:
    """A read-model table: ``Table("orders", key="order_id", columns={"order_id": str,
    "status": str, "amount_cents": int, "approver": str | None}, indexes=("status",))``.

    Column types: ``str``, ``int`` (64-bit), ``float``, ``bool``, or anything else as
    JSON (``dict``, ``list``, ``Any``); ``T | None`` allows None. The key column is a
    ``str`` or ``int``, never None."""

    def __init__(
        self,
        name: str,
        *,
        key: str,
        columns: Mapping[str, Any],
        indexes: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.name = check_name(name, "table name")
        if not columns:
            raise ConfigurationError(f"table {name!r} needs columns")
        self.columns: dict[str, Column] = {}
        for column, kind in columns.items():
            check_name(column, f"table {name!r}: column")
            self.columns[column] = _column(name, column, kind)
        if key not in self.columns:
            raise ConfigurationError(f"table {name!r}: key {key!r} is not one of its columns")
        if self.columns[key].kind not in ("text", "integer") or self.columns[key].nullable:
            raise ConfigurationError(f"table {name!r}: key {key!r} must be a str or an int")
        self.key = key
        for column in indexes:
            if column not in self.columns:
                raise ConfigurationError(f"table {name!r}: index on unknown column {column!r}")
        self.indexes = tuple(indexes)

    def __repr__(self) -> str:
        return f"Table({self.name!r})"

    def check_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A whole row: every column given (None for the nullable ones left out)."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ConfigurationError(f"table {self.name!r}: unknown columns {sorted(unknown)}")
        return {name: col.check(self.name, row.get(name)) for name, col in self.columns.items()}

    def check_changes(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(changes) - set(self.columns)
        if unknown:
            raise ConfigurationError(f"table {self.name!r}: unknown columns {sorted(unknown)}")
        if self.key in changes:
            raise ConfigurationError(f"table {self.name!r}: the key {self.key!r} cannot change")
        if not changes:
            raise ConfigurationError(f"table {self.name!r}: an update needs columns to set")
        return {name: self.columns[name].check(self.name, v) for name, v in changes.items()}

    def check_key(self, key: Any) -> Any:
        return self.columns[self.key].check(self.name, key)


def _column(table: str, name: str, kind: Any) -> Column:
    nullable = False
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(kind))
        kind = args[0] if len(args) == 1 else Any
    found = _KINDS.get(kind, "json")
    return Column(name, found, nullable or found == "json")


@dataclass(frozen=True, slots=True)
class Put:
    """Insert the row, or replace the one with its key."""

    table: str
    row: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Patch:
    """Set some columns of the row with ``key`` (nothing if there is none)."""

    table: str
    key: Any
    changes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Remove:
    """Delete the row with ``key`` (nothing if there is none)."""

    table: str
    key: Any


TableWrite = Put | Patch | Remove
"""A change to a read-model table (by its declared name), as a projection's batch
hands it to the store."""
