"""Personal data that can be erased without touching the ledger (ADR 020).

Declare the fields of an event class (or of a workflow's input, result or signal
type: any dataclass or msgspec Struct) that hold personal data, and the field that
names whose data it is::

    @dataclass
    class CustomerRegistered:
        customer_id: Annotated[str, Subject]
        email: Annotated[str, Personal]
        plan: str

Each personal value is encrypted (AES-256-GCM) with a key of its data subject before
the event is encoded, so the ledger stores, chains and proves only ciphertext. The
keys live in a ``KeyVault`` (a table of the store by default). ``ledgerflow gdpr
erase <subject>`` destroys the subject's key and records a ``SubjectErased`` event
that names only the key's random id: every event stays as it was (the hash chains,
tiles and proofs still verify) and the values can no longer be read.

On the ledger a personal value is ``{"$pii": {"k": key id, "f": field, "n": nonce,
"c": ciphertext}}``. Read back, it is the value again, or ``{"$erased": field}``
once the key is gone; converting that into a typed value raises
``PersonalDataErasedError`` naming the field, so code that needs the data fails
clearly instead of running on a placeholder.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigurationError, PersonalDataErasedError

__all__ = [
    "ERASED",
    "MARKER",
    "SCHEMA_KEY",
    "SIZING",
    "KeyVault",
    "Personal",
    "Sealed",
    "Sealer",
    "Subject",
    "SubjectKey",
    "check_class",
    "check_not_erased",
    "declared",
    "erased_fields",
    "has_personal_objects",
    "holds_personal",
    "key_ids_in",
    "mark_schema",
    "marked",
    "plain",
    "reveal",
    "seal_builtins",
    "seal_by_schema",
    "subjects_in",
]

MARKER: Final = "$pii"
ERASED: Final = "$erased"
_MARKER_BYTES: Final = b'"$pii"'


class _Personal:
    def __repr__(self) -> str:
        return "Personal"


class _Subject:
    def __repr__(self) -> str:
        return "Subject"


Personal: Final = _Personal()
"""``Annotated[T, Personal]``: this field holds personal data of the object's subject."""
Subject: Final = _Subject()
"""``Annotated[str, Subject]``: this field names the data subject (an opaque id, not
an email: it stays readable in the key vault until erased)."""


@dataclass(frozen=True, slots=True)
class _Spec:
    fields: tuple[tuple[str, str], ...]
    """(attribute, encoded name) of every field."""
    subject: str | None
    personal: tuple[tuple[str, str], ...]


_SPECS: dict[type, _Spec | None] = {}
_declared = False
"""Whether any class with personal fields was seen in this process: until one is,
no value can hold personal data and appends skip looking for it."""


def declared() -> bool:
    return _declared


def check_class(cls: type) -> None:
    """Learn ``cls``'s personal fields now (``ConfigurationError`` if it declares
    some without a subject): the registry calls it when a class is registered."""
    _spec(cls)


def _spec(cls: type) -> _Spec | None:
    """How ``cls``'s fields are encoded and which are personal (None: not a class of
    fields ledgerflow walks: only dataclasses and msgspec Structs)."""
    try:
        return _SPECS[cls]
    except KeyError:
        spec = _SPECS[cls] = _make_spec(cls)
        return spec


def _make_spec(cls: type) -> _Spec | None:
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        names = [(f.name, f.encode_name) for f in msgspec.structs.fields(cls)]
    elif dataclasses.is_dataclass(cls):
        names = [(f.name, f.name) for f in dataclasses.fields(cls)]
    else:
        return None
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing declared
        hints = {}
    personal, subject = [], None
    for attr, encoded in names:
        marks = getattr(hints.get(attr), "__metadata__", ())
        if any(m is Personal for m in marks):
            personal.append((attr, encoded))
        if any(m is Subject for m in marks):
            subject = attr
    if personal:
        global _declared
        _declared = True
    if personal and subject is None:
        raise ConfigurationError(
            f"{cls.__qualname__} declares personal fields "
            f"{[a for a, _ in personal]} but no Annotated[str, Subject] field naming "
            "whose data they are"
        )
    return _Spec(tuple(names), subject, tuple(personal))


