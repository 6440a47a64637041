"""``ledgerflow machines show|send|migrate`` and ``ledgerflow diagram --instance``,
against a real worker process running the machine (SQLite)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.cli import app

from ._engines import WAIT, waiting_for
from ._workers import CLI, child_env

DOORS = textwrap.dedent(
    """
    import ledgerflow as lf


    def unlock(call: lf.MachineCall) -> str:
        return "unlocked by " + call.payload["by"]


    def build(version: int) -> lf.Machine:
        m = lf.Machine("door", version=version)
        m.state("closed", initial=True)
        m.state("opened" if version == 1 else "ajar")
        m.state("gone", terminal=True)
        m.event("open", payload={"by": ["alice", "bob"]})
        m.transition("closed", "open", "opened" if version == 1 else "ajar", activity=unlock)
        m.transition("opened" if version == 1 else "ajar", "leave", "gone")
        return m


    DOOR = build(1)
    VERSIONS = [DOOR, build(2)]
    """
)

runner = CliRunner()


@pytest.fixture
def doors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "doors.py").write_text(DOORS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("doors", None)
    return tmp_path


@pytest.fixture
def worker(doors: Path) -> Iterator[str]:
    """A worker process running both versions of the door; its ledger's URL."""
    db = f"sqlite:///{doors / 'doors.db'}"
    process = subprocess.Popen(
        [*CLI, "worker", "--app", "doors:VERSIONS", "--db", db, "--poll", "0.05"],
        cwd=doors,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not (doors / "doors.db").exists() or _no_ledger_yet(db):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the worker did not create its ledger"
            time.sleep(0.05)
        yield db
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=WAIT)
        assert process.returncode == 0, output


def _no_ledger_yet(db: str) -> bool:
    async def probe() -> bool:
        try:
            async with ledgerflow.open_store(db, create=False):
                return False
        except ledgerflow.LedgerflowError:
            return True

    return asyncio.run(probe())


def _start(db: str, instance_id: str) -> None:
    import doors  # type: ignore[import-not-found]

    async def start() -> None:
        async with ledgerflow.WorkflowClient(db, workflows=doors.VERSIONS) as client:
            await client.start(doors.DOOR, None, id=instance_id)

    asyncio.run(start())


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_send_show_and_migrate_an_instance_from_the_command_line(worker: str) -> None:
    db = worker
    _start(db, "d1")
    sent = cli(
        "machines",
        "send",
        "d1",
        "open",
        "--app",
        "doors:DOOR",
        "--db",
        db,
        "--payload",
        '{"by": "alice"}',
        "--actor",
        "alice",
        "--reason",
        "delivery",
    )
    assert sent.exit_code == 0, sent.output
    assert "opened" in sent.stdout
    assert "unlocked by alice" in sent.stdout
    again = cli(
        "machines",
        "send",
        "d1",
        "open",
        "--app",
        "doors:DOOR",
        "--db",
        db,
        "--payload",
        '{"by": "bob"}',
    )
    assert again.exit_code == 1
    assert "does not accept 'open'" in again.stderr
    assert "'leave'" in again.stderr
    wrong = cli(
        "machines",
        "send",
        "d1",
        "leave",
        "--app",
        "doors:DOOR",
        "--db",
        db,
        "--payload",
        "{not json",
    )
    assert wrong.exit_code == 2
    assert "not valid JSON" in wrong.stderr
    shown = cli("machines", "show", "d1", "--app", "doors:VERSIONS", "--db", db, "--json")
    assert shown.exit_code == 0, shown.output
    state = json.loads(shown.stdout)
    assert (state["state"], state["accepts"], state["version"]) == ("opened", ["leave"], 1)
    drawn = cli("diagram", "doors:VERSIONS", "--instance", "d1", "--db", db)
    assert drawn.exit_code == 0, drawn.output
    assert "class opened current" in drawn.stdout
    assert "class closed visited" in drawn.stdout
    assert "closed --> opened : open ✓" in drawn.stdout
    refused = cli(
        "machines",
        "migrate",
        "d1",
        "--app",
        "doors:VERSIONS",
        "--db",
        db,
        "--to",
        "2",
        "--reason",
        "new doors",
    )
    assert refused.exit_code == 2
    assert "'opened'" in refused.stderr
    assert "do not exist in v2" in refused.stderr
    moved = cli(
        "machines",
        "migrate",
        "d1",
        "--app",
        "doors:VERSIONS",
        "--db",
        db,
        "--to",
        "2",
        "--state",
        "opened=ajar",
        "--reason",
        "new doors",
    )
    assert moved.exit_code == 0, moved.output
    assert "ajar" in moved.stdout
    left = cli("machines", "send", "d1", "leave", "--app", "doors:VERSIONS", "--db", db)
    assert left.exit_code == 0, left.output
    assert "gone" in left.stdout


def test_a_code_first_history_is_drawn_from_the_ledger(tmp_path: Path) -> None:
    @ledgerflow.workflow(name="drawn")
    async def drawn(ctx: ledgerflow.WorkflowContext, n: int) -> int:
        await ctx.step(_double, n)
        await ctx.sleep(0.01)
        await ctx.wait_for_signal("approve")
        return n

    db = f"sqlite:///{tmp_path / 'drawn.db'}"

    async def run() -> None:
        async with ledgerflow.Engine(db, workflows=[drawn]) as engine:
            handle = await engine.start(drawn, 2, id="w")
            await waiting_for(engine, "w", "signal 'approve'")
            await engine.signal("w", "approve")
            await handle.result(timeout=WAIT)

    asyncio.run(run())
    drawn_out = cli("diagram", "--instance", "w", "--db", db)
    assert drawn_out.exit_code == 0, drawn_out.output
    chart = drawn_out.stdout
    assert chart.startswith("flowchart LR\n")
    assert '1. step _double<br/>done"' in chart
    assert "2. timer" in chart
    assert "3. signal approve" in chart
    assert 'finish(["completed"])' in chart
    as_dot = cli("diagram", "--instance", "w", "--db", db, "--format", "dot")
    assert as_dot.stdout.startswith('digraph "history"')
    missing = cli("diagram", "--db", db)
    assert missing.exit_code == 2


def _double(n: int) -> int:
    return 2 * n
