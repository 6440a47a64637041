"""Random event sequences on running instances agree with what ``verify`` explored
(hypothesis, on the engine with an in-memory store):

- an event is accepted exactly when a transition of the instance's state takes it
  and its guard holds (computed here independently of the runtime); refused ones
  raise ``InvalidTransition`` and record nothing;
- an instance never reaches a state verify called unreachable, nor fires a transition
  it called dead, and moves as the definition says (target and data);
- an activity that fails for good moves the instance to the transition's failure
  state (compensated) or leaves it where it was;
- where verify found no deadlock and no trap, every configuration a run reaches can
  still complete, and the instance ends (its ``result()``) once it is terminal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

import ledgerflow as lf
from ledgerflow.statemachine import FindingKind, Machine
from ledgerflow.statemachine.verify import can_complete, transition_labels
from ledgerflow.testing import workflow_environment
from ledgerflow.workflow.definition import step_options
from ledgerflow.workflow.history import Transitioned

from ._engines import WAIT

EVENTS = ("a", "b", "c")


class Failing:
    """Activities that fail for good when told (a set of step names)."""

    def __init__(self) -> None:
        self.now: set[str] = set()

    def activity(self, name: str) -> Callable[[lf.MachineCall], str]:
        @lf.step(name=name, retry=lf.RetryPolicy(max_attempts=1))
        def act(call: lf.MachineCall) -> str:
            if name in self.now:
                raise ValueError(f"{name} failed")
            return name

        return act


@st.composite
def running_machines(draw: st.DrawFn, failing: Failing) -> Machine:
    states = draw(st.integers(2, 6))
    m = Machine("random", data={"n": range(3)}, initial_data={"n": 0})
    terminal = draw(st.sets(st.integers(1, states - 1), min_size=1, max_size=2))
    for i in range(states):
        m.state(f"s{i}", initial=i == 0, terminal=i in terminal)
    for k in range(draw(st.integers(1, 10))):
        source = draw(st.sampled_from([i for i in range(states) if i not in terminal]))
        target = draw(st.integers(0, states - 1))
        acts = draw(st.booleans())
        failure = draw(st.sampled_from([None, *range(states)])) if acts else None
        m.transition(
            f"s{source}",
            draw(st.sampled_from(EVENTS)),
            f"s{target}",
            guard=_below(draw(st.integers(0, 3))),
            update=_bump if draw(st.booleans()) else None,
            activity=failing.activity(f"t{k}") if acts else None,
            failure=() if failure is None else f"s{failure}",
        )
    return m


def _below(limit: int) -> Callable[[Mapping[str, Any], Mapping[str, Any]], bool]:
    return lambda data, payload: bool(data["n"] < limit)


def _bump(data: Mapping[str, Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    return {"n": min(2, data["n"] + 1)}


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_events_on_a_running_instance_agree_with_verify(data: st.DataObject) -> None:
    failing = Failing()
    m = data.draw(running_machines(failing))
    report = lf.verify_machine(m)
    unreachable = {f.subject for f in report.of(FindingKind.UNREACHABLE_STATE)}
    dead = {f.subject for f in report.of(FindingKind.DEAD_TRANSITION)}
    labels = dict(zip(m.transitions, transition_labels(m), strict=True))
    sound_enough = not report.of(FindingKind.DEADLOCK) and not report.of(FindingKind.NO_COMPLETION)
    plan = data.draw(
        st.lists(st.tuples(st.sampled_from(EVENTS), st.booleans()), min_size=1, max_size=12)
    )
    asyncio.run(_run(m, failing, plan, unreachable, dead, labels, sound_enough))


async def _run(
    m: Machine,
    failing: Failing,
    plan: list[tuple[str, bool]],
    unreachable: set[str],
    dead: set[str],
    labels: Mapping[Any, str],
    sound_enough: bool,
) -> None:
    async with workflow_environment(m, verify_machines="off") as env:
        engine = env.engine
        handle = await engine.start(m, None, id="i")
        await env.run_until_idle()  # it has entered its initial state
        state, values = "s0", {"n": 0}
        for name, fail in plan:
            if m.states[state].terminal:
                break
            enabled = [
                t
                for t in m.transitions
                if t.source == state and t.event == name and t.guard is not None
                if t.guard(values, {})
            ]
            before = len(await engine.history("i"))
            failing.now = {step(t) for t in enabled} if fail else set()
            outcome: lf.MachineState | lf.InvalidTransition | lf.TransitionFailedError
            try:
                outcome = await engine.execute("i", name, timeout=WAIT)
            except (lf.InvalidTransition, lf.TransitionFailedError) as exc:
                outcome = exc
            if isinstance(outcome, lf.InvalidTransition):
                assert not enabled, f"{name} refused in {state} {values}: {outcome}"
                event("refused")
                assert len(await engine.history("i")) == before
                continue
            if isinstance(outcome, lf.TransitionFailedError):
                t = enabled[0]
                assert fail
                assert t.activity is not None
                assert labels[t] not in dead
                assert outcome.state == (t.failure[0] if t.failure else state)
                state = outcome.state
                assert state not in unreachable
                event("failed, compensated" if outcome.compensated else "failed, stayed")
                continue
            assert enabled, f"{name} accepted in {state} {values}"
            event("moved")
            t = enabled[0]  # nondeterminism: declaration order wins (verify reports it)
            assert labels[t] not in dead
            values = dict(t.update(values, {})) if t.update else values
            state = t.target
            assert (outcome.state, outcome.data) == (state, values)
            assert state not in unreachable
            if sound_enough and not m.states[state].terminal:
                assert can_complete(m, (state,), values)[0]
        if m.states[state].terminal:
            ended = await handle.result(timeout=WAIT)
            assert ended.state == state
            event("ended")
        assert (await engine.machine_state("i")).state == state
        moves = [e.data for e in await engine.history("i") if isinstance(e.data, Transitioned)]
        assert moves[0].transition == "start"


def step(t: Any) -> str:
    return step_options(t.activity).name if t.activity is not None else ""
