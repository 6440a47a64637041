"""One pass of a workflow instance: replay its history through the code, then act.

The workflow function runs from the top on every pass. Each command it issues gets
the next ``seq``; if the history holds that command's outcome, the outcome is
returned (and the command checked against the record: a different kind or name
parks the instance with a ``NonDeterminismError``). At the first command without an
outcome the pass acts for real: it runs the step, records the timer, takes the
signal... and makes the outcome durable before the code sees it. A command that must
wait (a timer not yet due, a signal not yet sent, a running child) ends the pass with
``Suspend``: the instance costs nothing but rows until it is due again, and the body
is dropped, or kept by the engine to go on from its wait (``_Run``, ADR 026).

How a pass can end, and who decides:

- the code returns or raises: the workflow's own outcome (compensations on failure);
- ``Suspend``: it waits; ``Restart``: another runner recorded under us, replay again;
- ``Abandon``: the store could not be reached (or closed). Infrastructure never
  decides a workflow's outcome: the engine drops the pass and retries it, with
  backoff, from the last recorded event;
- ``Park``: the code cannot go on with this history (non-determinism, a value that
  cannot be recorded or no longer fits its type): the instance is parked as
  ``stuck`` until fitting code is deployed.

The last three are ``BaseException``s so that ``except Exception`` in workflow code
cannot swallow them, and a pass ends only once every command it started has settled
(``asyncio.gather`` branches included), so no step result is dropped and no step
runs twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import sys
import traceback
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .. import metrics, tracing
from ..errors import (
    BulkheadFullError,
    CircuitOpenError,
    ConcurrencyError,
    EventError,
    LeaseLostError,
    NonDeterminismError,
    PersonalDataErasedError,
    PolicyNotFoundError,
    RecordedValueError,
    ResultTooLargeError,
    StepFailedError,
    StepTimeoutError,
    StoreClosedError,
    StoreReadOnlyError,
    StoreUnavailableError,
    UnrecordableValueError,
    WorkflowCancelled,
)
from ..resilience.guards import Admission, TokenWait, guarded
from ..retry import RetryPolicy, as_seconds
from ..store.runtime import InstanceRow, PutInstance, PutTask, TaskRow
from .codec import CodecError, check_fits, from_builtins, json_schema, to_builtins
from .context import WorkflowContext
from .definition import WorkflowDefinition, return_type, step_options
from .history import (
    Finished,
    History,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    StepParked,
    StepRetried,
    StepScheduled,
    WorkflowStatus,
    error_message,
)
from .host import Abandon, BodyEnded, Park, PassResult, Relinquish, Restart, RunHost, Suspend
from .rules import (
    INLINE_BACKOFF_S,
    StepRules,
    attempt_limits,
    inline_rules,
    named_rules,
    next_attempt_at,
)
from .saga import Compensation, Saga
from .steps import DEFAULT_STEP_RETRY, Attempts, nothing
from .tasks import task_payload
from .waits import _END, _RELOOK, Waits, _Relook

if TYPE_CHECKING:
    from ..resilience.book import PolicyVersion
    from ..store.runtime import RuntimeWrite

__all__ = ["Abandon", "Park", "PassResult", "Restart", "Suspend"]

log = logging.getLogger("ledgerflow.engine")

T = TypeVar("T")


_RETURNED_NOTHING: Any = object()


class _Pass(Waits, Saga):
    """The mechanics behind one pass (commands, steps, records, compensations),
    whatever runs them: a workflow's code (``_Run``) or a state machine's
    transitions (``statemachine.runtime.MachineRun``)."""

    unreadable = False
    """The code failed on personal data erased from its history (it cannot reach
    the commands recorded after it)."""
    raised_at: str | None = None
    """Where the body raised what failed it (``file:line``), for a divergence."""

    def __init__(self, host: RunHost, history: History, *, query: bool = False) -> None:
        self.host = host
        self.history = history
        self.query = query
        self.seq = 0
        self.buffer: list[Any] = []
        """Clock readings and patch markers: recorded with the next append, before
        anything acts on them."""
        self.patches: dict[str, bool] = {}
        """``ctx.patched`` answers of this pass, by change id."""
        self.retyped_waits: list[tuple[int, str, str | None]] = []
        """Signal waits (seq, name, where) recorded with a type other than the code's:
        what the replay gate reports (``waits.signal``)."""
        self.exposed: Any = None
        self.compensations: list[Compensation] = []
        self.compensating = False
        self.shield = 0
        self.appending = asyncio.Lock()
        self.acting = _Acting()
        """Commands acting for real: the pass ends only when none is left."""
        self.cancel_told = False
        """This pass raised the cancellation into the body (``_live``)."""
        self.taking: set[int] = set()
        """Versions of the signals this pass's waits took or set aside."""
        self.news = 0
        """How many times news from outside (signals, a cancel, children's ends) was
        folded into the history during this pass."""
        self.waits_seen: list[int] = []
        """``news`` when each of ``waits`` looked."""
        self.waits: list[Suspend] = []
        """What the body's waiting commands wait for (timers, signals, children...),
        in the order they began to: the pass ends with all of them."""
        self.parked: asyncio.Future[object] | None = None
        """Done once the body can go no further: every waiting command then raises
        its ``Suspend`` (see ``_hold``), or, in a kept run resumed, looks again."""
        self.trace_context: Any = None
        """A resumed kept run's pass: the trace context its held commands rejoin."""
        self.reuse_seq: int | None = None
        """The seq the next command takes instead of a new one: a held command of a
        kept run looking again (``_relooking``)."""
        self.still: asyncio.Future[None] | None = None
        """Kept runs only: done once the body can go no further this pass."""
        self.quiet_rounds = 0
        self.quiet_mark: tuple[int, int, int] | None = None
        self.quiet_check: asyncio.Handle | None = None
        self.ended = False
        self.fault: BaseException | None = None
        self.attempts = Attempts(history.workflow_id, host.step_threads)
        self.on_durable: list[Callable[[], None]] = []
        """Releases of step threads whose results are in ``buffer``."""
        self.held: list[Callable[[], None]] = []
        self.flush_scheduled = False
        self.flushing: set[asyncio.Future[None]] | None = None
        self._rng: random.Random | None = None
        self.appended = False
        """This pass has appended: what it meets now, it meets for the first time."""

    @property
    def rng(self) -> random.Random:
        """The workflow's random stream, seeded by its id (made on first use: most
        passes never draw from it)."""
        if self._rng is None:
            seed = hashlib.sha256(self.history.workflow_id.encode()).digest()
            self._rng = random.Random(int.from_bytes(seed[:8], "big"))
        return self._rng

    async def _settle(self) -> None:
        """Let every command the body started settle; the body takes no new ones."""
        self.ended = True
        if self.parked is not None and not self.parked.done():
            self.parked.set_result(_END)  # held branches end (the body is over)
        await self.acting.none_left()
        if self.fault is not None:
            raise self.fault

    def _finish(self, finished: Finished) -> PassResult:
        return PassResult(finished=finished, exposed=self.exposed, buffered=self._take_buffer())

    def _take_buffer(self) -> list[Any]:
        """The buffered events, for the host to append with the pass's end; the
        threads they hold are released by ``released()`` once that is done."""
        taken, self.buffer = self.buffer, []
        self.held.extend(self.on_durable)
        self.on_durable = []
        return taken

    def unrecorded(self) -> list[Any]:
        return self._take_buffer()

    def relooked(self, seq: int) -> None:
        """A held command of a resumed kept run looks again: at ``seq``, in the
        trace of the pass that resumed it (not the one it waited in)."""
        self.reuse_seq = seq
        if self.trace_context is not None:
            tracing.rejoin(self.trace_context)

    # Kept runs (``_Run``): a pass of another kind is never kept.
    def kept(self) -> None:
        pass

    def resumable(self, history: History) -> bool:
        return False

    def resume(self) -> None:
        raise AssertionError("only a kept run is resumed")

    def drop(self) -> None:
        pass

    def released(self) -> None:
        """The pass is over: the host appended (or gave up on) what it was handed,
        and results never appended are lost with the pass; their threads go free."""
        held, self.held, self.on_durable = [*self.held, *self.on_durable], [], []
        for release in held:
            release()

    def _flush_soon(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_if_left)

    def _flush_if_left(self) -> None:
        self.flush_scheduled = False
        if self.on_durable and not self.ended:
            task = asyncio.ensure_future(self._flush())
            if self.flushing is None:
                self.flushing = set()  # the tasks' strong references, while they run
            self.flushing.add(task)
            task.add_done_callback(self.flushing.discard)

    async def _flush(self) -> None:
        # A fault is remembered by the pass: the body's next command raises it.
        with self.acting, contextlib.suppress(Park, Abandon, Restart, Relinquish):
            await self.record([])

    async def _hold(self, suspend: Suspend) -> NoReturn:
        """A command of the body must wait: hold its branch until the body can go
        no further, then raise ``suspend``.

        Raised at once, the ``Suspend`` of the first branch to wait ended an
        ``asyncio.gather`` before the others had run: a sibling's failure went
        unseen until that branch's wait was over (a failed child left the others
        running, uncancelled), and the other branches' waits were not recorded (a
        second timer started a pass late). Held, every branch runs as far as it
        can; a failure reaches the body first, and the pass ends with every wait.
        Outside the body (a query, the saga's own waits), or once the pass is
        over, it raises at once."""
        parked = self.parked
        if self.query or self.ended or self.compensating or (parked and parked.done()):
            raise suspend
        self.waits.append(suspend)
        self.waits_seen.append(self.news)
        if parked is None:
            parked = self.parked = asyncio.get_running_loop().create_future()
            self.acting.on_idle = self._look_for_quiet
        self._look_for_quiet()
        if await parked is _RELOOK:
            raise _Relook()
        raise suspend

    def _look_for_quiet(self) -> None:
        if self.quiet_check is None and self.parked is not None and not self.parked.done():
            self.quiet_rounds = 0
            self.quiet_check = asyncio.get_running_loop().call_soon(self._check_quiet)

    def _check_quiet(self) -> None:
        """Release the parked branches once nothing has moved for a few turns of
        the loop: no command acting, none issued, no new wait. Workflow code awaits
        only commands, so a branch not parked or acting is runnable and moves
        within a turn or two (a gather's results reach its caller in three)."""
        self.quiet_check = None
        parked = self.parked
        if parked is None or parked.done() or self.acting.count:
            return  # acting: its end looks again (``_Acting.on_idle``)
        mark = (self.seq, len(self.waits), self.history.version)
        if mark != self.quiet_mark:
            self.quiet_mark, self.quiet_rounds = mark, 0
        else:
            self.quiet_rounds += 1
        if self.quiet_rounds >= _QUIET_ROUNDS:
            if self.still is not None:
                # A kept run: the pass ends here with the body alive, every branch
                # still held (``_Run.execute``).
                if not self.still.done():
                    self.still.set_result(None)
                return
            parked.set_result(_END)
            return
        self.quiet_check = asyncio.get_running_loop().call_soon(self._check_quiet)

    def _suspended(self, raised: Suspend) -> Suspend:
        """The pass's end when its body waits: every parked command's events, in
        order, and the earliest wake-up among them."""
        waits = self.waits
        if not waits or (len(waits) == 1 and waits[0] is raised):
            suspended = raised
        else:
            events = [event for wait in waits for event in wait.events]
            dues = [wait.due_at_us for wait in waits if wait.due_at_us is not None]
            child = next((wait.child_id for wait in waits if wait.child_id is not None), None)
            suspended = Suspend(events, min(dues) if dues else None, child_id=child)
        # A wait that looked before news was folded in (another branch's append met
        # a signal) may have missed it: the engine runs the pass again.
        suspended.stale = any(seen < self.news for seen in self.waits_seen)
        return suspended

    def body_location(self) -> str | None:
        """Where the workflow's code is (a diverging run that ended early)."""
        return None

    def caller(self) -> str | None:
        """``file:line`` of the workflow code issuing the command now; where its body
        raised, or its definition, for commands the pass issues itself (the saga's
        compensations). Only on a divergence: walking frames costs."""
        return _caller_outside_ledgerflow() or self.raised_at or self.body_location()

    def _raise(self, stop: BaseException) -> BaseException:
        """Remember the first fault of the pass: every later command re-raises it,
        even in code that caught it (``gather(..., return_exceptions=True)``)."""
        if self.fault is None:
            self.fault = stop
        return self.fault

    def _check_finished_path(self, failure: tuple[str, str] | None = None) -> None:
        """Park if the history goes on past where the body ended. ``failure``: the
        body ended raising that (type, message), which the divergence names: the
        likeliest cause is a bug in the new code, not a removed command."""
        later = self.history.recorded(self.seq + 1)
        if later:
            attempted = (
                "no further command (the workflow ended)"
                if failure is None
                else f"no further command: the workflow raised {failure[0]}: {failure[1]}"
            )
            raise self._raise(
                Park(
                    NonDeterminismError(
                        self.history.workflow_id,
                        self.seq + 1,
                        f"{later[0].kind} {later[0].name!r}",
                        attempted,
                        self.raised_at or self.body_location(),
                    )
                )
            )

    # -- values in and out of history ------------------------------------------------

    def _encode(self, value: Any, what: str) -> Any:
        try:
            return to_builtins(value)
        except CodecError as exc:
            error = UnrecordableValueError(self.history.workflow_id, what, value, str(exc))
            raise self._raise(Park(error)) from None

    def _check_fits(self, encoded: Any, value: Any, wanted: Any, what: str, whose: str) -> None:
        """Park, recording nothing, if ``encoded`` would not read back as ``wanted``:
        recorded, it would stop every replay there (stuck for good, whatever code is
        deployed); parked, fixed code runs again on resume."""
        try:
            check_fits(encoded, wanted, whose)
        except CodecError as exc:
            error = UnrecordableValueError(self.history.workflow_id, what, value, str(exc))
            raise self._raise(Park(error)) from None

    def _decode(self, value: Any, type_: Any, what: str) -> Any:
        try:
            return from_builtins(value, type_)
        except CodecError as exc:
            error = RecordedValueError(self.history.workflow_id, what, type_, str(exc))
            raise self._raise(Park(error)) from None
        except PersonalDataErasedError:
            # Raised where the code asked for the value: the workflow fails, naming
            # the fields (no code could fit data that is gone: parked, it stayed
            # stuck for good, neither resumable nor cancellable).
            raise

    def _oversize(self, event: Any, payload: Any, what: str) -> ResultTooLargeError | None:
        """Whether ``event`` (carrying the encoded ``payload``) is too large to record."""
        limit = self.host.max_event_bytes
        if limit is None:
            return None
        budget = limit - _EVENT_OVERHEAD_BOUND - 6 * len(getattr(event, "name", ""))
        if _surely_within(payload, budget):
            return None
        size = self.host.encoded_size(event)
        if size <= limit:
            return None
        return ResultTooLargeError(what, size, limit)

    # -- commands -------------------------------------------------------------------

    def _command(self, kind: str, name: str, *, own: bool = False) -> tuple[int, list[Any] | None]:
        if self.fault is not None:
            raise self.fault
        if self.ended and not own:
            raise BodyEnded()
        if self.reuse_seq is not None:
            seq, self.reuse_seq = self.reuse_seq, None  # a held command looking again
        else:
            self.seq += 1
            seq = self.seq
        recorded = self.history.recorded(seq)
        if recorded is not None and (recorded[0].kind != kind or recorded[0].name != name):
            raise self._raise(
                Park(
                    NonDeterminismError(
                        self.history.workflow_id,
                        seq,
                        f"{recorded[0].kind} {recorded[0].name!r}",
                        f"{kind} {name!r}",
                        self.caller(),
                    )
                )
            )
        return seq, recorded

    def _cancelling(self) -> bool:
        """Whether a cancellation would end the body at its next command."""
        return self.history.cancel is not None and not self.compensating and not self.shield

    def in_doubt(self, recorded: list[Any] | None) -> bool:
        """Whether the step this pass is about to start (``recorded``: what its
        earlier attempts left) may have run already: the instance was cancelled
        after its latest command was recorded (so the pass that recorded it did not
        see the cancel and went on into this step), this pass has appended nothing,
        and nothing it found new lies between (a clock reading, a patch marker);
        unless that command was this step's failed attempt whose retry is not due
        yet (the pass was waiting out the backoff: no body ran), or this pass told
        the body of the cancel already (it stopped at a wait, the body caught it and
        went on: the previous pass stopped at that wait too). Such a step is run,
        not cancelled: it may have acted (its pass was lost), and then only its
        recorded result gets it compensated. Steps are at least once under their
        idempotency key anyway."""
        last = recorded[-1] if recorded else None
        if isinstance(last, StepAttemptFailed) and (last.retry_at_us or 0) > self.host.now_us():
            return False
        return (
            not self.query
            and not self.appended
            and not self.buffer
            and not self.cancel_told
            and self._cancelling()
            and (self.history.cancelled_after_last_command() or self._first_in_doubt())
        )

    def _first_in_doubt(self) -> bool:
        """The first command, with no command recorded before the cancel to say a
        pass went on into it: an earlier lease on the instance says a pass may have
        (lost with its engine mid-step: the effect of a first step stood, never
        compensated, and the instance ended ``cancelled``). An instance cancelled
        before any engine took it runs no step."""
        return not self.history.commands and self.host.claimed_before(self.history.workflow_id)

    def _live(self) -> None:
        """About to act on a command without a recorded outcome."""
        if self.query:
            raise Suspend()
        if self.history.cancel is not None and not self.compensating and not self.shield:
            # Told: a step the body reaches after catching it did not follow the
            # previous pass into it (that pass stopped here), so it is not in doubt.
            self.cancel_told = True
            raise WorkflowCancelled(self.history.cancel.reason)

    async def _host(self, call: Awaitable[T]) -> T:
        """Await a host call; a store fault abandons the pass."""
        try:
            with self.acting:
                return await call
        except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
            raise self._raise(Abandon(exc)) from exc

    async def record(self, events: list[Any], runtime: tuple[RuntimeWrite, ...] = ()) -> None:
        """Append ``events`` (after anything buffered) at the history's version.

        Signals, cancellations and children's ends appended meanwhile are folded in
        and the append retried; commands recorded by someone else mean another
        runner: Restart. Store faults abandon the pass. (One coroutine: every step
        passes through here, and each frame alive costs the garbage collector.)
        """
        async with self.appending:  # concurrent commands of one run append in turn
            batch = [*self.buffer, *events]
            self.buffer = []
            waiting, self.on_durable = self.on_durable, []
            try:
                while batch:
                    try:
                        result = await self.host.append(self.history, batch, runtime)
                    except ConcurrencyError:
                        newer = await self.host.read_after(self.history)
                        # Nothing new to see (yet), or commands of another runner:
                        # replay from the record rather than append on top of it.
                        if not newer or any(not self.history.from_outside(e.data) for e in newer):
                            raise self._raise(Restart()) from None
                        self.history.extend(newer)
                        self.news += 1
                        continue
                    self.appended = True
                    before = self.history.version
                    first = result.version - len(batch) + 1
                    for offset, event in enumerate(batch):
                        self.history.add(first + offset, event)
                    await self.host.appended(self.history, before)
                    break
            except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
                raise self._raise(Abandon(exc)) from exc
            except LeaseLostError as exc:
                metrics.lease_lost("workflow")
                raise self._raise(Relinquish(exc)) from exc
            except EventError as exc:  # an event the engine built does not fit the store
                error = UnrecordableValueError(
                    self.history.workflow_id, "an event of this pass", batch[-1], str(exc)
                )
                raise self._raise(Park(error)) from exc
            finally:
                for release in waiting:
                    release()

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        compensate: Callable[..., Any] | None,
        retry: RetryPolicy | None,
        timeout: timedelta | float | None,
        queue: str | None = None,
        policy: str | None = None,
    ) -> Any:
        while True:
            seq, recorded = self._command("step", name)
            try:
                wanted = return_type(fn)
                # A step's end, if recorded, is its last event (after any failed attempts).
                outcome = recorded[-1] if recorded else None
                if isinstance(outcome, StepFailed):
                    raise StepFailedError(name, outcome.error_type, outcome.message)
                if isinstance(outcome, StepDone):
                    try:  # every replayed step passes here: no message made unless needed
                        value = from_builtins(outcome.result, wanted)
                    except CodecError:
                        value = self._decode(outcome.result, wanted, _result_of(name, seq))
                elif isinstance(outcome, StepParked):
                    # Waiting for an operator (retry, skip, give up); a cancellation still
                    # gets through.
                    self._live()
                    await self._hold(Suspend([], None))
                elif queue is not None or (recorded and isinstance(recorded[0], StepScheduled)):
                    # Sent to a task queue (now, or by an earlier pass: the record decides,
                    # whatever the code says today): a worker of the queue runs it.
                    value = await self._remote_step(
                        seq, name, fn, args, retry, timeout, queue, recorded, policy
                    )
                    compensate_queue = step_options(compensate).queue if compensate else None
                    if compensate is not None:
                        self.compensations.append(
                            Compensation(
                                seq,
                                name,
                                compensate,
                                args,
                                value,
                                compensate_queue or _queue_of(recorded),
                            )
                        )
                    return value
                else:
                    doubt = self.in_doubt(recorded)
                    if not doubt:
                        self._live()
                    try:
                        with self.acting:
                            value = await self._run_step(
                                seq, name, fn, args, retry, timeout, recorded, policy, doubt=doubt
                            )
                            try:
                                value = from_builtins(value, wanted)
                            except CodecError:
                                value = self._decode(value, wanted, _result_of(name, seq))
                            # Registered before the command settles: a pass that fails
                            # meanwhile waits for it, so a completed step's compensation is
                            # never lost.
                            if compensate is not None:
                                self.compensations.append(
                                    Compensation(seq, name, compensate, args, value)
                                )
                    except Suspend as waits:  # a durable backoff, a token wait, parked
                        await self._hold(waits)
                    return value
                if compensate is not None:
                    own = step_options(compensate).queue
                    queue_of = own or (_queue_of(recorded) if recorded else None)
                    self.compensations.append(
                        Compensation(seq, name, compensate, args, value, queue_of)
                    )
                return value
            except _Relook:
                # Held, in a kept run resumed: look again at this step, at its seq
                # (the try costs nothing until it catches; a wrapper, every step).
                self.relooked(seq)

    async def _remote_step(
        self,
        seq: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        retry: RetryPolicy | None,
        timeout: timedelta | float | None,
        queue: str | None,
        recorded: list[Any] | None,
        policy: str | None,
    ) -> Any:
        """A step run by a worker of its task queue: sent (with the command's record,
        in one append), then waited for like a child; its outcome arrives in this
        stream, appended by the task's runner with a nudge. Under a named policy the
        worker resolves it at each attempt. An operator's retry of a parked step
        sends it again."""
        again = bool(recorded) and isinstance(recorded[-1], StepRetried)  # type: ignore[index]
        if recorded and not again and self._cancelling():
            task_id = f"{self.history.workflow_id}/{seq}"
            if not await self._host(self.host.withdraw_task(task_id)):
                # A worker claimed it: it runs now, or ran in an attempt lost with
                # its worker and runs again once the lease runs out. Its outcome
                # comes, and a step that completes is compensated, as a step run
                # here would be. One never claimed is withdrawn (atomically with
                # any claim): it never runs.
                await self._hold(Suspend())
        self._live()
        if not recorded or again:
            queue = queue or _queue_of(recorded)
            assert queue is not None
            with self.acting:
                arguments = self._encode(list(args), f"the arguments of step {name!r}")
                payload = task_payload(
                    arguments,
                    {},
                    retry or DEFAULT_STEP_RETRY,
                    as_seconds(timeout),
                    name,
                    policy=policy,
                    code_retry=retry is not None,
                )
                row = self._task_row(seq, "step", name, queue, payload)
                await self.record([StepScheduled(seq=seq, name=name, queue=queue)], (PutTask(row),))
            recorded = self.history.recorded(seq)
        outcome = recorded[-1] if recorded else None
        if isinstance(outcome, StepFailed):
            raise StepFailedError(name, outcome.error_type, outcome.message)
        if isinstance(outcome, StepDone):
            wanted = return_type(fn)
            return self._decode(outcome.result, wanted, _result_of(name, seq))
        return await self._hold(Suspend())

    def _task_row(self, seq: int, kind: str, name: str, queue: str, payload: str) -> TaskRow:
        now = self.host.now_us()
        workflow_id = self.history.workflow_id
        return TaskRow(
            f"{workflow_id}/{seq}",
            workflow_id,
            seq,
            kind,
            name,
            queue,
            payload,
            now,
            created_at_us=now,
        )

    async def _run_step(
        self,
        seq: int,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        retry: RetryPolicy | None,
        timeout: timedelta | float | None,
        recorded: list[Any] | None,
        policy: str | None,
        *,
        doubt: bool = False,
    ) -> Any:
        """Attempts until one succeeds or the rules give up; the encoded result,
        recorded before it is returned. Each attempt runs under the rules in force
        when it starts (a policy changed meanwhile applies from the next attempt)."""
        # Clock readings the arguments may depend on are durable before the step acts.
        await self.record([])
        # That append may have folded in a cancellation (it lands as a conflict):
        # the step does not start after an accepted cancel (unless it may have
        # started before it: see in_doubt).
        if not doubt:
            self._live()
        # An operator's retry starts afresh: attempts and deadlines count from it.
        since = [i for i, e in enumerate(recorded or ()) if isinstance(e, StepRetried)]
        current = (recorded or [])[since[-1] + 1 :] if since else (recorded or [])
        failures = [e for e in current if isinstance(e, StepAttemptFailed)]
        attempt = 1 + sum(not f.refused for f in failures)
        first_at = failures[0].first_at_us if failures else None
        retry_at = failures[-1].retry_at_us if failures else None
        code_timeout = as_seconds(timeout)
        while True:
            if retry_at is not None:
                await self._backoff(retry_at)
            rules, found, missing = await self._rules(retry, code_timeout, policy)
            now = self.host.now_us()
            first_at = first_at if first_at is not None else now
            limits = attempt_limits(rules, first_at, now)
            failure: BaseException | None = missing
            spent = (
                _spent(rules, attempt, first_at, now)
                if missing is None and rules.on_exhausted == "fail"
                else ""
            )
            if spent:
                # The policy changed during the backoff (fewer attempts, a deadline
                # now past): the attempt it no longer allows does not start.
                last = (self.history.recorded(seq) or [None])[-1]
                error_type = getattr(last, "error_type", "StepFailedError")
                message = f"{getattr(last, 'message', '')} ({spent})".lstrip()
                await self.record(
                    [
                        StepFailed(
                            seq=seq,
                            name=name,
                            error_type=error_type,
                            message=message,
                            policy=rules.policy,
                            policy_version=rules.policy_version,
                        )
                    ]
                )
                raise StepFailedError(name, error_type, message)
            if failure is None and limits.timeout is not None and limits.timeout <= 0:
                failure = StepTimeoutError(name, attempt, limits.kind, limits.shown or 0.0)
            admission: Admission | None = None
            refusal: BaseException | None = None
            if failure is None and found is not None and guarded(found.policy):
                admission, refusal = await self._admit(found, seq, attempt)
            value: Any
            if failure is not None:
                ok, value, release = False, failure, nothing
            elif refusal is not None:
                ok, value, release = False, refusal, nothing
            else:
                await self.attempts.outlive(seq)
                if not doubt:
                    self._live()  # nor does a retry, after its backoff
                doubt = False  # the step in doubt gets its one attempt; retries do not
                ok, value, release = await self.attempts.run(seq, name, fn, args, attempt, limits)
            try:
                if ok:
                    held, release = release, nothing
                    return await self._record_result(
                        seq, name, value, held, rules, admission, found, return_type(fn)
                    )
                writes = self._outcome(admission, value)
                error_type, message = type(value).__name__, error_message(value)
                retry_at, why_not = self._retry_at(
                    rules, seq, attempt, first_at, value, refused=refusal is not None
                )
                if retry_at is None and rules.on_exhausted == "park" and rules.retryable(value):
                    schema = json_schema(return_type(fn))
                    await self._park(seq, name, attempt, value, rules, writes, schema)
                    await self._settle_guards(found, admission, value)
                    raise Suspend([], None)
                if retry_at is None:
                    failed = StepFailed(
                        seq=seq,
                        name=name,
                        error_type=error_type,
                        message=f"{message} ({why_not})" if why_not else message,
                        policy=rules.policy,
                        policy_version=rules.policy_version,
                    )
                    await self.record([failed], writes)
                    log.warning(
                        "workflow %s: step %r failed for good: %s: %s",
                        self.history.workflow_id,
                        name,
                        error_type,
                        failed.message,
                        extra={"workflow_id": self.history.workflow_id, "step": name},
                    )
                    await self._settle_guards(found, admission, value)
                    raise StepFailedError(name, error_type, failed.message) from value
                await self.record(
                    [
                        StepAttemptFailed(
                            seq=seq,
                            name=name,
                            attempt=attempt,
                            error_type=error_type,
                            message=message,
                            retry_at_us=retry_at,
                            first_at_us=first_at,
                            policy=rules.policy,
                            policy_version=rules.policy_version,
                            refused=refusal is not None,
                        )
                    ],
                    writes,
                )
                metrics.step_retry(name)
                await self._settle_guards(found, admission, value)
            finally:
                release()
            if refusal is None:
                attempt += 1

    async def _park(
        self,
        seq: int,
        name: str,
        attempt: int,
        error: BaseException,
        rules: StepRules,
        writes: tuple[RuntimeWrite, ...],
        result_schema: dict[str, Any] | None,
    ) -> None:
        """The step used up its attempts under a policy that parks: record it, and
        list the instance as needing attention until an operator acts."""
        started = self.history.started
        now = self.host.now_us()
        row = InstanceRow(
            self.history.workflow_id,
            started.name,
            self.history.definition_version,
            WorkflowStatus.NEEDS_ATTENTION,
            started.parent_id,
            now,
            now,
        )
        parked = StepParked(
            seq=seq,
            name=name,
            attempts=attempt,
            error_type=type(error).__name__,
            message=error_message(error),
            policy=rules.policy,
            policy_version=rules.policy_version,
            result_schema=result_schema,
        )
        log.warning(
            "workflow %s: step %r used up its attempts (%s: %s); parked for an operator",
            self.history.workflow_id,
            name,
            parked.error_type,
            parked.message,
        )
        await self.record([parked], (*writes, PutInstance(row)))

    async def _admit(
        self, found: PolicyVersion, seq: int, attempt: int
    ) -> tuple[Admission | None, BaseException | None]:
        """Pass the resource's guards: the admission, or the refusal to record (a
        long wait for a token ends the pass until then instead)."""
        guards = self.host.guards
        assert guards is not None
        call = f"{self.history.workflow_id}/{seq}/{attempt}"
        try:
            return await self._host(guards.admit(found, call)), None
        except (CircuitOpenError, BulkheadFullError) as refused:
            return None, refused
        except TokenWait as wait:
            raise Suspend([], wait.until_us) from None

    def _outcome(
        self, admission: Admission | None, error: BaseException | None
    ) -> tuple[RuntimeWrite, ...]:
        guards = self.host.guards
        if admission is None or guards is None:
            return ()
        return guards.outcome_writes(admission, error)

    async def _settle_guards(
        self,
        found: PolicyVersion | None,
        admission: Admission | None,
        error: BaseException | None,
    ) -> None:
        guards = self.host.guards
        if admission is None or found is None or guards is None:
            return
        if guards.needs_settling(admission, error):
            await self._host(guards.settle(found, admission, error, self.history.workflow_id))

    async def _rules(
        self, retry: RetryPolicy | None, timeout: float | None, policy: str | None
    ) -> tuple[StepRules, PolicyVersion | None, BaseException | None]:
        """The rules of the next attempt, the policy version they come from, and why
        the attempt may not run at all (its policy is missing: a retryable failure,
        so a policy set meanwhile is picked up)."""
        if policy is None:
            return inline_rules(retry or DEFAULT_STEP_RETRY, timeout), None, None
        # The cached version, if fresh enough, without a coroutine: every attempt asks.
        found = self.host.fresh_policy(policy)
        if found is None:
            try:
                found = await self._host(self.host.policy(policy))
            except PolicyNotFoundError as exc:
                return inline_rules(retry or DEFAULT_STEP_RETRY, timeout), None, exc
        return named_rules(found, retry, timeout, DEFAULT_STEP_RETRY), found, None

    def _retry_at(
        self,
        rules: StepRules,
        seq: int,
        attempt: int,
        first_at: int,
        error: BaseException,
        *,
        refused: bool = False,
    ) -> tuple[int | None, str]:
        return next_attempt_at(
            rules,
            error,
            now_us=self.host.now_us(),
            workflow_id=self.history.workflow_id,
            seq=seq,
            attempt=attempt,
            first_at_us=first_at,
            refused=refused,
        )

    async def _backoff(self, retry_at_us: int) -> None:
        """Wait until ``retry_at_us``: in the pass if it is soon, else by ending the
        pass with a durable timer (no lease or thread held meanwhile)."""
        wait = (retry_at_us - self.host.now_us()) / 1_000_000
        if wait <= 0:
            return
        if wait < INLINE_BACKOFF_S:
            await asyncio.sleep(wait)
            return
        raise Suspend([], retry_at_us)

    async def _record_result(
        self,
        seq: int,
        name: str,
        value: Any,
        release: Callable[[], None],
        rules: StepRules,
        admission: Admission | None = None,
        found: PolicyVersion | None = None,
        wanted: Any = Any,
    ) -> Any:
        """Buffer a step's result to ride with the next append; ``release`` frees the
        step's thread once it is recorded, or at once if it can never be.

        A result that does not fit the step's declared return type is not recorded:
        every replay would fail to read it back (stuck for good, whatever code is
        deployed). The instance parks as it does for a result with no JSON form, and
        the step runs again once code that returns a fitting value is deployed."""
        try:
            try:
                encoded = to_builtins(value)
            except CodecError:  # said once, with its context, by _encode
                encoded = self._encode(value, f"the {_result_of(name, seq)}")
            self._check_fits(encoded, value, wanted, f"the {_result_of(name, seq)}", "step's")
            done = (
                StepDone(seq=seq, name=name, result=encoded)
                if rules.policy is None
                else StepDone(
                    seq=seq,
                    name=name,
                    result=encoded,
                    policy=rules.policy,
                    policy_version=rules.policy_version,
                )
            )
            oversize = self._oversize(done, encoded, f"the result of step {name!r}")
            if oversize is not None:
                error_type = type(oversize).__name__
                await self.record(
                    [StepFailed(seq=seq, name=name, error_type=error_type, message=str(oversize))]
                )
                raise StepFailedError(name, error_type, str(oversize)) from oversize
        except BaseException:
            release()
            raise
        writes = self._outcome(admission, None)
        if writes or (admission is not None and admission.probe):
            # A guarded call's outcome moves shared state (its tally, its permit, a
            # probe's verdict): recorded now, with those writes.
            try:
                await self.record([done], writes)
            finally:
                release()
            await self._settle_guards(found, admission, None)
            return encoded
        # The result goes with the next append, which the code reaches in the same
        # turn (its next command, its wait, its end: a 3-step workflow then costs 4
        # commits); if nothing appends by the end of this turn (a gather sibling still
        # runs), it is appended on its own. Either way the window between the body's
        # end and its record is one commit, and its thread is held until then.
        self.buffer.append(done)
        self.on_durable.append(release)
        self._flush_soon()
        return encoded


