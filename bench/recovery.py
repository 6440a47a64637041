"""Crash recovery: SIGKILL a worker halfway through 200 workflows, restart, count re-runs.

    python bench/recovery.py                  # SQLite
    python bench/recovery.py --db postgres    # PostgreSQL

N workflows (``--n``, 200), each three sync steps: ``a``, ``b`` (sleeps ``--sleep``,
0.5 s), ``c``; at most ``--concurrency`` (20) run at once (the Engine's
``concurrency`` and ``step_threads``). The driver starts a worker process that starts
the instances ``wf-0`` .. ``wf-{N-1}`` and waits for their results. Once
``--kill-at`` (0.5) of them have run the body of ``c`` to its end, the driver sends
SIGKILL, reads the ledger as the kill left it, then starts a second worker that opens
an Engine on the same database (which resumes unfinished instances) and waits for all
N results.

Every step body appends ``<workflow id> <step> start|end`` to a marker file with
``os.write`` on an ``O_APPEND`` descriptor, so the lines survive the kill. From the
markers: step bodies that ran more than once, of those how many had run to their end
before the kill, and workflows with a step that never ran. From the ledger (a
read-only query of ``wf.step_done`` events right after the kill): how many step
results were recorded, and whether any step re-ran although its result was recorded
(that would be a bug, whatever the timing).

If the DBOS peer environment is there (``LEDGERFLOW_PEER_PYTHON``, default
``/tmp/peers/bin/python``, and ``dbos_recovery.py`` in ``LEDGERFLOW_PEER_DIR``), the
same crash is run on DBOS Transact with the same arguments and its figures are added
as ``dbos_*`` fields. Prints one JSON line; progress goes to stderr. Each run uses a
fresh database (a temporary directory for SQLite, new schemas, and for DBOS a new
database, on PostgreSQL), removed afterwards. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import ledgerflow as lf
from store import PG_URL, note, pg_problem, pg_store_url

REPO = Path(__file__).resolve().parent.parent
PEER_PYTHON = Path(os.environ.get("LEDGERFLOW_PEER_PYTHON", "/tmp/peers/bin/python"))
PEER_DIR = Path(os.environ.get("LEDGERFLOW_PEER_DIR", REPO.parent / "shared" / "peers"))
PEER_HARNESS = PEER_DIR / "dbos_recovery.py"

STEPS = ("a", "b", "c")
STREAM_PREFIX = lf.Engine.stream_id("")
POLL_S = 0.01
KILL_DEADLINE_S = 30.0
"""The first worker is killed at this age even if fewer workflows are done (an error)."""
RECOVER_TIMEOUT_S = 30.0
LEASE_S = 2.0
"""Both workers' lease: the second takes over the killed one's instances once its
heartbeat is this old (the default, 60 s, would outlast RECOVER_TIMEOUT_S)."""
PEER_TIMEOUT_S = 45.0
DBOS_FIELDS = (
    "done_at_kill",
    "steps_in_flight_at_kill",
    "steps_run_twice",
    "steps_run_twice_after_body_finished",
    "steps_run_twice_after_checkpoint",
    "restart_to_all_done_s",
    "restart_launch_s",
    "launch_to_all_done_s",
)
"""Figures of the DBOS harness copied into the line, prefixed with ``dbos_``."""


class BenchError(Exception):
    """A worker failed, never reached the kill point, or returned wrong results."""


# -- the worker -----------------------------------------------------------------------

_marks_fd = -1
_sleep_s = 0.0


def mark(step: str, what: str) -> None:
    line = f"{lf.current_step().workflow_id} {step} {what}\n"
    os.write(_marks_fd, line.encode())


def step_a(i: int) -> int:
    mark("a", "start")
    mark("a", "end")
    return i


def step_b(i: int) -> int:
    mark("b", "start")
    time.sleep(_sleep_s)
    mark("b", "end")
    return 1


def step_c(i: int) -> int:
    mark("c", "start")
    mark("c", "end")
    return 2


@lf.workflow(name="bench.recovery", version=1)
async def recovery(ctx: lf.WorkflowContext, i: int) -> int:
    a = await ctx.step(step_a, i, name="a")
    b = await ctx.step(step_b, i, name="b")
    c = await ctx.step(step_c, i, name="c")
    return a + b + c


def expected_result(i: int) -> int:
    return i + 3


async def work(url: str, n: int, concurrency: int, instances: int | None) -> dict[str, float]:
    """Start the N instances and wait for them: the first worker until the driver
    kills it, the second (recovering) until all have finished."""
    began = time.perf_counter()
    engine = lf.Engine(
        url,
        workflows=[recovery],
        concurrency=instances or concurrency,
        step_threads=concurrency,
        lease=timedelta(seconds=LEASE_S),
    )
    await engine.start_engine()
    try:
        launched = time.perf_counter()
        ids = [f"wf-{i}" for i in range(n)]
        # Both phases start all N: starting is idempotent for the same id and input,
        # so the second gets a handle on each instance the first started and starts
        # those it did not get to before the kill (on PostgreSQL, with steps
        # running beside the starts, that can be some).
        handles = [await engine.start(recovery, i, id=wid) for i, wid in enumerate(ids)]
        results = await asyncio.gather(*(h.result() for h in handles))
        done = time.perf_counter()
    finally:
        await engine.close()
    wrong = sum(r != expected_result(i) for i, r in enumerate(results))
    if wrong:
        raise BenchError(f"{wrong} of {n} results are wrong")
    return {"launch_s": round(launched - began, 3), "after_launch_s": round(done - launched, 3)}


def worker(args: argparse.Namespace) -> int:
    global _marks_fd, _sleep_s
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _marks_fd = os.open(args.marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _sleep_s = args.sleep
    times = asyncio.run(work(args.url, args.n, args.concurrency, args.instances))
    print(json.dumps(times), flush=True)
    return 0


# -- the ledger -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    db: str
    url: str
    """What the Engine opens."""
    sqlite_path: Path | None = None
    schema: str | None = None

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """``sql`` (``{events}`` standing for the events table) on a read-only
        connection of its own."""
        if self.sqlite_path is not None:
            con = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True)
            try:
                return con.execute(sql.format(events="events")).fetchall()
            finally:
                con.close()
        import psycopg

        with psycopg.connect(PG_URL) as pg:
            pg.read_only = True
            return pg.execute(sql.format(events=f"{self.schema}.events")).fetchall()


@dataclass(frozen=True)
class AtKill:
    recorded: set[tuple[str, str]]
    """(workflow id, step) of every ``wf.step_done`` event."""
    started: int
    finished: int


def read_ledger(ledger: Ledger) -> AtKill:
    rows = ledger.rows(
        "SELECT stream_id, type, data FROM {events} "
        "WHERE type IN ('wf.started', 'wf.step_done', 'wf.finished')"
    )
    recorded: set[tuple[str, str]] = set()
    started = finished = 0
    for stream_id, kind, data in rows:
        if kind == "wf.step_done":
            recorded.add((stream_id.removeprefix(STREAM_PREFIX), json.loads(bytes(data))["name"]))
        elif kind == "wf.started":
            started += 1
        else:
            finished += 1
    return AtKill(recorded, started, finished)


@contextlib.contextmanager
def fresh_ledger(db: str, directory: Path) -> Iterator[Ledger]:
    if db == "sqlite":
        path = directory / "ledger.db"
        yield Ledger(db, f"sqlite:///{path}", sqlite_path=path)
        return
    problem = pg_problem()
    if problem is not None:
        raise BenchError(problem)
    import psycopg

    schema = f"lf_bench_recovery_{uuid.uuid4().hex[:12]}"
    try:
        yield Ledger(db, pg_store_url(schema), schema=schema)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# -- the crash ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    db: str
    n: int
    sleep: float
    concurrency: int
    kill_at: float
    instances: int | None = None
    """Engine concurrency if not ``concurrency``: with 200, all instances run at once
    on ``concurrency`` step threads (the burst shape of the original report)."""


def read_marks(path: Path) -> list[tuple[str, str, str]]:
    if not path.exists():
        return []
    marks: list[tuple[str, str, str]] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            marks.append((parts[0], parts[1], parts[2]))
    return marks


def worker_command(s: Settings, url: str, marks: Path, phase: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--phase", phase, "--url", url, "--marks", str(marks)),
        *("--n", str(s.n), "--sleep", str(s.sleep), "--concurrency", str(s.concurrency)),
        *(("--instances", str(s.instances)) if s.instances else ()),
    ]


def kill_halfway(s: Settings, ledger: Ledger, marks: Path) -> float:
    """Run the first worker until ``kill_at`` of the workflows have ended step ``c``,
    SIGKILL it; seconds from its start to the kill."""
    target = int(s.n * s.kill_at)
    began = time.perf_counter()
    proc = subprocess.Popen(
        worker_command(s, ledger.url, marks, "first"), stdout=subprocess.DEVNULL
    )
    try:
        done = 0
        offset = 0
        while done < target:
            if proc.poll() is not None:
                raise BenchError(
                    f"the first worker exited ({proc.returncode}) with {done} of "
                    f"{s.n} workflows done, before the kill at {target}"
                )
            if time.perf_counter() - began > KILL_DEADLINE_S:
                raise BenchError(
                    f"only {done} of {target} workflows done after {KILL_DEADLINE_S} s"
                )
            if marks.exists():
                with marks.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk.rfind(b"\n") + 1
                offset += complete
                done += chunk[:complete].count(b" c end\n")
            time.sleep(POLL_S)
        return time.perf_counter() - began
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def crash_and_recover(s: Settings, ledger: Ledger, marks: Path) -> dict[str, Any]:
    note(f"{s.db}: {s.n} workflows, killing the worker once {s.kill_at:.0%} are done")
    killed_after = kill_halfway(s, ledger, marks)
    before = read_marks(marks)
    at_kill = read_ledger(ledger)
    done_at_kill = sum(1 for m in before if m[1:] == ("c", "end"))
    started = collections.Counter((w, st) for w, st, x in before if x == "start")
    ended = collections.Counter((w, st) for w, st, x in before if x == "end")
    in_flight = [k for k in started if started[k] > ended[k]]
    unrecorded = [k for k in ended if k not in at_kill.recorded]
    note(
        f"{s.db}: killed after {killed_after:.2f} s with {done_at_kill} done; ledger: "
        f"{len(at_kill.recorded)} step results, {at_kill.finished} workflows finished"
    )

    restarted = time.perf_counter()
    out = subprocess.run(
        worker_command(s, ledger.url, marks, "recover"),
        stdout=subprocess.PIPE,
        text=True,
        timeout=RECOVER_TIMEOUT_S,
        check=False,
    )
    recovered = time.perf_counter() - restarted
    if out.returncode != 0:
        raise BenchError(f"the recovering worker exited with {out.returncode}")
    times = json.loads(out.stdout.strip().splitlines()[-1])
    note(f"{s.db}: restart to all done {recovered:.2f} s")

    runs = collections.Counter((w, st) for w, st, x in read_marks(marks) if x == "start")
    twice = [k for k, v in runs.items() if v > 1]
    return {
        "killed_after_s": round(killed_after, 3),
        "done_at_kill": done_at_kill,
        "steps_in_flight_at_kill": len(in_flight),
        "workflows_started_at_kill": at_kill.started,
        "workflows_finished_at_kill": at_kill.finished,
        "step_results_recorded_at_kill": len(at_kill.recorded),
        "steps_finished_unrecorded_at_kill": len(unrecorded),
        "restart_to_all_done_s": round(recovered, 3),
        "restart_launch_s": times["launch_s"],
        "launch_to_all_done_s": times["after_launch_s"],
        "ideal_remaining_s": round((s.n - done_at_kill) / s.concurrency * s.sleep, 3),
        "steps_run_twice": len(twice),
        "steps_run_twice_after_body_finished": sum(1 for k in twice if ended[k] > 0),
        "steps_run_twice_after_checkpoint": sum(1 for k in twice if k in at_kill.recorded),
        "workflows_missing_a_step": sum(
            1 for i in range(s.n) if any(runs[(f"wf-{i}", st)] == 0 for st in STEPS)
        ),
    }


# -- the DBOS peer --------------------------------------------------------------------


@contextlib.contextmanager
def peer_database(db: str) -> Iterator[str | None]:
    """For PostgreSQL, the URL of a new database for the DBOS harness (which drops and
    creates a fixed schema in it), dropped afterwards; None for SQLite."""
    if db == "sqlite":
        yield None
        return
    import psycopg

    name = f"lf_bench_dbos_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(PG_URL)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def dbos(s: Settings, directory: Path) -> dict[str, Any]:
    """The same crash on DBOS Transact, if its environment is installed."""
    if not (PEER_PYTHON.exists() and PEER_HARNESS.exists()):
        return {"dbos": "not installed (see bench/README.md)"}
    note(f"{s.db}: the same crash on DBOS ({PEER_HARNESS.name})")
    command = [
        str(PEER_PYTHON),
        str(PEER_HARNESS),
        *("--db", s.db, "--n", str(s.n), "--sleep", str(s.sleep)),
        *("--concurrency", str(s.concurrency), "--kill-at", str(s.kill_at)),
    ]
    scratch = directory / "dbos"
    scratch.mkdir()
    try:
        with peer_database(s.db) as url:
            env = os.environ | {"TMPDIR": str(scratch)}  # its mkdtemp lands in ours
            if url is not None:
                env["BENCH_PG_URL"] = url
            out = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                timeout=PEER_TIMEOUT_S,
                check=False,
            )
        if out.returncode != 0:
            raise BenchError(f"{PEER_HARNESS.name} exited with {out.returncode}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - the peer's failure is a figure, not ours
        return {"dbos": "failed", "dbos_error": f"{type(exc).__name__}: {exc}"}
    note(
        f"{s.db}: DBOS restart to all done {figures['restart_to_all_done_s']:.2f} s, "
        f"{figures['steps_run_twice_after_body_finished']} finished bodies re-run"
    )
    return (
        {"dbos": "dbos_recovery.py"}
        | {f"dbos_{key}": figures.get(key) for key in DBOS_FIELDS}
        | {"dbos_steps_never_run": figures.get("workflows_missing_a_step")}
    )


# -- the run --------------------------------------------------------------------------


def run(s: Settings) -> tuple[dict[str, Any], bool]:
    began = time.perf_counter()
    errors: list[str] = []
    figures: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="ledgerflow-bench-recovery-"))
    try:
        try:
            with fresh_ledger(s.db, directory) as ledger:
                figures = crash_and_recover(s, ledger, directory / "marks.log")
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON
            errors.append(f"{type(exc).__name__}: {exc}")
            note(f"{s.db}: {errors[-1]}")
        peer = dbos(s, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    line = {
        "bench": "recovery",
        "db": s.db,
        "n": s.n,
        "sleep_s": s.sleep,
        "concurrency": s.concurrency,
        "engine_concurrency": s.instances or s.concurrency,
        "lease_s": LEASE_S,
        "kill_at": s.kill_at,
        **figures,
        **peer,
        "errors": errors,
        "seconds": round(time.perf_counter() - began, 1),
    }
    return line, not errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--n", type=int, default=200, help="workflows (default 200)")
    parser.add_argument("--sleep", type=float, default=0.5, help="step b's sleep (0.5 s)")
    parser.add_argument("--concurrency", type=int, default=20, help="at once (default 20)")
    parser.add_argument(
        "--instances",
        type=int,
        default=None,
        help="instances the engine runs at once (default: --concurrency); 200 runs all "
        "of them on --concurrency step threads",
    )
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="fraction of workflows done at the kill"
    )
    parser.add_argument(
        "--phase", choices=("driver", "first", "recover"), default="driver", help=argparse.SUPPRESS
    )
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--marks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase != "driver":
        return worker(args)
    settings = Settings(args.db, args.n, args.sleep, args.concurrency, args.kill_at, args.instances)
    line, ok = run(settings)
    print(json.dumps(line), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
