"""HTML forms made from the JSON Schema a signal's wait recorded, and the payload
read back from a submitted form. What a form cannot express (nested objects,
lists, unions) is a JSON text field; the engine checks the payload against the whole
schema either way, so the form only has to get the common shapes right."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

__all__ = ["FormField", "SignalForm", "signal_form"]

Kind = Literal["boolean", "integer", "number", "string", "choice", "json"]
PREFIX = "f."
"""Form field names of payload fields start with it (``reason`` and ``csrf`` don't)."""


@dataclass(frozen=True, slots=True)
class FormField:
    key: str
    """The payload's key; empty for a payload that is one value, not an object."""
    label: str
    kind: Kind
    required: bool
    choices: tuple[str, ...] = ()
    description: str | None = None

    @property
    def name(self) -> str:
        return PREFIX + (self.key or "payload")


@dataclass(frozen=True, slots=True)
class SignalForm:
    signal: str
    title: str | None
    description: str | None
    fields: tuple[FormField, ...]
    whole: bool
    """The payload is the one field's value, not an object of the fields."""

    def read(self, form: Mapping[str, str]) -> tuple[Any, dict[str, str]]:
        """The payload a submitted form gives, and the problems by field name."""
        values: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for field in self.fields:
            raw = form.get(field.name, "")
            if raw.strip() == "":
                if field.required and field.kind != "boolean":
                    problems[field.name] = "required"
                continue
            try:
                values[field.key] = _parse(field, raw)
            except ValueError as exc:
                problems[field.name] = str(exc)
        if self.whole:
            return values.get(""), problems
        return values, problems


def _parse(field: FormField, raw: str) -> Any:
    if field.kind == "boolean":
        if raw not in ("true", "false"):
            raise ValueError("choose yes or no")
        return raw == "true"
    if field.kind == "integer":
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("a whole number") from None
    if field.kind == "number":
        try:
            number = float(raw.strip())
        except ValueError:
            raise ValueError("a number") from None
        if not math.isfinite(number):  # float() reads "nan", "inf", "1e999": no JSON has them
            raise ValueError("a finite number")
        return number
    if field.kind == "choice":
        if raw not in field.choices:
            raise ValueError(f"one of {', '.join(field.choices)}")
        return raw
    if field.kind == "json":
        try:
            return msgspec.json.decode(raw.encode())
        except msgspec.DecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
    return raw


def signal_form(signal: str, schema: dict[str, Any] | None) -> SignalForm:
    """The form of a signal whose payload must fit ``schema`` (None: any JSON)."""
    root = _resolve(schema or {}, schema or {})
    title = root.get("title")
    description = root.get("description")
    if root.get("type") == "object" and isinstance(root.get("properties"), dict):
        required = set(root.get("required", []))
        fields = tuple(
            _field(key, _resolve(prop, schema or {}), key in required)
            for key, prop in root["properties"].items()
            if isinstance(prop, dict)
        )
        return SignalForm(signal, title, description, fields, whole=False)
    return SignalForm(
        signal, title, description, (_field("", root, required=bool(schema)),), whole=True
    )


def _resolve(node: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found = document.get("$defs", {}).get(ref[len("#/$defs/") :])
        if isinstance(found, dict):
            return found
    return node


def _field(key: str, node: dict[str, Any], required: bool) -> FormField:
    label = str(node.get("title") or key.replace("_", " ") or "payload")
    description = node.get("description")
    options = node.get("anyOf")
    if isinstance(options, list):
        # Optional[X]: X, not required.
        others = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
        if len(others) == 1 and len(others) < len(options):
            inner = _field(key, others[0], required=False)
            return FormField(key, label, inner.kind, False, inner.choices, description)
        return FormField(key, label, "json", required, (), description)
    enum = node.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        return FormField(key, label, "choice", required, tuple(enum), description)
    kind = node.get("type")
    if kind in ("boolean", "integer", "number", "string"):
        return FormField(key, label, kind, required, (), description)
    return FormField(key, label, "json", required, (), description)
