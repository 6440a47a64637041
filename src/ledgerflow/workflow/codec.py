"""Typed values in and out of history events: JSON builtins on the ledger, the
user's types (dataclasses, msgspec Structs, pydantic models) in workflow code."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["CodecError", "from_builtins", "json_schema", "to_builtins"]


class CodecError(ValueError):
    pass


def _is_pydantic(value: object) -> bool:
    return hasattr(value, "model_dump") and hasattr(type(value), "model_validate")


def to_builtins(value: Any) -> Any:
    """JSON-safe builtins for ``value``; raises CodecError if it has none."""
    try:
        if _is_pydantic(value):
            return value.model_dump(mode="json")
        return msgspec.to_builtins(value)
    except (TypeError, ValueError) as exc:
        raise CodecError(str(exc)) from exc


def from_builtins(value: Any, type_: Any) -> Any:
    """``value`` (JSON builtins) as an instance of ``type_``; Any returns it as is."""
    if type_ is Any or type_ is None or type_ is type(None):
        return value
    try:
        if isinstance(type_, type) and hasattr(type_, "model_validate"):
            return type_.model_validate(value)
        return msgspec.convert(value, type_)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise CodecError(str(exc)) from exc


_SCHEMAS: dict[Any, dict[str, Any] | None] = {}
"""Schemas already made, by type: every signal wait records one (~40 µs to make)."""


def json_schema(type_: Any) -> dict[str, Any] | None:
    """The JSON Schema of ``type_`` (None for ``Any`` or a type msgspec and pydantic
    cannot describe): recorded with a signal wait, so that a sender without the
    workflow's code can still check a payload before it is recorded."""
    try:
        return _SCHEMAS[type_]
    except KeyError:
        schema = _json_schema(type_)
        if len(_SCHEMAS) < 1024:  # a program has a few types: a bound all the same
            _SCHEMAS[type_] = schema
        return schema
    except TypeError:  # an unhashable annotation
        return _json_schema(type_)


def _json_schema(type_: Any) -> dict[str, Any] | None:
    if type_ is Any or type_ is None:
        return None
    try:
        if isinstance(type_, type) and hasattr(type_, "model_json_schema"):
            schema: dict[str, Any] = type_.model_json_schema()
        else:
            schema = msgspec.json.schema(type_)
    except (TypeError, ValueError):
        return None
    return schema
