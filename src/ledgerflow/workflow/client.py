"""The client of durable workflows: start, signal, cancel, look at, wait for.

Everything here goes through the store alone: no scheduler, no step threads, no
leases. The CLI uses a ``WorkflowClient`` as it is (and so will the HTTP API); an
``Engine`` is a client that also runs instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar, overload
from uuid import UUID

import msgspec

from .. import metrics, personal, tracing
from .._waiting import wait_at_most
from ..clock import Clock, SystemClock
from ..errors import (
    ConcurrencyError,
    ConfigurationError,
    DuplicateEventError,
    EventSerializationError,
    RecordedValueError,
    SignalInputError,
    StreamNotFoundError,
    UnknownWorkflowError,
    WorkflowAlreadyStartedError,
    WorkflowError,
    WorkflowFailedError,
    WorkflowFinishedError,
    WorkflowInputError,
    WorkflowNotFoundError,
)
from ..events import NO_STREAM, Metadata, NewEvent, RecordedEvent
from ..hashing import from_micros, to_micros
from ..registry import EventRegistry
from ..resilience.book import PolicyBook, default_actor
from ..resilience.guards import breaker_registry
from ..statemachine.client import MachineClient, check_machine, machine_waits
from ..statemachine.definition import Machine
from ..statemachine.instance import MachineOutcome
from ..store import MAX_STREAM_ID_LENGTH, WorkflowStore, open_store
from ..store.runtime import InstanceQuery, InstanceRow, Nudge, PutInstance, Schedule
from ..tenants import check_tenant
from .codec import CodecError, check_nesting, from_builtins, schema_problems, to_builtins
from .definition import WorkflowDefinition
from .executors import Definition
from .handles import (
    QueueInfo,
    WorkerInfo,
    WorkflowDescription,
    WorkflowHandle,
    open_wait,
    signal_waits,
    undo_failed,
    waiting_for,
)
from .history import (
    TERMINAL,
    CancelRequested,
    Finished,
    History,
    SignalSent,
    Started,
    WorkflowStatus,
    history_registry,
)
from .host import Park, ReplayHost, Suspend
from .journal import load_history
from .operations import Operations
from .row_reads import RowReads
from .run import _Run, _surely_within

__all__ = ["MAX_WORKFLOW_ID_LENGTH", "STREAM_PREFIX", "WorkflowClient"]

I = TypeVar("I")  # noqa: E741
O = TypeVar("O")  # noqa: E741

STREAM_PREFIX = "wf-"
MAX_WORKFLOW_ID_LENGTH = MAX_STREAM_ID_LENGTH - len(STREAM_PREFIX)
_JSON_CONTAINERS = (dict, list)
"""What a value decoded from JSON is made of: checked for nesting once, as given."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""The longest workflow id (a tenant's instance's includes ``<tenant>/``)."""
SIGNAL_CHECK_WINDOW = 64
"""Latest events a sender reads to find the wait its signal is for."""

Outcome = tuple[tuple[str, int], "Finished | WorkflowError"]
"""(name, version) of the instance and how it ended."""

RECENT_OUTCOMES = 4096
"""Ends of instances this process ran that ``result()`` answers from memory: the
latest ones, each small enough. An end never changes once it is durable."""
RECENT_OUTCOME_BYTES = 4 * 1024
"""The largest end kept (its result, encoded, and its message)."""


@dataclass(slots=True)
class _Waiters:
    future: asyncio.Future[Outcome]
    count: int = 0


