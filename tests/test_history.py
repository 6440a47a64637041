"""The history index replay reads, and the pass's rules about what others recorded.

Properties over random histories (hypothesis): a snapshot restores exactly the index
it was taken from, whatever events came before, so a long history loaded from its
snapshot replays as the full one would.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledgerflow
from ledgerflow import WorkflowContext
from ledgerflow.errors import ConcurrencyError
from ledgerflow.events import Metadata, RecordedEvent
from ledgerflow.workflow.history import (
    CancelRequested,
    ChildFinished,
    ChildrenCancelled,
    ChildStarted,
    CompensationDone,
    CompensationFailed,
    Finished,
    History,
    SignalRejected,
    SignalSent,
    SignalTaken,
    SignalWaiting,
    Started,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    TimerFired,
    TimerStarted,
)
from ledgerflow.workflow.host import Restart
from ledgerflow.workflow.run import _Run

NAMES = st.sampled_from(["a", "b", "go"])
SEQS = st.integers(min_value=1, max_value=6)
VERSIONS = st.integers(min_value=1, max_value=40)
JSON = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3))

EVENTS = st.one_of(
    st.builds(StepDone, seq=SEQS, name=NAMES, result=JSON),
    st.builds(StepFailed, seq=SEQS, name=NAMES, error_type=NAMES, message=NAMES),
    st.builds(
        StepAttemptFailed, seq=SEQS, name=NAMES, attempt=SEQS, error_type=NAMES, message=NAMES
    ),
    st.builds(TimerStarted, seq=SEQS, name=NAMES, fire_at_us=st.integers(0, 2**53)),
    st.builds(TimerFired, seq=SEQS, name=NAMES),
    st.builds(SignalWaiting, seq=SEQS, name=NAMES, deadline_us=st.none(), schema=st.none()),
    st.builds(SignalTaken, seq=SEQS, name=NAMES, signal_version=VERSIONS),
    st.builds(SignalRejected, seq=SEQS, name=NAMES, signal_version=VERSIONS, reason=NAMES),
    st.builds(SignalSent, name=NAMES, payload=JSON),
    st.builds(CancelRequested, reason=st.one_of(st.none(), NAMES)),
    st.builds(ChildrenCancelled, reason=NAMES),
    st.builds(ChildStarted, seq=SEQS, name=NAMES, child_id=NAMES, version=SEQS),
    st.builds(ChildFinished, child_id=NAMES, status=NAMES, result=JSON),
    st.builds(CompensationDone, seq=SEQS, name=NAMES, step_seq=SEQS),
    st.builds(
        CompensationFailed, seq=SEQS, name=NAMES, step_seq=SEQS, error_type=NAMES, message=NAMES
    ),
)


def recorded(version: int, data: Any, stream: str = "wf-w") -> RecordedEvent:
    return RecordedEvent(
        id=UUID(int=version),
        stream_id=stream,
        version=version,
        position=version,
        type="test",
        schema_version=1,
        data=data,
        metadata=Metadata(),
        recorded_at=datetime.fromtimestamp(0, UTC),
        hash=b"",
        prev_hash=b"",
    )


def indexed(events: list[Any]) -> History:
    started = Started(name="w", version=1, input=1)
    return History.of("w", [recorded(v, e) for v, e in enumerate([started, *events], start=1)])


@settings(max_examples=200, deadline=None)
@given(before=st.lists(EVENTS, max_size=25), after=st.lists(EVENTS, max_size=10))
def test_a_snapshot_restores_the_index_it_was_taken_from(
    before: list[Any], after: list[Any]
) -> None:
    full = indexed([*before, *after])
    head = indexed(before)
    restored = History.from_snapshot(head.snapshot())
    assert restored == head  # taken signals, rejected ones, children's ends: all of it
    restored.extend([recorded(v, e) for v, e in enumerate(after, start=head.version + 1)])
    assert restored == full
    assert restored.untaken_signals() == full.untaken_signals()


def test_a_snapshot_remembers_which_signals_were_taken() -> None:
    history = indexed(
        [
            SignalSent(name="go", payload=1),
            SignalSent(name="go", payload=2),
            SignalTaken(seq=1, name="go", signal_version=2),
            SignalSent(name="go", payload="bad"),
            SignalRejected(seq=2, name="go", signal_version=4, reason="does not fit"),
        ]
    )
    restored = History.from_snapshot(history.snapshot())
    assert restored.next_signal("go") == (3, SignalSent(name="go", payload=2))


# -- the pass's rules ----------------------------------------------------------------


@ledgerflow.workflow(name="undo", version=1)
async def undo(ctx: WorkflowContext, n: int) -> int:
    await ctx.step(lambda: n, name="a", compensate=lambda: None)
    await ctx.step(lambda: n, name="b")
    return n


class ReplayHost:
    """A host for a pass that only replays; appends fail as if someone wrote first."""

    step_threads = None
    max_event_bytes = None

    def __init__(self, newer: list[RecordedEvent] | None = None) -> None:
        self.newer = newer or []

    def now_us(self) -> int:
        return 0

    def encoded_size(self, event: Any) -> int:
        return 0

    async def append(self, history: History, events: list[Any], runtime: Any) -> Any:
        raise ConcurrencyError("wf-w", history.version, history.version + len(self.newer))

    async def read_after(self, history: History) -> list[RecordedEvent]:
        return [e for e in self.newer if e.version > history.version]

    async def appended(self, history: History, before: int) -> None:
        return None

    async def start_child(self, *args: Any) -> None:
        raise AssertionError("not in these tests")

    async def cancel_child(self, *args: Any) -> None:
        raise AssertionError("not in these tests")

    async def withdraw_task(self, task_id: str) -> bool:
        raise AssertionError("not in these tests")

    def claimed_before(self, workflow_id: str) -> bool:
        return False

    async def policy(self, name: str) -> Any:
        raise AssertionError("not in these tests")

    def fresh_policy(self, name: str) -> Any:
        raise AssertionError("not in these tests")

    guards = None


async def test_a_recorded_compensation_failure_decides_the_status_on_replay() -> None:
    history = indexed(
        [
            StepDone(seq=1, name="a", result=1),
            StepFailed(seq=2, name="b", error_type="E", message="no"),
            CompensationFailed(seq=3, name="a", step_seq=1, error_type="E", message="down"),
        ]
    )
    result = await _Run(ReplayHost(), undo, history, query=True).execute()
    assert result.finished == Finished(
        status="compensation_failed", error_type="StepFailedError", message="step 'b' failed: E: no"
    )


async def test_commands_another_runner_recorded_restart_the_pass() -> None:
    """Only signals, cancellations and children's ends are folded in; a command
    recorded by someone else means two runners: replay from the record instead."""
    history = indexed([])
    other = recorded(2, StepDone(seq=1, name="a", result=7))
    run = _Run(ReplayHost([other]), undo, history)
    with pytest.raises(Restart):
        await run.record([StepDone(seq=1, name="a", result=1)])
    assert history.version == 1  # nothing folded in


async def test_signals_that_arrive_meanwhile_are_folded_in() -> None:
    history = indexed([])
    outside = recorded(2, SignalSent(name="go", payload=None))
    host = ReplayHost([outside])
    run = _Run(host, undo, history)
    # The append keeps failing in this host: the signal is taken into view, and when
    # nothing newer can be seen the pass starts over instead of spinning.
    with pytest.raises(Restart):
        await run.record([StepDone(seq=1, name="a", result=1)])
    assert history.version == 2
    assert history.signals == [(2, SignalSent(name="go", payload=None))]
