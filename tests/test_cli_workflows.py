"""``ledgerflow workflows ...``: the CLI reads instances and records signals and
cancellations; a real Engine (on a ManualClock, so the signal timeout never fires)
is what acts on them."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import ledgerflow as lf
from ledgerflow.cli import app
from ledgerflow.resilience.book import default_actor
from ledgerflow.store.runtime import Lease

from .conftest import pg_url

WAITING = "wait-1"
DONE = "done-1"

shipped: list[str] = []


def ship(order: str) -> str:
    shipped.append(order)
    return f"shipped {order}"


@lf.workflow(name="approval", version=1)
async def approval(ctx: lf.WorkflowContext, order: str) -> str:
    # Annotated: otherwise mypy infers None (wait_for_signal's `type[T] | Any` parameter).
    approved: bool | None = await ctx.wait_for_signal("approval", bool, timeout=timedelta(days=3))
    if not approved:
        return f"{order} rejected"
    result: str = await ctx.step(ship, order)
    return result


async def cli(*args: str) -> Result:
    """Invoke the CLI on a thread: it runs its own event loop with asyncio.run."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "200"})


def engine(url: str, clock: lf.ManualClock) -> lf.Engine:
    return lf.Engine(url, workflows=[approval], clock=clock)


async def until_waiting(eng: lf.Engine, workflow_id: str) -> None:
    for _ in range(250):
        if (await eng.describe(workflow_id)).waiting_for is not None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{workflow_id} never waited")


async def outcome(eng: lf.Engine, clock: lf.ManualClock, workflow_id: str) -> Any:
    """The instance's result once ``eng`` has acted on what the CLI recorded.

    Another process's nudge is seen at the engine's next poll, one poll interval
    on its clock; a manual clock moves a second at a time until the instance ends,
    far short of the signal's 3-day timeout.
    """
    for _ in range(50):
        clock.advance(timedelta(seconds=1))
        try:
            return await eng.handle(workflow_id).result(timeout=0.1)
        except TimeoutError:
            continue
    raise AssertionError(f"{workflow_id} did not finish")


async def prepare(url: str, clock: lf.ManualClock) -> None:
    """One instance waiting for its approval, one approved and completed."""
    async with engine(url, clock) as eng:
        done = await eng.start(approval, "order-d", id=DONE)
        await until_waiting(eng, DONE)
        await eng.signal(DONE, "approval", True)
        assert await done.result(timeout=5) == "shipped order-d"
        await eng.start(approval, "order-w", id=WAITING)
        await until_waiting(eng, WAITING)


@pytest.fixture
def clock() -> lf.ManualClock:
    return lf.ManualClock()


@pytest.fixture
async def db(tmp_path: Path, clock: lf.ManualClock) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    await prepare(url, clock)
    return url


def listed(output: str) -> dict[str, str]:
    """id -> status, from the rows of the ``list`` table."""
    rows: dict[str, str] = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 5 and cells[1] == "approval":
            rows[cells[0]] = cells[3]
    return rows


async def history_json(url: str, workflow_id: str) -> list[dict[str, Any]]:
    result = await cli("workflows", "history", workflow_id, "--json", "--db", url)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


# -- reading --------------------------------------------------------------------------


async def test_list_shows_every_instance_and_filters_by_status(db: str) -> None:
    result = await cli("workflows", "list", "--db", db)
    assert result.exit_code == 0, result.output
    assert listed(result.stdout) == {DONE: "completed", WAITING: "running"}
    assert "│ 1 " in result.stdout  # the version column

    running = await cli("workflows", "list", "--status", "running", "--db", db)
    assert listed(running.stdout) == {WAITING: "running"}
    completed = await cli("workflows", "list", "--status", "completed", "--db", db)
    assert listed(completed.stdout) == {DONE: "completed"}
    failed = await cli("workflows", "list", "--status", "failed", "--db", db)
    assert failed.exit_code == 0
    assert listed(failed.stdout) == {}
    assert "no workflow instances with status failed" in failed.stdout


