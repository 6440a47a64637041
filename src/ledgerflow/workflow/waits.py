"""Commands that wait: durable timers, signals, child workflows, and the recorded
clock. ``Waits`` is the part of a pass (``run._Pass``) that issues them; it shares
the pass's state and commands, and is a module of its own only to keep each one
readable."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, TypeVar

from .. import tracing
from ..errors import ChildWorkflowError
from ..hashing import from_micros
from ..store.runtime import RuntimeWrite
from .codec import CodecError, from_builtins, json_schema, same_shape
from .definition import WorkflowDefinition
from .history import (
    ChildDone,
    ChildFinished,
    ChildStarted,
    ClockRead,
    History,
    Patched,
    SignalRejected,
    SignalTaken,
    SignalTimedOut,
    SignalWaiting,
    TimerFired,
    TimerStarted,
    WorkflowStatus,
)
from .host import RunHost, Suspend
from .saga import _first, _last

if TYPE_CHECKING:
    from .run import _Acting

__all__ = ["Waits"]

log = logging.getLogger("ledgerflow.engine")

_LATEST_US = 2**63 - 1
"""The last moment a timer may be set for: what a store keeps of a due time (a
64-bit count of microseconds, some 292,000 years from 1970; past year 9999 it is
described as "beyond")."""


def finite_seconds(seconds: float | None, what: str) -> float | None:
    """``seconds`` if finite (or None); else ValueError, raised in the workflow's
    code at the call that asked (a NaN or infinite duration is a bug there)."""
    if seconds is not None and not math.isfinite(seconds):
        raise ValueError(f"{what} needs a finite number of seconds, not {seconds!r}")
    return seconds


def due_after(now_us: int, seconds: float, what: str) -> int:
    """The moment ``seconds`` after ``now_us``, for a timer or a wait's deadline;
    ValueError past what a store can keep (every pass failed in the store then,
    the instance left running for ever)."""
    due = now_us + int(seconds * 1_000_000)
    if due > _LATEST_US:
        raise ValueError(f"{what} of {seconds!r} s ends later than a timer can be set")
    return due


T = TypeVar("T")


_END: object = object()
"""``parked``'s value when held branches must end: each raises its ``Suspend``."""
_RELOOK: object = object()
"""``parked``'s value when a kept run is resumed: each held command looks again."""


class _Relook(BaseException):
    """A held command of a resumed kept run: run the command again, at its seq."""


P = ParamSpec("P")
S = TypeVar("S", bound="Waits")


