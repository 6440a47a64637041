"""Every error ledgerflow raises, in one hierarchy.

Callers catch the most specific class they can handle; anything from a driver
(sqlite3, psycopg) is translated at the adapter boundary into one of these, so no
driver type ever crosses the port::

    LedgerflowError
    ├── ConfigurationError          bad store URL, unsupported option
    ├── EventError                  bad input: nothing was written
    │   ├── UnknownEventTypeError   object of an unregistered class, unknown name on read
    │   ├── EventSerializationError payload cannot be encoded as JSON
    │   ├── InvalidEventDataError   payload does not match its registered type
    │   └── EventTooLargeError      encoded event over the store's size limit
    ├── StoreError                  the store refused or could not do the operation
    │   ├── ConcurrencyError        expected version did not match (retry after reload)
    │   ├── DuplicateEventError     an event id was reused with different content
    │   ├── LeaseLostError          a runner's lease on an instance passed to another
    │   │   └── ProjectionLeaseLostError  a projection runner's lease, or its checkpoint, moved
    │   ├── StreamNotFoundError     read of a stream that has no events
    │   ├── SchemaVersionError      database schema is newer than this code
    │   ├── SchemaOutdatedError     schema older than this code, opened with create=False
    │   ├── LedgerNotFoundError     no ledger at that URL (opened with create=False)
    │   ├── StoreReadOnlyError      the database cannot be written (read-only file, standby)
    │   ├── StoreClosedError        the store was used after it was closed
    │   ├── StoreCorruptError       the database's files are damaged (restore a backup)
    │   ├── StaleReadError          an inbox handler's reads changed before it committed
    │   └── StoreUnavailableError   connection or I/O failure (retryable)
    │       └── StoreInternalError  a defect in ledgerflow's store adapter (retryable)
    ├── WorkflowError               durable workflows
    │   ├── WorkflowDefinitionError a workflow or step definition is unusable (lint)
    │   ├── UnknownWorkflowError    no registered workflow of that name/version
    │   ├── WorkflowNotFoundError   no instance with that id
    │   ├── WorkflowInputError      input does not match the workflow's input type
    │   │   ├── SignalInputError    a signal's payload does not fit the waited-for type
    │   │   └── EventInputError     an event a state machine's instance cannot take
    │   ├── WorkflowFinishedError   signal or cancel sent to a finished instance
    │   ├── WorkflowAlreadyStartedError  the id is taken by another workflow or input
    │   ├── NonDeterminismError     the code no longer matches the recorded history
    │   ├── UnrecordableValueError  a step result or return value cannot be recorded
    │   ├── RecordedValueError      a recorded value no longer fits the code's type
    │   ├── ResultTooLargeError     a step result or return value over the size limit
    │   ├── StepCancelledError      inside a step: its attempt timed out, stop now
    │   ├── StepTimeoutError        a step attempt ran out of time (also a TimeoutError)
    │   ├── WorkflowFailedError     result() of an instance that did not complete
    │   ├── StepFailedError         inside workflow code: a step failed for good
    │   ├── StepNotParkedError      an operator action on an instance with no such step
    │   ├── WorkflowNotStuckError   resume of an instance that is not stuck
    │   ├── ChildWorkflowError      inside workflow code: a child did not complete
    │   ├── InvalidTransition       an event a state machine does not accept where it is
    │   ├── InstanceBusyError       an event not sent in time: the machine was still busy
    │   ├── TransitionFailedError   the activity of a state machine's transition failed
    │   └── MigrationError          a running state machine cannot move to that version
    ├── BusUnavailableError         the event bus's broker is out of reach (retryable)
    ├── ProjectionError             projections (operator actions)
    │   ├── ProjectionNotFoundError no projection of that name in the ledger
    │   ├── ProjectionHeldError     another runner holds its lease (retryable)
    │   └── ProjectionNotFailedError retry or skip of a projection not stopped at a failure
    └── ResilienceError             named resilience policies
        ├── InvalidPolicyError      a policy document is wrong; ``field`` names where
        ├── PolicyNotFoundError     no policy of that name in the ledger
        ├── CircuitOpenError        a call refused: the resource's breaker is open
        └── BulkheadFullError       a call refused: the resource's bulkhead stayed full

``WorkflowCancelled`` is not an error but a signal to workflow code (a
``BaseException``, like ``asyncio.CancelledError``): it is raised at the next await of
a cancelled instance so that ``except Exception`` in user code cannot swallow it.

Retryability is data: ``error.retryable`` says whether the same call may succeed
if simply tried again (after reloading state, for a ``ConcurrencyError``). Step
retries read it too, from any exception that has it: a user's own error class can say
``retryable = False`` (a business rule was violated: trying again will not help).
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from .hashing import from_micros

__all__ = [
    "AuditError",
    "BulkheadFullError",
    "BusUnavailableError",
    "CheckpointMismatchError",
    "ChildWorkflowError",
    "CircuitOpenError",
    "ConcurrencyError",
    "ConfigurationError",
    "DuplicateEventError",
    "EventError",
    "EventInputError",
    "EventSerializationError",
    "EventTooLargeError",
    "InstanceBusyError",
    "InvalidEventDataError",
    "InvalidPolicyError",
    "InvalidTransition",
    "LeaseLostError",
    "LedgerNotFoundError",
    "LedgerflowError",
    "MigrationError",
    "NonDeterminismError",
    "PersonalDataErasedError",
    "PolicyNotFoundError",
    "ProjectionError",
    "ProjectionHeldError",
    "ProjectionLeaseLostError",
    "ProjectionNotFailedError",
    "ProjectionNotFoundError",
    "RecordedValueError",
    "ResilienceError",
    "ResultTooLargeError",
    "SchemaOutdatedError",
    "SchemaVersionError",
    "SignalInputError",
    "StepCancelledError",
    "StepFailedError",
    "StepNotParkedError",
    "StepTimeoutError",
    "StoreClosedError",
    "StoreError",
    "StoreInternalError",
    "StoreReadOnlyError",
    "StoreUnavailableError",
    "StreamNotFoundError",
    "TaskLeaseLostError",
    "TransitionFailedError",
    "UnknownEventTypeError",
    "UnknownWorkflowError",
    "UnrecordableValueError",
    "WitnessError",
    "WitnessRefusedError",
    "WorkflowAlreadyStartedError",
    "WorkflowCancelled",
    "WorkflowDefinitionError",
    "WorkflowError",
    "WorkflowFailedError",
    "WorkflowFinishedError",
    "WorkflowInputError",
    "WorkflowNotFoundError",
]


class LedgerflowError(Exception):
    """Root of every error ledgerflow raises on purpose."""

    retryable: bool = False


class ConfigurationError(LedgerflowError):
    """The store or engine was configured with something it cannot use."""


class EventError(LedgerflowError):
    """An event given to the store is not acceptable; nothing was written."""


class UnknownEventTypeError(EventError):
    def __init__(self, what: str) -> None:
        super().__init__(f"unknown event type: {what} (register it with EventRegistry.event)")
        self.what = what


class EventSerializationError(EventError):
    def __init__(self, event_type: str, reason: str) -> None:
        super().__init__(f"event {event_type!r} cannot be serialized: {reason}")
        self.event_type = event_type
        self.reason = reason


class InvalidEventDataError(EventError):
    def __init__(self, event_type: str, schema_version: int, reason: str) -> None:
        # Also raised for what rides with appends or goes to the store directly
        # (runtime rows, fences, claims), where no event is named.
        message = (
            f"event {event_type!r} v{schema_version} has invalid data: {reason}"
            if event_type
            else f"invalid input: {reason}"
        )
        super().__init__(message)
        self.event_type = event_type
        self.schema_version = schema_version
        self.reason = reason


class EventTooLargeError(EventError):
    def __init__(self, event_type: str, size: int, limit: int) -> None:
        super().__init__(f"event {event_type!r} is {size} bytes encoded; the limit is {limit}")
        self.event_type = event_type
        self.size = size
        self.limit = limit


class StoreError(LedgerflowError):
    """The store could not carry out the operation."""


class ConcurrencyError(StoreError):
    """The stream's version was not the one the writer expected.

    ``expected`` is what the caller passed (an int or a StreamState name),
    ``actual`` the stream's version at the time (0 when the stream does not exist).
    Reload and decide again; that is why it is retryable.
    """

    retryable = True

    def __init__(self, stream_id: str, expected: object, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, actual version {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventError(StoreError):
    """An event id that is already stored came back with different content."""

    def __init__(self, event_id: UUID, stream_id: str, reason: str) -> None:
        super().__init__(f"event {event_id} (stream {stream_id!r}) already stored: {reason}")
        self.event_id = event_id
        self.stream_id = stream_id
        self.reason = reason


class LeaseLostError(StoreError):
    """A fenced append of a runner whose lease on the instance is no longer the one it
    claimed: another runner took the instance over (or the runner gave it back).

    Nothing of the append was written. The runner must step back without any further
    effect: the instance is the new holder's now.
    """

    def __init__(
        self, workflow_id: str, owner: str, epoch: int, held_by: str | None, held_epoch: int
    ) -> None:
        holder = "nobody" if held_by is None else f"{held_by!r}"
        super().__init__(
            f"workflow {workflow_id!r}: lease {epoch} of {owner!r} is lost; "
            f"held by {holder} at epoch {held_epoch}"
        )
        self.workflow_id = workflow_id
        self.owner = owner
        self.epoch = epoch
        self.held_by = held_by
        self.held_epoch = held_epoch


class TaskLeaseLostError(LeaseLostError):
    """A task runner's fenced append whose lease on the task is no longer the one it
    claimed: the task was claimed again (this runner's lease expired) or dropped
    (its workflow ended). Nothing of the append was written."""

    def __init__(
        self, task_id: str, owner: str, epoch: int, held_by: str | None, held_epoch: int
    ) -> None:
        holder = "nobody" if held_by is None else f"{held_by!r}"
        StoreError.__init__(
            self,
            f"task {task_id!r}: lease {epoch} of {owner!r} is lost; "
            f"held by {holder} at epoch {held_epoch}",
        )
        self.workflow_id = task_id.rpartition("/")[0]
        self.task_id = task_id
        self.owner = owner
        self.epoch = epoch
        self.held_by = held_by
        self.held_epoch = held_epoch


class ProjectionLeaseLostError(LeaseLostError):
    """A projection runner's commit when its lease is no longer the one it claimed
    (another runner took the projection over) or its checkpoint moved (an operator
    skipped or retried meanwhile). Nothing was written: the runner steps back and
    reads its row again."""

    def __init__(self, projection: str, owner: str, epoch: int, why: str) -> None:
        StoreError.__init__(
            self, f"projection {projection!r}: lease {epoch} of {owner!r} cannot commit: {why}"
        )
        self.workflow_id = ""
        self.projection = projection
        self.owner = owner
        self.epoch = epoch
        self.held_by: str | None = None
        self.held_epoch = 0
        self.why = why


class StreamNotFoundError(StoreError):
    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} does not exist")
        self.stream_id = stream_id


class SchemaVersionError(StoreError):
    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"the database schema is at version {found} but this ledgerflow knows "
            f"versions up to {known}: upgrade ledgerflow before opening this database"
        )
        self.found = found
        self.known = known


class SchemaOutdatedError(StoreError):
    """The ledger's schema is older than this code and the store was opened with
    ``create=False``, which never migrates: a process that writes (an ``Engine``, or
    ``open_store(url)``) migrates it when it opens the ledger."""

    def __init__(self, location: str, found: int, known: int) -> None:
        super().__init__(
            f"the ledger at {location} has schema version {found} and this ledgerflow "
            f"needs {known}; it is not migrated by a read-only open: open it once from "
            "a process that writes (an Engine, or open_store(url)) to migrate it"
        )
        self.location = location
        self.found = found
        self.known = known


class LedgerNotFoundError(StoreError):
    """Opened with ``create=False`` where there is no ledger (a missing or empty
    file, another application's database, a mistyped schema); nothing was created."""

    def __init__(self, location: str, reason: str | None = None) -> None:
        super().__init__(f"no ledger at {location}" + (f" ({reason})" if reason else ""))
        self.location = location
        self.reason = reason


class StoreReadOnlyError(StoreError):
    """The database can be read but not written: a read-only file or session, a
    standby server, missing privileges. Not retryable: it needs an operator. The
    loops that serve for a process's life (the scheduler, task and projection
    runners, heartbeats, passes) wait it out as they wait out an outage, backing
    off, and resume once the operator has fixed it."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"cannot write to the ledger at {location}: {reason}")
        self.location = location
        self.reason = reason


class StoreClosedError(StoreError):
    def __init__(self) -> None:
        super().__init__("the event store is closed")


class StoreUnavailableError(StoreError):
    """The database could not be reached or failed mid-operation."""

    retryable = True

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"{backend} store unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class StoreInternalError(StoreUnavailableError):
    """An unexpected exception inside ledgerflow's own store adapter: a defect of
    ledgerflow, not of the database or the caller's input. The append it broke may
    or may not be stored, as after an outage, and is handled as one (retrying it
    with the same event ids finds out); the store's log has the traceback, and the
    HTTP API answers 500 with an incident id rather than 503."""

    def __init__(self, backend: str, error: BaseException) -> None:
        reason = (
            f"{type(error).__name__}: {error} (a defect of ledgerflow; the store's log has "
            "the traceback); the append may or may not be stored"
        )
        StoreError.__init__(self, f"{backend} store: internal error: {reason}")
        self.backend = backend
        self.reason = reason
        self.error_type = type(error).__name__


class StoreCorruptError(StoreError):
    """The database's files are damaged (a page or an index that does not read
    back): not a state to retry, nor tampering the hash chain can describe. Restore
    from a backup; ``ledgerflow audit verify`` exits 3."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"the database at {location} is corrupt: {reason}")
        self.location = location
        self.reason = reason


class StaleReadError(StoreError):
    """A read-model row an inbox handler read was changed (by another process of the
    same consumer) before the handler's writes could commit: they were made from the
    old row and would overwrite that update. Nothing was written; the message is
    handled again with fresh reads."""

    retryable = True

    def __init__(self, consumer: str, table: str, key: object) -> None:
        super().__init__(
            f"consumer {consumer!r}: row {key!r} of {table!r} changed after the handler read it"
        )
        self.consumer = consumer
        self.table = table
        self.key = key


class WorkflowError(LedgerflowError):
    """Something about a durable workflow or its instance."""


class WorkflowDefinitionError(WorkflowError):
    """A workflow or step is defined in a way ledgerflow cannot run durably."""


class UnknownWorkflowError(WorkflowError):
    def __init__(self, name: str, version: int | None = None) -> None:
        which = name if version is None else f"{name} v{version}"
        super().__init__(f"no workflow {which!r} is registered with this engine")
        self.name = name
        self.version = version


class WorkflowNotFoundError(WorkflowError):
    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"no workflow instance {workflow_id!r}")
        self.workflow_id = workflow_id


