"""State-machine instances under kill -9: none lost, each step recorded once.

``_machine_crash_worker.py`` drives order machines to ``placed``; killed with SIGKILL at
random instants and restarted, then left to finish, on SQLite and PostgreSQL. Then:
every instance completed in ``placed`` along the one path; each event received and
transitioned once, each activity done once (``charge``'s declined first attempt
recorded at most once), nothing refused, failed or compensated; one effect per
(instance, activity), the result the ledger recorded; the ledger verifies. Activity
bodies run again are printed (``-s``), not asserted. ``LEDGERFLOW_MACHINE_CRASH_SEED``
replays the kill delays, ``LEDGERFLOW_MACHINE_CRASH_KILLS`` (8) sets the kills.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import ledgerflow as lf
from ledgerflow.workflow import history as h

from . import _machine_crash_worker as w
from .conftest import backend_url

WORKER = Path(__file__).with_name("_machine_crash_worker.py")
SEED = int(os.environ.get("LEDGERFLOW_MACHINE_CRASH_SEED", str(random.randrange(2**32))))
KILLS = int(os.environ.get("LEDGERFLOW_MACHINE_CRASH_KILLS", "8"))
KILL_AFTER = (0.3, 1.5)
"""Seconds after a worker starts at which it is killed (it needs ~0.3 s to start)."""
INSTANCES = 40
MAX_EARLY_FINISHES = 6 + KILLS // 2
FINAL_RUN_TIMEOUT = 120.0


def _run_worker(url: str, effects: Path, instances: int, log: Path, timeout: float) -> int | None:
    """Run a worker; its exit code, or None once it was killed after ``timeout``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), url, str(effects), str(instances)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)  # a no-op if it exited meanwhile
        code = proc.wait()
        return None if code == -signal.SIGKILL else code


def _progress(effects: Path) -> str:
    con = w.connect_effects(effects)
    sql = "SELECT (SELECT count(*) FROM effects), (SELECT count(*) FROM attempts)"
    applied, ran = con.execute(sql).fetchone()
    con.close()
    return f"{applied} effects, {ran} activity runs"


def _kill_and_finish(url: str, effects: Path, logs: Path) -> tuple[int, int]:
    """Kill workers until ``KILLS`` kills landed on a running one (a worker that
    finished first makes the next ones start half as many instances again), then
    let one finish. (kills landed, instances)."""
    rng = random.Random(SEED)
    kills, instances = 0, INSTANCES
    w.init_effects(effects)
    for round_ in range(KILLS + MAX_EARLY_FINISHES):
        if kills >= KILLS:
            break
        delay = rng.uniform(*KILL_AFTER)
        log = logs / f"run-{round_:02d}.log"
        code = _run_worker(url, effects, instances, log, delay)
        if code not in (None, 0):
            pytest.fail(f"run {round_}: worker exited {code}\n{log.read_text()}")
        outcome = "killed" if code is None else "finished before its kill"
        progress = _progress(effects)
        print(f"  run {round_}: {instances} instances, {outcome} at {delay:.2f}s: {progress}")
        kills += code is None
        instances += 0 if code is None else instances // 2
    log = logs / "run-final.log"
    began = time.monotonic()
    code = _run_worker(url, effects, instances, log, FINAL_RUN_TIMEOUT)
    assert code == 0, f"the final run exited {code} (None: hung)\n{log.read_text()}"
    print(f"  final run of {instances} instances: {time.monotonic() - began:.1f}s")
    return kills, instances


