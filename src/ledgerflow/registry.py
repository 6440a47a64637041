"""Event types by name and schema version, and how their data is encoded.

User event classes may be dataclasses, msgspec Structs or pydantic models. Each is
registered under a stable name and the schema version its current shape has; an
upcaster turns stored data of version ``n`` into version ``n + 1`` on read, so old
events never have to be rewritten.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from . import personal
from .errors import (
    ConfigurationError,
    EventSerializationError,
    InvalidEventDataError,
    UnknownEventTypeError,
)
from .events import NewEvent

__all__ = ["EncodedEvent", "EventRegistry", "Upcaster"]

T = TypeVar("T", bound=type)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_encoder = msgspec.json.Encoder()
_decode_any = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """An event reduced to what the store writes: a name, a version and JSON bytes."""

    type: str
    schema_version: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Entry:
    cls: type
    name: str
    version: int
    is_pydantic: bool
    decoder: msgspec.json.Decoder[Any] | None


def _is_pydantic(cls: type) -> bool:
    return hasattr(cls, "model_validate") and hasattr(cls, "model_dump_json")


class EventRegistry:
    """Maps event classes to names and schema versions, and back.

    >>> registry = EventRegistry()
    >>> @registry.event("order.created", version=1)
    ... @dataclasses.dataclass(frozen=True)
    ... class OrderCreated:
    ...     order_id: str
    """

    def __init__(self) -> None:
        self._by_name: dict[str, _Entry] = {}
        self._by_class: dict[type, _Entry] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def event(self, name: str, version: int = 1) -> Callable[[T], T]:
        """Class decorator: register ``cls`` as event type ``name`` at ``version``."""

        def register(cls: T) -> T:
            self.register(cls, name, version)
            return cls

        return register

    def register(self, cls: type, name: str, version: int = 1) -> None:
        if version < 1:
            raise ConfigurationError(f"event {name!r}: schema version must be >= 1")
        pydantic = _is_pydantic(cls)
        if not (pydantic or dataclasses.is_dataclass(cls) or issubclass(cls, msgspec.Struct)):
            raise ConfigurationError(
                f"event class {cls.__qualname__} must be a dataclass, msgspec Struct "
                "or pydantic model"
            )
        if not pydantic:
            personal.check_class(cls)
        known = self._by_name.get(name)
        if known is not None and known.cls is not cls:
            raise ConfigurationError(
                f"event name {name!r} is already registered to {known.cls.__qualname__}"
            )
        entry = _Entry(
            cls=cls,
            name=name,
            version=version,
            is_pydantic=pydantic,
            decoder=None if pydantic else msgspec.json.Decoder(cls),
        )
        self._by_name[name] = entry
        self._by_class[cls] = entry

    def include(self, other: EventRegistry) -> None:
        """Register every event type and upcaster of ``other`` here too (an app's
        registries, merged for the one store a worker opens); a name registered to
        another class, or an upcaster that differs, raises ``ConfigurationError``."""
        for entry in other._by_name.values():
            self.register(entry.cls, entry.name, entry.version)
        for key, fn in other._upcasters.items():
            known = self._upcasters.get(key)
            if known is not None and known is not fn:
                raise ConfigurationError(
                    f"event {key[0]!r}: two different upcasters from version {key[1]}"
                )
            self._upcasters[key] = fn

    def knows(self, cls: type) -> bool:
        """Whether events of ``cls`` (or of a registered subclass of it) decode to
        instances of it: what a handler keyed on ``cls`` needs to be called."""
        return any(issubclass(known, cls) for known in self._by_class)

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``fn(data)`` turns ``name`` data of ``from_version`` into the next."""

        def register(fn: Upcaster) -> Upcaster:
            self._upcasters[(name, from_version)] = fn
            return fn

        return register

    def name_of(self, cls: type) -> str:
        entry = self._by_class.get(cls)
        if entry is None:
            raise UnknownEventTypeError(cls.__qualname__)
        return entry.name

    def class_of(self, name: str) -> type | None:
        entry = self._by_name.get(name)
        return None if entry is None else entry.cls

    # -- encoding -------------------------------------------------------------------

    def encode(self, event: object, *, sealer: personal.Sealer | None = None) -> EncodedEvent:
        """Encode a registered event object or a ``NewEvent`` into JSON bytes.

        ``sealer``: encrypts the personal values in it (``personal``); the store
        passes one holding the keys of the event's data subjects.

        Raises a subclass of ``EventError``: the event is unacceptable as given.
        """
        if isinstance(event, NewEvent):
            return self._encode_new(event, sealer)
        entry = self._by_class.get(type(event))
        if entry is None:
            raise UnknownEventTypeError(type(event).__qualname__)
        encoder = _encoder if sealer is None else sealer.encoder
        compared = False  # personal values read back sealed, pydantic as it says
        try:
            if entry.is_pydantic:
                # No serializer warnings: what does not fit is refused just below.
                data = event.model_dump_json(warnings=False).encode()  # type: ignore[attr-defined]
                plain = data
            elif personal.declared() and personal.has_personal_objects(event):
                raw = msgspec.to_builtins(event, builtin_types=(personal.Sealed,))
                data = encoder.encode(personal.seal_builtins(event, raw))
                plain = _encoder.encode(msgspec.to_builtins(event))
            else:
                data = plain = encoder.encode(event)
                # Values sealed already (a workflow's input) read back as their seal.
                compared = not personal.holds_personal(data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EventSerializationError(entry.name, _unsealed(exc)) from exc
        # Neither a dataclass nor a Struct checks its field types when built (nor
        # does a pydantic model made with model_construct): an object holding an int
        # where its class says str would be stored, and then every read of it, its
        # stream's and the whole log's (each projection, each subscriber), would
        # fail. So it is read back now, as a read would (the plain form of sealed
        # values: their types are checked before they are sealed).
        back = self._decode_entry(entry, plain)
        if compared and back != event:
            # It reads back as its class, but not as it was: msgspec writes NaN and
            # infinities as null, and what an ``Any`` field holds as JSON (a tuple as a
            # list, an int key as a string, a datetime as text). Stored, the event would
            # silently differ from what the caller appended.
            raise EventSerializationError(
                entry.name,
                "it does not read back equal to what was given (NaN or infinity, or a "
                "value a JSON field turns into another: a tuple, a set, a non-string "
                "key, a datetime in an Any field); give fields the types they hold",
            )
        return EncodedEvent(entry.name, entry.version, data)

    def _encode_new(self, event: NewEvent, sealer: personal.Sealer | None) -> EncodedEvent:
        if not event.type:
            raise InvalidEventDataError("", event.schema_version or 1, "event type is empty")
        entry = self._by_name.get(event.type)
        version = event.schema_version or (entry.version if entry else 1)
        if not isinstance(event.data, Mapping):
            raise InvalidEventDataError(event.type, version, "data must be a JSON object")
        try:
            data = (_encoder if sealer is None else sealer.encoder).encode(event.data)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EventSerializationError(event.type, _unsealed(exc)) from exc
        # msgspec writes sets, tuples, datetimes and NaN as *something*; plain data must
        # read back equal to what was given, or the event would silently change.
        # (Sealed values read back as what they were sealed as: not compared.)
        if (sealer is None or not personal.holds_personal(data)) and _decode_any.decode(
            data
        ) != event.data:
            raise EventSerializationError(
                event.type,
                "data does not survive a JSON round trip (only dict with str keys, list, "
                "str, int, float, bool and None are plain JSON; use a registered class "
                "for richer types)",
            )
        if entry is not None and not personal.holds_personal(data):
            # Validate now (through upcasters, for older versions), so that a read of
            # this event can never fail to decode.
            self.decode(event.type, version, data)
        return EncodedEvent(event.type, version, data)

    # -- decoding -------------------------------------------------------------------

    def decode(
        self,
        type_name: str,
        schema_version: int,
        data: bytes,
        *,
        keys: Mapping[str, bytes] | None = None,
    ) -> Any:
        """Decode stored data: an instance of the registered class, upcast to its
        current version, or plain JSON when ``type_name`` is not registered.

        ``keys``: the subject keys that open the personal values sealed in ``data``
        (by key id); a value whose key is missing reads as erased, and decoding it
        into a typed field raises ``PersonalDataErasedError``."""
        entry = self._by_name.get(type_name)
        if keys is not None:
            return self._decode_revealed(entry, type_name, schema_version, data, keys)
        if entry is None:
            try:
                return _decode_any.decode(data)
            except msgspec.DecodeError as exc:
                raise InvalidEventDataError(type_name, schema_version, str(exc)) from exc
        if schema_version == entry.version:
            return self._decode_entry(entry, data)
        _check_not_newer(entry, schema_version)
        try:
            raw = _decode_any.decode(data)
        except msgspec.DecodeError as exc:
            raise InvalidEventDataError(type_name, schema_version, str(exc)) from exc
        return self._from_raw(entry, schema_version, raw)

    def _decode_revealed(
        self,
        entry: _Entry | None,
        type_name: str,
        schema_version: int,
        data: bytes,
        keys: Mapping[str, bytes],
    ) -> Any:
        try:
            raw = personal.reveal(_decode_any.decode(data), keys)
        except msgspec.DecodeError as exc:
            raise InvalidEventDataError(type_name, schema_version, str(exc)) from exc
        if entry is None:
            return raw
        _check_not_newer(entry, schema_version)
        try:
            return self._from_raw(entry, schema_version, raw)
        except InvalidEventDataError:
            personal.check_not_erased(raw, f"event {type_name!r}")
            raise

    def _from_raw(self, entry: _Entry, schema_version: int, raw: Any) -> Any:
        type_name = entry.name
        for version in range(schema_version, entry.version):
            upcast = self._upcasters.get((type_name, version))
            if upcast is None:
                raise InvalidEventDataError(
                    type_name, version, f"no upcaster from version {version} to {version + 1}"
                )
            try:
                raw = upcast(raw)
            except Exception as exc:  # user code: any failure means this data is unreadable
                raise InvalidEventDataError(
                    type_name, version, f"upcaster to version {version + 1} failed: {exc!r}"
                ) from exc
        try:
            if entry.is_pydantic:
                return entry.cls.model_validate(raw)  # type: ignore[attr-defined]
            return msgspec.convert(raw, entry.cls)
        except (msgspec.ValidationError, ValueError) as exc:
            raise InvalidEventDataError(type_name, entry.version, str(exc)) from exc

    def _decode_entry(self, entry: _Entry, data: bytes) -> Any:
        try:
            if entry.is_pydantic:
                return entry.cls.model_validate_json(data)  # type: ignore[attr-defined]
            assert entry.decoder is not None
            return entry.decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise InvalidEventDataError(entry.name, entry.version, str(exc)) from exc


def _unsealed(exc: BaseException) -> str:
    if "Sealed" in str(exc):
        return (
            f"it holds personal data: append it through a store, whose key vault seals it ({exc})"
        )
    return str(exc)


def _check_not_newer(entry: _Entry, schema_version: int) -> None:
    if schema_version > entry.version:
        raise InvalidEventDataError(
            entry.name,
            schema_version,
            f"stored schema version is newer than the registered {entry.version}",
        )