class WorkflowInputError(WorkflowError):
    def __init__(self, workflow: str, reason: str) -> None:
        super().__init__(f"invalid input for workflow {workflow!r}: {reason}")
        self.workflow = workflow
        self.reason = reason


class SignalInputError(WorkflowInputError):
    """A signal's payload does not fit the type the instance waits for (or has no
    JSON form); nothing was recorded."""

    def __init__(self, workflow_id: str, signal: str, reason: str) -> None:
        WorkflowError.__init__(
            self, f"signal {signal!r} to workflow {workflow_id!r} refused: {reason}"
        )
        self.workflow = workflow_id
        self.workflow_id = workflow_id
        self.signal = signal
        self.reason = reason


class EventInputError(WorkflowInputError):
    """An event sent to an instance of a state machine was refused before anything
    was recorded: a name or payload that does not fit the machine, or an instance
    that is not a state machine's."""

    def __init__(self, event: str, reason: str, workflow_id: str | None = None) -> None:
        to = f" to instance {workflow_id!r}" if workflow_id else ""
        WorkflowError.__init__(self, f"event {event!r}{to} refused: {reason}")
        self.workflow = workflow_id or ""
        self.workflow_id = workflow_id
        self.event = event
        self.reason = reason


class WorkflowFinishedError(WorkflowError):
    def __init__(self, workflow_id: str, status: str, action: str) -> None:
        super().__init__(f"cannot {action} workflow {workflow_id!r}: it is already {status}")
        self.workflow_id = workflow_id
        self.status = status
        self.action = action


