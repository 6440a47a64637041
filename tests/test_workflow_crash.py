"""Invariants 6 and 7 under kill -9: no workflow lost, every step recorded once.

``tests/_crash_worker.py`` runs ``N`` instances of a workflow (a sync step with a
compensation, an async step, a durable timer, a sync step) on a SQLite ledger. This
test starts it, kills it with SIGKILL at a random instant, starts it again, many
times, then lets a last run finish. Afterwards, read through the public API:

- every instance ``w-i`` completed, with the result its recorded steps add up to;
- its history records each step's ``StepDone`` exactly once (no ``StepFailed``),
  the timer once, ``Finished`` once and last, and no compensation;
- the external system (the effects database, deduplicating on the step's
  idempotency key) holds exactly one effect per (instance, step), the very value the
  ledger recorded as the step's result; executions (``attempts``) may be more: the
  step body runs at least once, and how often it ran again is printed (``-s``);
- the ledger's hash chains verify.

A kill only tests something if it lands on a running worker: when a worker finishes
all its instances before its kill comes, the next workers start half as many again
(the same ids and new ones), until ``LEDGERFLOW_CRASH_KILLS`` (default 15) kills have
landed. ``LEDGERFLOW_CRASH_N`` sets the instances to begin with (default 30) and
``LEDGERFLOW_CRASH_SEED`` replays a schedule of kill delays;
``LEDGERFLOW_CRASH_CONCURRENCY`` (default 4) is the workers' engine concurrency.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ledgerflow as lf
from ledgerflow.workflow.history import (
    CompensationDone,
    CompensationFailed,
    Finished,
    Resumed,
    Started,
    StepDone,
    StepFailed,
    Stuck,
    TimerFired,
    TimerStarted,
    history_registry,
)

from ._crash_worker import (
    STEPS,
    TIMER_SEQ,
    WORKFLOW_NAME,
    Receipt,
    connect_effects,
    crash_order,
    expected_prefixes,
)

WORKER = Path(__file__).with_name("_crash_worker.py")
KILLS = int(os.environ.get("LEDGERFLOW_CRASH_KILLS", "15"))
INSTANCES = int(os.environ.get("LEDGERFLOW_CRASH_N", "30"))
SEED = int(os.environ.get("LEDGERFLOW_CRASH_SEED", str(random.randrange(2**32))))
CONCURRENCY = int(os.environ.get("LEDGERFLOW_CRASH_CONCURRENCY", "4"))
"""Instances a worker runs at once: several, so that their appends share group commits."""
KILL_AFTER = (0.1, 1.5)
"""Seconds after a worker starts at which it is killed, uniformly at random."""
MAX_EARLY_FINISHES = 12
"""Rounds in which a worker may finish before its kill (each adds half the instances)."""
FINAL_RUN_TIMEOUT = 120.0


@dataclass
class Runs:
    instances: int = INSTANCES
    """Instances the workers start: grows whenever a worker finishes them all before
    its kill, so that kills keep landing on pending work however fast the machine."""
    kills: int = 0
    """Workers killed while still running."""
    finished_early: int = 0
    """Workers that finished every instance before their kill came."""
    logs: list[Path] = field(default_factory=list)


def _worker(ledger_url: str, effects: Path, instances: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LEDGERFLOW_CRASH_CONCURRENCY": str(CONCURRENCY)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), ledger_url, str(effects), str(instances)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _effect_counts(effects: Path) -> tuple[int, int]:
    """(effects applied, step executions) so far."""
    if not effects.exists():
        return 0, 0
    con = connect_effects(effects)
    try:
        applied = con.execute("SELECT count(*) FROM effects").fetchone()[0]
        executed = con.execute("SELECT count(*) FROM attempts").fetchone()[0]
    except sqlite3.OperationalError:  # killed before it created its tables
        return 0, 0
    finally:
        con.close()
    return int(applied), int(executed)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _kill_repeatedly(ledger_url: str, effects: Path, logs: Path, rng: random.Random) -> Runs:
    """Start a worker and kill it at a random instant until ``KILLS`` kills have landed
    on a running worker."""
    runs = Runs()
    for round_ in range(KILLS + MAX_EARLY_FINISHES):
        if runs.kills >= KILLS:
            break
        log = logs / f"run-{round_:03d}.log"
        runs.logs.append(log)
        delay = rng.uniform(*KILL_AFTER)
        proc = _worker(ledger_url, effects, runs.instances, log)
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
            if code != -signal.SIGKILL:
                pytest.fail(f"run {round_}: killed worker exited {code}\n{_tail(log)}")
            runs.kills += 1
            outcome = "killed"
        else:
            if code != 0:
                pytest.fail(f"run {round_}: worker exited {code} on its own\n{_tail(log)}")
            runs.finished_early += 1
            outcome = "finished before its kill"
        applied, executed = _effect_counts(effects)
        print(
            f"  run {round_:3d}: {runs.instances} instances, {outcome} at {delay:.2f}s "
            f"(effects {applied}/{runs.instances * len(STEPS)}, executions {executed})"
        )
        if outcome != "killed":
            runs.instances += runs.instances // 2
    return runs


def _final_run(ledger_url: str, effects: Path, runs: Runs, logs: Path) -> float:
    log = logs / "run-final.log"
    runs.logs.append(log)
    began = time.monotonic()
    proc = _worker(ledger_url, effects, runs.instances, log)
    try:
        code = proc.wait(timeout=FINAL_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pytest.fail(
            f"the final, unkilled run did not finish in {FINAL_RUN_TIMEOUT:.0f}s "
            f"(instances stuck?)\n{_tail(log)}"
        )
    if code != 0:
        pytest.fail(f"the final run exited {code}\n{_tail(log)}")
    return time.monotonic() - began


def _logged_errors(logs: list[Path]) -> list[str]:
    """Lines of the workers' output that tell of an exception or an engine error."""
    found = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(("ERROR", "CRITICAL", "Traceback")):
                found.append(f"{log.name}: {line}")
    return found


