"""Bodies of the worker processes of ``test_store_concurrency``.

They run in processes started with the "spawn" method, so they live in a module of
their own that imports nothing from pytest. Each reports one plain, picklable result
on a queue: ``("ok", worker, payload)`` or ``("error", worker, traceback)``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
import uuid
from collections.abc import Callable, Coroutine
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

from ledgerflow import Appended, ConcurrencyError, NewEvent
from ledgerflow.store._base import BaseEventStore

from ._adapters import open_adapter

BARRIER_TIMEOUT = 120.0
"""Guard against a hang when a sibling process died, never an expectation of speed."""

Ack = tuple[str, str, int, int]
"""An acknowledged event: (event id, stream id, version, position)."""
Conflict = tuple[str, object, int, int]
"""A refused append: (error's stream id, error's expected, error's actual, version read)."""


def _report(
    worker: int, results: Queue[Any], body: Callable[[], Coroutine[Any, Any, object]]
) -> None:
    try:
        payload = asyncio.run(body())
    except BaseException:  # noqa: BLE001 - the parent fails the test with the traceback
        results.put(("error", worker, traceback.format_exc()))
    else:
        results.put(("ok", worker, payload))


async def _append_until_acked(
    store: BaseEventStore, stream: str, event: NewEvent, conflicts: list[Conflict]
) -> Ack:
    """Read the version, append at it, and on a conflict reload and try again."""
    while True:
        version = await store.stream_version(stream)
        try:
            result = await store.append(stream, [event], expected_version=version)
        except ConcurrencyError as error:
            conflicts.append((error.stream_id, error.expected, error.actual, version))
            continue
        if not isinstance(result, Appended) or result.version <= version:
            raise AssertionError(f"append at {version} answered {result!r}")
        return (str(event.id), stream, result.version, result.positions[0])


def contend(
    url: str,
    worker: int,
    count: int,
    start: Barrier,
    results: Queue[Any],
) -> None:
    """Append ``count`` events to the shared stream "shared" and ``count`` to the
    worker's own stream, the two concurrently; report every acknowledged event."""

    async def body() -> dict[str, Any]:
        async with open_adapter(url) as store:
            start.wait(BARRIER_TIMEOUT)
            conflicts: list[Conflict] = []

            async def shared() -> list[Ack]:
                acks = []
                for i in range(count):
                    event = NewEvent("shared", {"worker": worker, "i": i}, id=uuid.uuid4())
                    acks.append(await _append_until_acked(store, "shared", event, conflicts))
                return acks

            async def own() -> list[Ack]:
                stream = f"own-{worker}"
                acks = []
                for i in range(count):
                    event = NewEvent("own", {"worker": worker, "i": i}, id=uuid.uuid4())
                    result = await store.append(stream, [event], expected_version=i)
                    assert isinstance(result, Appended)
                    acks.append((str(event.id), stream, result.version, result.positions[0]))
                return acks

            a, b = await asyncio.gather(shared(), own())
            return {"acks": a + b, "conflicts": conflicts}

    _report(worker, results, body)


def race(
    url: str,
    worker: int,
    stream: str,
    rounds: int,
    start: Barrier,
    results: Queue[Any],
) -> None:
    """In each round, append to ``stream`` at expected version ``round`` together with
    every other worker; report per round ("won", version) or ("lost", stream, expected,
    actual)."""

    async def body() -> list[tuple[Any, ...]]:
        outcomes: list[tuple[Any, ...]] = []
        async with open_adapter(url) as store:
            for round_ in range(rounds):
                event = NewEvent("raced", {"worker": worker, "round": round_})
                start.wait(BARRIER_TIMEOUT)
                try:
                    result = await store.append(stream, [event], expected_version=round_)
                except ConcurrencyError as error:
                    outcomes.append(("lost", error.stream_id, error.expected, error.actual))
                else:
                    outcomes.append(("won", result.version))
                # Nobody starts the next round before every append of this one is done.
                start.wait(BARRIER_TIMEOUT)
        return outcomes

    _report(worker, results, body)


def open_fresh(url: str, worker: int, start: Barrier, results: Queue[Any]) -> None:
    """Open a store nobody has created yet, at the same moment as the other workers,
    and append one event to the worker's own stream."""

    async def body() -> int:
        start.wait(BARRIER_TIMEOUT)
        async with open_adapter(url) as store:
            result = await store.append(f"w-{worker}", [NewEvent("opened", {"worker": worker})])
            return result.version

    _report(worker, results, body)


CLI = [sys.executable, "-c", "from ledgerflow.cli import main; main()"]
"""The start of the command line of a ``ledgerflow`` process running this tree's code
(what the installed ``ledgerflow`` script runs)."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: ours, ``extra``, and our ``sys.path``, so
    that it imports this tree's code and the test's app modules."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