async def test_list_pages_with_limit_and_after(db: str) -> None:
    first = await cli("workflows", "list", "--limit", "1", "--db", db)
    assert listed(first.stdout) == {DONE: "completed"}
    assert f"--after {DONE}" in first.stdout
    second = await cli("workflows", "list", "--limit", "1", "--after", DONE, "--db", db)
    assert listed(second.stdout) == {WAITING: "running"}


async def test_list_rejects_an_unknown_status(db: str) -> None:
    result = await cli("workflows", "list", "--status", "done", "--db", db)
    assert result.exit_code == 2
    assert "unknown status 'done'" in result.stderr
    assert "Traceback" not in result.output


async def test_show_describes_a_waiting_and_a_completed_instance(db: str) -> None:
    waiting = await cli("workflows", "show", WAITING, "--db", db)
    assert waiting.exit_code == 0, waiting.output
    lines = waiting.stdout.splitlines()
    assert f"id:          {WAITING}" in lines
    assert "workflow:    approval v1" in lines
    assert "status:      running" in lines
    assert "waiting for: signal 'approval'" in lines
    assert "events:      2" in lines
    assert "created:     2030-01-01 00:00:00 UTC" in lines
    assert not any(line.startswith(("result:", "error:", "unconsumed")) for line in lines)
    sent = await cli("workflows", "signal", WAITING, "later", "--db", db)
    assert sent.exit_code == 0, sent.output
    kept = await cli("workflows", "show", WAITING, "--db", db)
    assert "unconsumed signals: later" in kept.stdout.splitlines()

    done = await cli("workflows", "show", DONE, "--db", db)
    lines = done.stdout.splitlines()
    assert "status:      completed" in lines
    assert 'result:      "shipped order-d"' in lines
    assert not any(line.startswith("waiting for:") for line in lines)


async def test_history_lists_the_events(db: str) -> None:
    table = await cli("workflows", "history", WAITING, "--db", db)
    assert table.exit_code == 0, table.output
    assert "wf.started" in table.stdout
    assert "wf.signal_waiting" in table.stdout
    assert '"input": "order-w"' in table.stdout
    assert "2030-01-01 00:00:00" in table.stdout

    events = await history_json(db, WAITING)
    assert [(e["version"], e["type"]) for e in events] == [
        (1, "wf.started"),
        (2, "wf.signal_waiting"),
    ]
    assert events[0]["data"] == {
        "name": "approval",
        "version": 1,
        "input": "order-w",
        "kind": "workflow",
    }
    assert events[1]["data"]["name"] == "approval"
    assert events[0]["recorded_at"] == "2030-01-01T00:00:00Z"
    # In pages: 20,000 events took 23 s to draw, with no way to ask for fewer.
    first = await cli("workflows", "history", WAITING, "--limit", "1", "--db", db)
    assert "wf.started" in first.stdout
    assert "wf.signal_waiting" not in first.stdout
    assert "(more may follow: --after 1)" in first.stdout
    rest = await cli("workflows", "history", WAITING, "--after", "1", "--json", "--db", db)
    assert [json.loads(line)["version"] for line in rest.stdout.splitlines()] == [2]


# -- acting ---------------------------------------------------------------------------


async def test_signal_is_recorded_by_the_cli_and_carried_out_by_an_engine(
    db: str, clock: lf.ManualClock
) -> None:
    shipped.clear()
    result = await cli("workflows", "signal", WAITING, "approval", "--payload", "true", "--db", db)
    assert result.exit_code == 0, result.output
    assert f"sent signal 'approval' to workflow '{WAITING}'" in result.stdout

    # The CLI only recorded the signal: nothing took it and nothing shipped.
    events = await history_json(db, WAITING)
    assert events[-1]["type"] == "wf.signal"
    assert events[-1]["data"] == {"name": "approval", "payload": True}
    # Who sent it is recorded (nothing was, unlike a cancel: no --actor either).
    assert events[-1]["metadata"]["actor"] == default_actor()
    assert shipped == []
    show = await cli("workflows", "show", WAITING, "--db", db)
    assert "status:      running" in show.stdout.splitlines()

    # An engine started afterwards finds the nudged instance and completes it.
    async with engine(db, clock) as eng:
        assert await eng.handle(WAITING).result(timeout=5) == "shipped order-w"
    assert shipped == ["order-w"]
    completed = await cli("workflows", "list", "--status", "completed", "--db", db)
    assert listed(completed.stdout) == {DONE: "completed", WAITING: "completed"}


