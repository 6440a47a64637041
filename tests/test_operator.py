"""A step that used up its attempts under a policy that parks: the instance waits as
``needs_attention``, and an operator retries, skips, compensates or cancels it, from
Python (every backend) or the CLI."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import ledgerflow as lf
from ledgerflow import ManualClock, WorkflowContext
from ledgerflow.cli import app
from ledgerflow.workflow.history import StepDone, StepFailed, StepParked, StepRetried

from ._engines import WAIT, EngineFactory, until_status, waiting_for

calls: Counter[str] = Counter()
erp = {"healthy": False}


@pytest.fixture(autouse=True)
def fresh() -> None:
    calls.clear()
    erp["healthy"] = False


def reserve(order: str) -> str:
    calls["reserve"] += 1
    return f"reserved {order}"


def release(order: str) -> None:
    calls["release"] += 1


def create_po(order: str) -> str:
    calls["erp"] += 1
    if not erp["healthy"]:
        raise ConnectionError("ERP unreachable")
    return f"po for {order}"


@lf.workflow(name="ordering", version=1)
async def ordering(ctx: WorkflowContext, order: str) -> str:
    await ctx.step(reserve, order, compensate=release)
    po = await ctx.step(create_po, order, policy="erp")
    return f"{order}: {po}"


PARKS = lf.Policy(retry=lf.Retry(max_attempts=2, initial_interval=0.01), on_exhausted="park")


async def parked(e: lf.Engine, workflow_id: str) -> None:
    await e.start(ordering, workflow_id, id=workflow_id)
    await waiting_for(e, workflow_id, "operator: step 'create_po' failed 2 time(s)")


async def test_a_step_out_of_attempts_parks_its_instance_for_an_operator(
    engine: EngineFactory,
) -> None:
    async with engine(ordering, policies={"erp": PARKS}) as e:
        await parked(e, "o-1")
        described = await e.describe("o-1")
        assert described.status == "needs_attention"
        assert described.waiting_for is not None
        assert "ConnectionError: ERP unreachable (retry, skip or compensate it)" in (
            described.waiting_for
        )
        listed = await e.list_workflows(status="needs_attention")
        assert [r.workflow_id for r in listed] == ["o-1"]
        (park,) = [ev.data for ev in await e.history("o-1") if isinstance(ev.data, StepParked)]
        assert (park.attempts, park.policy, park.policy_version) == (2, "erp", 1)
        with pytest.raises(TimeoutError):
            await e.handle("o-1").result(timeout=0.3)
    assert calls["erp"] == 2
    assert calls["release"] == 0  # nothing compensated: a person decides


async def test_retry_gives_the_step_a_fresh_set_of_attempts(engine: EngineFactory) -> None:
    async with engine(ordering, policies={"erp": PARKS}) as e:
        await parked(e, "o-2")
        # Still down: two more attempts, then parked again.
        assert await e.retry_step("o-2", reason="ERP restarted", actor="alice") == 2
        await waiting_for(e, "o-2", "operator: step 'create_po'")
        async with asyncio.timeout(WAIT):
            while calls["erp"] < 4:  # noqa: ASYNC110 - the retried attempts run
                await asyncio.sleep(0.01)
        await waiting_for(e, "o-2", "operator: step 'create_po'")
        erp["healthy"] = True
        await e.retry_step("o-2", reason="ERP really back", actor="bob")
        assert await e.handle("o-2").result(timeout=WAIT) == "o-2: po for o-2"
        history = await e.history("o-2")
        assert (await e.describe("o-2")).status == "completed"
    retried = [ev for ev in history if isinstance(ev.data, StepRetried)]
    assert [(ev.data.by, ev.data.reason) for ev in retried] == [
        ("alice", "ERP restarted"),
        ("bob", "ERP really back"),
    ]
    assert retried[0].metadata.actor == "alice"
    assert retried[0].metadata.reason == "retry: ERP restarted"
    assert calls["erp"] == 5


async def test_skip_records_the_result_an_operator_gives(engine: EngineFactory) -> None:
    async with engine(ordering, policies={"erp": PARKS}) as e:
        await parked(e, "o-3")
        await e.skip_step("o-3", "PO-4711 (entered by hand)", reason="typed into the ERP")
        assert await e.handle("o-3").result(timeout=WAIT) == "o-3: PO-4711 (entered by hand)"
        done = [ev for ev in await e.history("o-3") if isinstance(ev.data, StepDone)]
    assert done[-1].metadata.reason == "skip: typed into the ERP"
    assert calls["erp"] == 2


async def test_a_skipped_result_must_fit_the_steps_return_type(engine: EngineFactory) -> None:
    """The park records the step's return type as a JSON Schema, so a result that
    would break the workflow at replay (it decodes results by that type) is refused
    before it is recorded (it once made the instance stuck)."""
    async with engine(ordering, policies={"erp": PARKS}) as e:
        await parked(e, "o-9")
        (park,) = [ev.data for ev in await e.history("o-9") if isinstance(ev.data, StepParked)]
        assert park.result_schema == {"type": "string"}
        before = await e.history("o-9")
        with pytest.raises(lf.WorkflowInputError, match="'create_po''s return type"):
            await e.skip_step("o-9", 4711, reason="a number by mistake")
        assert await e.history("o-9") == before
        assert (await e.describe("o-9")).status == "needs_attention"
        await e.skip_step("o-9", "PO-4711", reason="typed into the ERP")
        assert await e.handle("o-9").result(timeout=WAIT) == "o-9: PO-4711"


async def test_compensate_fails_the_step_and_undoes_the_rest(engine: EngineFactory) -> None:
    async with engine(ordering, policies={"erp": PARKS}) as e:
        await parked(e, "o-4")
        await e.compensate("o-4", reason="customer withdrew", actor="carol")
        with pytest.raises(lf.WorkflowFailedError, match="given up by carol: customer withdrew"):
            await e.handle("o-4").result(timeout=WAIT)
        assert (await e.describe("o-4")).status == "compensated"
        failed = [ev.data for ev in await e.history("o-4") if isinstance(ev.data, StepFailed)]
    assert failed[-1].error_type == "ConnectionError"
    assert calls["release"] == 1


async def test_a_parked_instance_can_be_cancelled(engine: EngineFactory) -> None:
    async with engine(ordering, policies={"erp": PARKS}) as e:
        await parked(e, "o-5")
        await e.cancel("o-5", "order cancelled", actor="dave")
        with pytest.raises(lf.WorkflowFailedError, match="cancelled"):
            await e.handle("o-5").result(timeout=WAIT)
        (asked,) = [ev for ev in await e.history("o-5") if ev.type == "wf.cancel_requested"]
    assert (asked.metadata.actor, asked.metadata.reason) == ("dave", "order cancelled")
    assert calls["release"] == 1


async def test_operator_actions_refuse_what_they_cannot_do(engine: EngineFactory) -> None:
    async with engine(ordering, policies={"erp": PARKS}) as e:
        erp["healthy"] = True
        assert await (await e.start(ordering, "ok", id="ok")).result(timeout=WAIT) == (
            "ok: po for ok"
        )
        with pytest.raises(lf.WorkflowFinishedError):
            await e.retry_step("ok", reason="x")
        with pytest.raises(lf.WorkflowNotFoundError):
            await e.skip_step("nope", 1, reason="x")
        erp["healthy"] = False
        await parked(e, "o-6")
        with pytest.raises(lf.WorkflowInputError, match="a reason is required"):
            await e.compensate("o-6", reason=" ")
        with pytest.raises(lf.StepNotParkedError, match="no step waits"):
            await e.skip_step("o-6", 1, reason="wrong step", seq=1)
        with pytest.raises(lf.WorkflowInputError):
            await e.skip_step("o-6", object(), reason="not recordable")


SLOW = lf.Policy(retry=lf.Retry(max_attempts=3, initial_interval=600, max_interval=600))


async def test_retry_now_cuts_a_long_backoff_short(
    engine: EngineFactory, clock: ManualClock
) -> None:
    async with engine(ordering, policies={"erp": SLOW}) as e:
        await e.start(ordering, "o-7", id="o-7")
        await waiting_for(e, "o-7", "retry of step 'create_po' at ")
        erp["healthy"] = True
        await e.retry_step("o-7", reason="ERP is back, no need to wait")
        assert await e.handle("o-7").result(timeout=WAIT) == "o-7: po for o-7"
    assert calls["erp"] == 2


# -- the CLI -------------------------------------------------------------------------


async def cli(*args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "200"})


async def test_the_cli_retries_skips_and_compensates(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with lf.Engine(
        url, workflows=[ordering], policies={"erp": PARKS}, poll_interval=0.05
    ) as e:
        for wid in ("c-1", "c-2", "c-3"):
            await parked(e, wid)
        listed = await cli("workflows", "list", "--status", "needs_attention", "--db", url)
        assert listed.exit_code == 0, listed.output
        assert listed.stdout.count("needs_attention") == 3
        shown = await cli("workflows", "show", "c-1", "--db", url)
        assert "operator: step 'create_po'" in " ".join(shown.stdout.split())
        refused = await cli("workflows", "retry", "c-1", "--db", url)
        assert refused.exit_code == 2
        assert "--reason is required" in refused.stderr
        erp["healthy"] = True
        result = await cli(
            "workflows", "retry", "c-1", "--reason", "ERP back", "--actor", "ops", "--db", url
        )
        assert result.exit_code == 0, result.output
        assert "retrying step 2 of workflow 'c-1'" in result.stdout
        result = await cli(
            "workflows", "skip", "c-2", "--result", json.dumps("PO-1"), "--reason", "manual",
            "--db", url,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        result = await cli("workflows", "compensate", "c-3", "--reason", "withdrawn", "--db", url)
        assert result.exit_code == 0, result.output
        bad = await cli("workflows", "skip", "c-3", "--result", "{", "--reason", "x", "--db", url)
        assert bad.exit_code == 2
        assert "--result is not valid JSON" in bad.stderr
        assert await e.handle("c-1").result(timeout=WAIT) == "c-1: po for c-1"
        assert await e.handle("c-2").result(timeout=WAIT) == "c-2: PO-1"
        with pytest.raises(lf.WorkflowFailedError):
            await e.handle("c-3").result(timeout=WAIT)
        again = await cli("workflows", "retry", "c-1", "--reason", "again", "--db", url)
        assert again.exit_code == 2
        assert "it is already completed" in again.stderr


@lf.workflow(name="op.resumable")
async def resumable_before(ctx: lf.WorkflowContext, order: str) -> str:
    await ctx.wait_for_signal("go")
    return order


@lf.workflow(name="op.resumable")
async def resumable_after(ctx: lf.WorkflowContext, order: str) -> str:
    await ctx.sleep(0)  # not what its history recorded: it parks as stuck
    return order


async def test_the_cli_resumes_a_stuck_instance(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with lf.Engine(url, workflows=[resumable_before]) as e:
        await e.start(resumable_before, "o-1", id="r-1")
        await e.start(resumable_before, "o-2", id="r-2")
        await waiting_for(e, "r-1", "signal 'go'")
    async with lf.Engine(url, workflows=[resumable_after]) as e:
        await e.signal("r-1", "go")
        await until_status(e, "r-1", "stuck")
    refused = await cli("workflows", "resume", "r-1", "--db", url)
    assert refused.exit_code == 2
    assert "--reason is required" in refused.stderr
    not_stuck = await cli("workflows", "resume", "r-2", "--reason", "x", "--db", url)
    assert not_stuck.exit_code == 2
    assert "not stuck" in not_stuck.stderr
    done = await cli(
        "workflows", "resume", "r-1", "--reason", "fix out", "--actor", "ana", "--db", url
    )
    assert done.exit_code == 0, done.output
    assert "resumed workflow 'r-1'" in done.stdout
    async with lf.Engine(url, workflows=[resumable_before]) as e:  # the fixed code
        assert await e.handle("r-1").result(timeout=WAIT) == "o-1"
        resumed = [ev for ev in await e.history("r-1") if ev.type == "wf.resumed"]
    assert [ev.metadata.actor for ev in resumed] == ["ana"]