class WorkflowAlreadyStartedError(WorkflowError):
    """``start`` with an id an instance already has, but another workflow or input:
    starting is idempotent only for the very same start."""

    def __init__(self, workflow_id: str, reason: str) -> None:
        super().__init__(f"workflow id {workflow_id!r} is already used: {reason}")
        self.workflow_id = workflow_id
        self.reason = reason


class UnrecordableValueError(WorkflowError):
    """A value the workflow must record (a step's result, the return value) has no
    JSON form, or does not fit the type declared for it (it could never be read
    back). The instance is parked as ``stuck`` until code that returns a fitting
    value is deployed; nothing is compensated, since nothing failed."""

    def __init__(self, workflow_id: str, what: str, value: object, reason: str) -> None:
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:200] + "..."
        super().__init__(
            f"workflow {workflow_id!r}: {what} cannot be recorded: a "
            f"{type(value).__qualname__} ({shown}): {reason}"
        )
        self.workflow_id = workflow_id
        self.what = what
        self.type_name = type(value).__qualname__
        self.reason = reason


class RecordedValueError(WorkflowError):
    """A recorded value (a step result, a signal, the input) no longer converts to
    the type the code now asks for: the instance is parked as ``stuck``."""

    def __init__(self, workflow_id: str, what: str, wanted: object, reason: str) -> None:
        name = getattr(wanted, "__qualname__", None) or repr(wanted)
        super().__init__(
            f"workflow {workflow_id!r}: the recorded {what} does not fit {name}: {reason}"
        )
        self.workflow_id = workflow_id
        self.what = what
        self.reason = reason