def _check_history(iid: str, events: list[lf.RecordedEvent]) -> tuple[list[str], dict[str, str]]:
    """Problems with one instance's history; its activities' results by name."""
    problems: list[str] = []
    data = [e.data for e in events]
    if [e.version for e in events] != list(range(1, len(events) + 1)):
        problems.append(f"{iid}: versions are not contiguous")
    if not data or not isinstance(data[0], h.Started) or data[0].name != w.MACHINE.name:
        problems.append(f"{iid}: history begins with {data[:1]!r}")
    end = data[-1] if data else None
    if not isinstance(end, h.Finished) or end.status != "completed":
        problems.append(f"{iid}: history ends with {end!r}")
    seen: Counter[tuple[str, int, str]] = Counter()
    results: dict[str, str] = {}
    for d in data[1:-1]:
        if isinstance(d, h.EventReceived | h.Transitioned | h.StepDone | h.StepAttemptFailed):
            seen[(type(d).__name__, d.seq, d.name)] += 1
            if isinstance(d, h.StepDone):
                results[d.name] = d.result
        else:  # TransitionFailed, EventRefused, a compensation, a second Finished...
            problems.append(f"{iid}: unexpected {d!r}")
    expected = Counter({("Transitioned", 1, ""): 1})
    for seq, event in w.EVENTS.items():
        expected[("EventReceived", seq, event)] = expected[("Transitioned", seq, event)] = 1
    expected.update({("StepDone", seq, step): 1 for seq, step in w.STEPS.items()})
    failed = ("StepAttemptFailed", w.RETRIED_SEQ, w.STEPS[w.RETRIED_SEQ])
    if seen[failed] <= 1:  # missing if a kill cut the failed attempt off
        del seen[failed]
    if seen != expected:
        problems.append(f"{iid}: recorded {dict(seen - expected)}, missing {dict(expected - seen)}")
    return problems, results


async def _check(url: str, effects: Path, instances: int) -> list[str]:
    ids = [f"m-{n}" for n in range(instances)]
    problems: list[str] = []
    recorded: dict[str, str] = {}  # idempotency key -> the result the ledger recorded
    async with lf.Engine(url, workflows=[w.MACHINE], takeover=False) as engine:
        for iid in ids:
            found, results = _check_history(iid, await engine.history(iid))
            problems.extend(found)
            state = await engine.machine_state(iid)
            outcome = await engine.handle(iid).result(timeout=5)
            where = (state.status, state.state, state.path, state.pending)
            if where != ("completed", "placed", w.PATH, None):
                problems.append(f"{iid}: ended as {state!r}")
            if outcome != lf.MachineOutcome(state="placed", data=state.data, results=results):
                problems.append(f"{iid}: outcome {outcome!r}, history results {results!r}")
            recorded.update({f"{iid}/{seq}": results.get(n, "") for seq, n in w.STEPS.items()})
    async with lf.open_store(url, registry=h.history_registry()) as store:
        rows = await store.list_instances(limit=instances + 100)
        if sorted(row.workflow_id for row in rows) != sorted(ids):
            problems.append(f"instances: {sorted(row.workflow_id for row in rows)}")
        report = await lf.verify_ledger(store)
        problems.extend(f"ledger: {finding}" for finding in report.findings)
    con = w.connect_effects(effects)
    applied: dict[str, str] = dict(con.execute("SELECT key, value FROM effects"))
    executed = Counter(con.execute("SELECT key, step FROM attempts"))  # (key, step): runs
    runs = Counter(step for (_, step) in executed.elements())
    declined = {key for (key,) in con.execute("SELECT key FROM first_attempts")}
    con.close()
    if applied != recorded:
        wrong = sorted({key for key, _ in applied.items() ^ recorded.items()})
        problems.append(f"effects differ from the ledger's results at {wrong[:20]}")
    if declined != {f"{iid}/{w.RETRIED_SEQ}" for iid in ids}:
        problems.append(f"declined first attempts: {sorted(declined)[:20]}")
    if runs["release"]:
        problems.append(f"the compensation ran {runs['release']} times")
    again = {step: runs[step] - instances for step in w.STEPS.values()}
    print(
        f"  {len(applied)} effects applied once each; activity bodies run again after a "
        f"kill: {sum(again.values())} ({again}), {sum(c > 1 for c in executed.values())} "
        f"bodies ran more than once; verify_ledger: {report.events_checked} events, "
        f"{len(report.findings)} findings"
    )
    return problems


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_kill_minus_nine_loses_no_machine_and_records_each_transition_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = backend_url(backend, tmp_path, request)
    logs = tmp_path / "logs"
    logs.mkdir()
    print(f"\nmachine crash test on {backend}: seed {SEED} (LEDGERFLOW_MACHINE_CRASH_SEED)")
    began = time.monotonic()
    kills, instances = _kill_and_finish(url, tmp_path / "effects.db", logs)
    print(f"  {kills} kills landed; {time.monotonic() - began:.1f}s")
    problems = asyncio.run(_check(url, tmp_path / "effects.db", instances))
    for log in sorted(logs.iterdir()):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(("ERROR", "CRITICAL", "Traceback")):
                problems.append(f"{log.name}: {line}")
    assert kills >= KILLS, f"only {kills} of {KILLS} kills landed on a running worker"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
