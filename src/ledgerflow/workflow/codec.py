"""Typed values in and out of history events: JSON builtins on the ledger, the
user's types (dataclasses, msgspec Structs, pydantic models) in workflow code."""

from __future__ import annotations

import contextlib
import datetime
import functools
import typing
import uuid
from typing import Any

import msgspec

from .. import personal

__all__ = [
    "MAX_NESTING",
    "CodecError",
    "check_fits",
    "check_nesting",
    "from_builtins",
    "json_schema",
    "schema_problems",
    "to_builtins",
]


class CodecError(ValueError):
    pass


def _is_pydantic(value: object) -> bool:
    return hasattr(value, "model_dump") and hasattr(type(value), "model_validate")


def to_builtins(value: Any) -> Any:
    """JSON-safe builtins for ``value``, its personal fields left as ``Sealed``
    placeholders for the store to encrypt; raises CodecError if it has none."""
    try:
        if _is_pydantic(value):
            return value.model_dump(mode="json")
        return personal.seal_builtins(value, msgspec.to_builtins(value))
    except (TypeError, ValueError) as exc:
        raise CodecError(str(exc)) from exc
    except RecursionError:
        raise CodecError(f"it is nested deeper than {MAX_NESTING} levels") from None


MAX_NESTING = 100
"""Levels of objects and arrays a workflow's input or a signal's payload may nest.
What reads recorded values (sealing and revealing personal data, schema checks)
walks them by recursion, which Python stops at about 1,000 frames less those of the
caller: a payload nested 400 deep over HTTP failed there, as a defect (500), where
JSON decoders take 1,000 levels."""


def check_nesting(value: Any) -> None:
    """``CodecError`` if JSON builtins (dicts, lists, tuples) in ``value`` nest
    deeper than ``MAX_NESTING``; without recursion, so any depth is told, not hit."""
    if type(value) not in (dict, list, tuple):
        return
    level: list[Any] = [value]
    for _ in range(MAX_NESTING):
        inner: list[Any] = []
        for item in level:
            children = item.values() if type(item) is dict else item
            inner.extend(c for c in children if type(c) in (dict, list, tuple))
        if not inner:
            return
        level = inner
    raise CodecError(f"it is nested deeper than {MAX_NESTING} levels")


def check_fits(encoded: Any, wanted: Any, whose: str) -> None:
    """``CodecError`` if ``encoded`` (a value about to be recorded) would not read
    back as ``wanted``, the return type ``whose`` code declares: recorded, it would
    stop every replay of its history there."""
    if wanted is Any:
        return
    try:
        from_builtins(encoded, wanted)
    except CodecError as exc:
        shown = getattr(wanted, "__qualname__", None) or repr(wanted)
        raise CodecError(f"it does not fit the {whose} return type {shown}: {exc}") from exc


def from_builtins(value: Any, type_: Any) -> Any:
    """``value`` (JSON builtins) as an instance of ``type_``; Any returns it as is."""
    if personal.declared():
        value = personal.plain(value)  # placeholders from to_builtins: their values
    if type_ is Any or type_ is None or type_ is type(None):
        return value
    try:
        if isinstance(type_, type) and hasattr(type_, "model_validate"):
            return type_.model_validate(value)
        return msgspec.convert(value, type_)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        # A field that was personal data and is erased: say so, not "expected str".
        personal.check_not_erased(value, f"a value of type {getattr(type_, '__name__', type_)}")
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


_PROSE = frozenset({"title", "description", "examples", "$comment"})


def same_shape(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two JSON Schemas take the same values: equal once their prose
    (titles, descriptions, examples: a docstring edited) is left out."""
    return a == b or bool(_shape(a) == _shape(b))


_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
"""Keywords whose keys are names (a field called ``title``), not keywords."""


def _shape(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {
            k: {n: _shape(s) for n, s in v.items()}
            if k in _NAMED and isinstance(v, dict)
            else _shape(v)
            for k, v in schema.items()
            if k not in _PROSE
        }
    if isinstance(schema, list):
        return [_shape(v) for v in schema]
    return schema


def schema_problems(schema: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` (JSON builtins) does not fit ``schema``, in a few words; None
    if it does, or if the schema cannot be used (the decoder checks then)."""
    validator = _validator(msgspec.json.encode(schema))
    if validator is None:
        return None
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if not errors:
        return None
    return "; ".join(
        f"{'/'.join(str(p) for p in error.absolute_path) or 'value'}: {error.message}"
        for error in errors[:5]
    )


@functools.lru_cache(maxsize=256)
def _validator(schema: bytes) -> Any:
    """A checked validator per schema (by its JSON): building one costs more than
    using it, and a program waits on a handful of types. None if unusable."""
    # Imported here: jsonschema costs every `import ledgerflow` (and CLI call)
    # ~70 ms, and only a payload checked against a recorded type needs it.
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        validator = Draft202012Validator(msgspec.json.decode(schema), format_checker=_formats())
        validator.check_schema(validator.schema)
    except SchemaError:
        return None
    return validator


@functools.cache
def _formats() -> Any:
    """String formats checked as the decoder reads them (so a payload passes here
    exactly when it would decode): "next tuesday" is not a time, "x" no uuid."""
    from jsonschema import FormatChecker

    checker = FormatChecker(())
    decoders: dict[str, Any] = {
        "date-time": datetime.datetime,
        "date": datetime.date,
        "time": datetime.time,
        "duration": datetime.timedelta,
        "uuid": uuid.UUID,
    }
    for name, type_ in decoders.items():

        def decodes(value: object, type_: Any = type_) -> bool:
            if not isinstance(value, str):
                return True  # not a string: the schema's "type" says so
            try:
                msgspec.convert(value, type_)
            except msgspec.ValidationError:
                return False
            return True

        checker.checks(name)(decodes)
    return checker


def _mark_datetimes(schema: dict[str, Any], type_: Any) -> dict[str, Any]:
    """msgspec describes a ``datetime`` field as a bare string: mark it
    ``"format": "date-time"`` (in the classes' definitions) so senders check it."""
    defs = schema.get("$defs", {})
    seen: set[int] = set()
    pending = [type_]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        pending.extend(typing.get_args(current))
        try:
            info = msgspec.inspect.type_info(current)
        except (TypeError, ValueError):
            continue
        fields = getattr(info, "fields", None)
        target = defs.get(getattr(current, "__name__", ""), {}).get("properties", {})
        for field in fields or ():
            hint = getattr(info, "cls", current)
            with contextlib.suppress(Exception):
                pending.append(typing.get_type_hints(hint).get(field.name))
            if isinstance(field.type, msgspec.inspect.DateTimeType):
                prop = target.get(field.encode_name)
                if prop == {"type": "string"}:
                    prop["format"] = "date-time"
    return schema


def _json_schema(type_: Any) -> dict[str, Any] | None:
    if type_ is Any or type_ is None:
        return None
    try:
        if isinstance(type_, type) and hasattr(type_, "model_json_schema"):
            schema: dict[str, Any] = type_.model_json_schema()
        else:
            schema = personal.mark_schema(_mark_datetimes(msgspec.json.schema(type_), type_), type_)
    except (TypeError, ValueError):
        return None
    return schema