class ResultTooLargeError(WorkflowError):
    """A step result or workflow return value is larger than one event may be.

    Keep large payloads outside the ledger (a blob store, a file) and return a
    reference to them."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {size} bytes encoded, over the limit of {limit} bytes per event; "
            "store large payloads elsewhere and return a reference"
        )
        self.what = what
        self.size = size
        self.limit = limit


class StepCancelledError(WorkflowError):
    """Raised by ``current_step().raise_if_cancelled()`` in a step attempt that timed
    out: the engine has given up on it and will not start another attempt until
    this one returns."""


class StepTimeoutError(WorkflowError, TimeoutError):
    """A step attempt took longer than its timeout (start-to-close, the step's whole
    schedule-to-close budget, or its heartbeat interval). Retryable: the next attempt
    may be quicker. Also a ``TimeoutError``, so ``except TimeoutError`` catches it."""

    retryable = True

    def __init__(self, step: str, attempt: int, limit: str, seconds: float) -> None:
        super().__init__(
            f"attempt {attempt} of step {step!r} took longer than {limit} ({seconds}s)"
        )
        self.step = step
        self.attempt = attempt
        self.limit = limit
        self.seconds = seconds


class NonDeterminismError(WorkflowError):
    """Replaying the recorded history with the current code took another path.

    ``seq`` is the position of the first mismatching command in the workflow's
    sequence of commands; ``recorded`` and ``attempted`` describe each side
    (for example ``"step 'charge_card'"``).
    """

    def __init__(
        self,
        workflow_id: str,
        seq: int,
        recorded: str,
        attempted: str,
        location: str | None = None,
    ) -> None:
        super().__init__(
            f"workflow {workflow_id!r} diverged from its history at command {seq}: "
            f"recorded {recorded}, the code attempted {attempted}"
        )
        self.workflow_id = workflow_id
        self.seq = seq
        self.recorded = recorded
        self.attempted = attempted
        self.location = location
        """``file:line`` in the workflow's code where the attempt was made (where the
        body ended, if it attempted nothing), when known."""


class WorkflowFailedError(WorkflowError):
    """The instance ended without a result: failed, compensated, cancelled..."""

    def __init__(self, workflow_id: str, status: str, error_type: str, message: str) -> None:
        super().__init__(f"workflow {workflow_id!r} ended {status}: {error_type}: {message}")
        self.workflow_id = workflow_id
        self.status = status
        self.error_type = error_type
        self.message = message


class StepFailedError(WorkflowError):
    """A step failed after its retries; raised where the workflow awaited it.

    ``error_type`` is the class name of the step's last exception: the same on
    replay as when it happened, so workflow code can branch on it.
    """

    def __init__(self, step: str, error_type: str, message: str) -> None:
        super().__init__(f"step {step!r} failed: {error_type}: {message}")
        self.step = step
        self.error_type = error_type
        self.message = message


class StepNotParkedError(WorkflowError):
    """An operator action found no step to act on (or several: name one with
    ``seq``): retry, skip and compensate act on a step parked after its attempts
    (retry also on one waiting out a long backoff)."""

    def __init__(self, workflow_id: str, action: str, status: str, candidates: list[int]) -> None:
        if candidates:
            which = f"several steps wait ({', '.join(map(str, candidates))}): pass seq="
        else:
            which = f"no step waits for an operator (status {status})"
        super().__init__(f"cannot {action} a step of workflow {workflow_id!r}: {which}")
        self.workflow_id = workflow_id
        self.action = action
        self.status = status
        self.candidates = candidates


class WorkflowNotStuckError(WorkflowError):
    """``resume`` found the instance not parked as stuck (it runs, waits, or a
    worker took it up already)."""

    def __init__(self, workflow_id: str, status: str) -> None:
        super().__init__(f"cannot resume workflow {workflow_id!r}: it is {status}, not stuck")
        self.workflow_id = workflow_id
        self.status = status


class ChildWorkflowError(WorkflowError):
    def __init__(self, child_id: str, status: str, error_type: str, message: str) -> None:
        super().__init__(f"child workflow {child_id!r} ended {status}: {error_type}: {message}")
        self.child_id = child_id
        self.status = status
        self.error_type = error_type
        self.message = message


class InvalidTransition(WorkflowError):
    """An event a state-machine instance does not accept where it is (no transition
    on it from its states, or no guard of one holds): nothing was recorded.
    ``accepts`` lists the events it takes there."""

    def __init__(
        self, instance_id: str, state: str, event: str, accepts: tuple[str, ...], reason: str = ""
    ) -> None:
        listed = ", ".join(repr(e) for e in accepts) if accepts else "none"
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"instance {instance_id!r} in state {state!r} does not accept {event!r}{why}; "
            f"it accepts: {listed}"
        )
        self.instance_id = instance_id
        self.state = state
        self.event = event
        self.accepts = accepts
        self.reason = reason


class InstanceBusyError(WorkflowError):
    """An event could not be sent in time: the state-machine instance was still
    running its start or an earlier event's transition, and an event is only
    checked (and recorded) against the state it will apply to. Nothing was
    recorded: send it again."""

    retryable = True

    def __init__(self, instance_id: str, event: str, seconds: float) -> None:
        super().__init__(
            f"{event!r} was not sent to instance {instance_id!r}: it was still running "
            f"its start or an earlier event after {seconds:g}s; nothing was recorded, "
            "send it again"
        )
        self.instance_id = instance_id
        self.event = event


class TransitionFailedError(WorkflowError):
    """An activity of the transition an event fired failed for good: the instance is
    in ``state`` now (its failure states, compensated, or where it was)."""

    def __init__(
        self,
        instance_id: str,
        event: str,
        transition: str,
        state: str,
        error_type: str,
        message: str,
        compensated: bool,
    ) -> None:
        then = "compensated; now in" if compensated else "still in"
        super().__init__(
            f"instance {instance_id!r}: {transition} failed ({error_type}: {message}); "
            f"{then} {state!r}"
        )
        self.instance_id = instance_id
        self.event = event
        self.transition = transition
        self.state = state
        self.error_type = error_type
        self.message = message
        self.compensated = compensated


class MigrationError(WorkflowError):
    """A migration of a running state-machine instance to another version of its
    definition was refused (``problems`` says why); nothing was recorded."""

    def __init__(self, instance_id: str, to_version: int, problems: list[str]) -> None:
        listed = "; ".join(problems)
        super().__init__(f"instance {instance_id!r} cannot move to v{to_version}: {listed}")
        self.instance_id = instance_id
        self.to_version = to_version
        self.problems = problems


class WorkflowCancelled(BaseException):
    """Raised inside a cancelled workflow at its next await; compensations follow."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "cancelled")
        self.reason = reason