async def test_cancel_from_the_cli_reaches_a_running_engine(db: str, clock: lf.ManualClock) -> None:
    async with engine(db, clock) as eng:
        result = await cli(
            "workflows", "cancel", WAITING, "--reason", "customer changed mind", "--db", db
        )
        assert result.exit_code == 0, result.output
        assert f"cancellation of workflow '{WAITING}' requested" in result.stdout
        with pytest.raises(lf.WorkflowFailedError) as failed:
            await outcome(eng, clock, WAITING)
    assert failed.value.status == "cancelled"
    assert failed.value.message == "customer changed mind"

    running = await cli("workflows", "list", "--status", "running", "--db", db)
    assert listed(running.stdout) == {}
    cancelled = await cli("workflows", "list", "--status", "cancelled", "--db", db)
    assert listed(cancelled.stdout) == {WAITING: "cancelled"}
    types = [e["type"] for e in await history_json(db, WAITING)]
    assert types == ["wf.started", "wf.signal_waiting", "wf.cancel_requested", "wf.finished"]
    show = await cli("workflows", "show", WAITING, "--db", db)
    assert "error:       WorkflowCancelled: customer changed mind" in show.stdout.splitlines()


async def test_cli_refuses_a_signal_payload_that_does_not_fit_the_wait(db: str) -> None:
    """Case 3: checked against the waited-for type's recorded schema, without the
    workflow's code; exit 2, nothing recorded."""
    before = await cli("workflows", "history", WAITING, "--json", "--db", db)
    for payload in ('{"approved": true}', "null", '"yes"'):
        result = await cli(
            "workflows", "signal", WAITING, "approval", "--payload", payload, "--db", db
        )
        assert result.exit_code == 2, result.output
        assert "refused" in result.output
        assert "boolean" in result.output
        assert "Traceback" not in result.output
    after = await cli("workflows", "history", WAITING, "--json", "--db", db)
    assert after.stdout == before.stdout


async def test_the_cli_leaves_the_leases_of_a_running_engine_alone(db: str) -> None:
    lease_until = 2**53
    async with lf.open_store(db) as store:
        waiting = await store.get_wakeup(WAITING)
        claimed = await store.claim_wakeups(
            "another-engine", now_us=2**52, lease_until_us=lease_until, limit=10
        )
        # The engine started it with its lease (epoch 1) and gave that back when it
        # waited; this claim takes the next epoch.
        assert waiting is not None
        assert (waiting.lease_owner, waiting.lease_epoch) == (None, 1)
        assert claimed == [Lease(WAITING, 2)]
    signal = ["signal", WAITING, "approval", "--payload", "true"]
    for args in (["list"], ["show", WAITING], signal):
        result = await cli("workflows", *args, "--db", db)
        assert result.exit_code == 0, result.output
    async with lf.open_store(db) as store:
        wakeup = await store.get_wakeup(WAITING)
    assert wakeup is not None
    assert (wakeup.lease_owner, wakeup.lease_until_us, wakeup.lease_epoch) == (
        "another-engine",
        lease_until,
        2,
    )
    # The signal nudged it (due now rather than at the signal's timeout), for the
    # lease holder to act on.
    assert waiting.due_at_us is not None
    assert wakeup.due_at_us is not None
    assert wakeup.due_at_us < waiting.due_at_us


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["show", "nope"],
        ["history", "nope"],
        ["history", "nope", "--json"],
        ["signal", "nope", "approval"],
        ["cancel", "nope"],
    ],
)
async def test_an_unknown_id_exits_2_with_one_line(db: str, args: list[str]) -> None:
    result = await cli("workflows", *args, "--db", db)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: no workflow instance 'nope'"
    assert result.stdout == ""


@pytest.mark.parametrize("action", ["signal", "cancel"])
async def test_a_finished_instance_refuses_signals_and_cancellation(db: str, action: str) -> None:
    before = await history_json(db, DONE)
    assert before[-1]["type"] == "wf.finished"
    args = [action, DONE, "approval"] if action == "signal" else [action, DONE]
    result = await cli("workflows", *args, "--db", db)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: cannot {action} workflow '{DONE}': it is already completed"
    )
    assert await history_json(db, DONE) == before  # nothing was appended


