"""Invariants 6 and 7 under kill -9: no workflow lost, every step recorded once.

``tests/_crash_worker.py`` runs ``N`` instances of a workflow that waits for a signal
(sent by the worker right after starting the instance, and again by every restarted
worker), runs a sync step with a compensation, an async step whose first attempt
fails (a retry), a child workflow with a step of its own, a durable timer and a sync
step. This test starts it, kills it with SIGKILL at a random instant, starts it
again, many times, then lets a last run finish; on SQLite, and again on PostgreSQL.
Afterwards, read through the public API:

- every instance ``w-i`` and its child ``w-i.<seq>`` completed, with the result its
  recorded steps (and signal, and child) add up to, and neither has a wake-up left;
- each history holds contiguous versions; every command is the one the workflow
  issues at that ``seq`` (``COMMANDS``), in order; each step's ``StepDone`` exactly
  once (no ``StepFailed``), the retried step's failed attempt at most once (missing
  only when a kill cut it off before it was recorded), the signal taken exactly once
  and it is the first one sent (repeats stay unconsumed, none rejected), the child
  started once and its end delivered once, the timer once, ``Finished`` once and
  last, and no compensation;
- the external system (the effects database, deduplicating on the step's
  idempotency key) holds exactly one effect per (instance, step), the very value the
  ledger recorded as the step's result, and exactly one declined first attempt per
  instance; executions (``attempts``) may be more: the step body runs at least
  once, and how often it ran again is printed (``-s``);
- the ledger's hash chains verify.

What was in flight at each kill (a retry due, a child running, a signal sent but not
taken) is read from the histories' timestamps and printed.

A kill only tests something if it lands on a running worker: when a worker finishes
all its instances before its kill comes, the next workers start half as many again
(the same ids and new ones), until ``LEDGERFLOW_CRASH_KILLS`` (default 15) kills
have landed. ``LEDGERFLOW_CRASH_N`` sets the instances to begin
with (default 30) and ``LEDGERFLOW_CRASH_SEED`` replays a schedule of kill delays;
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
from typing import Any

import pytest

import ledgerflow as lf
from ledgerflow.workflow.history import (
    ChildDone,
    ChildFinished,
    ChildStarted,
    ClockRead,
    CompensationAttemptFailed,
    CompensationDone,
    CompensationFailed,
    Finished,
    SignalRejected,
    SignalSent,
    SignalTaken,
    SignalTimedOut,
    SignalWaiting,
    Started,
    StepAttemptFailed,
    StepDone,
    StepFailed,
    TimerFired,
    TimerStarted,
    history_registry,
)

from ._crash_worker import (
    CHILD_COMMANDS,
    CHILD_NAME,
    CHILD_STEPS,
    COMMANDS,
    RETRIED_STEP,
    SIGNAL_NAME,
    STEPS,
    WORKFLOW_NAME,
    WORKFLOWS,
    Approval,
    Receipt,
    child_id,
    connect_effects,
    expected_prefixes,
    seq_of,
)
from .conftest import backend_url

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
EFFECTS_PER_INSTANCE = len(STEPS) + len(CHILD_STEPS)

COMMAND_EVENTS = (
    StepDone,
    StepFailed,
    StepAttemptFailed,
    TimerStarted,
    TimerFired,
    SignalWaiting,
    SignalTaken,
    SignalTimedOut,
    SignalRejected,
    ChildStarted,
    ChildDone,
    ClockRead,
    CompensationDone,
    CompensationFailed,
    CompensationAttemptFailed,
)
CommandEvent = (
    StepDone
    | StepFailed
    | StepAttemptFailed
    | TimerStarted
    | TimerFired
    | SignalWaiting
    | SignalTaken
    | SignalTimedOut
    | SignalRejected
    | ChildStarted
    | ChildDone
    | ClockRead
    | CompensationDone
    | CompensationFailed
    | CompensationAttemptFailed
)
EXPECTED: dict[str, dict[type, tuple[int, ...]]] = {
    "step": {StepDone: (1,), StepAttemptFailed: (0,)},
    "signal": {SignalWaiting: (0, 1), SignalTaken: (1,)},
    "timer": {TimerStarted: (1,), TimerFired: (1,)},
    "child": {ChildStarted: (1,)},
}
"""How many events of each type the command of each kind records: the allowed counts
(the failed attempt of ``RETRIED_STEP`` is allowed once more). Other types: none."""
RETRIED_SEQ = seq_of("step", RETRIED_STEP)
SIGNAL_SEQ = seq_of("signal", SIGNAL_NAME)
CHILD_SEQ = seq_of("child", CHILD_NAME)


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
    kill_times: list[float] = field(default_factory=list)
    """Wall-clock instants (``time.time()``) of the kills that landed."""
    killed_pids: set[int] = field(default_factory=set)


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
        declined = con.execute("SELECT count(*) FROM first_attempts").fetchone()[0]
    except sqlite3.OperationalError:  # killed before it created its tables
        return 0, 0
    finally:
        con.close()
    return int(applied), int(executed) + int(declined)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _kill_repeatedly(
    ledger_url: str, effects: Path, logs: Path, rng: random.Random, kills: int
) -> Runs:
    """Start a worker and kill it at a random instant until ``kills`` kills have
    landed on a running worker."""
    runs = Runs()
    for round_ in range(kills + MAX_EARLY_FINISHES):
        if runs.kills >= kills:
            break
        log = logs / f"run-{round_:03d}.log"
        runs.logs.append(log)
        delay = rng.uniform(*KILL_AFTER)
        proc = _worker(ledger_url, effects, runs.instances, log)
        killed_at = 0.0
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            killed_at = time.time()
            proc.send_signal(signal.SIGKILL)  # a no-op if it exited meanwhile
            code = proc.wait()
        if code == -signal.SIGKILL:
            runs.kills += 1
            runs.kill_times.append(killed_at)
            runs.killed_pids.add(proc.pid)
            outcome = "killed"
        elif code == 0:
            runs.finished_early += 1
            outcome = "finished before its kill"
        else:
            pytest.fail(f"run {round_}: worker exited {code}\n{_tail(log)}")
        applied, executed = _effect_counts(effects)
        print(
            f"  run {round_:3d}: {runs.instances} instances, {outcome} at {delay:.2f}s "
            f"(effects {applied}/{runs.instances * EFFECTS_PER_INSTANCE}, "
            f"executions {executed})"
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
    declined: dict[str, int] = field(default_factory=dict)
    """Key -> pid of the worker whose first attempt was declined."""


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
        executions.declined = dict(con.execute("SELECT key, pid FROM first_attempts"))
    finally:
        con.close()
    return applied, executions


Interval = tuple[float, float]
"""[from, to) in ``time.time()`` seconds."""


@dataclass
class Checked:
    """What one parent's history (and its child's) recorded."""

    results: dict[str, str] = field(default_factory=dict)
    """Step name (``pack``: the child's step) -> recorded result."""
    approval: Approval | None = None
    """The payload of the first signal sent, which the instance must have taken."""
    signals_sent: int = 0
    waited: bool = False
    """The instance waited for its signal (it came after the wait began)."""
    attempt_failed: bool = False
    in_flight: dict[str, Interval] = field(default_factory=dict)
    """What was in flight when: ``retry`` (an attempt failed, the step not done yet),
    ``child`` (started, its end not delivered), ``signal`` (sent, not taken)."""


def _at(event: lf.RecordedEvent) -> float:
    return event.recorded_at.timestamp()


def _check_commands(
    workflow_id: str,
    events: list[lf.RecordedEvent],
    commands: tuple[tuple[str, str], ...],
    retried_seq: int | None,
) -> tuple[list[str], dict[int, list[tuple[CommandEvent, lf.RecordedEvent]]]]:
    """Every command event is the one the workflow issues at its seq, in seq order,
    as often as its kind allows; the events by seq."""
    problems: list[str] = []
    by_seq: dict[int, list[tuple[CommandEvent, lf.RecordedEvent]]] = {}
    last = 0
    for event in events:
        data = event.data
        if not isinstance(data, COMMAND_EVENTS):
            continue
        if data.seq < last:
            problems.append(f"{workflow_id}: seq {data.seq} recorded after seq {last}: {data!r}")
        last = max(last, data.seq)
        if not 1 <= data.seq <= len(commands):
            problems.append(f"{workflow_id}: a command beyond the workflow's: {data!r}")
            continue
        kind, name = commands[data.seq - 1]
        if (data.kind, data.name) != (kind, name):
            problems.append(f"{workflow_id}: seq {data.seq} is {kind} {name!r}, got {data!r}")
            continue
        by_seq.setdefault(data.seq, []).append((data, event))
    for seq, (kind, name) in enumerate(commands, 1):
        counts = Counter(type(data) for data, _ in by_seq.get(seq, []))
        allowed = dict(EXPECTED[kind])
        if seq == retried_seq:
            allowed[StepAttemptFailed] = (0, 1)
        for type_, count in sorted(counts.items(), key=lambda item: item[0].__name__):
            if type_ not in allowed:
                problems.append(
                    f"{workflow_id}: {kind} {name!r} (seq {seq}) recorded {count} "
                    f"{type_.__name__}: {[d for d, _ in by_seq[seq] if type(d) is type_]!r}"
                )
        for type_, wanted in allowed.items():
            if counts[type_] not in wanted:
                problems.append(
                    f"{workflow_id}: {kind} {name!r} (seq {seq}) has {counts[type_]} "
                    f"{type_.__name__} events, not {' or '.join(map(str, wanted))}"
                )
    return problems, by_seq


def _check_start_and_end(
    workflow_id: str,
    events: list[lf.RecordedEvent],
    name: str,
    parent: str | None,
    n: int,
    outside: tuple[type, ...],
) -> list[str]:
    """Contiguous versions, Started first, Finished(completed) last and once, and no
    event but these, the commands (checked by ``_check_commands``) and ``outside``."""
    problems: list[str] = []
    versions = [e.version for e in events]
    if versions != list(range(1, len(events) + 1)):
        problems.append(f"{workflow_id}: stream versions {versions} are not 1..{len(events)}")
    first = events[0].data if events else None
    if (
        not isinstance(first, Started)
        or first.name != name
        or first.parent_id != parent
        or first.input != {"n": n}
    ):
        problems.append(f"{workflow_id}: history begins with {first!r}")
    kinds = Counter(type(e.data) for e in events)
    if kinds[Started] != 1 or kinds[Finished] != 1:
        problems.append(f"{workflow_id}: {kinds[Started]} Started, {kinds[Finished]} Finished")
    last = events[-1].data if events else None
    if not isinstance(last, Finished) or last.status != "completed":
        problems.append(f"{workflow_id}: history ends with {last!r}, not Finished(completed)")
    for event in events:
        if not isinstance(event.data, (Started, Finished, *COMMAND_EVENTS, *outside)):
            problems.append(f"{workflow_id}: unexpected event {event.type} {event.data!r}")
    return problems


def _check_step_results(
    workflow_id: str,
    by_seq: dict[int, list[tuple[CommandEvent, lf.RecordedEvent]]],
    steps: tuple[tuple[int, str], ...],
    applied: dict[str, Effect],
) -> tuple[list[str], dict[str, str]]:
    """Each step's recorded result is the effect the external system applied."""
    problems: list[str] = []
    results: dict[str, str] = {}
    for seq, name in steps:
        done = [data for data, _ in by_seq.get(seq, []) if isinstance(data, StepDone)]
        if len(done) != 1:
            continue  # reported by _check_commands
        results[name] = done[0].result
        key = f"{workflow_id}/{seq}"
        effect = applied.get(key)
        if effect is None:
            problems.append(f"{workflow_id}: no effect applied under {key!r}")
        elif effect.value != done[0].result or effect.step != name:
            problems.append(
                f"{workflow_id}: StepDone of seq {seq} holds {done[0].result!r}, the external "
                f"system applied {effect.step} {effect.value!r} under {key!r}"
            )
    return problems, results


def _check_child(
    parent: str, n: int, events: list[lf.RecordedEvent], applied: dict[str, Effect]
) -> tuple[list[str], dict[str, str]]:
    cid = child_id(parent)
    if not events:
        return [f"{cid}: no history"], {}
    problems = _check_start_and_end(cid, events, CHILD_NAME, parent, n, ())
    found, by_seq = _check_commands(cid, events, CHILD_COMMANDS, None)
    problems.extend(found)
    found, results = _check_step_results(cid, by_seq, CHILD_STEPS, applied)
    problems.extend(found)
    last = events[-1].data
    (_, step_name), *_ = CHILD_STEPS
    if isinstance(last, Finished) and step_name in results and last.result != results[step_name]:
        problems.append(f"{cid}: ended with {last.result!r}, its step recorded {results}")
    return problems, results


def _check_parent(
    workflow_id: str,
    n: int,
    events: list[lf.RecordedEvent],
    child_events: list[lf.RecordedEvent],
    applied: dict[str, Effect],
    executions: Executions,
    runs: Runs,
) -> tuple[list[str], Checked]:
    """Problems with one instance's history and its child's, and what they hold."""
    checked = Checked()
    if not events:
        return [f"{workflow_id}: no history"], checked
    problems = _check_start_and_end(
        workflow_id, events, WORKFLOW_NAME, None, n, (SignalSent, ChildFinished)
    )
    found, by_seq = _check_commands(workflow_id, events, COMMANDS, RETRIED_SEQ)
    problems.extend(found)
    found, checked.results = _check_step_results(workflow_id, by_seq, STEPS, applied)
    problems.extend(found)

    # The retried step: declined exactly once by the external system; the failed
    # attempt recorded unless the worker that ran it was killed before recording it.
    key = f"{workflow_id}/{RETRIED_SEQ}"
    failed = [(d, e) for d, e in by_seq.get(RETRIED_SEQ, []) if isinstance(d, StepAttemptFailed)]
    done = [e for d, e in by_seq.get(RETRIED_SEQ, []) if isinstance(d, StepDone)]
    declined_by = executions.declined.get(key)
    if declined_by is None:
        problems.append(f"{workflow_id}: {RETRIED_STEP} was never declined")
    if failed:
        checked.attempt_failed = True
        attempt, event = failed[0]
        if attempt.attempt != 1 or attempt.error_type != "Declined":
            problems.append(f"{workflow_id}: unexpected failed attempt {attempt!r}")
        if done:
            checked.in_flight["retry"] = (_at(event), _at(done[0]))
    elif declined_by is not None and declined_by not in runs.killed_pids:
        problems.append(
            f"{workflow_id}: the declined attempt of {RETRIED_STEP} (worker {declined_by}, "
            "not killed) was not recorded"
        )

    # The signal: the first one sent is the one taken; repeats stay unconsumed.
    sent = [(e.version, e) for e in events if isinstance(e.data, SignalSent)]
    checked.signals_sent = len(sent)
    if not sent:
        problems.append(f"{workflow_id}: no signal recorded")
    wrong = [e.data for _, e in sent if e.data.name != SIGNAL_NAME]
    if wrong:
        problems.append(f"{workflow_id}: unexpected signals {wrong!r}")
    taken = [(d, e) for d, e in by_seq.get(SIGNAL_SEQ, []) if isinstance(d, SignalTaken)]
    checked.waited = any(isinstance(d, SignalWaiting) for d, _ in by_seq.get(SIGNAL_SEQ, []))
    if sent and len(taken) == 1:
        first_version, first = sent[0]
        signal_taken, taken_event = taken[0]
        if signal_taken.signal_version != first_version:
            problems.append(
                f"{workflow_id}: took the signal at version {signal_taken.signal_version}, "
                f"the first was sent at {first_version}"
            )
        payload: Any = first.data.payload
        checked.approval = Approval(**payload)
        if checked.approval.n != n:
            problems.append(f"{workflow_id}: approved by {payload!r}")
        checked.in_flight["signal"] = (_at(first), _at(taken_event))

    # The child: started once, its end delivered once, with what it recorded.
    cid = child_id(workflow_id)
    started = [d for d, _ in by_seq.get(CHILD_SEQ, []) if isinstance(d, ChildStarted)]
    if started and (started[0].child_id != cid or started[0].version != 1):
        problems.append(f"{workflow_id}: started child {started[0]!r}, expected {cid!r} v1")
    news = [e for e in events if isinstance(e.data, ChildFinished)]
    if len(news) != 1:
        problems.append(
            f"{workflow_id}: {len(news)} ChildFinished events: {[e.data for e in news]!r}"
        )
    found, child_results = _check_child(workflow_id, n, child_events, applied)
    problems.extend(found)
    if news and child_events:
        delivered: ChildFinished = news[0].data
        child_end = child_events[-1].data
        if (
            delivered.child_id != cid
            or delivered.status != "completed"
            or not isinstance(child_end, Finished)
            or delivered.result != child_end.result
        ):
            problems.append(f"{workflow_id}: child news {delivered!r}, child ended {child_end!r}")
        checked.results.update(child_results)
        checked.in_flight["child"] = (_at(child_events[0]), _at(news[0]))
    return problems, checked


async def _all_instances(store: Any) -> list[Any]:
    rows = []
    after: str | None = None
    while page := await store.list_instances(after=after, limit=500):
        rows.extend(page)
        after = page[-1].workflow_id
    return rows


@dataclass
class Summary:
    re_executions: int = 0
    lines: list[str] = field(default_factory=list)


async def _check_ledger(ledger_url: str, effects: Path, runs: Runs) -> tuple[list[str], Summary]:
    """Every problem found, and figures to print."""
    applied, executions = _read_effects(effects)
    executed = executions.by_key
    instances = runs.instances
    ids = [f"w-{n}" for n in range(instances)]
    children = {child_id(wid): wid for wid in ids}
    problems: list[str] = []
    checked: dict[str, Checked] = {}
    summary = Summary()

    async with lf.open_store(ledger_url, registry=history_registry()) as store:
        rows = await _all_instances(store)
        by_id = {row.workflow_id: row for row in rows}
        expected = set(ids) | set(children)
        missing = sorted(expected - set(by_id))
        extra = sorted(set(by_id) - expected)
        if missing:
            problems.append(f"lost workflows (no instance row): {missing[:50]}")
        if extra:
            problems.append(f"unexpected workflows: {extra[:50]}")
        not_done = {wid: row.status for wid, row in by_id.items() if row.status != "completed"}
        if not_done:
            problems.append(f"workflows not completed: {not_done}")
        for wid, row in by_id.items():
            want = (CHILD_NAME, children[wid]) if wid in children else (WORKFLOW_NAME, None)
            if (row.name, row.parent_id) != want:
                problems.append(f"{wid}: instance row says {row.name!r} of {row.parent_id!r}")
            wakeup = await store.get_wakeup(wid)
            if wakeup is not None:
                problems.append(f"{wid}: a wake-up is left after it ended: {wakeup!r}")

        for n, workflow_id in enumerate(ids):
            events = await store.read_stream(f"wf-{workflow_id}")
            child_events = await store.read_stream(f"wf-{child_id(workflow_id)}")
            found, checked[workflow_id] = _check_parent(
                workflow_id, n, events, child_events, applied, executions, runs
            )
            problems.extend(found)

        report = await lf.verify_ledger(store)
        if not report.ok:
            problems.extend(f"ledger: {finding}" for finding in report.findings)
        summary.lines.append(
            f"verify_ledger: {report.events_checked} events in "
            f"{report.streams_checked} streams, {len(report.findings)} findings"
        )

    # Results through the engine, as a user reads them.
    names = [name for _, name in STEPS] + [name for _, name in CHILD_STEPS]
    async with lf.Engine(ledger_url, workflows=WORKFLOWS, takeover=False) as engine:
        for n, workflow_id in enumerate(ids):
            record = checked.get(workflow_id)
            if record is None or set(record.results) != set(names) or record.approval is None:
                continue  # already reported
            try:
                receipt = await engine.handle(workflow_id, Receipt).result(timeout=5)
                packing = await engine.handle(child_id(workflow_id), str).result(timeout=5)
            except (lf.LedgerflowError, TimeoutError) as exc:
                problems.append(f"{workflow_id}: result() raised {exc!r}")
                continue
            values = record.results
            expected_receipt = Receipt(
                record.approval,
                values["reserve"],
                values["charge"],
                values["pack"],
                values["confirm"],
            )
            if receipt != expected_receipt or packing != values["pack"]:
                problems.append(
                    f"{workflow_id}: result {receipt!r} (child: {packing!r}), "
                    f"recorded {expected_receipt!r}"
                )
            prefixes = expected_prefixes(n)
            for name, value in values.items():
                if not value.startswith(prefixes[name]):
                    problems.append(f"{workflow_id}: {name} result {value!r} is another's")

    # The external system: one effect per (instance, step) key, nothing else.
    keys = {f"{wid}/{seq}" for wid in ids for seq, _ in STEPS} | {
        f"{cid}/{seq}" for cid in children for seq, _ in CHILD_STEPS
    }
    if set(applied) != keys:
        problems.append(
            f"effects: keys missing {sorted(keys - set(applied))[:20]}, "
            f"unexpected {sorted(set(applied) - keys)[:20]}"
        )
    strays = sorted(set(executed) - keys)
    if strays:
        problems.append(f"steps executed under unexpected keys: {strays[:20]}")
    declined_keys = {f"{wid}/{RETRIED_SEQ}" for wid in ids}
    if set(executions.declined) != declined_keys:
        problems.append(
            f"declined first attempts: missing "
            f"{sorted(declined_keys - set(executions.declined))[:20]}, unexpected "
            f"{sorted(set(executions.declined) - declined_keys)[:20]}"
        )
    if "release" in executions.steps:
        problems.append(f"the compensation ran {executions.steps.count('release')} times")

    total = sum(executed.values())
    summary.re_executions = total - len(applied)
    again: Counter[str] = Counter()
    step_of = {key: effect.step for key, effect in applied.items()}
    for key, count in executed.items():
        again[step_of.get(key, key)] += count - 1
    summary.lines.append(
        f"effects: {len(applied)} applied once each; {total} executions, of which "
        f"{summary.re_executions} re-executions after a kill "
        f"({', '.join(f'{name}: {again[name]}' for name in names)}) over "
        f"{sum(1 for count in executed.values() if count > 1)} keys"
    )
    records = list(checked.values())
    lost = sum(1 for r in records if not r.attempt_failed)
    sent = sum(r.signals_sent for r in records)
    summary.lines.append(
        f"retries: {len(executions.declined)} first attempts declined, "
        f"{len(records) - lost} recorded as failed, {lost} cut off by a kill before "
        f"being recorded; signals: {sent} sent, {len(records)} taken, "
        f"{sent - len(records)} repeats left unconsumed, "
        f"{sum(1 for r in records if r.waited)} instances waited for theirs"
    )
    summary.lines.append(_in_flight_at_kills(records, runs.kill_times))
    return problems, summary


def _in_flight_at_kills(records: list[Checked], kill_times: list[float]) -> str:
    """How many kills landed with a retry, a child, a signal in flight, and how
    many instances were so at the kills."""
    parts = []
    for what in ("retry", "child", "signal"):
        counts = [
            sum(
                1
                for record in records
                if what in record.in_flight
                and record.in_flight[what][0] <= at < record.in_flight[what][1]
            )
            for at in kill_times
        ]
        parts.append(
            f"{what} at {sum(1 for c in counts if c)}/{len(counts)} kills ({sum(counts)} instances)"
        )
    return "in flight: " + ", ".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_kill_minus_nine_loses_no_workflow_and_records_each_step_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ledger_url = backend_url(backend, tmp_path, request)
    kills = KILLS
    effects = tmp_path / "effects.db"
    logs = tmp_path / "logs"
    logs.mkdir()
    print(
        f"\ncrash test on {backend}: {kills} kills, {INSTANCES} instances to begin with, "
        f"concurrency {CONCURRENCY}, seed {SEED} (LEDGERFLOW_CRASH_SEED={SEED} to replay "
        "the delays)"
    )
    began = time.monotonic()
    runs = _kill_repeatedly(ledger_url, effects, logs, random.Random(SEED), kills)
    final = _final_run(ledger_url, effects, runs, logs)
    print(
        f"  {runs.kills} workers killed mid-run, {runs.finished_early} finished before "
        f"their kill; final run {final:.1f}s; {time.monotonic() - began:.1f}s in all"
    )
    problems, summary = asyncio.run(_check_ledger(ledger_url, effects, runs))
    for line in summary.lines:
        print(f"  {line}")
    print(
        f"  {summary.re_executions / max(runs.kills, 1):.1f} re-executions per kill "
        f"(concurrency {CONCURRENCY})"
    )
    problems.extend(f"worker output: {line}" for line in _logged_errors(runs.logs))
    assert runs.kills >= kills, f"only {runs.kills} of {kills} kills landed on a running worker"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:100])
