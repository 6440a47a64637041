"""A state machine and a code-first workflow under one name and version, registered
by engines of different processes on one database (every backend).

Engines claim instances by name and version. A machine engine claimed a code-first
instance and wrote ``sm.transitioned`` into its history, wedging it for good; a
code-first engine parked machine instances with a misleading decoding error. Each
now parks the other kind's instance, saying why and writing nothing of its own, and
an engine of the instance's kind resumes it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow import WorkflowContext
from ledgerflow.testing import ManualClock
from ledgerflow.workflow.executors import other_kind
from ledgerflow.workflow.history import History, Started, StepDone, Transitioned

from ._engines import WAIT, EngineFactory, until_status, waiting_for


def approval_machine() -> lf.Machine:
    m = lf.Machine("kinds.approval", version=1)
    m.state("open", initial=True)
    m.state("done", terminal=True)
    m.transition("open", "approve", "done")
    return m


@lf.workflow(name="kinds.approval", version=1)
async def approval(ctx: WorkflowContext, amount: int) -> int:
    await ctx.sleep(timedelta(hours=1))
    return amount * 2


def kinds_of_commands(types: list[str]) -> set[str]:
    return {t.split(".")[0] for t in types if t not in ("wf.stuck", "wf.resumed")}


async def test_a_machine_engine_leaves_a_code_first_instance_alone(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(approval) as code:
        await code.start(approval, 21, id="cf-1")
    async with engine(approval_machine()) as machines:
        await until_status(machines, "cf-1", "stuck")
        described = await machines.describe("cf-1")
        assert "is a code-first workflow 'kinds.approval' v1" in str(described.error)
        with pytest.raises(lf.WorkflowInputError, match="runs code, not a state machine"):
            await machines.machine_state("cf-1")
        with pytest.raises(lf.WorkflowInputError, match="runs code, not a state machine"):
            await machines.execute("cf-1", "approve", timeout=WAIT)
        types = [e.type for e in await machines.history("cf-1")]
        assert kinds_of_commands(types) == {"wf"}  # no sm.* record
    async with engine(approval) as code:  # its own kind's engine takes it back
        await waiting_for(code, "cf-1", "timer")
        clock.advance(timedelta(hours=1))
        assert await code.handle("cf-1").result(timeout=WAIT) == 42


async def test_a_code_first_engine_leaves_a_machine_instance_alone(
    engine: EngineFactory,
) -> None:
    machine = approval_machine()
    async with engine(machine) as machines:
        await machines.start(machine, None, id="m-1")
    async with engine(approval) as code:
        await until_status(code, "m-1", "stuck")
        described = await code.describe("m-1")
        assert "is a state machine 'kinds.approval' v1" in str(described.error)
    async with engine(machine) as machines:
        await until_status(machines, "m-1", "running")
        done = await machines.execute("m-1", "approve", timeout=WAIT)
        assert done.state == "done"


async def test_a_signal_to_a_machine_instance_is_refused_and_not_recorded(
    engine: EngineFactory,
) -> None:
    """A machine takes events; a signal to one was recorded (HTTP said 202) and left
    unread for ever, its sender believing it done."""
    machine = approval_machine()
    async with engine(machine) as machines:
        await machines.start(machine, None, id="m-2")
        await until_status(machines, "m-2", "running")
        for name in ("approve", "nope"):
            with pytest.raises(lf.SignalInputError, match="takes events, not signals"):
                await machines.signal("m-2", name, {"by": "ana"})
        assert "wf.signal" not in [e.type for e in await machines.history("m-2")]
        assert (await machines.execute("m-2", "approve", timeout=WAIT)).state == "done"
        assert (await machines.describe("m-2")).status == "completed"


def legacy(*commands: Any) -> History:
    """An instance started by a release that did not record its kind."""
    history = History("x", Started(name="kinds.approval", version=1, input=None))
    for version, command in enumerate(commands, start=2):
        history.add(version, command)
    return history


def test_an_instance_started_without_its_kind_is_told_by_its_commands() -> None:
    """An upgrade parked every state machine an older release had started and no
    engine had run yet (no kind recorded, no command): taken for code-first, stuck
    for good. Until its first command says otherwise it runs as what is registered,
    as it always did."""
    machine, code = approval_machine(), approval
    fresh = legacy()
    assert fresh.instance_kind() is None
    assert other_kind(machine, fresh) is None
    assert other_kind(code, fresh) is None
    stepped = legacy(StepDone(seq=1, name="s", result=1))
    assert stepped.instance_kind() == "workflow"
    assert other_kind(machine, stepped) is not None
    moved = legacy(
        StepDone(seq=1, name="enter", result=None),  # an activity's step first
        Transitioned(
            seq=0, name="start", transition="start", source=(), marking=("open",),
            targets=("open",), data={}, at_us=0,
        ),
    )  # fmt: skip
    assert moved.instance_kind() == "machine"
    assert other_kind(code, moved) is not None
    assert other_kind(machine, moved) is None
