"""The threads that run sync step bodies, and the bound on bodies not yet durable.

A sync step's body runs in one of ``size`` threads. Its result is not durable until
the pass records it, and a crash before that re-runs the body; so a *slot* is taken
before a body starts and given back only once its result is recorded (or can never
be): running bodies plus finished-but-unrecorded ones never outnumber ``size``, and
a crash re-runs at most that many (ADR 005).

The slot lives on the event loop, not in the thread: an earlier design kept each
thread blocked until its result was recorded, and the thread wake-ups and GIL
hand-offs that cost made a plain ``def`` step about three times as dear as an
``async def`` one (ADR 011). Here a thread takes the next body as soon as it is
done, and finished bodies come back to the loop in batches: one wake-up of the loop
for however many finished while it was busy.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Outcome", "StepThreads"]

Outcome = tuple[bool, Any]
"""(succeeded, value or exception) of one body."""

_Job = tuple["asyncio.Future[Outcome]", contextvars.Context, Callable[..., Any], tuple[Any, ...]]


class StepThreads:
    """Up to ``size`` threads for sync step bodies, started as bodies need them, and
    ``size`` slots."""

    def __init__(self, size: int, name: str = "ledgerflow-step") -> None:
        if size < 1:
            raise ValueError(f"step_threads must be at least 1, not {size}")
        self.size = size
        self.name = name
        self._slots = asyncio.Semaphore(size)
        self._taken = 0
        self._pending = 0
        """Bodies handed to the threads and not yet back on the loop (loop-side count)."""
        self._none_pending = asyncio.Event()
        self._none_pending.set()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._finished: deque[tuple[asyncio.Future[Outcome], Outcome]] = deque()
        self._drain_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def in_use(self) -> int:
        """Slots taken: bodies running or finished and not yet recorded."""
        return self._taken

    @property
    def running(self) -> int:
        """Bodies handed to the threads that have not come back (still running, or
        finished a moment ago): a cancelled pass does not stop its body."""
        return self._pending

    async def returned(self) -> None:
        """Return once every body handed to the threads has come back."""
        await self._none_pending.wait()

    async def slot(self) -> Callable[[], None]:
        """Wait for a slot; the function that gives it back (once, however often it
        is called)."""
        await self._slots.acquire()
        self._taken += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._taken -= 1
                self._slots.release()

        return give_back

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> asyncio.Future[Outcome]:
        """Start ``fn(*args)`` in a step thread, in a copy of the caller's context;
        the future of its outcome (a body's exception is an outcome, not raised)."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the engine's step threads are shut down")
        self._loop = loop
        self._pending += 1
        self._none_pending.clear()
        if len(self._threads) < min(self.size, self._pending):
            self._start_thread()
        done: asyncio.Future[Outcome] = loop.create_future()
        self._jobs.put((done, contextvars.copy_context(), fn, args))
        return done

    def shutdown(self) -> None:
        """Stop taking bodies: queued ones never start (their passes are ending);
        running ones finish in their threads, which then end."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:  # never started: not running, nor coming back
                self._pending -= 1
        if not self._pending:
            self._none_pending.set()
        for _ in self._threads:
            self._jobs.put(None)

    def _start_thread(self) -> None:
        # One more only when every thread may be busy (the count lives on the loop,
        # so no lock per body): an engine whose sync steps run one at a time keeps
        # one thread. Daemon: an interpreter exiting without closing the engine
        # abandons a running body as a crash would (it re-runs), instead of hanging.
        name = f"{self.name}_{len(self._threads)}"
        thread = threading.Thread(target=self._work, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _work(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            done, context, fn, args = job
            outcome: Outcome
            try:
                outcome = (True, context.run(fn, *args))
            except Exception as exc:  # noqa: BLE001 - handed to the retry policy
                outcome = (False, exc)
            except BaseException as exc:  # noqa: BLE001 - SystemExit in a step: its failure
                outcome = (False, RuntimeError(f"the step's body raised {exc!r}"))
            self._finished.append((done, outcome))
            if not self._drain_pending:
                # One wake-up of the loop for every body that finishes before it
                # drains. The flag is cleared before the drain looks: a body that
                # finds it set was appended before that look.
                self._drain_pending = True
                loop = self._loop
                assert loop is not None
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return
            del job, done, context, fn, args, outcome  # nothing of a body outlives it

    def _drain(self) -> None:
        self._drain_pending = False
        finished = self._finished
        while finished:
            done, outcome = finished.popleft()
            self._pending -= 1
            if not done.done():
                done.set_result(outcome)
        if not self._pending:
            self._none_pending.set()