class ProjectionError(LedgerflowError):
    """Projections: an operator action that does not fit the projection's state."""


class ProjectionNotFoundError(ProjectionError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no projection {name!r} in this ledger (has a runner started it?)")
        self.name = name


class ProjectionHeldError(ProjectionError):
    """Another runner holds the projection's lease (a live one runs it, or one that
    died holds it until its lease runs out): try again later."""

    retryable = True

    def __init__(self, name: str, owner: str | None, until: datetime | None) -> None:
        when = f" until {until:%Y-%m-%d %H:%M:%S} UTC" if until is not None else ""
        super().__init__(
            f"projection {name!r} is held by another runner ({owner!r}{when}): it runs "
            "it, or it died and its lease runs out then; try again later"
        )
        self.name = name
        self.owner = owner
        self.until = until


class ProjectionNotFailedError(ProjectionError):
    """Retry or skip of a projection that is not stopped at a failed event (or not at
    the one named)."""

    def __init__(self, name: str, detail: str = "it is not stopped at a failed event") -> None:
        super().__init__(f"projection {name!r}: {detail}")
        self.name = name


class BusUnavailableError(LedgerflowError):
    """The event bus's broker could not be reached, or did not acknowledge in time:
    retry later (what was published may be stored; publishing it again is safe)."""

    retryable = True

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"event bus {where}: {detail}")
        self.where = where
        self.detail = detail