def relooking(
    command: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A command of the body that may wait: in a kept run resumed for another pass,
    its held wait looks again (``_Relook``), as a replay reaching that command would,
    with the history as it is now: the same seq, what it recorded since (the
    timer's start, the wait's schema) and the news (the signal, the child's end)."""

    @functools.wraps(command)
    async def again(run: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        # The command takes its seq first thing, before it awaits anything.
        seq = run.seq + 1 if run.reuse_seq is None else run.reuse_seq
        while True:
            try:
                return await command(run, *args, **kwargs)
            except _Relook:
                run.relooked(seq)

    return again


class Waits:
    """Timers, signals, children and the clock of one pass; mixed into ``run._Pass``."""

    host: RunHost
    history: History
    query: bool
    acting: _Acting
    buffer: list[Any]
    patches: dict[str, bool]
    seq: int
    fault: BaseException | None
    retyped_waits: list[tuple[int, str, str | None]]
    taking: set[int]
    reuse_seq: int | None

    if TYPE_CHECKING:

        def relooked(self, seq: int) -> None: ...

        def caller(self) -> str | None: ...

        def _command(
            self, kind: str, name: str, *, own: bool = False
        ) -> tuple[int, list[Any] | None]: ...

        def _live(self) -> None: ...

        def _cancelling(self) -> bool: ...

        async def record(
            self, events: list[Any], runtime: tuple[RuntimeWrite, ...] = ()
        ) -> None: ...

        def _decode(self, value: Any, type_: Any, what: str) -> Any: ...

        async def _host(self, call: Awaitable[T]) -> T: ...

        async def _hold(self, suspend: Suspend) -> NoReturn: ...

    @relooking
    async def timer(self, fire_at: Callable[[int], int]) -> None:
        seq, recorded = self._command("timer", "sleep")
        if recorded and any(isinstance(e, TimerFired) for e in recorded):
            return
        self._live()
        now = self.host.now_us()
        if recorded:
            due = recorded[0].fire_at_us
            started: list[Any] = []
        else:
            due = fire_at(now)
            started = [TimerStarted(seq=seq, name="sleep", fire_at_us=due)]
        if now >= due:
            with self.acting:
                await self.record([*started, TimerFired(seq=seq, name="sleep")])
            # Its span lasts from when it was due to when it fired: how late it was
            # (the engine's clock measures it; the span's ends are on the wall clock).
            fired = time.time_ns()
            tracing.finished_span(
                "timer fired",
                fired - (now - due) * 1000,
                fired,
                {"ledgerflow.workflow_id": self.history.workflow_id, "ledgerflow.seq": seq},
            )
            return
        await self._hold(Suspend(started, due))

    @relooking
    async def signal(self, name: str, type_: Any, timeout: float | None) -> Any:
        seq, recorded = self._command("signal", name)
        for event in recorded or ():
            if isinstance(event, SignalTaken):
                payload = self.history.signal_at(event.signal_version).payload
                return self._decode(payload, type_, f"payload of signal {name!r}")
            if isinstance(event, SignalTimedOut):
                return None
        waiting = _last(recorded, SignalWaiting)
        wanted = json_schema(type_)
        retyped = waiting is not None and not same_shape(waiting.schema, wanted)
        if retyped and waiting is not None and waiting.schema is not None:
            # Deployed code waits with another type than the one recorded, which
            # senders are checked against: the replay gate names the instance.
            self.retyped_waits.append((seq, name, self.caller()))
        self._live()
        with self.acting:
            now = self.host.now_us()
            new: list[Any] = []
            if waiting is not None:
                deadline = waiting.deadline_us
                if retyped:
                    # Senders check payloads against the latest recorded schema: the
                    # code's own from now on, or a payload of the new type would be
                    # refused while one of the old type is taken, then rejected.
                    new = [SignalWaiting(seq=seq, name=name, deadline_us=deadline, schema=wanted)]
            else:
                deadline = (
                    None
                    if timeout is None
                    else due_after(now, timeout, f"the timeout of the wait for {name!r}")
                )
                new = [SignalWaiting(seq=seq, name=name, deadline_us=deadline, schema=wanted)]
            while (found := self.history.next_signal(name, self.taking)) is not None:
                version, sent = found
                sent_at = self.history.signal_time(version)
                if deadline is not None and sent_at is not None and sent_at > deadline:
                    # Recorded after the wait had timed out (no engine ran at its
                    # deadline to say so): the wait timed out all the same, and the
                    # signal stays for a later wait.
                    break
                # Taken (or set aside) by this wait: another of this pass's waits
                # (a gather) looking while this one records it takes the next.
                self.taking.add(version)
                try:
                    value = from_builtins(sent.payload, type_)
                except CodecError as exc:
                    # Bad input that reached the instance anyway: set aside, visibly;
                    # it never ends the instance, and the wait goes on.
                    reason = f"does not fit {getattr(type_, '__qualname__', type_)}: {exc}"
                    log.warning(
                        "workflow %s: signal %r rejected: %s",
                        self.history.workflow_id,
                        name,
                        reason,
                    )
                    rejected = SignalRejected(
                        seq=seq, name=name, signal_version=version, reason=reason
                    )
                    await self.record([rejected])
                    continue
                sender = tracing.link(self.history.signal_traces.get(version))
                with tracing.span(
                    f"signal {name} taken",
                    links=() if sender is None else (sender,),
                    attributes={
                        "ledgerflow.workflow_id": self.history.workflow_id,
                        "ledgerflow.seq": seq,
                    },
                ):
                    await self.record([SignalTaken(seq=seq, name=name, signal_version=version)])
                return value
            if deadline is not None and now >= deadline:
                await self.record([*new, SignalTimedOut(seq=seq, name=name)])
                return None
        return await self._hold(Suspend(new, deadline))

    @relooking
    async def child(
        self, workflow: WorkflowDefinition[Any, Any], given: Any, child_id: str | None
    ) -> Any:
        seq, recorded = self._command("child", workflow.name)
        done = _first(recorded, ChildDone)
        if done is not None:
            return self._child_outcome(workflow, done)
        started = _first(recorded, ChildStarted)
        tenant = self.history.started.tenant
        cid = (
            started.child_id
            if started is not None
            else f"{tenant}/{child_id}"
            if child_id and tenant and not child_id.startswith(f"{tenant}/")
            else child_id or f"{self.history.workflow_id}.{seq}"
        )
        ended = self.history.children.get(cid)
        # An end told after a cancel that this wait raises does not count: the pass
        # that saw the cancel first raised it here, and so does every later one.
        if (
            started is not None
            and ended is not None
            and not (self._cancelling() and self.history.told_after_cancel(cid))
        ):
            if self.history.told_after_ending(cid):
                # Ended because this instance, failing, cancelled it: not what this
                # wait waited for. It waits on, and the failure comes as it came.
                return await self._hold(Suspend([], None, child_id=cid))
            return self._child_outcome(workflow, ended)
        self._live()
        if started is None:
            with self.acting:
                # What the child's input depends on is durable before it starts.
                await self.record([])
                self._live()  # a cancellation that append folded in: no child
                await self._host(
                    self.host.start_child(workflow, given, cid, self.history.workflow_id, tenant)
                )
                await self.record(
                    [
                        ChildStarted(
                            seq=seq, name=workflow.name, child_id=cid, version=workflow.version
                        )
                    ]
                )
            ended = self.history.children.get(cid)
            if ended is not None:
                return self._child_outcome(workflow, ended)
        # The child tells us when it ends (wf.child_finished, with a nudge): a version
        # check on our wait makes sure that news is never missed.
        return await self._hold(Suspend([], None, child_id=cid))

    def _child_outcome(
        self, workflow: WorkflowDefinition[Any, Any], done: ChildDone | ChildFinished
    ) -> Any:
        if done.status != WorkflowStatus.COMPLETED:
            raise ChildWorkflowError(
                done.child_id, done.status, done.error_type or "", done.message or ""
            )
        return self._decode(done.result, workflow.output_type, f"result of child {done.child_id!r}")

    def patched(self, change: str) -> bool:
        known = self.patches.get(change)
        if known is not None:
            return known
        if self.fault is not None:
            raise self.fault
        recorded = self.history.recorded(self.seq + 1)
        if recorded is not None and (recorded[0].kind, recorded[0].name) != ("patch", change):
            # A history recorded before the change, replayed here: the old path,
            # and no command taken (the one recorded next is the old code's).
            self.patches[change] = False
            return False
        seq, recorded = self._command("patch", change)
        if not recorded and not self.query:
            self.buffer.append(Patched(seq=seq, name=change))
        self.patches[change] = True
        return True

    def deprecate_patch(self, change: str) -> None:
        recorded = self.history.recorded(self.seq + 1)
        if recorded is not None and (recorded[0].kind, recorded[0].name) == ("patch", change):
            self._command("patch", change)  # taken when histories hold it; never recorded

    def now(self) -> datetime:
        seq, recorded = self._command("now", "now")
        if recorded:
            return from_micros(recorded[0].at_us)
        at = self.host.now_us()
        if not self.query:
            self.buffer.append(ClockRead(seq=seq, name="now", at_us=at))
        return from_micros(at)
