"""A pass over a state-machine instance: fold what is recorded, act on what is due.

The instance's history is folded (``instance.fold``) into where it is. Then, in turn:
its entry into the initial state if not yet recorded; the event accepted and not yet
processed (one at a time: a sender appends an event only when none is pending); the
timeout of a state it has stayed in too long; its end once it is in a terminal state
alone; else it waits for the next event or timeout. Processing an event runs the
transition's activities as steps (the code-first runtime's own: policies, retries,
durable backoff, task queues, parking), then records the move with the last result,
in one append. A failed activity compensates (newest first) and moves to the
transition's failure states, or leaves the machine where it was.

The firing rule is ``semantics``'s, the one ``verify`` explores.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import (
    ConcurrencyError,
    LeaseLostError,
    StepFailedError,
    StoreClosedError,
    StoreReadOnlyError,
    StoreUnavailableError,
    WorkflowCancelled,
    WorkflowDefinitionError,
)
from ..workflow.definition import step_options
from ..workflow.history import (
    EventReceived,
    EventRefused,
    Finished,
    History,
    MachineCancelling,
    Transitioned,
    TransitionFailed,
    WorkflowStatus,
    error_message,
)
from ..workflow.host import (
    Abandon,
    BodyEnded,
    Park,
    PassResult,
    Relinquish,
    Restart,
    RunHost,
    Suspend,
)
from ..workflow.run import _Pass
from ..workflow.saga import Compensation
from .definition import Activity, Machine, Payload, Transition
from .instance import START_SEQ, Done, Instance, MachineCall, MachineOutcome, Moment, view
from .semantics import by_source, candidates, final, fire, fire_to

__all__ = ["MachineRun", "accepted", "enabled", "start_data", "undoer"]


class MachineRun(_Pass):
    """One pass over a state-machine instance (a ``host.Executor``)."""

    def __init__(
        self, host: RunHost, machine: Machine, history: History, *, query: bool = False
    ) -> None:
        super().__init__(host, history, query=query)
        self.machine = machine

    def _check_states(self, instance: Instance) -> None:
        """Park if the instance is in a state this code's definition of its version
        does not have (renamed or removed in place by a deploy): it would accept no
        event, and time out of nothing, running for ever."""
        if not instance.begun:
            return
        gone = self.machine.lacks(instance.marking)
        if gone:
            machine = self.machine
            error = WorkflowDefinitionError(
                f"instance {self.history.workflow_id!r} is in {'+'.join(instance.marking)}, "
                f"and this code's {machine.name!r} v{machine.version} has no state "
                f"{', '.join(repr(s) for s in gone)}: deploy code that has it, or change "
                "the machine as a new version and `ledgerflow machines migrate` the instance"
            )
            raise self._raise(Park(error))

    async def execute(self) -> PassResult:
        try:
            while True:
                instance = view(self.history)
                self._check_states(instance)
                if self.history.cancel is not None or instance.cancelling is not None:
                    return await self._cancelled(instance)
                outcome: Transitioned | TransitionFailed | EventRefused | None
                try:
                    if not instance.begun:
                        begun = await self._begin()
                        if isinstance(begun, Finished):
                            return self._finish(begun)
                        outcome = begun
                    elif instance.pending is not None:
                        outcome = await self._process(instance, instance.pending)
                    else:
                        outcome = None
                except WorkflowCancelled:
                    continue  # undone on the next turn of the loop
                if outcome is not None:
                    # The turn's outcome rides with what ends the pass (its wake-up, or
                    # its end): one commit. Until then it is folded in on a copy.
                    self.buffer.append(outcome)
                    instance = instance.copy()
                    for pending in self.buffer:  # the last step's result, then the outcome
                        instance.apply(pending)
                if final(self.machine, instance.marking):
                    return self._finish(self._completed(instance))
                due = self._next_timeout(instance)
                if due is not None and due[1] <= self.host.now_us():
                    await self.record([])  # what is buffered first: the timeout goes after
                    await self._time_out(view(self.history), due[0])
                    continue
                raise Suspend([], None if due is None else due[1])
        except Suspend as suspend:
            await self._settle()
            return PassResult(suspend=suspend, buffered=self._take_buffer())
        except (Park, Abandon, Restart, Relinquish, BodyEnded) as stop:
            await self._settle()
            raise self.fault or stop from None

    # -- turns ------------------------------------------------------------------------

    async def _begin(self) -> Transitioned | Finished:
        """Enter the initial state: its entry activity, then the record of it. If
        that activity fails for good the instance never began: it fails (nothing
        before it to compensate), rather than waiting in no state at all."""
        self._live()
        initial = self.machine.initial().name
        data = self._encode(start_data(self.machine, self.history.started.input), "start data")
        moment = Moment(START_SEQ, "", {}, (), data, {}, "start")
        self.seq = START_SEQ
        entry = self.machine.states[initial].on_enter
        if entry is not None:
            try:
                await self._act(entry, None, moment)
            except StepFailedError as failed:
                return Finished(
                    status=WorkflowStatus.FAILED,
                    error_type=failed.error_type,
                    message=f"entering the initial state {initial!r} failed: {failed.message}",
                )
        return Transitioned(
            seq=START_SEQ,
            name="",
            transition="start",
            source=(),
            marking=(initial,),
            targets=(initial,),
            data=data,
            at_us=self.host.now_us(),
        )

    async def _process(
        self, instance: Instance, event: EventReceived
    ) -> Transitioned | TransitionFailed | EventRefused:
        """Run the pending event's transition; its outcome, to record."""
        moment = instance.moment
        assert moment is not None
        assert moment.seq == event.seq
        self.seq = event.seq
        try:
            fired = enabled(
                self.machine, instance.marking, instance.data, event.name, event.payload
            )
        except Exception as exc:  # noqa: BLE001 - a user's guard raised: refuse, visibly
            fired = []
            reason = f"a guard raised {type(exc).__name__}: {error_message(exc)}"
        else:
            reason = _refusal(self.machine, instance.marking, event.name)
        if not fired:
            return self._refused(instance, event, reason)
        t = fired[0]  # two at once is nondeterminism: verify reports it; declared order wins
        moment.transition = t.label()
        try:
            after = _updated(self.machine, t, instance.data, event.payload)
        except Exception as exc:  # noqa: BLE001 - a user's update raised: refuse, visibly
            why = f"the update of {t.label()} raised {type(exc).__name__}: {error_message(exc)}"
            return self._refused(instance, event, why)
        data = self._encode(after, f"the data after {t.label()}")
        try:
            for fn, compensate in self.machine.actions(t):
                await self._act(fn, compensate, moment)
        except StepFailedError as failed:
            return await self._failed(instance, event, t, failed)
        return Transitioned(
            seq=event.seq,
            name=event.name,
            transition=t.label(),
            source=instance.marking,
            marking=fire(instance.marking, t),
            targets=t.targets,
            data=data,
            at_us=self.host.now_us(),
        )

    def _refused(self, instance: Instance, event: EventReceived, reason: str) -> EventRefused:
        """A sender's event refused: recorded, and the instance waits on. A timeout's
        is not: a state times out once per entry, so refused it would stay there for
        ever, running and waiting for nothing; it is parked, stuck until a definition
        whose timeout moves it is deployed (or an operator migrates it)."""
        if event.by != "timeout":
            return EventRefused(seq=event.seq, name=event.name, reason=reason)
        error = WorkflowDefinitionError(
            f"instance {self.history.workflow_id!r}: the timeout of state "
            f"{event.timeout_of!r} sent {event.name!r}, which it refused ({reason}); it "
            f"would stay in {'+'.join(instance.marking)} for ever: deploy a definition "
            "whose timeout transition always fires"
        )
        raise self._raise(Park(error))

    async def _failed(
        self, instance: Instance, event: EventReceived, t: Transition, failed: StepFailedError
    ) -> TransitionFailed:
        """An activity failed for good: with failure states, undo every completed
        activity (newest first) and go there; else stay, and say so."""
        marking, compensated = instance.marking, False
        targets: tuple[str, ...] = ()
        if t.failure:
            earlier = instance.outstanding(event.seq, skip_turn=event.seq)
            _, gave_up = await self._undo([*self._compensations(earlier), *self.compensations])
            marking = fire_to(instance.marking, t.sources, t.failure)
            targets, compensated = t.failure, not gave_up
        return TransitionFailed(
            seq=event.seq,
            name=event.name,
            transition=t.label(),
            error_type=failed.error_type,
            message=failed.message,
            marking=marking,
            targets=targets,
            compensated=compensated,
            at_us=self.host.now_us(),
        )

    async def _time_out(self, instance: Instance, state: str) -> None:
        """Send a state's timeout event to the instance: one append at the version the
        pass read, so an event a sender accepted meanwhile goes first (replayed)."""
        timeout = self.machine.states[state].on_timeout
        assert timeout is not None
        received = EventReceived(
            seq=instance.last_seq + 1, name=timeout, by="timeout", timeout_of=state
        )
        try:
            result = await self.host.append(self.history, [*self.buffer, received], ())
        except ConcurrencyError:
            raise self._raise(Restart()) from None
        except (StoreUnavailableError, StoreReadOnlyError, StoreClosedError) as exc:
            raise self._raise(Abandon(exc)) from exc
        except LeaseLostError as exc:
            raise self._raise(Relinquish(exc)) from exc
        batch, self.buffer = [*self.buffer, received], []
        before = self.history.version
        first = result.version - len(batch) + 1
        for offset, recorded in enumerate(batch):
            self.history.add(first + offset, recorded)
        await self.host.appended(self.history, before)

    async def _cancelled(self, instance: Instance) -> PassResult:
        """Cancelled: undo every completed activity, newest first, and end."""
        self.compensating = True
        if instance.cancelling is None:
            self.seq = instance.last_seq
            marker = MachineCancelling(seq=instance.last_seq + 1, name="cancel")
            await self.record([marker])
            base = marker.seq
        else:
            base = instance.cancelling
        self.seq = base
        ran, gave_up = await self._undo(self._compensations(instance.outstanding(base)))
        reason = self.history.cancel.reason if self.history.cancel is not None else None
        if gave_up:
            status = WorkflowStatus.COMPENSATION_FAILED
        elif ran:
            status = WorkflowStatus.COMPENSATED
        else:
            status = WorkflowStatus.CANCELLED
        return self._finish(
            Finished(status=status, error_type="WorkflowCancelled", message=reason or "cancelled")
        )

    def _completed(self, instance: Instance) -> Finished:
        outcome = MachineOutcome(
            state=instance.marking[0], data=instance.data, results=instance.results
        )
        return Finished(status=WorkflowStatus.COMPLETED, result=msgspec.to_builtins(outcome))

    def _next_timeout(self, instance: Instance) -> tuple[str, int] | None:
        """The state of the marking whose timeout is due first, and when."""
        due: tuple[str, int] | None = None
        for state in instance.marking:
            spec = self.machine.states.get(state)
            if spec is None or spec.timeout is None or state in instance.timed_out:
                continue
            at = instance.entered.get(state, 0) + int(spec.timeout.total_seconds() * 1_000_000)
            if due is None or at < due[1]:
                due = (state, at)
        return due

    # -- activities -------------------------------------------------------------------

    def _call(self, moment: Moment) -> MachineCall:
        return MachineCall(
            instance_id=self.history.workflow_id,
            machine=self.machine.name,
            version=self.machine.version,
            event=moment.event,
            payload=moment.payload,
            state="+".join(moment.marking),
            transition=moment.transition,
            data=moment.data,
            input=self.history.started.input,
            results=moment.results,
        )

    async def _act(self, fn: Activity, compensate: Activity | None, moment: Moment) -> Any:
        """Run an activity as a step (the next command): its ``@step`` options, and
        the compensation the transition gives it or its own."""
        options = step_options(fn)
        return await self.step(
            options.name,
            fn,
            (self._call(moment),),
            compensate or options.compensate,
            options.retry,
            options.timeout,
            options.queue,
            options.policy,
        )

    def _compensations(self, done: list[Done]) -> list[Compensation]:
        """The compensations of completed activities (those that have one)."""
        found = (self._compensation(d.step_seq, d.name, d.result, d.moment) for d in done)
        return [c for c in found if c is not None]

    def _compensation(
        self, step_seq: int, name: str, result: Any, moment: Moment
    ) -> Compensation | None:
        undo = undoer(self.machine, name)
        if undo is None:
            return None
        return Compensation(
            step_seq, name, undo, (self._call(moment),), result, step_options(undo).queue
        )