class Sealed:
    """A personal value in a builtins tree, waiting for its subject's key: what
    ``seal_builtins`` leaves for the store's encoder to encrypt."""

    __slots__ = ("field", "subject", "value")

    def __init__(self, subject: str, field: str, value: Any) -> None:
        self.subject = subject
        self.field = field
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sealed) and (self.subject, self.field, self.value) == (
            other.subject,
            other.field,
            other.value,
        )

    def __hash__(self) -> int:
        return hash((self.subject, self.field))

    def __repr__(self) -> str:
        return f"Sealed({self.subject!r}, {self.field!r})"


def seal_builtins(value: Any, raw: Any) -> Any:
    """``raw`` (``msgspec.to_builtins(value)``) with each personal value of ``value``
    replaced by a ``Sealed`` placeholder. Returns ``raw`` itself when nothing in
    ``value`` is personal."""
    cls = type(value)
    if cls in _SCALARS:
        return raw
    spec = _spec(cls)
    if spec is not None:
        if not isinstance(raw, dict):
            return raw
        for attr, encoded in spec.fields:
            if encoded in raw:
                raw[encoded] = seal_builtins(getattr(value, attr), raw[encoded])
        if spec.personal and spec.subject is not None:
            subject = getattr(value, spec.subject)
            for _, encoded in spec.personal:
                if raw.get(encoded) is not None:
                    raw[encoded] = Sealed(str(subject), encoded, raw[encoded])
        return raw
    if isinstance(value, (list, tuple)) and isinstance(raw, list):
        for i, item in enumerate(value):
            if type(item) not in _SCALARS:
                raw[i] = seal_builtins(item, raw[i])
    elif isinstance(value, dict) and isinstance(raw, dict):
        for key, item in value.items():
            if type(item) not in _SCALARS and (name := _key(key)) in raw:
                raw[name] = seal_builtins(item, raw[name])
    return raw


_SCALARS: Final = frozenset({str, int, float, bool, type(None), bytes})


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(msgspec.to_builtins(key))


def subjects_in(value: Any) -> set[str]:
    """The data subjects whose keys encoding ``value`` needs: those of ``Sealed``
    placeholders in builtins, and of typed objects with personal fields."""
    found: set[str] = set()
    _subjects(value, found)
    return found


def _subjects(value: Any, found: set[str]) -> None:
    cls = type(value)
    if cls in _SCALARS:
        return
    if cls is Sealed:
        found.add(value.subject)
        return
    if cls is dict:
        for item in value.values():
            _subjects(item, found)
        return
    if cls is list or cls is tuple:
        for item in value:
            _subjects(item, found)
        return
    spec = _spec(cls)
    if spec is None:
        return
    if spec.personal and spec.subject is not None:
        found.add(str(getattr(value, spec.subject)))
    for attr, _ in spec.fields:
        _subjects(getattr(value, attr), found)


@dataclass(frozen=True, slots=True)
class SubjectKey:
    key_id: str
    """Random, and all the ledger ever records of the subject."""
    key: bytes
    """32 bytes: AES-256-GCM."""


class KeyVault(Protocol):
    """Where data subjects' keys live: a table of the store by default
    (``store.key_vault``); a KMS or HSM implements the same three methods."""

    async def keys_for(self, subjects: Collection[str]) -> dict[str, SubjectKey]:
        """The key of each subject, created if it has none (a subject erased before
        gets a new key: data recorded after the erasure is theirs again)."""
        ...

    async def keys_by_id(self, key_ids: Collection[str]) -> dict[str, bytes]:
        """The keys that still exist among ``key_ids`` (destroyed ones are absent)."""
        ...

    async def key_id_of(self, subject: str) -> str | None:
        """The id of the subject's key, without creating one."""
        ...

    async def destroy(self, subject: str) -> str | None:
        """Destroy the subject's key for good; its id (None: the subject had none)."""
        ...


def _aad(key_id: str, field: str) -> bytes:
    # Binds a ciphertext to its key and field: it cannot be moved to another field.
    return f"{key_id}\0{field}".encode()


_json = msgspec.json.Encoder()
_unjson = msgspec.json.Decoder()


