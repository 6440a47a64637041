"""A client waiting for many results at once reads their rows together: it read
each one's row on its own once a poll interval, and 10,000 handles ran a
PostgreSQL pool dry (``StoreUnavailableError`` on a healthy server) and slowed the
workers sharing the database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import ledgerflow
from ledgerflow import WorkflowContext

from .conftest import backend_url


def triple(n: int) -> int:
    return n * 3


@ledgerflow.workflow(name="results.triple", version=1)
async def tripled(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(triple, n)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request.param, tmp_path, request)


async def test_many_results_are_polled_in_few_reads(url: str) -> None:
    async with ledgerflow.WorkflowClient(url, workflows=[tripled], poll_interval=0.05) as client:
        handles = [await client.start(tripled, i, id=f"r-{i}") for i in range(300)]
        single: list[str] = []
        batches: list[int] = []
        one, many = client.store.get_instance, client.store.get_instances

        async def get_instance(workflow_id: str) -> Any:
            single.append(workflow_id)
            return await one(workflow_id)

        async def get_instances(workflow_ids: Any) -> Any:
            batches.append(len(workflow_ids))
            return await many(workflow_ids)

        client.store.get_instance = get_instance  # type: ignore[method-assign]
        client.store.get_instances = get_instances  # type: ignore[method-assign]
        waiting = asyncio.gather(*(h.result(timeout=60) for h in handles))
        await asyncio.sleep(0.3)  # they poll, nothing runs them yet
        async with ledgerflow.Engine(url, workflows=[tripled]):
            assert await waiting == [i * 3 for i in range(300)]
    assert single == []  # no waiter read its row on its own
    assert max(batches) >= 250  # the waiters' rows in one read
    # About one read a poll interval for all of them, not one per waiter.
    assert len(batches) < 300
