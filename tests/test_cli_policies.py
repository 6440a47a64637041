"""``ledgerflow policy ...``: list, show, history and set named policies; a running
engine on the same ledger uses what the CLI sets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import ledgerflow as lf
from ledgerflow.cli import app
from ledgerflow.workflow.history import StepAttemptFailed, StepFailed

from ._engines import WAIT, waiting_for


async def cli(*args: str) -> Result:
    """Invoke the CLI on a thread: it runs its own event loop with asyncio.run."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "200"})


SHIPPED = lf.Policy(retry=lf.Retry(max_attempts=4))


@pytest.fixture
async def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with lf.Engine(url, policies={"erp": SHIPPED}):
        pass
    return url


async def lines(*args: str) -> list[dict[str, object]]:
    result = await cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_set_changes_fields_and_records_who_and_why(db: str) -> None:
    result = await cli(
        "policy", "set", "erp", "retry.max_attempts=10", "breaker.open_for=60",
        "retry.non_retryable=ValueError,myapp.errors.Rejected",
        "--reason", "ERP slow today", "--actor", "alice", "--db", db,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "version 2 in force" in result.stdout
    assert "retry.max_attempts: 4 -> 10" in result.stdout
    (shown,) = await lines("policy", "show", "erp", "--db", db)
    assert shown["version"] == 2
    assert shown["actor"] == "alice"
    assert shown["reason"] == "ERP slow today"
    policy = shown["policy"]
    assert isinstance(policy, dict)
    assert policy["retry"]["max_attempts"] == 10
    assert policy["retry"]["non_retryable"] == ["ValueError", "myapp.errors.Rejected"]
    assert policy["breaker"]["open_for"] == 60.0
    assert policy["breaker"]["consecutive_failures"] == 5  # defaults shown in full
    history = await lines("policy", "history", "erp", "--db", db)
    assert [(h["version"], h["reason"]) for h in history] == [
        (1, "declared by the application"),
        (2, "ERP slow today"),
    ]
    (first,) = await lines("policy", "show", "erp", "--version", "1", "--db", db)
    assert first["policy"]["retry"]["max_attempts"] == 4  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retry.initial_interval=-1"], "field 'retry.initial_interval': must be >= 0"),
        (["retry.maxx=1"], "field 'retry.maxx': unknown field; known: max_attempts"),
        (["retry.max_attempts=ten"], "field 'retry.max_attempts': Expected `int`, got `str`"),
        (["retry.max_interval=0.01"], "must be >= retry.initial_interval"),
        (["nonsense"], "a setting is key=value"),
        ([], "nothing to set"),
    ],
)
async def test_a_wrong_setting_is_refused_and_nothing_changes(
    db: str, args: list[str], message: str
) -> None:
    result = await cli("policy", "set", "erp", *args, "--reason", "try", "--db", db)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    (shown,) = await lines("policy", "show", "erp", "--db", db)
    assert shown["version"] == 1


async def test_a_change_needs_a_reason(db: str) -> None:
    result = await cli("policy", "set", "erp", "retry.max_attempts=2", "--db", db)
    assert result.exit_code == 2
    assert "--reason is required" in result.stderr


async def test_set_creates_a_policy_and_list_shows_them_all(db: str, tmp_path: Path) -> None:
    document = tmp_path / "bank.json"
    document.write_text(json.dumps({"retry": {"max_attempts": 2}, "on_exhausted": "park"}))
    result = await cli(
        "policy", "set", "bank", "retry.initial_interval=1", "--file", str(document),
        "--reason", "new bank API", "--db", db,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # A new name may be a typo: said, naming the others (it was silent).
    assert "note: there was no policy 'bank': this created it (the others: erp)" in (
        " ".join(result.stderr.split())
    )
    changed = await cli(
        "policy", "set", "bank", "retry.max_attempts=3", "--reason", "x", "--db", db
    )
    assert changed.exit_code == 0, changed.output
    assert "note:" not in changed.stderr
    listed = await lines("policy", "list", "--db", db)
    assert [(p["name"], p["version"]) for p in listed] == [("bank", 2), ("erp", 1)]
    bank = listed[0]["policy"]
    assert isinstance(bank, dict)
    assert bank["retry"]["max_attempts"] == 3
    assert bank["retry"]["initial_interval"] == 1.0
    assert bank["on_exhausted"] == "park"
    table = await cli("policy", "list", "--db", db)
    assert "retry; on_exhausted=park" in table.stdout


async def test_an_unknown_policy_or_version_is_a_clear_error(db: str) -> None:
    result = await cli("policy", "show", "nope", "--db", db)
    assert result.exit_code == 2
    assert "no policy named 'nope'" in result.stderr
    result = await cli("policy", "show", "erp", "--version", "9", "--db", db)
    assert result.exit_code == 2
    assert "has no version 9" in result.stderr


def sometimes(n: int) -> int:
    raise RuntimeError("ERP down")


@lf.workflow(name="ordering", version=1)
async def ordering(ctx: lf.WorkflowContext, n: int) -> int:
    return await ctx.step(sometimes, n, policy="erp")


async def test_a_running_engine_uses_what_the_cli_sets(db: str) -> None:
    """An operator lowers the attempts of a policy while an instance waits out a
    backoff: its next attempt runs under the new version, and is its last."""
    clock = lf.ManualClock()
    slow = lf.Policy(retry=lf.Retry(max_attempts=5, initial_interval=60, max_interval=60))
    async with lf.Engine(
        db, workflows=[ordering], clock=clock, poll_interval=0.05, policy_refresh=0.1
    ) as e:
        await e.policies.set("erp", slow, reason="slow backoff for the test")
        await e.start(ordering, 1, id="o-1")
        await waiting_for(e, "o-1", "retry of step 'sometimes' at ")
        result = await cli(
            "policy", "set", "erp", "retry.max_attempts=2", "--reason", "stop", "--db", db
        )
        assert result.exit_code == 0, result.output
        await asyncio.sleep(0.2)  # past the engine's refresh interval
        clock.advance(70)  # 60 s, and up to 10 % of jitter
        with pytest.raises(lf.WorkflowFailedError, match="ERP down"):
            await e.handle("o-1").result(timeout=WAIT)
        events = [ev.data for ev in await e.history("o-1")]
    failures = [ev for ev in events if isinstance(ev, StepAttemptFailed | StepFailed)]
    assert [type(f).__name__ for f in failures] == ["StepAttemptFailed", "StepFailed"]
    assert [f.policy_version for f in failures] == [2, 3]