def undoer(machine: Machine, name: str) -> Activity | None:
    """The compensation of the activity recorded under step ``name``, as this version
    of the definition gives it (None: it has none, or the activity is not here)."""
    for t in machine.transitions:
        if t.activity is not None and step_options(t.activity).name == name:
            return t.compensate or step_options(t.activity).compensate
    for state in machine.states.values():
        for fn in (state.on_enter, state.on_exit):
            if fn is not None and step_options(fn).name == name:
                return step_options(fn).compensate
    return None


def start_data(machine: Machine, given: Any) -> dict[str, Any]:
    """An instance's data at the start: the machine's ``initial_data`` and what
    ``start_data(input)`` adds; every declared field must have a value."""
    data = dict(machine.initial_data)
    if machine.start_data is not None:
        data.update(machine.start_data(given))
    missing = [k for k in machine.domains if k not in data]
    if missing:
        raise ValueError(f"machine {machine.name!r}: no start value for data fields {missing}")
    return data


def enabled(
    machine: Machine,
    marking: tuple[str, ...],
    data: Mapping[str, Any],
    event: str,
    payload: Mapping[str, Any],
) -> list[Transition]:
    """The transitions ``event`` fires in this configuration, in declaration order.
    A guard that raises propagates."""
    found: list[Transition] = []
    view = payload if isinstance(payload, Payload) else Payload(payload)
    for _, t in candidates(_lookup(machine), marking):
        if t.event != event:
            continue
        if t.guard is None or t.guard(data, view):
            found.append(t)
    return found


