"""What the multi-process guard tests share: starting, stopping and reading the
worker processes (``test_guards_processes``, ``test_guards_faults``); the shared
store itself is conftest's ``shared_url`` fixture."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from typing import Any

import ledgerflow as lf

RESULT_TIMEOUT = 90.0
"""Guard against a hung worker, never an expectation of speed."""
JOIN_TIMEOUT = 30.0
RESOURCE = "erp"

ctx = multiprocessing.get_context("spawn")


@contextmanager
def processes() -> Iterator[list[BaseProcess]]:
    """The processes the test starts (append them); whatever happens, each is
    stopped and joined at the end (killed if it has not exited by then)."""
    started: list[BaseProcess] = []
    try:
        yield started
    finally:
        for process in started:
            if process.is_alive():
                process.kill()
            process.join(timeout=JOIN_TIMEOUT)


def spawn(started: list[BaseProcess], target: Any, *args: Any) -> BaseProcess:
    process = ctx.Process(target=target, args=args, daemon=True)
    process.start()
    started.append(process)
    return process


async def declare(url: str, policy: lf.Policy) -> None:
    """Record the resource's policy before the workers start, as an operator would
    (engines starting at once may each declare it too: one records it)."""
    async with lf.WorkflowClient(url) as client:
        await client.policies.declare({RESOURCE: policy}, actor="test")


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals in progress at one moment (one that ends as another starts
    is not counted twice)."""
    edges = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most