@dataclass(frozen=True)
class Effect:
    step: str
    value: str


@dataclass
class Executions:
    """What the external system saw of the step bodies."""

    by_key: Counter[str] = field(default_factory=Counter)
    steps: list[str] = field(default_factory=list)
    """The step named by each execution."""


def _read_effects(effects: Path) -> tuple[dict[str, Effect], Executions]:
    con = connect_effects(effects)
    try:
        applied = {
            key: Effect(step, value)
            for key, step, value in con.execute("SELECT key, step, value FROM effects")
        }
        executions = Executions()
        for key, step in con.execute("SELECT key, step FROM attempts"):
            executions.by_key[key] += 1
            executions.steps.append(step)
    finally:
        con.close()
    return applied, executions


def _check_history(
    workflow_id: str, events: list[lf.RecordedEvent], applied: dict[str, Effect]
) -> tuple[list[str], dict[int, str]]:
    """Problems with one instance's history, and its recorded step results by seq."""
    problems: list[str] = []
    versions = [e.version for e in events]
    if versions != list(range(1, len(events) + 1)):
        problems.append(f"{workflow_id}: stream versions {versions} are not 1..{len(events)}")
    if not events or not isinstance(events[0].data, Started):
        problems.append(f"{workflow_id}: history does not begin with Started")
    done: dict[int, list[StepDone]] = {}
    kinds: Counter[str] = Counter()
    for event in events:
        data = event.data
        kinds[type(data).__name__] += 1
        if isinstance(data, StepDone):
            done.setdefault(data.seq, []).append(data)
        elif isinstance(data, StepFailed):
            problems.append(f"{workflow_id}: StepFailed at seq {data.seq}: {data!r}")
        elif isinstance(data, CompensationDone | CompensationFailed):
            problems.append(f"{workflow_id}: a compensation ran: {data!r}")
        elif isinstance(data, Stuck | Resumed):
            problems.append(f"{workflow_id}: {type(data).__name__} recorded: {data!r}")
        elif isinstance(data, TimerStarted | TimerFired) and data.seq != TIMER_SEQ:
            problems.append(f"{workflow_id}: timer event at seq {data.seq}: {data!r}")
    results: dict[int, str] = {}
    for seq, name in STEPS:
        records = done.pop(seq, [])
        if len(records) != 1:
            problems.append(
                f"{workflow_id}: step {name!r} (seq {seq}) has {len(records)} StepDone events"
            )
        if not records:
            continue
        record = records[0]
        if record.name != name:
            problems.append(f"{workflow_id}: seq {seq} recorded as {record.name!r}, not {name!r}")
        results[seq] = record.result
        key = f"{workflow_id}/{seq}"
        effect = applied.get(key)
        if effect is None:
            problems.append(f"{workflow_id}: no effect applied under {key!r}")
        elif effect.value != record.result or effect.step != name:
            problems.append(
                f"{workflow_id}: StepDone of seq {seq} holds {record.result!r}, the external "
                f"system applied {effect.step} {effect.value!r} under {key!r}"
            )
    for seq, records in sorted(done.items()):
        problems.append(f"{workflow_id}: unexpected StepDone at seq {seq}: {records!r}")
    for kind in ("TimerStarted", "TimerFired", "Finished"):
        if kinds[kind] != 1:
            problems.append(f"{workflow_id}: {kinds[kind]} {kind} events")
    last = events[-1].data if events else None
    if not isinstance(last, Finished) or last.status != "completed":
        problems.append(f"{workflow_id}: history ends with {last!r}, not Finished(completed)")
    return problems, results


