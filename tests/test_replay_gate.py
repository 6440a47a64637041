"""The replay gate: live instances replayed against the code about to be deployed.
A breaking change is found in every one of 1,000 waiting instances, with the first
command that differs and where in the new code; a compatible change passes; a
deploy that drops a running version is named as stranding its instances."""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.cli import app
from ledgerflow.workflow.gate import replay_check

from ._engines import waiting_for

V1 = """
import ledgerflow

@ledgerflow.step()
def reserve(n: int) -> int:
    return n

@ledgerflow.step()
def ship(n: int) -> int:
    return n

@ledgerflow.workflow(name="onboard", version=1)
async def onboard(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    await ctx.step(reserve, n)
    await ctx.wait_for_signal("go")
    return await ctx.step(ship, n)
"""

# Renames the first step: every instance past it takes another path.
BREAKING = V1.replace("await ctx.step(reserve, n)", "await ctx.step(ship, n)  # changed")
# Changes only what comes after the wait: nothing recorded differs.
COMPATIBLE = V1.replace("return await ctx.step(ship, n)", "return await ctx.step(reserve, n)")
# Drops version 1 for a version 2.
STRANDING = V1.replace("version=1", "version=2")


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    sources = {
        "gate_v1": V1,
        "gate_breaking": BREAKING,
        "gate_compatible": COMPATIBLE,
        "gate_stranding": STRANDING,
    }
    yield from importable(tmp_path, sources)