class ResilienceError(LedgerflowError):
    """Something about a named resilience policy."""


class InvalidPolicyError(ResilienceError):
    """A policy document (or a change to one) is not valid; nothing was recorded and
    the version in force stays. ``field`` is the dotted path of the first wrong field
    (``retry.max_interval``), or ``""`` for the document as a whole."""

    def __init__(self, policy: str, field: str, problem: str) -> None:
        where = f" field {field!r}" if field else ""
        super().__init__(f"policy {policy!r}{where}: {problem}")
        self.policy = policy
        self.field = field
        self.problem = problem


class PolicyNotFoundError(ResilienceError):
    """No policy of that name was ever set (in the ledger, or declared to the engine).
    Retryable: a step that names one not set yet (code deployed before its policy)
    tries again under its retry rules, and picks the policy up once it is set."""

    retryable = True

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no policy named {name!r}: declare it with Engine(policies={{...}}) or set it "
            f"with `ledgerflow policy set {name} ...`"
        )
        self.name = name


class CircuitOpenError(ResilienceError):
    """A call to ``resource`` was refused without being made: its circuit breaker is
    open (or half-open with its probes taken) until ``until_us`` (µs on the
    database's clock). Retryable, after that."""

    retryable = True

    def __init__(self, resource: str, state: str, until_us: int, why: str = "") -> None:
        try:
            until = from_micros(until_us).isoformat()
        except (OverflowError, ValueError):
            until = str(until_us)
        super().__init__(
            f"circuit {resource!r} is {state.replace('_', '-')}{why}; refused until {until}"
        )
        self.resource = resource
        self.state = state
        self.until_us = until_us