class Sealer:
    """Encrypts ``Sealed`` placeholders as they are encoded (an ``enc_hook``)."""

    def __init__(self, keys: Mapping[str, SubjectKey]) -> None:
        self._keys = keys
        self.encoder = msgspec.json.Encoder(enc_hook=self.hook)

    def hook(self, value: Any) -> Any:
        if type(value) is not Sealed:
            raise NotImplementedError(f"cannot encode {type(value).__qualname__}")
        key = self._keys[value.subject]
        nonce = os.urandom(12)
        cipher = AESGCM(key.key).encrypt(
            nonce, _json.encode(value.value), _aad(key.key_id, value.field)
        )
        return {
            MARKER: {
                "k": key.key_id,
                "f": value.field,
                "n": base64.b64encode(nonce).decode(),
                "c": base64.b64encode(cipher).decode(),
            }
        }


def holds_personal(data: bytes) -> bool:
    """Whether stored event data may hold sealed values (a cheap byte test)."""
    return _MARKER_BYTES in data


def _marker(value: Any) -> dict[str, Any] | None:
    if type(value) is dict and len(value) == 1:
        inner = value.get(MARKER)
        if type(inner) is dict:
            return inner
    return None


def key_ids_in(raw: Any) -> set[str]:
    found: set[str] = set()
    _key_ids(raw, found)
    return found


def _key_ids(raw: Any, found: set[str]) -> None:
    if type(raw) is dict:
        marker = _marker(raw)
        if marker is not None:
            if isinstance(marker.get("k"), str):
                found.add(marker["k"])
            return
        for item in raw.values():
            _key_ids(item, found)
    elif type(raw) is list:
        for item in raw:
            _key_ids(item, found)


def plain(raw: Any) -> Any:
    """``raw`` with each ``Sealed`` placeholder back to its value (a copy where it
    held any): builtins as the user's value gave them, to convert or compare."""
    cls = type(raw)
    if cls is Sealed:
        return raw.value
    if cls is dict:
        return {name: plain(item) for name, item in raw.items()}
    if cls is list:
        return [plain(item) for item in raw]
    return raw


def has_personal_objects(value: Any) -> bool:
    """Whether ``value`` holds typed objects with personal fields (not yet sealed)."""
    cls = type(value)
    if cls in _SCALARS or cls is Sealed:
        return False
    if cls is dict:
        return any(has_personal_objects(v) for v in value.values())
    if cls is list or cls is tuple:
        return any(has_personal_objects(v) for v in value)
    spec = _spec(cls)
    if spec is None:
        return False
    if spec.personal:
        return True
    return any(has_personal_objects(getattr(value, attr)) for attr, _ in spec.fields)


def reveal(raw: Any, keys: Mapping[str, bytes]) -> Any:
    """``raw`` with every sealed value decrypted, or ``{"$erased": field}`` where its
    key is gone (or the ciphertext does not open: it is not readable either way).
    Sealed values sit under the field they were sealed for; one anywhere else (at
    the top, in a list) is not opened."""
    if type(raw) is dict:
        revealed = {}
        for name, item in raw.items():
            marker = _marker(item)
            revealed[name] = reveal(item, keys) if marker is None else _open(marker, name, keys)
        return revealed
    if type(raw) is list:
        return [reveal(item, keys) for item in raw]
    return raw


def _open(marker: dict[str, Any], field: str, keys: Mapping[str, bytes]) -> Any:
    """The value sealed in ``marker``, found under ``field``: the field is part of
    the authenticated data, so a ciphertext moved to another field does not open."""
    key = keys.get(marker.get("k", ""))
    if key is None:
        return {ERASED: field}
    try:
        nonce = base64.b64decode(marker["n"])
        cipher = base64.b64decode(marker["c"])
        plain = AESGCM(key).decrypt(nonce, cipher, _aad(marker["k"], field))
    except (InvalidTag, KeyError, TypeError, ValueError):
        return {ERASED: field}
    return _unjson.decode(plain)