class _Run(_Pass):
    """One pass of a code-first workflow; see the module docstring.

    A run the host keeps (``keep``) may outlive a pass that waits: when the body can
    go no further, the pass ends with every branch still held and the body alive.
    The host records the waits, and if nothing but news (signals, a cancel, a
    child's end) is recorded before the instance is due again, it ``resume``s the
    same run instead of replaying the history from the top: each held command looks
    again, as a replay reaching it would. A workflow that loops through waits (a
    mailbox of signals, a poller) then costs the same per wake however long its
    history; replayed, each wake cost the whole history. Otherwise it ``drop``s the
    run, and the next pass replays as ever.
    """

    def __init__(
        self,
        host: RunHost,
        definition: WorkflowDefinition[Any, Any],
        history: History,
        *,
        query: bool = False,
    ) -> None:
        super().__init__(host, history, query=query)
        self.definition = definition
        self.keep = False
        """The body may outlive a pass that waits (set by the host, before execute)."""
        self.body: asyncio.Future[PassResult] | None = None
        self.kept_command: int | None = None
        """``history.command_version`` when the run was kept: another runner's
        commands since make it stale."""

    def body_location(self) -> str | None:
        code = getattr(self.definition.fn, "__code__", None)
        return None if code is None else f"{code.co_filename}:{code.co_firstlineno}"

    async def execute(self) -> PassResult:
        if not self.keep:
            return await self._body()
        if self.body is None:
            self.still = asyncio.get_running_loop().create_future()
            self.body = asyncio.ensure_future(self._body())
        body, still = self.body, self.still
        assert still is not None
        try:
            await asyncio.wait((body, still), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # The host's task cancelled (it closes past its grace): the body is
            # cancelled with it, as when it ran in that task, and ends first.
            self.drop()
            body.cancel()
            await asyncio.wait((body,))
            raise
        if body.done():
            return body.result()
        return PassResult(
            suspend=self._suspended(self.waits[0]),
            exposed=self.exposed,
            buffered=self._take_buffer(),
            kept=True,
        )

    def kept(self) -> None:
        self.kept_command = self.history.command_version

    def resumable(self, history: History) -> bool:
        """Whether the kept body may go on over ``history`` (the instance's history
        now): the same history, grown only by news since it was kept."""
        body = self.body
        return (
            body is not None
            and not body.done()
            and history is self.history
            and history.command_version == self.kept_command
            and history.finished is None
            and history.stuck is None
        )

    def resume(self) -> None:
        """Another pass over the kept body: its held commands look again."""
        parked = self.parked
        assert parked is not None
        self.waits, self.waits_seen, self.taking = [], [], set()
        self.news = 0
        self.parked = None
        self.quiet_rounds, self.quiet_mark = 0, None
        self.appended = False
        self.cancel_told = False
        self.still = asyncio.get_running_loop().create_future()
        self.trace_context = tracing.captured()
        parked.set_result(_RELOOK)

    def drop(self) -> None:
        """The kept body is not resumed: it ends as a pass's body ends (each held
        command raises its ``Suspend``), recording nothing."""
        self.ended = True
        parked = self.parked
        if parked is not None and not parked.done():
            parked.set_result(_END)
        body = self.body
        if body is not None:
            body.add_done_callback(_retrieved)

    async def _body(self) -> PassResult:
        ctx = WorkflowContext(self)
        failure: tuple[str, str] | None = None
        cancelled = False
        returned: Any = _RETURNED_NOTHING
        try:
            given = self._decode(self.history.started.input, self.definition.input_type, "input")
            returned = await self.definition.fn(ctx, given)
        except Suspend as suspend:
            await self._settle()
            return PassResult(
                suspend=self._suspended(suspend),
                exposed=self.exposed,
                buffered=self._take_buffer(),
            )
        except (Park, Abandon, Restart, Relinquish, BodyEnded) as stop:
            await self._settle()
            raise self.fault or stop from None
        except WorkflowCancelled as exc:
            failure, cancelled = ("WorkflowCancelled", exc.reason or "cancelled"), True
        except PersonalDataErasedError as exc:
            # Its history cannot be replayed past the erased value: what it recorded
            # after that is not a path the code left.
            failure, self.unreadable = (type(exc).__name__, error_message(exc)), True
        except Exception as exc:  # noqa: BLE001 - the workflow failed: that is its outcome
            failure = (type(exc).__name__, error_message(exc))
            self.raised_at = _raised_at(exc)
        if self.waits and self.parked is not None and self.parked.done():
            # The body went on past a wait that ended the pass: it took the Suspend
            # for a value (``gather(..., return_exceptions=True)``) or caught it. The
            # wait stands; what the body made of it after does not count.
            await self._settle()
            waits = self._suspended(self.waits[0])
            return PassResult(suspend=waits, exposed=self.exposed, buffered=self._take_buffer())
        await self._settle()
        if failure is None:
            self._check_finished_path()
            encoded = self._encode(returned, "the workflow's return value")
            self._check_fits(
                encoded, returned, self.definition.output_type, "the return value", "workflow's"
            )
            finished = Finished(status=WorkflowStatus.COMPLETED, result=encoded)
            oversize = self._oversize(finished, encoded, "the workflow's return value")
            if oversize is None:
                return self._finish(finished)
            failure = (type(oversize).__name__, str(oversize))
        try:
            return await self._fail(failure, cancelled)
        except Suspend as suspend:  # a compensation runs on a task queue: wait for it
            await self._settle()
            return PassResult(suspend=suspend, exposed=self.exposed, buffered=self._take_buffer())


def _retrieved(body: asyncio.Future[PassResult]) -> None:
    """A dropped body's end: nobody acts on it (its pass was over)."""
    if not body.cancelled():
        body.exception()


_EVENT_OVERHEAD_BOUND = 8192
"""More than an event's envelope and metadata take (its name aside), so a payload that
surely fits in the rest needs no trial encoding."""


def _surely_within(payload: Any, budget: int) -> bool:
    """A cheap yes for the common small results (a JSON string costs at most 6 bytes a
    character); anything else is measured by encoding it."""
    if budget < 32:
        return False  # a tiny limit (tests set them): measure everything
    kind = type(payload)
    if payload is None or kind is bool or kind is float:
        return True
    if kind is int:
        digits: int = payload.bit_length() // 3 + 1  # a bit holds ~0.3 decimal digits
        return digits + 1 <= budget  # and a sign
    if kind is str:
        return 6 * len(payload) + 2 <= budget
    return False


def _raised_at(exc: BaseException) -> str | None:
    """``file:line`` where ``exc`` was raised (the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def _queue_of(recorded: list[Any] | None) -> str | None:
    """The queue a step was sent to, if it was."""
    first = recorded[0] if recorded else None
    return first.queue if isinstance(first, StepScheduled) else None


def _result_of(name: str, seq: int) -> str:
    return f"result of step {name!r} (command {seq})"


class _Acting:
    """``with run.acting:`` counts a command acting for real until it settles;
    ``none_left()`` waits until none is. One per pass, reentrant: the hot path
    pays no object, future or coroutine per command."""

    __slots__ = ("count", "idle", "on_idle")

    def __init__(self) -> None:
        self.count = 0
        self.idle: asyncio.Future[None] | None = None
        self.on_idle: Callable[[], None] | None = None
        """Called when the last one settles, once a branch of the body waits."""

    def __enter__(self) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.count -= 1
        if self.count == 0:
            idle = self.idle
            if idle is not None and not idle.done():
                idle.set_result(None)
            if self.on_idle is not None:
                self.on_idle()

    async def none_left(self) -> None:
        while self.count:
            self.idle = asyncio.get_running_loop().create_future()
            await self.idle


_QUIET_ROUNDS = 4
"""Turns of the event loop with nothing moving before parked branches are let go."""

_OWN = str(Path(__file__).resolve().parent.parent)


def _caller_outside_ledgerflow() -> str | None:
    """``file:line`` of the innermost frame outside ledgerflow (and asyncio): the
    workflow code that issued the command. Only on a divergence: walking frames
    costs, and the hot path never does."""
    frame: FrameType | None = sys._getframe(1)
    entry = _Run.execute.__code__
    while frame is not None:
        if frame.f_code is entry:
            # Out of the pass without meeting workflow code: the pass issued the
            # command itself (a compensation). Beyond lies whoever ran the pass.
            return None
        filename = frame.f_code.co_filename
        if not filename.startswith(_OWN) and "asyncio" not in filename:
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _spent(rules: StepRules, attempt: int, first_at_us: int, now_us: int) -> str:
    """Why attempt ``attempt`` (after failed ones) may not start under ``rules`` as
    they are now: a policy lowered its attempts or set a deadline since ("" if it
    may). Rules given in code are asked after each failure, as before."""
    if attempt <= 1 or rules.code is not None:
        return ""
    where = f"policy {rules.policy!r} v{rules.policy_version}" if rules.policy else "the rules"
    if attempt > rules.retry.max_attempts:
        return f"no retry: {where} allows {rules.retry.max_attempts} attempts now"
    deadline = rules.retry.deadline
    if deadline is not None and now_us >= first_at_us + int(deadline * 1_000_000):
        return f"no retry: the step's retry deadline of {deadline}s has passed ({where})"
    return ""