class BulkheadFullError(ResilienceError):
    """A call to ``resource`` was refused: its ``max_concurrent`` permits stayed taken
    for ``max_wait`` seconds. Retryable."""

    retryable = True

    def __init__(self, resource: str, max_concurrent: int, max_wait: float) -> None:
        super().__init__(
            f"bulkhead {resource!r} full: {max_concurrent} calls in progress for {max_wait:g}s"
        )
        self.resource = resource
        self.max_concurrent = max_concurrent
        self.max_wait = max_wait


class AuditError(LedgerflowError):
    """Checkpointing, witnessing or proving the ledger's Merkle tree failed."""


class CheckpointMismatchError(AuditError):
    """The ledger no longer produces a tree head it checkpointed or exported: its
    events (or its checkpoints) were changed, removed or re-chained since. Not
    retryable: run ``ledgerflow audit verify`` to see what changed."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


class WitnessError(AuditError):
    """A witness of tree heads could not be read or written."""

    def __init__(self, witness: str, reason: str) -> None:
        super().__init__(f"witness {witness}: {reason}")
        self.witness = witness
        self.reason = reason


class WitnessRefusedError(WitnessError):
    """The witness refused a tree head that does not extend the last one it holds
    (another root for the same size, a failed consistency proof, a wrong key)."""


class PersonalDataErasedError(LedgerflowError):
    """Personal data this needs was erased (its subject's key destroyed): converting
    what is left into a typed value would only put placeholders where the data was.
    Not retryable."""

    def __init__(self, what: str, fields: list[str]) -> None:
        super().__init__(
            f"{what}: the personal data at {', '.join(fields)} was erased (its subject's "
            "key was destroyed); it can no longer be read"
        )
        self.what = what
        self.fields = fields
