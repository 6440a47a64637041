"""Reading a projection's tables (what the CLI, an API or a test queries)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .definition import Projection
from .tables import Table

if TYPE_CHECKING:
    from ..store import WorkflowStore

__all__ = ["ReadModel"]


class ReadModel:
    """The tables of ``projection`` in ``store``, as last committed."""

    def __init__(self, store: WorkflowStore, projection: Projection) -> None:
        self.store = store
        self.projection = projection

    async def get(self, table: Table | str, key: Any) -> dict[str, Any] | None:
        spec = self.projection.table(table)
        return await self.store.read_model_get(self.projection.name, spec, key)

    async def select(
        self,
        table: Table | str,
        *,
        where: dict[str, Any] | None = None,
        order_by: str | None = None,
        descending: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Rows whose columns equal ``where``'s values, ordered by ``order_by`` (then
        the key), one page."""
        spec = self.projection.table(table)
        return await self.store.read_model_select(
            self.projection.name,
            spec,
            where=where,
            order_by=order_by,
            descending=descending,
            limit=limit,
            offset=offset,
        )