def importable(where: Path, sources: dict[str, str]) -> Iterator[Path]:
    """Modules written to ``where`` and importable while the caller yields; then
    forgotten, so another test's module of the same name is imported afresh."""
    for name, source in sources.items():
        (where / f"{name}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(where))
    try:
        yield where
    finally:
        sys.path.remove(str(where))
        for name in sources:
            sys.modules.pop(name, None)


async def waiting_instances(url: str, count: int) -> None:
    v1 = importlib.import_module("gate_v1")
    async with ledgerflow.Engine(url, workflows=[v1.onboard], concurrency=200) as engine:
        for n in range(count):
            await engine.start(v1.onboard, n, id=f"o-{n:04}")
        while True:  # each has run its first step and waits for "go"
            kinds = Counter(r.type for r in await engine.store.read_rows(limit=100_000))
            if kinds["wf.signal_waiting"] >= count:
                return
            await asyncio.sleep(0.05)


async def test_the_gate_finds_a_breaking_change_in_every_live_instance(
    modules: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    await waiting_instances(url, 1000)
    breaking = importlib.import_module("gate_breaking")
    compatible = importlib.import_module("gate_compatible")
    stranding = importlib.import_module("gate_stranding")
    async with ledgerflow.open_store(url) as store:
        report = await replay_check(store, [breaking.onboard])
        assert (report.checked, len(report.breakages)) == (1000, 1000)
        first = report.breakages[0]
        assert (first.workflow_id, first.seq) == ("o-0000", 1)
        assert (first.recorded, first.attempted) == ("step 'reserve'", "step 'ship'")
        line = BREAKING.splitlines().index("    await ctx.step(ship, n)  # changed") + 1
        assert first.location == f"{modules / 'gate_breaking.py'}:{line}"
        assert (await replay_check(store, [compatible.onboard])).ok
        sampled = await replay_check(store, [breaking.onboard], sample=50, seed=7)
        assert (sampled.checked, len(sampled.breakages)) == (50, 50)
        stranded = await replay_check(store, [stranding.onboard])
        assert len(stranded.breakages) == 1000
        assert "no 'onboard' version 1 (it has [2])" in stranded.breakages[0].reason


def test_the_cli_gate_exits_1_on_a_breaking_change_and_0_on_a_compatible_one(
    modules: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    asyncio.run(waiting_instances(url, 20))
    runner = CliRunner()
    broke = runner.invoke(app, ["replay-check", "--db", url, "--app", "gate_breaking"])
    assert broke.exit_code == 1, broke.output
    output = " ".join(broke.output.split())
    assert "BREAKS o-0000 (onboard v1): command 1: recorded step 'reserve'" in output
    assert "gate_breaking.py:" in output
    assert "20 of 20 instances would break" in output
    ok = runner.invoke(app, ["replay-check", "--db", url, "--app", "gate_compatible"])
    assert ok.exit_code == 0, ok.output
    assert "20 instances fit the new code" in ok.output
    bad = runner.invoke(
        app, ["replay-check", "--db", url, "--app", "gate_v1", "--status", "nonsense"]
    )
    assert bad.exit_code == 2


OTHER_SERVICE = """
import ledgerflow

@ledgerflow.workflow(name="invoice", version=1)
async def invoice(ctx: ledgerflow.WorkflowContext, n: int) -> int:
    await ctx.wait_for_signal("paid")
    return n
"""


def test_a_service_sharing_its_ledger_checks_only_its_own_workflows(
    modules: Path, tmp_path: Path
) -> None:
    """Services that each run their own workflows on one ledger (docs/deploy.md):
    the gate of one named the others' instances as stranded (exit 1), so it could
    not gate that service's deploy. With ``--own`` it checks the workflows its
    ``--app`` defines, every version of them."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    asyncio.run(waiting_instances(url, 3))
    (modules / "gate_other.py").write_text(textwrap.dedent(OTHER_SERVICE))

    async def an_invoice_waits() -> None:  # the billing service's
        other = importlib.import_module("gate_other")
        async with ledgerflow.Engine(url, workflows=[other.invoice]) as engine:
            await engine.start(other.invoice, 1, id="i-1")
            await waiting_for(engine, "i-1", "signal 'paid'")

    asyncio.run(an_invoice_waits())
    runner = CliRunner()
    try:
        everyone = runner.invoke(app, ["replay-check", "--db", url, "--app", "gate_v1"])
        assert everyone.exit_code == 1, everyone.output
        assert "BREAKS i-1 (invoice v1)" in " ".join(everyone.output.split())
        own = runner.invoke(app, ["replay-check", "--db", url, "--app", "gate_v1", "--own"])
        assert own.exit_code == 0, own.output
        assert "3 instances fit the new code" in own.output
        stranding = runner.invoke(
            app, ["replay-check", "--db", url, "--app", "gate_stranding", "--own"]
        )
        assert stranding.exit_code == 1  # its own workflow, another version: checked
    finally:
        sys.modules.pop("gate_other", None)


MACHINE = """
import ledgerflow

proc = ledgerflow.Machine("proc")
proc.state("draft", initial=True)
proc.state("review")
proc.state("done", terminal=True)
proc.transition("draft", "submit", "review")
proc.transition("review", "decide", "done")
"""


def test_the_gate_names_state_machine_instances_a_change_in_place_strands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "ok: N instances replay" for machines it did not look at: a state
    renamed in place left an instance in a state the new code has not, accepting
    nothing, not even listed as stuck."""
    for name, source in {
        "sm_v1": MACHINE,
        "sm_renamed": MACHINE.replace('"review"', '"in_review"'),
        "sm_dead_end": MACHINE.replace(
            'proc.transition("review", "decide", "done")',
            'proc.state("closed")\nproc.transition("review", "decide", "closed")',
        ),
        "sm_same": MACHINE + "\n# a comment: the same machine\n",
        "sm_fields": MACHINE.replace(
            'ledgerflow.Machine("proc")',
            'ledgerflow.Machine("proc", data={"n": [0, 1]}, initial_data={"n": 0})',
        ),
    }.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    async def instances() -> None:
        v1 = importlib.import_module("sm_v1")
        async with ledgerflow.Engine(url, workflows=[v1.proc]) as engine:
            for n in range(3):
                await engine.start(v1.proc, None, id=f"p-{n}")
            await engine.execute("p-0", "submit", timeout=30)

    asyncio.run(instances())
    runner = CliRunner()
    renamed = runner.invoke(app, ["replay-check", "--db", url, "--app", "sm_renamed"])
    assert renamed.exit_code == 1, renamed.output
    output = " ".join(renamed.output.split())
    assert "BREAKS p-0 (proc v1): it is in review, and the new code's 'proc' v1 has no " in output
    assert "state 'review'" in output
    assert "1 of 3 instances would break (3 of them state-machine instances" in output
    dead_end = runner.invoke(app, ["replay-check", "--db", url, "--app", "sm_dead_end"])
    assert dead_end.exit_code == 1, dead_end.output
    assert "on the new code" in dead_end.output
    # Other data fields: migrate cannot help (it moves states, never data); the
    # advice was to migrate all the same.
    fields = runner.invoke(app, ["replay-check", "--db", url, "--app", "sm_fields"])
    assert fields.exit_code == 1, fields.output
    said = " ".join(fields.output.split())
    assert "keeping this one registered beside it" in said
    assert "then `ledgerflow machines migrate`" not in said
    same = runner.invoke(app, ["replay-check", "--db", url, "--app", "sm_same"])
    assert same.exit_code == 0, same.output
    assert "3 instances fit the new code (3 of them state-machine instances" in same.output
    for name in ("sm_v1", "sm_renamed", "sm_dead_end", "sm_same", "sm_fields"):
        sys.modules.pop(name, None)


SIGNALS = """
import msgspec
import ledgerflow

class Approval(msgspec.Struct):
    approver: str
    approved: bool

@ledgerflow.step()
def reserve(n: int) -> int:
    return n

@ledgerflow.step()
def release(n: int) -> None:
    pass

@ledgerflow.workflow(name="approve", version=1)
async def approve(ctx: ledgerflow.WorkflowContext, n: int) -> str:
    await ctx.step(reserve, n, compensate=release)
    decision = await ctx.wait_for_signal("decision", Approval)
    return f"{decision.approver}: {decision.approved}"
"""
SIGNAL_VARIANTS = {
    "sig_v1": SIGNALS,
    # Another type under the same signal name: senders are checked against the
    # recorded schema, the new code decodes with its own.
    "sig_retyped": SIGNALS.replace(
        "class Approval(msgspec.Struct):\n    approver: str\n    approved: bool",
        "class Approval(msgspec.Struct):\n    sku: str",
    ).replace('f"{decision.approver}: {decision.approved}"', "decision.sku"),
    # A new field named like a JSON Schema keyword is still a new field.
    "sig_titled": SIGNALS.replace("    approved: bool", "    approved: bool\n    title: str"),
    # Prose only: the same values fit.
    "sig_documented": SIGNALS.replace(
        "class Approval(msgspec.Struct):", 'class Approval(msgspec.Struct):\n    """Who decided."""'
    ),
    # Awaits a future nobody resolves: the replay would never end.
    "sig_hangs": SIGNALS.replace("version=1)", "version=1, lint=False)").replace(
        '    decision = await ctx.wait_for_signal("decision", Approval)\n',
        "    await __import__('asyncio').get_running_loop().create_future()\n"
        '    decision = await ctx.wait_for_signal("decision", Approval)\n',
    ),
    # The new code fails after the first step: its compensation is the first command
    # that differs, and the divergence names where the body raised.
    "sig_raises": SIGNALS.replace(
        '    decision = await ctx.wait_for_signal("decision", Approval)\n',
        '    raise ValueError("a bug in the new code")\n',
    ),
}


@pytest.fixture
def signal_modules(tmp_path: Path) -> Iterator[Path]:
    yield from importable(tmp_path, SIGNAL_VARIANTS)


async def _waiting_for_a_decision(url: str, count: int = 1) -> None:
    v1 = importlib.import_module("sig_v1")
    async with ledgerflow.Engine(url, workflows=[v1.approve]) as engine:
        ids = ["a-1"] if count == 1 else [f"a-{n}" for n in range(count)]
        for n, workflow_id in enumerate(ids):
            await engine.start(v1.approve, n, id=workflow_id)
        for workflow_id in ids:
            await waiting_for(engine, workflow_id, "signal 'decision'")


async def test_the_gate_names_a_wait_whose_signal_type_changed(
    signal_modules: Path, tmp_path: Path
) -> None:
    """A new type for a waited-for signal passed the gate; after the deploy the
    instance refused payloads of the new type at send and rejected the old type's:
    unreachable until its timeout."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    await _waiting_for_a_decision(url)
    async with ledgerflow.open_store(url) as store:
        for module in ("sig_retyped", "sig_titled"):
            report = await replay_check(store, [importlib.import_module(module).approve])
            (broken,) = report.breakages
            assert broken.seq == 2
            assert broken.recorded is not None
            assert "signal 'decision' awaited with another type" in broken.recorded
            source = SIGNAL_VARIANTS[module].splitlines()
            line = next(i for i, s in enumerate(source, 1) if "wait_for_signal" in s)
            assert broken.location == f"{signal_modules / module}.py:{line}"
        documented = importlib.import_module("sig_documented")
        assert (await replay_check(store, [documented.approve])).ok
        (raised,) = (
            await replay_check(store, [importlib.import_module("sig_raises").approve])
        ).breakages
        # It named the test runner's frame (the first outside ledgerflow), not the raise.
        line = (
            SIGNAL_VARIANTS["sig_raises"]
            .splitlines()
            .index('    raise ValueError("a bug in the new code")')
            + 1
        )
        assert raised.location == f"{signal_modules / 'sig_raises.py'}:{line}"


async def test_deployed_code_records_its_signal_type_with_the_wait(
    signal_modules: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    await _waiting_for_a_decision(url)
    retyped = importlib.import_module("sig_retyped")
    async with ledgerflow.Engine(url, workflows=[retyped.approve]) as engine:
        # A payload of the old type still fits the recorded schema: taken at send,
        # rejected by the new code, whose pass records its own type with the wait.
        await engine.signal("a-1", "decision", {"approver": "ann", "approved": True})
        async with asyncio.timeout(20):
            while True:
                kinds = [e.type for e in await engine.store.read_stream("wf-a-1")]
                if "wf.signal_rejected" in kinds:
                    break
                await asyncio.sleep(0.02)
        # Before, the new type was refused here, against the old recorded schema.
        await engine.signal("a-1", "decision", {"sku": "sku-9"})
        assert await (engine.handle("a-1")).result(timeout=20) == "sku-9"


async def test_a_replay_that_never_ends_breaks_its_instance_instead_of_hanging_the_gate(
    signal_modules: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    await _waiting_for_a_decision(url, 5)
    hangs = importlib.import_module("sig_hangs")
    async with ledgerflow.open_store(url) as store:
        report = await replay_check(store, [hangs.approve], timeout=0.5)
    assert [b.workflow_id for b in report.breakages] == [f"a-{n}" for n in range(5)]
    hung, skipped = report.breakages[:3], report.breakages[3:]
    assert all("did not end within 0.5 s" in b.reason for b in hung)
    # Three hung: the code hangs, so the others are not waited for one by one.
    assert all("not replayed: the replays of 3 other" in b.reason for b in skipped)