async def _check_ledger(ledger_url: str, effects: Path, instances: int) -> tuple[list[str], int]:
    """Every problem found, and how many step executions were re-executions."""
    applied, executions = _read_effects(effects)
    executed = executions.by_key
    ids = [f"w-{n}" for n in range(instances)]
    problems: list[str] = []
    recorded: dict[str, dict[int, str]] = {}

    async with lf.open_store(ledger_url, registry=history_registry()) as store:
        rows = []
        after: str | None = None
        while page := await store.list_instances(after=after, limit=500):
            rows.extend(page)
            after = page[-1].workflow_id
        statuses = {row.workflow_id: row.status for row in rows}
        missing = sorted(set(ids) - set(statuses))
        extra = sorted(set(statuses) - set(ids))
        if missing:
            problems.append(f"lost workflows (no instance row): {missing}")
        if extra:
            problems.append(f"unexpected workflows: {extra}")
        not_done = {wid: s for wid, s in statuses.items() if s != "completed"}
        if not_done:
            problems.append(f"workflows not completed: {not_done}")
        wrong_name = [r.workflow_id for r in rows if r.name != WORKFLOW_NAME]
        if wrong_name:
            problems.append(f"instances of another workflow: {wrong_name}")

        for workflow_id in ids:
            events = await store.read_stream(f"wf-{workflow_id}")
            if not events:
                problems.append(f"{workflow_id}: no history")
                continue
            found, results = _check_history(workflow_id, events, applied)
            problems.extend(found)
            recorded[workflow_id] = results

        report = await lf.verify_ledger(store)
        if not report.ok:
            problems.extend(f"ledger: {finding}" for finding in report.findings)
        print(
            f"  verify_ledger: {report.events_checked} events in "
            f"{report.streams_checked} streams, {len(report.findings)} findings"
        )

    # Results through the engine, as a user reads them.
    async with lf.Engine(ledger_url, workflows=[crash_order], takeover=False) as engine:
        for n, workflow_id in enumerate(ids):
            steps = recorded.get(workflow_id)
            if steps is None or len(steps) != len(STEPS):
                continue  # already reported
            try:
                receipt = await engine.handle(workflow_id, Receipt).result(timeout=5)
            except (lf.LedgerflowError, TimeoutError) as exc:
                problems.append(f"{workflow_id}: result() raised {exc!r}")
                continue
            expected = Receipt(*(steps[seq] for seq, _ in STEPS))
            if receipt != expected:
                problems.append(f"{workflow_id}: result {receipt!r}, recorded steps {expected!r}")
            prefixes = expected_prefixes(n)
            for (_, name), value in zip(
                STEPS, (expected.reservation, expected.charge, expected.confirmation), strict=True
            ):
                if not value.startswith(prefixes[name]):
                    problems.append(f"{workflow_id}: {name} result {value!r} is another's")

    # The external system: one effect per (instance, step) key, nothing else.
    keys = {f"{wid}/{seq}" for wid in ids for seq, _ in STEPS}
    if set(applied) != keys:
        problems.append(
            f"effects: keys missing {sorted(keys - set(applied))[:20]}, "
            f"unexpected {sorted(set(applied) - keys)[:20]}"
        )
    strays = sorted(set(executed) - keys)
    if strays:
        problems.append(f"steps executed under unexpected keys: {strays[:20]}")
    if "release" in executions.steps:
        problems.append(f"the compensation ran {executions.steps.count('release')} times")

    total = sum(executed.values())
    names = {str(seq): name for seq, name in STEPS}
    again: Counter[str] = Counter()
    for key, count in executed.items():
        again[names.get(key.rsplit("/", 1)[-1], key)] += count - 1
    print(
        f"  effects: {len(applied)} applied once each; {total} executions, of which "
        f"{total - len(applied)} re-executions after a kill "
        f"({', '.join(f'{name}: {again[name]}' for _, name in STEPS)}) over "
        f"{sum(1 for count in executed.values() if count > 1)} keys"
    )
    return problems, total - len(applied)


@pytest.mark.slow
def test_kill_minus_nine_loses_no_workflow_and_records_each_step_once(tmp_path: Path) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    effects = tmp_path / "effects.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    print(
        f"\ncrash test: {KILLS} kills, {INSTANCES} instances to begin with, concurrency "
        f"{CONCURRENCY}, seed {SEED} (LEDGERFLOW_CRASH_SEED={SEED} to replay the delays)"
    )
    began = time.monotonic()
    runs = _kill_repeatedly(ledger_url, effects, logs, random.Random(SEED))
    final = _final_run(ledger_url, effects, runs, logs)
    print(
        f"  {runs.kills} workers killed mid-run, {runs.finished_early} finished before "
        f"their kill; final run {final:.1f}s; {time.monotonic() - began:.1f}s in all"
    )
    problems, again = asyncio.run(_check_ledger(ledger_url, effects, runs.instances))
    print(f"  {again / max(runs.kills, 1):.1f} re-executions per kill (concurrency {CONCURRENCY})")
    problems.extend(f"worker output: {line}" for line in _logged_errors(runs.logs))
    assert runs.kills >= KILLS, f"only {runs.kills} of {KILLS} kills landed on a running worker"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:100])