def accepted(machine: Machine, marking: tuple[str, ...]) -> tuple[str, ...]:
    """The events some transition from this marking takes (guards aside)."""
    return tuple(sorted({t.event for _, t in candidates(_lookup(machine), marking)}))


def _refusal(machine: Machine, marking: tuple[str, ...], event: str) -> str:
    if event in accepted(machine, marking):
        return f"no guard of {event!r} holds in {'+'.join(marking)}"
    return f"{'+'.join(marking)} does not accept {event!r}"


def _updated(
    machine: Machine, t: Transition, data: Mapping[str, Any], payload: Mapping[str, Any]
) -> dict[str, Any]:
    if t.update is None:
        return dict(data)
    view = payload if isinstance(payload, Payload) else Payload(payload)
    made = t.update(data, view)
    if not isinstance(made, Mapping):
        raise TypeError(
            f"it returned {type(made).__name__}, not the data (does it forget to return it?)"
        )
    after = dict(made)
    if set(after) != set(machine.domains):
        changed = sorted(set(after) ^ set(machine.domains))
        raise ValueError(f"it changed the data fields {changed}")
    return after


_LOOKUPS: weakref.WeakKeyDictionary[
    Machine, tuple[int, dict[str, list[tuple[int, Transition]]]]
] = weakref.WeakKeyDictionary()


def _lookup(machine: Machine) -> dict[str, list[tuple[int, Transition]]]:
    """``semantics.by_source`` of the machine, kept while its transitions stay (a
    definition is built by adding to it)."""
    kept = _LOOKUPS.get(machine)
    if kept is None or kept[0] != len(machine.transitions):
        kept = _LOOKUPS[machine] = (len(machine.transitions), by_source(machine))
    return kept[1]