@pytest.mark.parametrize("payload", ["{yes", "NaN", ""])
async def test_a_payload_that_is_not_json_exits_2_and_sends_nothing(db: str, payload: str) -> None:
    args = ["signal", WAITING, "approval", "--payload", payload]
    result = await cli("workflows", *args, "--db", db)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --payload is not valid JSON: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(await history_json(db, WAITING)) == 2


async def test_a_missing_sqlite_file_is_reported_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    result = await cli("workflows", "list", "--db", f"sqlite:///{path}")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: no ledger at sqlite:///{path}"
    assert not path.exists()


@pytest.mark.parametrize("url", ["mysql://db/x", "sqlite://relative.db"])
async def test_a_bad_url_exits_2_with_one_line(url: str) -> None:
    result = await cli("workflows", "list", "--db", url)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


# -- PostgreSQL -----------------------------------------------------------------------


async def test_list_on_postgres(pg_schema: str, clock: lf.ManualClock) -> None:
    url = pg_url(pg_schema)
    await prepare(url, clock)
    result = await cli("workflows", "list", "--db", url)
    assert result.exit_code == 0, result.output
    assert listed(result.stdout) == {DONE: "completed", WAITING: "running"}
    waiting = await cli("workflows", "list", "--status", "running", "--db", url)
    assert listed(waiting.stdout) == {WAITING: "running"}


def refuse(order: str) -> str:
    raise RuntimeError(f"ERP said: \x1b]0;pwned\x07\x1b[2J\x1b[32mcompleted\r{order}\u202e")


@lf.workflow(name="refused", version=1)
async def refused(ctx: lf.WorkflowContext, order: str) -> str:
    result: str = await ctx.step(refuse, order, retry=lf.RetryPolicy(max_attempts=1))
    return result


async def test_the_cli_shows_control_characters_escaped_never_acts_on_them(tmp_path: Path) -> None:
    """Ids, names and messages come from API callers and external systems: printed
    raw, an ESC sequence in a step's error retitled the operator's terminal, cleared
    it and painted a fake "completed"; a CR wrote over the line. Ids with control
    characters are refused at the start too."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with lf.Engine(url, workflows=[refused]) as eng:
        for bad in ("o\x1b[2J", "o\r1", "o\x07", "o\x9b"):
            with pytest.raises(lf.WorkflowInputError, match="control characters"):
                await eng.start(refused, "x", id=bad)
        handle = await eng.start(refused, "o-1", id="o-\u202e1")
        with pytest.raises(lf.WorkflowFailedError):
            await handle.result(timeout=10)
    for args in (["workflows", "list"], ["workflows", "show", "o-\u202e1"]):
        result = await cli(*args, "--db", url)
        assert result.exit_code == 0, result.output
        for raw in ("\x1b", "\x07", "\r", "\u202e"):
            assert raw not in result.stdout, (args, result.stdout)
        assert "o-\\u202e1" in result.stdout
    shown = await cli("workflows", "show", "o-\u202e1", "--db", url)
    assert "ERP said: \\x1b]0;pwned\\x07\\x1b[2J\\x1b[32mcompleted\\x0do-1" in shown.stdout


async def test_a_payload_too_deep_or_not_json_is_one_line_and_exit_2(db: str) -> None:
    """A payload nested deeper than the JSON reader goes printed a traceback (exit
    1); NaN passed as a result of a skip."""
    deep = "[" * 5000 + "]" * 5000
    for args, said in (
        (["workflows", "signal", WAITING, "approval", "--payload", deep], "nested too deeply"),
        (["workflows", "signal", WAITING, "approval", "--payload", "[NaN]"], "not valid JSON"),
        (["workflows", "skip", WAITING, "--result", "NaN", "--reason", "r"], "not valid JSON"),
    ):
        result = await cli(*args, "--db", db)
        assert result.exit_code == 2, result.output
        assert said in result.stderr
        assert "Traceback" not in result.output
