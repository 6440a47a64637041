"""The embedded runtime: runs workflow instances on one event store.

Work is found through the store's runtime rows (see ``store.runtime``): the engine
claims due instances with a lease, runs a pass over each (``run.py``), and records the
pass's outcome together with the instance's next wake-up in one append. Starting an
instance, a step's result, a timer, a signal and the end are each one append, so
concurrent instances share commits through the store's group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import msgspec
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from ..clock import Clock, SystemClock
from ..errors import (
    ConcurrencyError,
    ConfigurationError,
    LedgerflowError,
    SignalInputError,
    StoreClosedError,
    StoreUnavailableError,
    UnknownWorkflowError,
    WorkflowAlreadyStartedError,
    WorkflowError,
    WorkflowFailedError,
    WorkflowFinishedError,
    WorkflowInputError,
    WorkflowNotFoundError,
)
from ..events import NO_STREAM, AppendResult, Metadata, RecordedEvent, Snapshot
from ..hashing import from_micros, to_micros
from ..registry import EventRegistry
from ..store import open_store
from ..store._base import BaseEventStore
from ..store.runtime import InstanceRow, Nudge, PutInstance, RuntimeWrite, Schedule, Unschedule
from .codec import CodecError, from_builtins, to_builtins
from .definition import WorkflowDefinition
from .handles import WorkflowDescription, WorkflowHandle, open_wait, waiting_for
from .history import (
    SNAPSHOT_TYPE,
    SNAPSHOT_VERSION,
    TERMINAL,
    CancelRequested,
    ChildFinished,
    Finished,
    History,
    Resumed,
    SignalSent,
    Started,
    Stuck,
    history_registry,
)
from .host import Abandon, Park, PassResult, Restart, Suspend
from .run import _Run

__all__ = ["Engine", "WorkflowDescription", "WorkflowHandle"]

log = logging.getLogger("ledgerflow.engine")

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741

STREAM_PREFIX = "wf-"
MAX_PASS_RETRIES = 8
SIGNAL_CHECK_WINDOW = 64
"""Latest events a sender reads to find the wait its signal is for."""
"""Store faults in a row after which a pass waits for its lease to expire."""


Outcome = tuple[tuple[str, int], "Finished | WorkflowError"]
"""(name, version) of the instance and how it ended."""


@dataclass(slots=True)
class _Waiters:
    future: asyncio.Future[Outcome]
    count: int = 0


class Engine:
    """Runs durable workflows in this process on one store.

    ``store`` is a URL (``sqlite:///ledgerflow.db``, ``postgresql://...``) or an open
    store. ``concurrency`` bounds the instances running a pass at once. With
    ``takeover`` (the default) leases left by engines of this host whose process is
    gone (a crash, a kill) are released at start, so their unfinished instances
    resume at once; leases of live engines, or of other hosts, are left to expire.
    """

    def __init__(
        self,
        store: str | BaseEventStore,
        *,
        workflows: Sequence[WorkflowDefinition[Any, Any]] = (),
        concurrency: int = 200,
        clock: Clock | None = None,
        lease: timedelta = timedelta(seconds=60),
        step_threads: int = 16,
        takeover: bool = True,
        poll_interval: float = 1.0,
        cache_size: int = 10_000,
        snapshot_every: int | None = 1_000,
        registry: EventRegistry | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("Engine concurrency must be >= 1")
        self.clock: Clock = clock or SystemClock()
        self._owns_store = isinstance(store, str)
        if isinstance(store, str):
            self.store: BaseEventStore = open_store(
                store, registry=history_registry(registry), clock=self.clock.now
            )
        else:
            history_registry(store.registry)
            self.store = store
        self._definitions: dict[tuple[str, int], WorkflowDefinition[Any, Any]] = {}
        self._latest: dict[str, WorkflowDefinition[Any, Any]] = {}
        for definition in workflows:
            self.register(definition)
        self.concurrency = concurrency
        self.lease_us = int(lease.total_seconds() * 1_000_000)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.takeover = takeover
        self.poll_interval = poll_interval
        self.step_pool = ThreadPoolExecutor(step_threads, thread_name_prefix="ledgerflow-step")
        self._cache: OrderedDict[str, History] = OrderedDict()
        self._cache_size = cache_size
        self.snapshot_every = snapshot_every
        self._active: dict[str, asyncio.Task[None]] = {}
        self._rerun: set[str] = set()
        self._stuck: dict[str, WorkflowError] = {}
        # Callers of result() waiting on instances this engine runs: a future and
        # how many wait on it.
        self._waiters: dict[str, _Waiters] = {}
        self._fresh: set[str] = set()
        self._saturated = False
        self._sleeping_until: int | None = None
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._host = _Host(self)

    # -- set-up ---------------------------------------------------------------------

    def register(self, definition: WorkflowDefinition[Any, Any]) -> None:
        known = self._definitions.get(definition.key)
        if known is not None and known.fn is not definition.fn:
            raise ConfigurationError(
                f"workflow {definition.name!r} v{definition.version} is registered twice"
            )
        self._definitions[definition.key] = definition
        latest = self._latest.get(definition.name)
        if latest is None or latest.version < definition.version:
            self._latest[definition.name] = definition

    async def __aenter__(self) -> Self:
        await self.start_engine()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start_engine(self) -> None:
        """Open the store, recover unfinished instances and start running them."""
        await self.store.open()
        if self.takeover:
            for owner in await self.store.lease_owners():
                if owner_is_gone(owner):
                    await self.store.release_wakeups(owner)
        await self._resume_stuck()
        self._scheduler = asyncio.create_task(self._schedule(), name="ledgerflow-scheduler")

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop claiming work, let running passes finish (up to ``grace`` seconds),
        give back leases and close the store if the engine opened it."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._scheduler is not None:
            await self._scheduler
        active = list(self._active.values())
        if active:
            _, pending = await asyncio.wait(active, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(LedgerflowError):
            await self.store.release_wakeups(self.owner)
        self.step_pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_store:
            await self.store.close()

    # -- helpers --------------------------------------------------------------------

    def _stopping(self) -> bool:
        # A method, not the attribute: close() flips it while loops await.
        return self._closing

    def _now_us(self) -> int:
        return to_micros(self.clock.now())

    @staticmethod
    def stream_id(workflow_id: str) -> str:
        """The ledger stream holding the history of instance ``workflow_id``."""
        return STREAM_PREFIX + workflow_id

    def _definition(
        self, workflow: WorkflowDefinition[Any, Any] | str
    ) -> WorkflowDefinition[Any, Any]:
        if isinstance(workflow, str):
            found = self._latest.get(workflow)
            if found is None:
                raise UnknownWorkflowError(workflow)
            return found
        if workflow.key not in self._definitions:
            raise UnknownWorkflowError(workflow.name, workflow.version)
        return workflow

    # -- starting -------------------------------------------------------------------

    @overload
    async def start(
        self, workflow: WorkflowDefinition[I, O], input: I, *, id: str | None = None
    ) -> WorkflowHandle[O]: ...

    @overload
    async def start(
        self, workflow: str, input: Any, *, id: str | None = None
    ) -> WorkflowHandle[Any]: ...

    async def start(
        self,
        workflow: WorkflowDefinition[Any, Any] | str,
        input: Any,
        *,
        id: str | None = None,
    ) -> WorkflowHandle[Any]:
        """Start an instance, or return the handle of the one with this ``id``.

        The input is checked against the workflow's input type before anything is
        recorded. Starting is idempotent on ``id``: the same workflow and input
        return the existing instance; another workflow or input under the same id
        raises ``WorkflowAlreadyStartedError``. Without ``id`` a random one is used.
        """
        definition = self._definition(workflow)
        workflow_id = str(uuid.uuid4()) if id is None else id
        await self._start(definition, input, workflow_id, None)
        return WorkflowHandle(self, workflow_id, definition.output_type)

    def handle(self, workflow_id: str, output_type: Any = Any) -> WorkflowHandle[Any]:
        return WorkflowHandle(self, workflow_id, output_type)

    async def _start(
        self,
        definition: WorkflowDefinition[Any, Any],
        given: Any,
        workflow_id: str,
        parent_id: str | None,
    ) -> None:
        if not isinstance(workflow_id, str) or not workflow_id or "\x00" in workflow_id:
            raise WorkflowInputError(
                definition.name,
                f"the workflow id must be a non-empty string without NUL, not {workflow_id!r}",
            )
        encoded = _check_input(definition, given)
        now = self._now_us()
        local = len(self._active) < self.concurrency and not self._closing
        row = InstanceRow(
            workflow_id, definition.name, definition.version, "running", parent_id, now, now
        )
        schedule = Schedule(
            workflow_id,
            now,
            self.owner if local else None,
            now + self.lease_us if local else None,
        )
        started = Started(
            name=definition.name, version=definition.version, input=encoded, parent_id=parent_id
        )
        try:
            await self.store.append(
                self.stream_id(workflow_id),
                [started],
                NO_STREAM,  # the one check that makes starting idempotent
                runtime=[PutInstance(row), schedule],
            )
        except ConcurrencyError:
            await self._same_start(workflow_id, started)
            return
        if local:
            # The first pass replays what we just wrote: no need to read it back.
            history = History(workflow_id, started)
            history.add(1, started)
            self._remember(history)
            self._fresh.add(workflow_id)
            self._spawn(workflow_id)
        else:
            self._wake.set()

    async def _same_start(self, workflow_id: str, wanted: Started) -> None:
        """An instance with this id exists: fine if it was started the same way."""
        first = await self.store.read_stream(self.stream_id(workflow_id), limit=1)
        existing = first[0].data if first else None
        if not isinstance(existing, Started) or existing.name != wanted.name:
            name = existing.name if isinstance(existing, Started) else "?"
            raise WorkflowAlreadyStartedError(
                workflow_id, f"it is a {name!r} workflow, not {wanted.name!r}"
            )
        if existing.parent_id != wanted.parent_id:
            raise WorkflowAlreadyStartedError(
                workflow_id, f"it belongs to parent {existing.parent_id!r}"
            )
        if existing.input != wanted.input:
            raise WorkflowAlreadyStartedError(
                workflow_id,
                "it was started with another input; starting is idempotent only for the same input",
            )

    # -- scheduling -----------------------------------------------------------------

    async def _schedule(self) -> None:
        failures = 0
        while not self._closing:
            try:
                claimed = await self._claim()
                failures = 0
            except StoreUnavailableError as exc:
                failures += 1
                log.warning("ledgerflow engine: cannot claim work (%s)", exc)
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                continue
            if claimed:
                continue
            self._wake.clear()
            if self._stopping():
                break
            if self.concurrency - len(self._active) <= 0:
                # Every slot is busy: a pass ending frees one and wakes us; looking at
                # due times now would only find the backlog due and spin.
                self._saturated = True
                cap = self.clock.now() + timedelta(seconds=self.poll_interval)
                await self.clock.sleep_until(cap, self._wake)
                continue
            try:
                due = await self.store.next_wakeup()
            except StoreUnavailableError:
                due = None
            # Other processes (the CLI, other engines) nudge rows without telling us;
            # poll_interval bounds how long that goes unseen.
            # Compared in µs: a due time far in the future need not fit a datetime.
            cap_us = self._now_us() + int(self.poll_interval * 1_000_000)
            when_us = cap_us if due is None else min(cap_us, due)
            self._sleeping_until = when_us
            await self.clock.sleep_until(from_micros(when_us), self._wake)
            self._sleeping_until = None

    async def _claim(self) -> bool:
        free = self.concurrency - len(self._active)
        if free <= 0:
            self._saturated = True
            return False
        now = self._now_us()
        ids = await self.store.claim_wakeups(
            self.owner, now_us=now, lease_until_us=now + self.lease_us, limit=free
        )
        for workflow_id in ids:
            if workflow_id in self._active:
                self._rerun.add(workflow_id)
            else:
                self._spawn(workflow_id)
        self._saturated = len(ids) == free
        return self._saturated

    def _spawn(self, workflow_id: str) -> None:
        task = asyncio.create_task(self._drive(workflow_id), name=f"wf:{workflow_id}")
        self._active[workflow_id] = task

    async def _drive(self, workflow_id: str) -> None:
        failures = 0
        try:
            while not self._closing:
                try:
                    again = await self._pass(workflow_id)
                except (StoreUnavailableError, StoreClosedError, Abandon) as exc:
                    # Infrastructure, not the workflow: what is recorded stands, and
                    # the pass is tried again from there.
                    self._cache.pop(workflow_id, None)
                    failures += 1
                    if self._stopping():
                        return
                    if failures > MAX_PASS_RETRIES:
                        log.error(
                            "workflow %s: store unavailable %d times in a row (%s); "
                            "leaving it until its lease expires",
                            workflow_id,
                            failures,
                            exc,
                        )
                        return
                    log.warning("workflow %s: pass abandoned, retrying: %s", workflow_id, exc)
                    await asyncio.sleep(min(5.0, 0.05 * 2**failures))
                    continue
                failures = 0
                if not again and workflow_id not in self._rerun:
                    return
                self._rerun.discard(workflow_id)
        except Exception:
            # A bug or an unexpected failure: the lease runs out and the instance is
            # tried again then; nothing recorded is lost.
            log.exception("workflow %s: pass failed", workflow_id)
            self._cache.pop(workflow_id, None)
        finally:
            self._active.pop(workflow_id, None)
            self._fresh.discard(workflow_id)
            if self._saturated or self._closing:
                self._wake.set()  # a slot is free for work left unclaimed

    # -- one pass -------------------------------------------------------------------

    async def _history(self, workflow_id: str) -> History:
        stream = self.stream_id(workflow_id)
        cached = self._cache.get(workflow_id)
        if workflow_id in self._fresh and cached is not None:
            self._fresh.discard(workflow_id)
            return cached
        if cached is None:
            cached = await self._load_history(workflow_id)
        else:
            cached.extend(await self.store.read_stream(stream, from_version=cached.version + 1))
        self._remember(cached)
        return cached

    async def _load_history(self, workflow_id: str) -> History:
        """From the latest snapshot and the events after it, or from the start."""
        stream = self.stream_id(workflow_id)
        snapshot = await self.store.load_snapshot(stream)
        if (
            snapshot is not None
            and snapshot.type == SNAPSHOT_TYPE
            and snapshot.schema_version == SNAPSHOT_VERSION
        ):
            history = History.from_snapshot(snapshot.state)
            history.extend(await self.store.read_stream(stream, from_version=history.version + 1))
            return history
        return History.of(workflow_id, await self.store.read_stream(stream))

    async def _snapshot_if_due(self, history: History, before: int) -> None:
        """Keep a snapshot every ``snapshot_every`` events, so a long history never
        has to be read whole again."""
        every = self.snapshot_every
        if not every or history.version // every <= before // every:
            return
        try:
            state = history.snapshot()
        except (TypeError, ValueError, OverflowError) as exc:
            # A snapshot only saves reading time: never let it stop the instance.
            log.warning("workflow %s: no snapshot taken: %s", history.workflow_id, exc)
            return
        await self.store.save_snapshot(
            Snapshot(
                self.stream_id(history.workflow_id),
                history.version,
                SNAPSHOT_TYPE,
                SNAPSHOT_VERSION,
                state,
            )
        )

    def _remember(self, history: History) -> None:
        self._cache[history.workflow_id] = history
        self._cache.move_to_end(history.workflow_id)
        while len(self._cache) > self._cache_size:
            evicted, _ = self._cache.popitem(last=False)
            self._fresh.discard(evicted)

    async def _pass(self, workflow_id: str) -> bool:
        """Run one pass; True if another pass is needed at once."""
        history = await self._history(workflow_id)
        try:
            return await self._pass_over(history)
        except ConcurrencyError:
            # Someone wrote under a runtime-row update: look again at what is there.
            self._cache.pop(workflow_id, None)
            return True

    async def _pass_over(self, history: History) -> bool:
        workflow_id = history.workflow_id
        if history.finished is not None:
            # Ended, but the last steps of ending (telling the parent, dropping the
            # wake-up) were cut short: finish them.
            await self._after_end(history)
            return False
        if history.stuck is not None:
            # Parked: a signal may have nudged it; it runs again only when resumed.
            await self._guarded(history, [Unschedule(workflow_id)])
            return False
        started = history.started
        definition = self._definitions.get((started.name, started.version))
        if definition is None:
            await self._get_stuck(history, UnknownWorkflowError(started.name, started.version))
            return False
        run = _Run(self._host, definition, history)
        try:
            result = await run.execute()
        except Restart:
            self._cache.pop(workflow_id, None)
            return True
        except Park as park:
            await self._get_stuck(history, park.error)
            return False
        return await self._conclude(history, result)

    async def _conclude(self, history: History, result: PassResult) -> bool:
        workflow_id = history.workflow_id
        if result.finished is not None:
            finished = result.finished
            now = self._now_us()
            parent = history.started.parent_id
            runtime: list[RuntimeWrite] = [
                PutInstance(
                    InstanceRow(
                        workflow_id,
                        history.started.name,
                        history.started.version,
                        finished.status,
                        parent,
                        now,
                        now,
                    )
                )
            ]
            if parent is None:
                runtime.append(Unschedule(workflow_id))
            # A signal or cancellation that landed meanwhile fails this append: the
            # pass runs again and decides with it in view.
            await self._append(history, [*result.buffered, finished], runtime)
            self._stuck.pop(workflow_id, None)
            self._tell(history, finished)
            if parent is not None:
                await self._after_end(history)
            self._cache.pop(workflow_id, None)
            return False
        suspend = result.suspend
        assert suspend is not None
        schedule = Schedule(workflow_id, suspend.due_at_us)
        events = [*result.buffered, *suspend.events]
        if events:
            await self._append(history, events, [schedule])
        else:
            await self._guarded(history, [schedule])
        due = suspend.due_at_us
        if due is not None and (self._sleeping_until is None or due < self._sleeping_until):
            self._wake.set()  # due before the scheduler means to look again
        return False

    async def _after_end(self, history: History) -> None:
        """Tell the parent (if any) how this instance ended, then drop its wake-up.

        The child keeps its wake-up until the news is in the parent's stream (one
        append carries the news, the parent's nudge and the child's unschedule), so
        a crash in between delivers it on the next claim, never loses it.
        """
        workflow_id = history.workflow_id
        parent = history.started.parent_id
        finished = history.finished
        assert finished is not None
        if parent is None:
            await self._guarded(history, [Unschedule(workflow_id)])
            return
        news = ChildFinished(
            child_id=workflow_id,
            status=finished.status,
            result=finished.result,
            error_type=finished.error_type,
            message=finished.message,
        )
        stream = self.stream_id(parent)
        while True:
            version = await self.store.stream_version(stream)
            row = await self.store.get_instance(parent)
            if row is None or row.status in TERMINAL:
                await self._guarded(history, [Unschedule(workflow_id)])
                return
            try:
                await self.store.append(
                    stream,
                    [news],
                    version,
                    runtime=[Nudge(parent, self._now_us()), Unschedule(workflow_id)],
                )
            except ConcurrencyError:
                continue  # the parent moved on meanwhile: look again
            self._wake.set()  # the parent is due now: claim it
            return

    async def _append(
        self, history: History, events: list[Any], runtime: list[RuntimeWrite]
    ) -> None:
        stream = self.stream_id(history.workflow_id)
        before = history.version
        result = await self.store.append(stream, events, history.version, runtime=runtime)
        first = result.version - len(events) + 1
        for offset, event in enumerate(events):
            history.add(first + offset, event)
        await self._snapshot_if_due(history, before)

    async def _guarded(self, history: History, runtime: list[RuntimeWrite]) -> None:
        await self.store.append(
            self.stream_id(history.workflow_id), [], history.version, runtime=runtime
        )

    async def _get_stuck(self, history: History, error: WorkflowError) -> None:
        workflow_id = history.workflow_id
        log.error("workflow %s is stuck: %s", workflow_id, error)
        now = self._now_us()
        row = InstanceRow(
            workflow_id,
            history.started.name,
            history.started.version,
            "stuck",
            history.started.parent_id,
            now,
            now,
        )
        stuck = Stuck(error_type=type(error).__name__, message=str(error))
        while True:
            try:
                await self._append(history, [stuck], [PutInstance(row), Unschedule(workflow_id)])
                break
            except ConcurrencyError:
                # Signals may land meanwhile; anything else means another runner.
                newer = await self.store.read_stream(
                    self.stream_id(workflow_id), from_version=history.version + 1
                )
                if not all(_from_outside(e.data) for e in newer):
                    self._cache.pop(workflow_id, None)
                    return
                history.extend(newer)
        self._stuck[workflow_id] = error
        self._cache.pop(workflow_id, None)
        self._tell(history, error)

    async def _resume_stuck(self) -> None:
        after: str | None = None
        while True:
            rows = await self.store.list_instances(status="stuck", after=after, limit=500)
            if not rows:
                return
            for row in rows:
                if (row.name, row.version) not in self._definitions:
                    continue
                now = self._now_us()
                stream = self.stream_id(row.workflow_id)
                version = await self.store.stream_version(stream)
                running = InstanceRow(
                    row.workflow_id, row.name, row.version, "running", row.parent_id, now, now
                )
                with contextlib.suppress(ConcurrencyError):
                    await self.store.append(
                        stream,
                        [Resumed(by=self.owner)],
                        version,
                        runtime=[PutInstance(running), Schedule(row.workflow_id, now)],
                    )
            after = rows[-1].workflow_id

    async def _finished_event(self, workflow_id: str) -> Finished | None:
        row = await self.store.get_instance(workflow_id)
        if row is None or row.status not in TERMINAL:
            return None
        stream = self.stream_id(workflow_id)
        for event in await self.store.read_stream(stream, backwards=True, limit=50):
            if isinstance(event.data, Finished):
                return event.data
        history = await self._load_history(workflow_id)
        return history.finished

    # -- outside interaction --------------------------------------------------------

    async def _instance(self, workflow_id: str) -> InstanceRow:
        row = await self.store.get_instance(workflow_id)
        if row is None:
            raise WorkflowNotFoundError(workflow_id)
        return row

    async def _send(self, workflow_id: str, event: Any, action: str) -> None:
        stream = self.stream_id(workflow_id)
        checked = False
        while True:
            # Version first: the status row and the Finished event are written in one
            # append, so a status read after the version that is not terminal proves
            # the version predates the end, and a later end fails this append.
            version = await self.store.stream_version(stream)
            row = await self._instance(workflow_id)
            if row.status in TERMINAL:
                raise WorkflowFinishedError(workflow_id, row.status, action)
            if isinstance(event, SignalSent) and not checked:
                await self._check_signal(workflow_id, event)
                checked = True
            # A parked instance keeps what is sent for when it resumes, but is not
            # woken for it: it could only park again.
            runtime = [Nudge(workflow_id, self._now_us())] if row.status == "running" else []
            try:
                await self.store.append(stream, [event], version, runtime=runtime)
            except ConcurrencyError:
                continue  # it moved on (or finished) meanwhile: look again
            self._wake.set()
            return

    async def _check_signal(self, workflow_id: str, signal: SignalSent) -> None:
        """Refuse a payload that does not fit the type the instance waits for now.

        The wait records its type's JSON Schema, so any sender (this process, the
        CLI, another service) can check without the workflow's code. A signal sent
        ahead of its wait cannot be checked here; the wait rejects it if it does
        not fit, visibly, and goes on waiting.
        """
        recent = await self.store.read_stream(
            self.stream_id(workflow_id), backwards=True, limit=SIGNAL_CHECK_WINDOW
        )
        waiting = open_wait([event.data for event in recent], signal.name)
        if waiting is None or waiting.schema is None:
            return
        try:
            validator = Draft202012Validator(waiting.schema)
            errors = sorted(validator.iter_errors(signal.payload), key=lambda e: list(e.path))
        except SchemaError:
            return  # a schema we cannot use: the wait checks the payload itself
        if errors:
            described = "; ".join(
                f"{'/'.join(str(p) for p in error.absolute_path) or 'payload'}: {error.message}"
                for error in errors[:5]
            )
            raise SignalInputError(
                workflow_id, signal.name, f"does not fit the waited-for type: {described}"
            )

    async def signal(self, workflow_id: str, name: str, payload: Any = None) -> None:
        """Deliver a signal; kept until the workflow waits for it.

        If the instance is waiting for ``name`` now, the payload is checked against
        the waited-for type first: ``WorkflowInputError`` and nothing recorded if it
        does not fit.
        """
        if not isinstance(name, str) or not name:
            raise WorkflowInputError(
                f"signal {name!r}", "the signal name must be a non-empty string"
            )
        try:
            encoded = to_builtins(payload)
        except CodecError as exc:
            raise WorkflowInputError(f"signal {name!r}", str(exc)) from exc
        await self._send(workflow_id, SignalSent(name=name, payload=encoded), "signal")

    async def cancel(self, workflow_id: str, reason: str | None = None) -> None:
        """Ask the instance to stop: it raises ``WorkflowCancelled`` at its next await,
        its compensations run and the children it still runs are cancelled too."""
        await self._send(workflow_id, CancelRequested(reason=reason), "cancel")

    async def result(
        self,
        workflow_id: str,
        *,
        timeout: timedelta | float | None = None,
        output_type: Any = Any,
    ) -> Any:
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        # Registered before the first look, so an end between look and wait still
        # wakes us; instances another process runs are polled.
        waiter = self._outcome(workflow_id)
        try:
            while True:
                if waiter.done():
                    started, outcome = waiter.result()
                    return self._decode_outcome(workflow_id, started, outcome, output_type)
                row = await self._instance(workflow_id)
                if row.status in TERMINAL:
                    finished = await self._finished_event(workflow_id)
                    assert finished is not None
                    return self._decode_outcome(
                        workflow_id, (row.name, row.version), finished, output_type
                    )
                if row.status == "stuck" and workflow_id in self._stuck:
                    raise self._stuck[workflow_id]
                wait = self.poll_interval
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise TimeoutError(f"workflow {workflow_id!r} has not finished")
                    wait = min(wait, left)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), wait)
        finally:
            self._release_outcome(workflow_id)

    def _outcome(self, workflow_id: str) -> asyncio.Future[Outcome]:
        entry = self._waiters.get(workflow_id)
        if entry is None:
            entry = self._waiters[workflow_id] = _Waiters(
                asyncio.get_running_loop().create_future()
            )
        entry.count += 1
        return entry.future

    def _release_outcome(self, workflow_id: str) -> None:
        entry = self._waiters.get(workflow_id)
        if entry is not None:
            entry.count -= 1
            if entry.count <= 0:
                del self._waiters[workflow_id]

    def _tell(self, history: History, outcome: Finished | WorkflowError) -> None:
        entry = self._waiters.get(history.workflow_id)
        if entry is not None and not entry.future.done():
            entry.future.set_result(((history.started.name, history.started.version), outcome))

    def _decode_outcome(
        self, workflow_id: str, started: tuple[str, int], outcome: Any, output_type: Any
    ) -> Any:
        if isinstance(outcome, WorkflowError):
            raise outcome
        finished: Finished = outcome
        if finished.status != "completed":
            raise WorkflowFailedError(
                workflow_id, finished.status, finished.error_type or "", finished.message or ""
            )
        definition = self._definitions.get(started)
        wanted = output_type if definition is None else definition.output_type
        return from_builtins(finished.result, wanted)

    async def history(self, workflow_id: str) -> list[RecordedEvent]:
        await self._instance(workflow_id)
        return await self.store.read_stream(self.stream_id(workflow_id))

    async def query(self, workflow_id: str) -> Any:
        """The state the workflow last exposed (``ctx.expose``), by replaying its
        history without acting."""
        row = await self._instance(workflow_id)
        definition = self._definitions.get((row.name, row.version))
        if definition is None:
            raise UnknownWorkflowError(row.name, row.version)
        run = _Run(self._host, definition, await self._load_history(workflow_id), query=True)
        try:
            result = await run.execute()
        except Suspend:
            return run.exposed
        except Park as park:
            raise park.error from None
        return result.exposed

    async def describe(self, workflow_id: str) -> WorkflowDescription:
        row = await self._instance(workflow_id)
        history = await self._load_history(workflow_id)
        finished = history.finished
        result = None
        error = None
        if finished is not None:
            result = finished.result
            if finished.status != "completed":
                error = f"{finished.error_type}: {finished.message}"
        elif history.stuck is not None:
            error = f"{history.stuck.error_type}: {history.stuck.message}"
        return WorkflowDescription(
            workflow_id=workflow_id,
            name=row.name,
            version=row.version,
            status=row.status,
            parent_id=row.parent_id,
            created_at=from_micros(row.created_at_us),
            updated_at=from_micros(row.updated_at_us),
            events=history.events,
            waiting_for=None if finished else waiting_for(history),
            result=result,
            error=error,
            unconsumed_signals=tuple(s.name for _, s in history.untaken_signals()),
        )

    async def list_workflows(
        self, *, status: str | None = None, after: str | None = None, limit: int = 100
    ) -> list[InstanceRow]:
        return await self.store.list_instances(status=status, after=after, limit=limit)


class _Host:
    """The engine as a pass sees it (``run.RunHost``): a narrow door, so the pass
    never reaches into the engine's other rooms."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._metadata_bytes = len(msgspec.json.encode(Metadata()))

    @property
    def step_pool(self) -> ThreadPoolExecutor:
        return self._engine.step_pool

    @property
    def max_event_bytes(self) -> int:
        return self._engine.store.max_event_bytes

    def now_us(self) -> int:
        return self._engine._now_us()

    def encoded_size(self, event: Any) -> int:
        return len(self._engine.store.registry.encode(event).data) + self._metadata_bytes

    async def append(
        self, history: History, events: list[Any], runtime: tuple[RuntimeWrite, ...]
    ) -> AppendResult:
        stream = self._engine.stream_id(history.workflow_id)
        return await self._engine.store.append(stream, events, history.version, runtime=runtime)

    async def read_after(self, history: History) -> list[RecordedEvent]:
        stream = self._engine.stream_id(history.workflow_id)
        return await self._engine.store.read_stream(stream, from_version=history.version + 1)

    async def appended(self, history: History, before: int) -> None:
        await self._engine._snapshot_if_due(history, before)

    async def start_child(
        self, workflow: WorkflowDefinition[Any, Any], given: Any, child_id: str, parent_id: str
    ) -> None:
        engine = self._engine
        await engine._start(engine._definition(workflow), given, child_id, parent_id)

    async def cancel_child(self, child_id: str, reason: str) -> None:
        with contextlib.suppress(WorkflowFinishedError, WorkflowNotFoundError):
            await self._engine.cancel(child_id, f"parent cancelled: {reason}")


def owner_is_gone(owner: str) -> bool:
    """Whether the engine named ``owner`` (``host:pid:tag``) is known to be dead:
    it ran on this host and its process no longer exists. Owners on other hosts are
    left to their lease expiry."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another engine in this very process: alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, someone else's
    return False


def _check_input(definition: WorkflowDefinition[Any, Any], given: Any) -> Any:
    """The input as JSON builtins, once it is known to fit the input type."""
    try:
        encoded = to_builtins(given)
        from_builtins(encoded, definition.input_type)
    except CodecError as exc:
        raise WorkflowInputError(definition.name, str(exc)) from exc
    wanted = definition.input_type
    if isinstance(wanted, type) and wanted is not Any and not isinstance(given, wanted | dict):
        raise WorkflowInputError(
            definition.name, f"expected {wanted.__qualname__}, got {type(given).__qualname__}"
        )
    return encoded


def _from_outside(data: Any) -> bool:
    return isinstance(data, SignalSent | CancelRequested | ChildFinished)
