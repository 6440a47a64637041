"""Typed events: registration, round trips through a store, and upcasting on read."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pydantic
import pytest

from ledgerflow import (
    ConfigurationError,
    EventRegistry,
    InvalidEventDataError,
    NewEvent,
    UnknownEventTypeError,
)
from ledgerflow.store._base import BaseEventStore

# -- three flavours of user event class ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    sku: str
    qty: int


@dataclasses.dataclass(frozen=True)
class OrderPlaced:
    order_id: uuid.UUID
    lines: list[Line]
    placed_at: datetime
    note: str | None = None


class PaymentTaken(msgspec.Struct, frozen=True):
    order_id: uuid.UUID
    cents: int
    tags: frozenset[str] = frozenset()


class OrderShipped(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)

    order_id: uuid.UUID
    carrier: str
    weight_kg: Decimal
    items: tuple[str, ...] = ()


def register_all(registry: EventRegistry) -> None:
    registry.register(OrderPlaced, "order.placed", version=1)
    registry.register(PaymentTaken, "payment.taken", version=2)
    registry.register(OrderShipped, "order.shipped", version=1)


async def test_typed_events_round_trip(store: BaseEventStore, registry: EventRegistry) -> None:
    register_all(registry)
    order_id = uuid.uuid4()
    placed = OrderPlaced(
        order_id,
        [Line("apple", 3), Line("pear", 1)],
        datetime(2030, 5, 6, 7, 8, 9, 10, tzinfo=UTC),
    )
    paid = PaymentTaken(order_id, 1299, frozenset({"card", "eu"}))
    shipped = OrderShipped(
        order_id=order_id, carrier="dhl", weight_kg=Decimal("1.25"), items=("apple", "pear")
    )
    await store.append(f"order-{order_id}", [placed, paid, shipped])
    events = await store.read_stream(f"order-{order_id}")
    assert [(e.type, e.schema_version) for e in events] == [
        ("order.placed", 1),
        ("payment.taken", 2),
        ("order.shipped", 1),
    ]
    assert [type(e.data) for e in events] == [OrderPlaced, PaymentTaken, OrderShipped]
    assert events[0].data == placed
    assert events[1].data == paid
    assert events[2].data == shipped
    assert [e.data for e in await store.read_all()] == [placed, paid, shipped]


async def test_new_event_of_registered_type_decodes_to_its_class(
    store: BaseEventStore, registry: EventRegistry
) -> None:
    register_all(registry)
    order_id = uuid.uuid4()
    raw = {"order_id": str(order_id), "carrier": "ups", "weight_kg": "2.5"}
    await store.append("s", [NewEvent("order.shipped", raw)])
    await store.append("s", [NewEvent("payment.taken", {"order_id": str(order_id), "cents": 5})])
    shipped, paid = await store.read_stream("s")
    assert shipped.data == OrderShipped(order_id=order_id, carrier="ups", weight_kg=Decimal("2.5"))
    assert (paid.schema_version, paid.data) == (2, PaymentTaken(order_id, 5))


@pytest.mark.parametrize(
    ("type_name", "data"),
    [
        ("order.placed", {"order_id": "not a uuid", "lines": [], "placed_at": "2030-01-01Z"}),
        ("order.placed", {"lines": [], "placed_at": "2030-01-01T00:00:00Z"}),
        ("payment.taken", {"order_id": str(uuid.UUID(int=1)), "cents": "twelve"}),
        ("order.shipped", {"order_id": str(uuid.UUID(int=1)), "carrier": "x"}),
        ("order.shipped", {"order_id": str(uuid.UUID(int=1)), "carrier": 5, "weight_kg": 1}),
    ],
)
async def test_new_event_with_bad_payload_for_registered_type_writes_nothing(
    store: BaseEventStore, registry: EventRegistry, type_name: str, data: dict[str, Any]
) -> None:
    register_all(registry)
    await store.append("s", [NewEvent("free.form", {"a": 1})])
    with pytest.raises(InvalidEventDataError) as info:
        await store.append("s", [NewEvent("free.form", {"b": 2}), NewEvent(type_name, data)])
    assert info.value.event_type == type_name
    assert await store.head_position() == 1
    assert [e.data for e in await store.read_stream("s")] == [{"a": 1}]


# -- upcasting ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CustomerRegistered:
    """Version 3. v1 was ``{"name": "Ada Lovelace"}``; v2 split the name in two."""

    first: str
    last: str
    email: str | None


def register_customer(registry: EventRegistry, *, upcasters: tuple[int, ...]) -> list[int]:
    """Register the v3 class with the upcasters from the given versions; returns a log
    of which upcasters ran, in order."""
    registry.register(CustomerRegistered, "customer.registered", version=3)
    ran: list[int] = []
    if 1 in upcasters:

        @registry.upcaster("customer.registered", from_version=1)
        def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
            ran.append(1)
            first, _, last = data["name"].partition(" ")
            return {"first": first, "last": last}

    if 2 in upcasters:

        @registry.upcaster("customer.registered", from_version=2)
        def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
            ran.append(2)
            return {**data, "email": None}

    return ran


async def test_upcasters_run_in_order_on_read(
    store: BaseEventStore, registry: EventRegistry
) -> None:
    # Stored by older code, at versions 1 and 2 of the event...
    await store.append(
        "customers",
        [
            NewEvent("customer.registered", {"name": "Ada Lovelace"}, schema_version=1),
            NewEvent("customer.registered", {"first": "Alan", "last": "Turing"}, schema_version=2),
        ],
    )
    # ...read, and extended, by code whose event is at version 3.
    ran = register_customer(registry, upcasters=(1, 2))
    await store.append("customers", [CustomerRegistered("Grace", "Hopper", "grace@navy.mil")])
    events = await store.read_stream("customers")
    assert [e.data for e in events] == [
        CustomerRegistered("Ada", "Lovelace", None),
        CustomerRegistered("Alan", "Turing", None),
        CustomerRegistered("Grace", "Hopper", "grace@navy.mil"),
    ]
    assert ran == [1, 2, 2]
    # The envelope keeps the version the event was stored at, and so do the rows.
    assert [e.schema_version for e in events] == [1, 2, 3]
    rows = await store.read_rows()
    assert msgspec.json.decode(rows[0].data) == {"name": "Ada Lovelace"}
    assert [e.data for e in await store.read_all(from_position=2)] == [e.data for e in events[1:]]


async def test_missing_upcaster_fails_the_read(
    store: BaseEventStore, registry: EventRegistry
) -> None:
    await store.append(
        "customers", [NewEvent("customer.registered", {"name": "Ada Lovelace"}, schema_version=1)]
    )
    register_customer(registry, upcasters=(1,))
    with pytest.raises(InvalidEventDataError) as info:
        await store.read_stream("customers")
    assert (info.value.event_type, info.value.schema_version) == ("customer.registered", 2)
    assert "no upcaster from version 2 to 3" in str(info.value)
    with pytest.raises(InvalidEventDataError):
        await store.read_all()


async def test_stored_version_newer_than_registered_fails_the_read(
    store: BaseEventStore, registry: EventRegistry
) -> None:
    # Written by newer code, at a version this registry does not know yet...
    await store.append(
        "customers",
        [
            NewEvent(
                "customer.registered", {"first": "a", "last": "b", "email": None}, schema_version=4
            )
        ],
    )
    # ...then read by code that knows the type only up to version 3.
    register_customer(registry, upcasters=(1, 2))
    with pytest.raises(InvalidEventDataError) as info:
        await store.read_stream("customers")
    assert (info.value.event_type, info.value.schema_version) == ("customer.registered", 4)
    assert "newer" in info.value.reason


@pytest.mark.parametrize(
    ("schema_version", "upcasters", "data"),
    [
        (4, (1, 2), {"first": "a", "last": "b", "email": None}),
        (1, (2,), {"name": "Ada Lovelace"}),
    ],
    ids=["newer than registered", "no upcaster from it"],
)
async def test_new_event_the_registry_cannot_read_back_is_refused(
    store: BaseEventStore,
    registry: EventRegistry,
    schema_version: int,
    upcasters: tuple[int, ...],
    data: dict[str, Any],
) -> None:
    """NewEvent promises that data of a registered type is validated against it: an
    event this code could not decode must not be written (invariant 10)."""
    register_customer(registry, upcasters=upcasters)
    event = NewEvent("customer.registered", data, schema_version=schema_version)
    with pytest.raises(InvalidEventDataError):
        await store.append("customers", [event])
    assert await store.head_position() == 0


# -- refusals ----------------------------------------------------------------------


class NotRegistered(msgspec.Struct):
    x: int


@pytest.mark.parametrize(
    "make",
    [
        lambda: OrderPlaced(uuid.uuid4(), [Line("apple", "three")], datetime.now(UTC)),  # type: ignore[arg-type]
        lambda: OrderPlaced("not a uuid", [], datetime.now(UTC)),  # type: ignore[arg-type]
        lambda: PaymentTaken(uuid.uuid4(), "twelve"),  # type: ignore[arg-type]
        lambda: PaymentTaken(uuid.uuid4(), 1.5),  # type: ignore[arg-type]
        lambda: OrderShipped.model_construct(order_id=uuid.uuid4(), carrier=5, weight_kg=1),
    ],
    ids=["dataclass, nested", "dataclass", "struct, str", "struct, float", "pydantic, unchecked"],
)
async def test_typed_event_holding_values_of_other_types_writes_nothing(
    store: BaseEventStore, registry: EventRegistry, make: Any
) -> None:
    """A dataclass or Struct does not check its field types when built: one holding
    a str where its class says int used to be stored, and then every read of its
    stream and of the whole log failed (each projection and subscriber stopped)."""
    register_all(registry)
    await store.append("s", [PaymentTaken(uuid.uuid4(), 1)])
    with pytest.raises(InvalidEventDataError) as info:
        await store.append("s", [PaymentTaken(uuid.uuid4(), 2), make()])
    assert info.value.event_type in ("order.placed", "payment.taken", "order.shipped")
    assert await store.head_position() == 1
    assert len(await store.read_all()) == 1


async def test_unregistered_class_is_refused_and_nothing_written(
    store: BaseEventStore, registry: EventRegistry
) -> None:
    register_all(registry)
    await store.append("s", [NewEvent("noted", {})])
    good = PaymentTaken(uuid.uuid4(), 1)
    with pytest.raises(UnknownEventTypeError) as info:
        await store.append("s", [good, NotRegistered(1)])
    assert info.value.what == "NotRegistered"
    with pytest.raises(UnknownEventTypeError):
        await store.append("s", [{"type": "noted"}])
    assert await store.head_position() == 1
    assert await store.stream_version("s") == 1


class Plain:
    def __init__(self, x: int) -> None:
        self.x = x


class PlainModelLike:
    model_validate = None


@pytest.mark.parametrize("cls", [Plain, PlainModelLike, dict, int])
def test_only_dataclasses_structs_and_models_register(cls: type) -> None:
    registry = EventRegistry()
    with pytest.raises(ConfigurationError):
        registry.register(cls, "x")
    assert registry.class_of("x") is None


def test_one_name_one_class() -> None:
    registry = EventRegistry()
    registry.register(OrderPlaced, "order.placed")
    registry.register(OrderPlaced, "order.placed")  # the same pair again is harmless
    with pytest.raises(ConfigurationError) as info:
        registry.register(PaymentTaken, "order.placed")
    assert "already registered" in str(info.value)
    assert registry.class_of("order.placed") is OrderPlaced
    assert registry.name_of(OrderPlaced) == "order.placed"
    with pytest.raises(UnknownEventTypeError):
        registry.name_of(PaymentTaken)


def test_decorator_registers_and_returns_the_class() -> None:
    registry = EventRegistry()

    @registry.event("thing.happened", version=2)
    @dataclasses.dataclass
    class ThingHappened:
        what: str

    assert registry.class_of("thing.happened") is ThingHappened
    assert registry.encode(ThingHappened("x")).schema_version == 2
    with pytest.raises(ConfigurationError):
        registry.register(ThingHappened, "thing.other", version=0)
