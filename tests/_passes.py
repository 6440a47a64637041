"""Helpers for engine tests that must fail as soon as a pass crashes, not when the
hang guard runs out: a pass that raises is logged and left to its lease, which a
manual clock never reaches, so the instance would just seem to hang.

``no_pass_crashed`` is an autouse fixture in the modules that import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ledgerflow
from ledgerflow.workflow.engine import Engine

from ._engines import WAIT

crashes: list[str] = []
"""Passes that raised (logged by the engine, left to their lease) in this test."""


class _CrashLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a bad log call is the engine's to find
            if record.getMessage().endswith("pass failed"):
                crashes.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_pass_crashed() -> Iterator[None]:
    """None should crash in these tests, even if the instance gets on by other means."""
    handler = _CrashLog(logging.ERROR)
    logger = logging.getLogger("ledgerflow.engine")
    crashes.clear()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert crashes == []


async def outcome(
    e: Engine,
    which: str | ledgerflow.WorkflowHandle[Any],
    meanwhile: Callable[[], object] | None = None,
) -> Any:
    """The instance's result (or the error it raises), failing as soon as a pass
    crashes or ``meanwhile`` (a function, or a coroutine function) raises."""
    workflow_id = which if isinstance(which, str) else which.id
    waiting = asyncio.ensure_future(e.handle(workflow_id).result(timeout=WAIT))
    try:
        while not waiting.done():
            assert crashes == []
            if meanwhile is not None:
                done = meanwhile()
                if inspect.isawaitable(done):
                    await done
            await asyncio.wait([waiting], timeout=0.01)
        return waiting.result()
    finally:
        waiting.cancel()


async def waiting(e: Engine, workflow_id: str, what: str) -> None:
    """``waiting_for``, failing as soon as a pass crashes rather than at the guard."""
    async with asyncio.timeout(WAIT):
        while True:
            assert crashes == []
            try:
                described = await e.describe(workflow_id)
            except ledgerflow.WorkflowNotFoundError:  # a child not started yet
                described = None
            if described is not None:
                assert described.status == "running", described.error  # it will never
                if (described.waiting_for or "").startswith(what):
                    return
            await asyncio.sleep(0.005)
