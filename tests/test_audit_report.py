"""Who-did-what reports: the events recorded with an actor, filtered by actor,
tenant, time and type, as CSV and JSON (Python and `ledgerflow audit report`)."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

from typer.testing import CliRunner

import ledgerflow as lf
from ledgerflow.audit_report import actions, actions_csv, actions_json
from ledgerflow.cli import app

from ._engines import EngineFactory, waiting_for


@lf.workflow(name="approve", version=1)
async def approve(ctx: lf.WorkflowContext, order: str) -> str:
    decision: str | None = await ctx.wait_for_signal("decision", str)
    return f"{order}: {decision}"


async def history(engine: EngineFactory, clock: lf.ManualClock) -> None:
    async with engine(approve) as e:
        await e.start(approve, "a", id="a-1", tenant="acme", actor="ana", reason="new order")
        await e.start(approve, "b", id="b-1", tenant="beta", actor="bo")
        await e.start(approve, "c", id="c-1")  # no actor: not in the report
        for workflow_id in ("acme/a-1", "beta/b-1", "c-1"):
            await waiting_for(e, workflow_id, "signal 'decision'")
        clock.advance(timedelta(hours=1))
        await e.signal("acme/a-1", "decision", "yes", actor="cy", reason="=HYPERLINK(1)")
        await e.cancel("beta/b-1", "customer withdrew", actor="ana")
        await e.handle("acme/a-1").result(timeout=20)


async def test_the_report_lists_each_action_with_who_and_why(
    engine: EngineFactory, clock: lf.ManualClock, store_url: str
) -> None:
    await history(engine, clock)
    async with engine(approve) as e:
        everything = [a async for a in actions(e.store)]
        assert [(a.stream_id, a.type, a.actor, a.tenant) for a in everything] == [
            ("wf-acme/a-1", "wf.started", "ana", "acme"),
            ("wf-beta/b-1", "wf.started", "bo", "beta"),
            ("wf-acme/a-1", "wf.signal", "cy", "acme"),
            ("wf-beta/b-1", "wf.cancel_requested", "ana", "beta"),
        ]
        assert everything[0].reason == "new order"
        by_ana = [a async for a in actions(e.store, actor="ana")]
        assert [a.type for a in by_ana] == ["wf.started", "wf.cancel_requested"]
        # The signal names no tenant; its stream's namespace does.
        acme = [a async for a in actions(e.store, tenant="acme")]
        assert [a.actor for a in acme] == ["ana", "cy"]
        later = everything[2].recorded_at
        assert [a.actor async for a in actions(e.store, since=later)] == ["cy", "ana"]
        assert [a.actor async for a in actions(e.store, until=later)] == ["ana", "bo"]
        only = [a async for a in actions(e.store, types={"wf.signal"})]
        assert [a.actor for a in only] == ["cy"]

    async with engine(approve) as e:
        # An all-tenants caller's id whose prefix cannot name a tenant is nobody's
        # (the report showed "<script>alert(1)<" as its tenant).
        await e.start(approve, "d", id="<script>alert(1)</script>", actor="root")
        (odd,) = [a async for a in actions(e.store, actor="root")]
        assert odd.tenant is None
    table = list(csv.DictReader(io.StringIO(actions_csv(everything))))
    assert [row["actor"] for row in table] == ["ana", "bo", "cy", "ana"]
    # A reason a spreadsheet would run as a formula is quoted as text.
    assert table[2]["reason"] == "'=HYPERLINK(1)"
    parsed = json.loads(actions_json(everything))
    assert parsed[2]["reason"] == "=HYPERLINK(1)"  # JSON keeps it as it was
    assert parsed[0]["recorded_at"] == everything[0].recorded_at.isoformat()


def test_the_cli_prints_csv_or_json(tmp_path: Path) -> None:
    import asyncio

    db = f"sqlite:///{tmp_path / 'audit.db'}"

    async def record() -> None:
        async with lf.Engine(db, workflows=[approve], poll_interval=0.05) as e:
            await e.start(approve, "a", id="a-1", tenant="acme", actor="ana")
            await e.start(approve, "b", id="b-1", actor="bo")

    asyncio.run(record())
    runner = CliRunner()
    as_json = runner.invoke(app, ["audit", "report", "--db", db, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert [a["actor"] for a in json.loads(as_json.stdout)] == ["ana", "bo"]
    as_csv = runner.invoke(app, ["audit", "report", "--db", db, "--tenant", "acme"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["actor"], r["tenant"], r["stream_id"]) for r in rows] == [
        ("ana", "acme", "wf-acme/a-1")
    ]
    wrong = runner.invoke(app, ["audit", "report", "--db", db, "--format", "xml"])
    assert wrong.exit_code == 2
    missing = runner.invoke(app, ["audit", "report", "--db", f"sqlite:///{tmp_path / 'no.db'}"])
    assert missing.exit_code == 2