class WorkflowClient(Operations, MachineClient):
    """Starts, signals, cancels and reads workflow instances through a store.

    ``store`` is a URL (opened and closed by the client) or a store object. Workflows
    are registered to start them by name and to decode their results and queries.
    """

    def __init__(
        self,
        store: str | WorkflowStore,
        *,
        workflows: Sequence[Definition] = (),
        clock: Clock | None = None,
        poll_interval: float = 1.0,
        registry: EventRegistry | None = None,
        verify_machines: str = "refuse",
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.verify_machines = verify_machines
        self._owns_store = isinstance(store, str)
        if isinstance(store, str):
            self.store: WorkflowStore = open_store(
                store, registry=history_registry(registry), clock=self.clock.now
            )
        else:
            history_registry(store.registry)
            if registry is not None and registry is not store.registry:
                # Given with a store object (whose registry decodes its events): its
                # types join the store's, rather than being ignored unseen.
                store.registry.include(registry)
            self.store = store
        self.policies = PolicyBook(self.store)
        breaker_registry(self.store.registry)
        """Named resilience policies in the ledger: set, change, read, list."""
        self._definitions: dict[tuple[str, int], Definition] = {}
        self._latest: dict[str, Definition] = {}
        for definition in workflows:
            self.register(definition)
        self.poll_interval = poll_interval
        self._stuck: dict[str, WorkflowError] = {}
        # Callers of result() waiting on instances this process runs: a future and
        # how many wait on it.
        self._waiters: dict[str, _Waiters] = {}
        self._rows = RowReads(self.store)
        """The rows ``result()`` polls, read together (one read for many waiters)."""
        self._recent: OrderedDict[str, Outcome] = OrderedDict()
        self._histories: OrderedDict[str, History] = OrderedDict()

    async def open(self) -> Self:
        """Open the store (``async with`` does it for you)."""
        await self.store.open()
        return self

    async def close(self) -> None:
        """Close the store if this client opened it from a URL."""
        if self._owns_store:
            await self.store.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- hooks an engine fills in -----------------------------------------------------

    _owner: str | None = None
    _lease_us: int = 0

    def _reserve_slot(self) -> bool:
        """Whether this process runs an instance it starts (a client never does); an
        engine that says yes holds a slot for it until ``_run_here`` or
        ``_release_slot``."""
        return False

    def _release_slot(self) -> None:
        raise AssertionError("a client holds no slot")  # pragma: no cover

    def _run_here(self, history: History) -> None:
        raise AssertionError("a client runs no instance")  # pragma: no cover

    def _poke(self) -> None:
        """Something became due: a client has no scheduler to wake."""

    def register(self, definition: Definition) -> None:
        """Register a workflow or a state machine (checked first: see
        ``check_machine``) to start, run and read its instances."""
        known = self._definitions.get(definition.key)
        if known is not None and not _same(known, definition):
            raise ConfigurationError(
                f"workflow {definition.name!r} v{definition.version} is registered twice"
            )
        if isinstance(definition, Machine) and known is None:
            check_machine(definition, self.verify_machines)
        self._definitions[definition.key] = definition
        latest = self._latest.get(definition.name)
        if latest is None or latest.version < definition.version:
            self._latest[definition.name] = definition

    def _now_us(self) -> int:
        return to_micros(self.clock.now())

    @property
    def _machines(self) -> Mapping[tuple[str, int], Definition]:
        return self._definitions

    @staticmethod
    def stream_id(workflow_id: str) -> str:
        """The ledger stream holding the history of instance ``workflow_id``."""
        return STREAM_PREFIX + workflow_id

    def _definition(self, workflow: Definition | str) -> Definition:
        if isinstance(workflow, str):
            found = self._latest.get(workflow)
            if found is None:
                raise UnknownWorkflowError(workflow)
            return found
        if workflow.key not in self._definitions:
            raise UnknownWorkflowError(workflow.name, workflow.version)
        return workflow

    @overload
    async def start(
        self,
        workflow: WorkflowDefinition[I, O],
        input: I,
        *,
        id: str | None = None,
        tenant: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> WorkflowHandle[O]: ...
    @overload
    async def start(
        self,
        workflow: Machine,
        input: Any,
        *,
        id: str | None = None,
        tenant: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> WorkflowHandle[MachineOutcome]: ...
    @overload
    async def start(
        self,
        workflow: str,
        input: Any,
        *,
        id: str | None = None,
        tenant: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> WorkflowHandle[Any]: ...
    async def start(
        self,
        workflow: Definition | str,
        input: Any,
        *,
        id: str | None = None,
        tenant: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> WorkflowHandle[Any]:
        """Start an instance, or return the handle of the one with this ``id``.

        The input is checked against the workflow's input type before anything is
        recorded. Starting is idempotent on ``id``: the same workflow and input
        return the existing instance; another workflow or input under the same id
        raises ``WorkflowAlreadyStartedError``. Without ``id`` a random one is used.
        With ``tenant`` the instance (and its children) is in that tenant's
        namespace: its id is ``<tenant>/<id>``. ``actor``, ``reason`` and
        ``correlation_id`` are recorded with the start (the metadata of its first
        event); the instance's JSON log lines carry the correlation id.
        """
        handle, _ = await self._begin(
            workflow,
            input,
            id=id,
            tenant=tenant,
            actor=actor,
            reason=reason,
            correlation_id=correlation_id,
        )
        return handle

    async def _begin(
        self,
        workflow: Definition | str,
        input: Any,
        *,
        id: str | None = None,
        tenant: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        correlation_id: str | None = None,
    ) -> tuple[WorkflowHandle[Any], bool]:
        """``start``, and whether this call started the instance (False: it was
        started before, the same way), for callers that answer differently."""
        definition = self._definition(workflow)
        workflow_id = str(uuid.uuid4()) if id is None else id
        if tenant is not None:
            workflow_id = f"{check_tenant(tenant, definition.name)}/{workflow_id}"
        metadata = None
        if actor is not None or reason is not None or tenant is not None or correlation_id:
            metadata = Metadata(
                actor=actor, reason=reason, tenant=tenant, correlation_id=correlation_id
            )
        created = await self._start(
            definition, input, workflow_id, None, tenant=tenant, metadata=metadata
        )
        return WorkflowHandle(self, workflow_id, definition.output_type), created

    def handle(self, workflow_id: str, output_type: Any = Any) -> WorkflowHandle[Any]:
        return WorkflowHandle(self, workflow_id, output_type)

    async def _start(
        self,
        definition: Definition,
        given: Any,
        workflow_id: str,
        parent_id: str | None,
        *,
        tenant: str | None = None,
        metadata: Metadata | None = None,
    ) -> bool:
        """Record the start; whether it is new (False: started the same way before)."""
        if not isinstance(workflow_id, str) or not workflow_id or _CONTROL.search(workflow_id):
            # Control characters too: shown in a terminal, an id with ESC or CR in it
            # could rewrite the screen of whoever lists instances.
            raise WorkflowInputError(
                definition.name,
                "the workflow id must be a non-empty string without control characters "
                f"(NUL, ESC, CR...), not {workflow_id!r}",
            )
        longest = MAX_WORKFLOW_ID_LENGTH
        if len(workflow_id) > longest:
            raise WorkflowInputError(
                definition.name,
                f"the workflow id is {len(workflow_id)} characters long; at most {longest}"
                + (" (with the tenant and the /)" if tenant is not None else ""),
            )
        encoded = _check_input(definition, given)
        now = self._now_us()
        local = self._reserve_slot()
        # In the caller's trace (the store records the start span's context with
        # Started): every pass and step of the instance joins it, in any process.
        # Started outside any trace, it has no start span: its first pass is the
        # root of its trace (a span fewer for every such start).
        starting: contextlib.AbstractContextManager[object] = (
            tracing.span(
                f"start {definition.name}",
                kind=tracing.SpanKind.PRODUCER,
                attributes={"ledgerflow.workflow_id": workflow_id},
            )
            if tracing.active()
            else contextlib.nullcontext()
        )
        try:
            started = Started(
                name=definition.name,
                version=definition.version,
                input=encoded,
                parent_id=parent_id,
                tenant=tenant,
                kind="machine" if isinstance(definition, Machine) else "workflow",
            )
            with starting:
                try:
                    created = await self._record_start(workflow_id, started, metadata, now, local)
                except EventSerializationError as exc:
                    if exc.event_type != "wf.started":
                        raise
                    # The input fit its type but has no JSON form (NaN, infinity, a
                    # tuple in an Any field): the caller's input, not an event fault.
                    raise WorkflowInputError(definition.name, exc.reason) from exc
            if created:
                metrics.workflow_started(definition.name)
            return created
        finally:
            if local:
                # Running here (no await since ``_run_here``: the slot passes to the
                # pass at once), already started, or failed: the hold ends.
                self._release_slot()

    async def _record_start(
        self,
        workflow_id: str,
        started: Started,
        metadata: Metadata | None,
        now: int,
        local: bool,
    ) -> bool:
        row = InstanceRow(
            workflow_id,
            started.name,
            started.version,
            WorkflowStatus.RUNNING,
            started.parent_id,
            now,
            now,
        )
        schedule = Schedule(
            workflow_id,
            now,
            self._owner if local else None,
            now + self._lease_us if local else None,
        )
        try:
            await self.store.append(
                self.stream_id(workflow_id),
                [started],
                NO_STREAM,  # the one check that makes starting idempotent
                runtime=[PutInstance(row), schedule],
                metadata=metadata,
            )
        except ConcurrencyError:
            await self._same_start(workflow_id, started)
            return False
        if local:
            # The first pass replays what we just wrote: no need to read it back.
            history = History(workflow_id, started)
            history.add(1, started)
            # What the store recorded with Started (given, or stamped from the
            # start's span): later passes from this cache join the same trace.
            history.traceparent = (
                metadata.traceparent
                if metadata is not None and metadata.traceparent
                else tracing.current_traceparent()
            )
            history.correlation_id = None if metadata is None else metadata.correlation_id
            self._run_here(history)
        else:
            self._poke()
        return True

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
            owner = (
                "it was started on its own, not as a child"
                if existing.parent_id is None
                else f"it is a child of {existing.parent_id!r}"
            )
            advice = (
                f"; give ctx.child(..., id=...) an id of its own for {wanted.parent_id!r}'s child"
                if wanted.parent_id is not None
                else ""
            )
            raise WorkflowAlreadyStartedError(workflow_id, owner + advice)
        if existing.input != personal.plain(wanted.input):
            raise WorkflowAlreadyStartedError(
                workflow_id,
                "it was started with another input; starting is idempotent only for the same input",
            )

    async def _load_history(self, workflow_id: str) -> History:
        """From the latest snapshot and the events after it, or from the start."""
        return await load_history(self.store, workflow_id)

    async def _finished_event(
        self, workflow_id: str, row: InstanceRow | None = None
    ) -> Finished | None:
        """The instance's end; ``row`` is its row if the caller just read it."""
        if row is None:
            row = await self.store.get_instance(workflow_id)
        if row is None or row.status not in TERMINAL:
            return None
        stream = self.stream_id(workflow_id)
        for event in await self.store.read_stream(stream, backwards=True, limit=50):
            if isinstance(event.data, Finished):
                return event.data
        history = await self._load_history(workflow_id)
        return history.finished

    async def _instance(self, workflow_id: str) -> InstanceRow:
        row = await self.store.get_instance(workflow_id)
        if row is None:
            raise WorkflowNotFoundError(workflow_id)
        return row

    async def _sent_before(self, stream: str, event_id: UUID, event: Any) -> bool:
        """Whether ``event`` is stored under ``event_id`` already (a signal delivered
        again after the instance took it and ended: the retry succeeds, as a repeat
        does while it runs); DuplicateEventError if another event has that id."""
        for recorded in await self.store.read_stream(stream, backwards=True):
            if recorded.id == event_id:
                if recorded.data != event:
                    raise DuplicateEventError(
                        event_id, stream, "the id was used before for another signal"
                    )
                return True
        return False

    async def _send(
        self,
        workflow_id: str,
        event: Any,
        action: str,
        metadata: Metadata | None = None,
        event_id: UUID | None = None,
    ) -> None:
        stream = self.stream_id(workflow_id)
        unchecked = isinstance(event, SignalSent)
        while True:
            # Version first: the status row and the Finished event are written in one
            # append, so a status read after the version that is not terminal proves
            # the version predates the end, and a later end fails this append. A
            # signal's first look reads the newest events instead: the version is
            # the first one's, and they say what the instance waits for.
            recent: list[RecordedEvent] = []
            if unchecked:
                try:
                    recent = await self.store.read_stream(
                        stream, backwards=True, limit=SIGNAL_CHECK_WINDOW
                    )
                except StreamNotFoundError:
                    raise WorkflowNotFoundError(workflow_id) from None
                version = recent[0].version
            else:
                version = await self.store.stream_version(stream)
            row = await self._instance(workflow_id)
            if row.status in TERMINAL:
                if event_id is not None and await self._sent_before(stream, event_id, event):
                    return  # a repeat of what it received before it ended: done
                raise WorkflowFinishedError(workflow_id, row.status, action)
            if unchecked:
                event = _check_signal(workflow_id, event, recent)
                unchecked = False
            # A parked instance keeps what is sent for when it resumes, but is not
            # woken for it: it could only park again.
            runtime = (
                [Nudge(workflow_id, self._now_us())]
                if row.status in (WorkflowStatus.RUNNING, WorkflowStatus.NEEDS_ATTENTION)
                else []
            )
            # With an id, sending twice (a message delivered again) stores it once.
            recorded: Any = event if event_id is None else _with_id(event, event_id)
            try:
                await self.store.append(
                    stream, [recorded], version, runtime=runtime, metadata=metadata
                )
            except ConcurrencyError:
                continue  # it moved on (or finished) meanwhile: look again
            self._poke()
            return

    async def signal(
        self,
        workflow_id: str,
        name: str,
        payload: Any = None,
        *,
        id: str | UUID | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Deliver a signal; kept until the workflow waits for it.

        If the instance is waiting for ``name`` now, the payload is checked against
        the waited-for type first: ``WorkflowInputError`` and nothing recorded if it
        does not fit. ``id`` makes sending idempotent: the same signal sent again with
        the same id (a message delivered twice) is recorded once. ``actor`` and
        ``reason``, when given, are recorded with it (its metadata).
        """
        if not isinstance(name, str) or not name:
            raise WorkflowInputError(
                f"signal {name!r}", "the signal name must be a non-empty string"
            )
        try:
            check_nesting(payload)
            encoded = to_builtins(payload)
            if type(payload) not in _JSON_CONTAINERS:
                check_nesting(encoded)  # an object's fields nest too
        except CodecError as exc:
            raise WorkflowInputError(f"signal {name!r}", str(exc)) from exc
        event_id = None if id is None else _signal_id(workflow_id, id)
        metadata = None
        if actor is not None or reason is not None:
            metadata = Metadata(actor=actor, reason=reason)
        # The sender's span: recorded with the signal (the store stamps it), linked
        # from the span of the pass that takes it.
        with tracing.span(
            f"signal {name}",
            kind=tracing.SpanKind.PRODUCER,
            attributes={"ledgerflow.workflow_id": workflow_id},
        ):
            try:
                await self._send(
                    workflow_id,
                    SignalSent(name=name, payload=encoded),
                    "signal",
                    metadata,
                    event_id=event_id,
                )
            except DuplicateEventError as exc:
                raise DuplicateEventError(
                    exc.event_id,
                    exc.stream_id,
                    f"the id {id!s} was sent to workflow {workflow_id!r} before with "
                    "another signal (name, payload, actor or reason): a repeat must be "
                    "the same signal",
                ) from None

    async def cancel(
        self, workflow_id: str, reason: str | None = None, *, actor: str | None = None
    ) -> None:
        """Ask the instance to stop: it raises ``WorkflowCancelled`` at its next await,
        its compensations run and the children it still runs are cancelled too. Who
        asked (``actor``, default ``user@host``) and why are recorded with it."""
        metadata = Metadata(actor=actor or default_actor(), reason=reason)
        await self._send(workflow_id, CancelRequested(reason=reason), "cancel", metadata)

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
                if (recent := self._recent.get(workflow_id)) is not None:
                    return self._decode_outcome(workflow_id, *recent, output_type)
                if self._runs_here(workflow_id):
                    # A pass of ours runs it: its end tells the waiter, and a pass that
                    # parks or steps back leaves, so the next look reads the row.
                    await wait_at_most(asyncio.shield(waiter), self._wait(workflow_id, deadline))
                    continue
                polled = await self._rows.get(workflow_id)
                if polled is None:
                    raise WorkflowNotFoundError(workflow_id)
                row = polled
                if row.status in TERMINAL:
                    finished = await self._finished_event(workflow_id, row)
                    assert finished is not None
                    return self._decode_outcome(
                        workflow_id, (row.name, row.version), finished, output_type
                    )
                if row.status == WorkflowStatus.STUCK and workflow_id in self._stuck:
                    raise self._stuck[workflow_id]
                await wait_at_most(asyncio.shield(waiter), self._wait(workflow_id, deadline))
        finally:
            self._release_outcome(workflow_id)

    def _runs_here(self, workflow_id: str) -> bool:
        """Whether a pass of this process runs the instance now (an engine's)."""
        return False

    def _wait(self, workflow_id: str, deadline: float | None) -> float:
        """How long ``result`` waits before it looks again (raises past the deadline)."""
        if deadline is None:
            return self.poll_interval
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"workflow {workflow_id!r} has not finished")
        return min(self.poll_interval, left)

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
        """The instance ended (its end is durable), or parked: wake its waiters."""
        workflow_id = history.workflow_id
        started = (history.started.name, history.definition_version)
        entry = self._waiters.get(workflow_id)
        if entry is not None and not entry.future.done():
            entry.future.set_result((started, outcome))
        if isinstance(outcome, Finished) and _small(outcome):
            # Kept for a result() that comes later (starts in a loop, then results):
            # it would otherwise read the row and the stream's end again.
            recent = self._recent
            recent[workflow_id] = (started, outcome)
            recent.move_to_end(workflow_id)
            if len(recent) > RECENT_OUTCOMES:
                recent.popitem(last=False)

    def _decode_outcome(
        self, workflow_id: str, started: tuple[str, int], outcome: Any, output_type: Any
    ) -> Any:
        if isinstance(outcome, WorkflowError):
            raise outcome
        finished: Finished = outcome
        if finished.status != WorkflowStatus.COMPLETED:
            raise WorkflowFailedError(
                workflow_id, finished.status, finished.error_type or "", finished.message or ""
            )
        definition = self._definitions.get(started)
        wanted = output_type if definition is None else definition.output_type
        try:
            return from_builtins(finished.result, wanted)
        except CodecError as exc:  # a type asked for that the recorded result does not fit
            raise RecordedValueError(workflow_id, "result", wanted, str(exc)) from None

    async def history(
        self, workflow_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[RecordedEvent]:
        """The instance's events, oldest first: those after version ``after``, at
        most ``limit`` of them (all by default)."""
        await self._instance(workflow_id)
        return await self.store.read_stream(
            self.stream_id(workflow_id), from_version=after + 1, limit=limit
        )

    async def query(self, workflow_id: str) -> Any:
        """The state the workflow last exposed (``ctx.expose``), by replaying its
        history without acting."""
        row = await self._instance(workflow_id)
        definition = self._definitions.get((row.name, row.version))
        if definition is None:
            raise UnknownWorkflowError(row.name, row.version)
        if isinstance(definition, Machine):
            return await self.machine_state(workflow_id)
        run = _Run(
            ReplayHost(self._now_us()),
            definition,
            await self._load_history(workflow_id),
            query=True,
        )
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
            if finished.status != WorkflowStatus.COMPLETED:
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
            waiting_for=None if finished else self._waiting(row, history),
            result=result,
            error=error,
            unconsumed_signals=tuple(s.name for _, s in history.untaken_signals()),
            waiting_signals=() if finished else signal_waits(history),
            patches=history.patches(),
            undo_failed=undo_failed(history),
        )

    def _waiting(self, row: InstanceRow, history: History) -> str | None:
        said = waiting_for(history)
        definition = self._definitions.get((row.name, row.version))
        if said is not None or not isinstance(definition, Machine):
            return said
        return machine_waits(definition, history)

    async def list_workflows(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        id_prefix: str | None = None,
        text: str | None = None,
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        newest_first: bool = False,
        after: str | None = None,
        limit: int = 100,
    ) -> list[InstanceRow]:
        """One page of instances, by id or newest first, after the instance ``after``
        (the last id of the page before). Every filter given narrows the list:
        ``text`` is a substring of the id or the name (ASCII letters in either case),
        ``id_prefix`` a start of the id, and the creation time is in
        [``created_from``, ``created_before``)."""
        query = InstanceQuery(
            status=status,
            name=name,
            id_prefix=id_prefix,
            text=text,
            created_from_us=None if created_from is None else to_micros(created_from),
            created_before_us=None if created_before is None else to_micros(created_before),
            newest_first=newest_first,
        )
        return await self.store.list_instances(query=query, after=after, limit=limit)

    async def workers(self) -> list[WorkerInfo]:
        """The registered workers (engines), alive, stopping or late, by id.

        Whether each is alive is judged on the database's clock, read after the
        registry (so no heartbeat listed is newer than it), as the engines that reap
        dead workers judge it.
        """
        rows = await self.store.list_workers()
        as_of_us = await self.store.database_now_us()
        return [WorkerInfo.from_row(row, as_of_us) for row in rows]

    async def task_queues(self) -> list[QueueInfo]:
        """The task queues that have tasks or a limit, by name, with how many tasks
        are ready, scheduled later (a retry's backoff) and running, counted on the
        database's clock."""
        rows = await self.store.list_queues(await self.store.database_now_us())
        return [QueueInfo(r.queue, r.max_concurrent, r.ready, r.scheduled, r.running) for r in rows]

    async def set_queue_limit(self, queue: str, max_concurrent: int | None) -> None:
        """Let at most ``max_concurrent`` tasks of ``queue`` run at once across every
        worker on this store (None: no limit); workers apply it from their next claim."""
        await self.store.set_queue_limit(queue, max_concurrent)


_IDEMPOTENT = uuid.UUID("6f1c2b7e-4d3a-5e8f-9a0b-1c2d3e4f5a6b")


def _signal_id(workflow_id: str, given: str | UUID) -> UUID:
    """The event id of a signal sent with the idempotency id ``given``: per instance,
    so one message id may signal many instances (a trigger's fan-out, two tenants'
    own ids) without one send being taken for a repeat of another's."""
    return uuid.uuid5(_IDEMPOTENT, f"{workflow_id}\x00{given}")


def _with_id(event: Any, event_id: UUID) -> NewEvent:
    return NewEvent(_SIGNAL_TYPE, msgspec.to_builtins(event), id=event_id)


_SIGNAL_TYPE = "wf.signal"


def _same(known: Definition, given: Definition) -> bool:
    if isinstance(known, WorkflowDefinition) and isinstance(given, WorkflowDefinition):
        return known.fn is given.fn
    return known is given


def _check_input(definition: Definition, given: Any) -> Any:
    """The input as JSON builtins, once it is known to fit the input type."""
    try:
        check_nesting(given)  # before anything walks it by recursion
        encoded = to_builtins(given)
        if type(given) not in _JSON_CONTAINERS:
            check_nesting(encoded)  # an object's fields nest too
        typed = from_builtins(encoded, definition.input_type)
        if typed is not encoded and personal.has_personal_objects(typed):
            # Given as JSON (over HTTP, from the CLI): its personal fields are
            # known only from the input type, and sealed from the typed value.
            encoded = to_builtins(typed)
    except CodecError as exc:
        raise WorkflowInputError(definition.name, str(exc)) from exc
    wanted = definition.input_type
    if isinstance(wanted, type) and wanted is not Any and not isinstance(given, wanted | dict):
        raise WorkflowInputError(
            definition.name, f"expected {wanted.__qualname__}, got {type(given).__qualname__}"
        )
    return encoded


def _check_signal(workflow_id: str, signal: SignalSent, recent: list[RecordedEvent]) -> SignalSent:
    """Refuse a payload that does not fit the type the instance waits for now; the
    signal to record, its personal fields sealed as that type declares.

    The wait records its type's JSON Schema, so any sender (this process, the CLI,
    another service) can check without the workflow's code. A signal sent ahead of
    its wait cannot be checked here; the wait rejects it if it does not fit,
    visibly, and goes on waiting.
    """
    if _a_machine(recent):
        # Nothing in a state machine takes signals: recorded, it waited unread for
        # ever, and its sender (an HTTP client told 202) believed it done.
        raise SignalInputError(
            workflow_id,
            signal.name,
            "it is a state machine instance, which takes events, not signals: send "
            f"the event {signal.name!r} with engine.execute or 'ledgerflow machines "
            "send'",
        )
    waiting = open_wait([event.data for event in recent], signal.name)
    if waiting is None or waiting.schema is None:
        return signal
    payload = personal.plain(signal.payload) if personal.declared() else signal.payload
    problems = schema_problems(waiting.schema, payload)
    if problems is not None:
        raise SignalInputError(
            workflow_id, signal.name, f"does not fit the waited-for type: {problems}"
        )
    if not personal.marked(waiting.schema):
        return signal
    payload = personal.seal_by_schema(signal.payload, waiting.schema)
    return msgspec.structs.replace(signal, payload=payload)


def _a_machine(recent: list[RecordedEvent]) -> bool:
    """Whether the newest events of an instance are a state machine's: its start
    says so (or, started by an older release, its own events do)."""
    for event in recent:
        if event.type.startswith("sm."):
            return True
        if event.type == "wf.started":
            data = event.data
            kind = data.get("kind") if isinstance(data, dict) else getattr(data, "kind", None)
            return kind == "machine"
    return False


def _small(finished: Finished) -> bool:
    """Whether an end is small enough to keep in memory (its result and message)."""
    budget = RECENT_OUTCOME_BYTES - len(finished.message or "")
    result = finished.result
    if _surely_within(result, budget):
        return True  # the common scalars, without encoding
    if isinstance(result, str) and len(result) > budget:
        return False  # too long before any escaping: no need to encode it
    return len(msgspec.json.encode(result)) <= budget
