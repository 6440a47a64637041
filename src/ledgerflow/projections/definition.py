"""Declaring a projection: its name, its tables, and a handler per event type.

    orders = Table("orders", key="order_id", columns={...}, indexes=("status",))
    by_status = Projection("orders", tables=[orders])

    @by_status.on(OrderCreated)
    def created(event: RecordedEvent, view: View) -> None:
        view.put(orders, {"order_id": event.stream_id, "status": "created", ...})

    @by_status.on("order.approved")          # or by registered type name
    async def approved(event: RecordedEvent, view: View) -> None:
        view.update(orders, event.stream_id, status="approved")

A handler is called once per event it handles, in global order, with the event and
the projection's ``View``; ``async def`` handlers may ``await view.get(...)``. What it
writes commits with the projection's checkpoint (see ``runner``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..events import RecordedEvent
from .tables import Table, check_name

if TYPE_CHECKING:
    from .view import View

__all__ = ["Handler", "Projection"]

Handler = Callable[[RecordedEvent, "View"], Awaitable[None] | None]


class Projection:
    """A read model built from the ledger: see the module docstring."""

    def __init__(self, name: str, *, tables: Iterable[Table] = (), version: int = 1) -> None:
        self.name = check_name(name, "projection name")
        if not isinstance(version, int) or version < 1:
            raise ConfigurationError(f"projection {name!r}: version must be an int >= 1")
        self.version = version
        """Bump it when handlers or tables change: runners then rebuild the read model
        from position 0 into fresh tables, and swap them in once caught up."""
        self.tables: dict[str, Table] = {}
        for table in tables:
            if table.name in self.tables:
                raise ConfigurationError(f"projection {name!r}: table {table.name!r} twice")
            self.tables[table.name] = table
        self._by_class: dict[type, list[Handler]] = {}
        self._by_name: dict[str, list[Handler]] = {}

    def __repr__(self) -> str:
        return f"Projection({self.name!r})"

    def on(self, *kinds: type | str) -> Callable[[Handler], Handler]:
        """Register the decorated function for events of these classes (or
        registered type names)."""
        if not kinds:
            raise ConfigurationError(f"projection {self.name!r}: on() needs event types")

        def register(fn: Handler) -> Handler:
            if not callable(fn) or len(inspect.signature(fn).parameters) != 2:
                raise ConfigurationError(f"projection {self.name!r}: a handler takes (event, view)")
            for kind in kinds:
                if isinstance(kind, str):
                    self._by_name.setdefault(kind, []).append(fn)
                elif isinstance(kind, type):
                    self._by_class.setdefault(kind, []).append(fn)
                else:
                    raise ConfigurationError(
                        f"projection {self.name!r}: {kind!r} is neither a class nor a type name"
                    )
            return fn

        return register

    def handlers(self, event: RecordedEvent) -> list[Handler]:
        """The handlers of ``event``, by its class (and its bases) then its type name."""
        found: list[Handler] = []
        for cls in type(event.data).__mro__:
            found.extend(self._by_class.get(cls, ()))
        found.extend(self._by_name.get(event.type, ()))
        return found

    def may_handle(self, type_name: str, class_of: Callable[[str], type | None]) -> bool:
        """Whether an event named ``type_name`` (of the class ``class_of`` gives, and
        so of its bases) would reach a handler, without decoding it."""
        if type_name in self._by_name:
            return True
        cls = class_of(type_name)
        return cls is not None and any(c in self._by_class for c in cls.__mro__)

    def unknown_classes(self, known: Callable[[type], bool]) -> list[type]:
        """The classes handlers are keyed on that ``known`` (a registry's ``knows``)
        says no event decodes to: those handlers could never be called."""
        return [cls for cls in self._by_class if not known(cls)]

    @property
    def external(self) -> bool:
        """No tables: its handlers act elsewhere, so it runs at least once."""
        return not self.tables

    def table(self, table: Table | str) -> Table:
        name = table if isinstance(table, str) else table.name
        found = self.tables.get(name)
        if found is None or (isinstance(table, Table) and found is not table):
            raise ConfigurationError(f"projection {self.name!r} has no table {name!r}")
        return found


async def call(handler: Handler, event: RecordedEvent, view: View) -> None:
    """Run a handler, sync or async."""
    result: Any = handler(event, view)
    if inspect.isawaitable(result):
        await result