def erased_fields(raw: Any, path: str = "$") -> list[str]:
    """Where in ``raw`` (revealed) erased values sit, as JSON paths."""
    if type(raw) is dict:
        if len(raw) == 1 and ERASED in raw:
            return [path]
        return [p for name, item in raw.items() for p in erased_fields(item, f"{path}.{name}")]
    if type(raw) is list:
        return [p for i, item in enumerate(raw) for p in erased_fields(item, f"{path}[{i}]")]
    return []


def check_not_erased(raw: Any, what: str) -> None:
    """Raise ``PersonalDataErasedError`` if ``raw`` holds erased values: converting it
    into a typed value would only put placeholders where the data was."""
    paths = erased_fields(raw)
    if paths:
        raise PersonalDataErasedError(what, paths)


class _AnyKey(dict[str, SubjectKey]):
    def __missing__(self, subject: str) -> SubjectKey:
        return SubjectKey("00000000-0000-0000-0000-000000000000", bytes(32))


SIZING: Final = Sealer(_AnyKey())
"""Seals with a dummy key: to learn an event's encoded size before its subjects'
keys are fetched (a sealed value's size does not depend on the key)."""


SCHEMA_KEY: Final = "x-ledgerflow-personal"
"""Where a recorded JSON Schema says which fields of an object are personal and
which names the subject: how a sender without the workflow's code (the CLI, the HTTP
API) seals a signal's payload before it is recorded."""


def mark_schema(schema: dict[str, Any], type_: Any) -> dict[str, Any]:
    """``schema`` (msgspec's, of ``type_``) with each object schema of a class that
    declares personal fields marked with them (under ``SCHEMA_KEY``)."""
    classes: dict[str, type] = {}
    _classes(type_, classes, set())
    defs = schema.get("$defs", {})
    for name, cls in classes.items():
        spec = _spec(cls)
        target = defs.get(name)
        if spec is None or not spec.personal or spec.subject is None or target is None:
            continue
        encoded = dict(spec.fields)
        target[SCHEMA_KEY] = {
            "subject": encoded[spec.subject],
            "fields": [e for _, e in spec.personal],
        }
    return schema


def _classes(type_: Any, found: dict[str, type], seen: set[int]) -> None:
    """The dataclasses and Structs reachable from ``type_``'s annotations, by name."""
    if id(type_) in seen:
        return
    seen.add(id(type_))
    for arg in typing.get_args(type_):
        _classes(arg, found, seen)
    if isinstance(type_, type) and _spec(type_) is not None:
        found.setdefault(type_.__name__, type_)
        try:
            hints = typing.get_type_hints(type_, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable annotations: nothing more
            return
        for hint in hints.values():
            _classes(hint, found, seen)


def marked(schema: dict[str, Any]) -> bool:
    """Whether ``schema`` marks any personal field (``mark_schema``)."""
    nodes = [schema, *schema.get("$defs", {}).values()]
    return any(isinstance(n, dict) and SCHEMA_KEY in n for n in nodes)


def seal_by_schema(raw: Any, schema: dict[str, Any]) -> Any:
    """``raw`` (JSON builtins that fit ``schema``) with the fields ``mark_schema``
    marked personal replaced by ``Sealed`` placeholders."""
    return _seal_node(raw, schema, schema.get("$defs", {}), 0)


def _seal_node(raw: Any, node: Any, defs: dict[str, Any], depth: int) -> Any:
    if not isinstance(node, dict) or depth > 64:
        return raw
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _seal_node(raw, defs.get(ref.removeprefix("#/$defs/")), defs, depth + 1)
    for key in ("anyOf", "oneOf"):
        for option in node.get(key, ()):
            raw = _seal_node(raw, option, defs, depth + 1)
    if type(raw) is dict:
        properties = node.get("properties", {})
        for name, item in raw.items():
            if name in properties:
                raw[name] = _seal_node(item, properties[name], defs, depth + 1)
        marks = node.get(SCHEMA_KEY)
        if isinstance(marks, dict) and marks.get("subject") in raw:
            subject = str(raw[marks["subject"]])
            for name in marks.get("fields", ()):
                if raw.get(name) is not None and type(raw[name]) is not Sealed:
                    raw[name] = Sealed(subject, name, raw[name])
    elif type(raw) is list and isinstance(node.get("items"), dict):
        return [_seal_node(item, node["items"], defs, depth + 1) for item in raw]
    return raw
