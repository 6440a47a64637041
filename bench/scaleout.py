"""Scale-out on PostgreSQL: several processes on one ledger (issue 12).

    python bench/scaleout.py                  # every case, one JSON line each
    python bench/scaleout.py append           # one case: append, workflows, failover,
                                              # claim_latency

Each case prints one JSON line on stdout; progress goes to stderr. Each runs on a new
schema ``lf_bench_scaleout_<random>`` (dropped afterwards), in a temporary directory
(removed afterwards), and takes under a minute:

- ``append``: 8 asyncio tasks in all appending single events, each to its own stream
  with the version the last append returned, for 6 s, from 1, 2 and 4 writer
  processes (1 x 8, 2 x 4, 4 x 2 tasks), while a subscriber process follows the log
  with ``store.subscribe`` and must see every acknowledged event exactly once, in
  increasing position order. ``frozen_writer``: 2 writer processes, one stopped with
  SIGSTOP for 2 s mid-run: does the other keep appending?
- ``workflows``: 600 three-step workflows (plain ``def`` steps) started in batches
  of 100 through a ``WorkflowClient``, run by 1, 2 and 4 ``ledgerflow worker``
  processes; workflows/s and steps/s from the first start until none is running.
- ``failover``: 2 workers with ``--lease 2``; the one running a sleeping step is
  killed with SIGKILL; seconds until the step starts again on the other.
- ``claim_latency``: one idle worker; 200 workflows started one at a time (0.05 to
  0.15 s apart); from the ``start`` call until the first step starts.
- ``task_latency``: the same, with the first step sent to a task queue that only a
  second worker serves (``--app _scaleout_app:remote_first --queue bench-remote``):
  the workflow's worker claims the instance and sends the step, the other claims
  the task and runs it. No target: a figure next to ``claim_latency``.

The floor, measured in the same run on the same server, is single-row INSERT +
COMMIT from 8 connections at once into a scratch table shaped like the events table.
Workers are the CLI (``ledgerflow worker --app _scaleout_app``, the workflows of
bench/_scaleout_app.py) run from this source tree. PostgreSQL is found as in
bench/store.py; without it the script says why and exits 2. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _scaleout_app as app
import ledgerflow as lf
from store import PG_URL, events_shaped_table, note, pg_problem, pg_store_url, ratio

if TYPE_CHECKING:
    import psycopg

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CASES = ("append", "workflows", "failover", "claim_latency", "task_latency")

FLOOR_CONNECTIONS = 8
FLOOR_SECONDS = 0.8
SPAWN_TIMEOUT_S = 30.0
"""A child process must be ready (store open, worker started) within this."""
CASE_TIMEOUT_S = 100.0
"""A case still running after this is cut short and reported as an error."""

# append
TOTAL_TASKS = 8
WRITER_PROCESSES = (1, 2, 4)
APPEND_SECONDS = 6.0
FROZEN_RUN_S = 7.0
FREEZE_AT_S = 2.5
FREEZE_S = 2.0
CATCH_UP_TIMEOUT_S = 15.0
"""The subscriber must have seen every acknowledged event this long after the end."""
EVENT_TYPE = "bench.deposited"

# workflows
WORKER_COUNTS = (1, 2, 4)
WORKFLOWS = 600
START_BATCH = 100
STEPS_PER_WORKFLOW = 3
RESULT_TIMEOUT_S = 40.0
POLL_S = 0.01
STOP_TIMEOUT_S = 20.0
"""A worker told to stop (SIGTERM) must exit within this (its --grace is 10 s)."""

# failover
FAILOVER_LEASE_S = 2.0
FAILOVER_INSTANCES = 6
FAILOVER_STEP_S = 2.0
"""The sleeping step; the kill comes 0.3 s after every instance has started it."""

# claim latency
CLAIM_STARTS = 200
CLAIM_GAP_S = (0.05, 0.15)
CLAIM_WARMUP = 3

TARGETS = {
    "append_ratio_4_to_1": ">= 1.0",
    "frozen_writer_other_during_ratio": ">= 0.5 (the other writer is not stalled)",
    "failover_s": f"<= lease + 1 s ({FAILOVER_LEASE_S + 1:g} s)",
    "claim_latency_p50_ms": "< 5",
}


class BenchError(Exception):
    """A child failed, a wait ran out, or results were wrong."""


# -- child processes ------------------------------------------------------------------

_LIVE_PIDS: set[int] = set()
"""Every child not yet known to have exited: killed at interpreter exit, whatever
happened (the async clean-up is the normal way; this is the net under it)."""


def _kill_leftovers() -> None:
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


atexit.register(_kill_leftovers)

LEDGERFLOW_CLI = (
    "-c",
    "import sys; from ledgerflow.cli import main; sys.argv[0] = 'ledgerflow'; main()",
)
"""``ledgerflow`` as its console script runs it, on this interpreter and this tree."""


def child_env(**extra: str) -> dict[str, str]:
    """This tree's ``src`` (not an installed ledgerflow) and ``bench`` importable."""
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(BENCH)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    """Its stderr."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, word: str, timeout: float = SPAWN_TIMEOUT_S) -> None:
        """Wait for the line ``word`` on its stdout."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"{self.name}: no {word!r} after {timeout:.0f} s") from None
        if line.strip() != word.encode():
            await asyncio.sleep(0.2)
            raise BenchError(
                f"{self.name}: expected {word!r}, got {line[:200]!r} "
                f"(exit {self.proc.returncode}; stderr: {self.log_tail()})"
            )

    async def wait(self, timeout: float) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise BenchError(f"{self.name}: still running after {timeout:.0f} s") from None
        _LIVE_PIDS.discard(self.pid)
        return code


class Children:
    """The child processes of one case, each with its stderr in a file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.all: list[Child] = []

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> Child:
        log = self.directory / f"{name}.log"
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=cwd,
                env=child_env(**(env or {})),
            )
        _LIVE_PIDS.add(proc.pid)
        child = Child(name, proc, log)
        self.all.append(child)
        return child

    async def kill_all(self) -> list[str]:
        """SIGCONT then SIGKILL to each child still running; their names."""
        left: list[str] = []
        for child in self.all:
            if child.proc.returncode is None:
                left.append(child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGCONT)
                    child.proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.proc.wait(), 5)
            if child.proc.returncode is not None:
                _LIVE_PIDS.discard(child.pid)
        return left

    def log_problems(self) -> list[str]:
        """Warnings, errors and tracebacks in the children's stderr."""
        found: list[str] = []
        for child in self.all:
            with contextlib.suppress(OSError):
                for line in child.log.read_text(errors="replace").splitlines():
                    if any(w in line for w in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")):
                        found.append(f"{child.name}: {line.strip()[:400]}")
        return found


def own_script(role: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *args]


def with_params(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


# -- the database ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_ledger() -> AsyncIterator[str]:
    """A new schema with a ledger in it (created here, before any child opens it);
    dropped afterwards. Yields the schema's name."""
    import psycopg

    schema = f"lf_bench_scaleout_{uuid.uuid4().hex[:12]}"
    try:
        async with lf.open_store(pg_store_url(schema)):
            pass
        yield schema
    finally:
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as con:
            await con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def pg_rows(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as con:
        cur = await con.execute(sql, params)
        return await cur.fetchall()


async def pg_settings() -> dict[str, str]:
    names = ("server_version", "synchronous_commit", "fsync", "max_connections")
    rows = await pg_rows(
        "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(names),)
    )
    return dict(rows)


class Floor:
    """``FLOOR_CONNECTIONS`` autocommit connections, each sending BEGIN, a one-row
    INSERT and COMMIT in one pipeline (the adapter's way of committing), in a loop,
    all at once, into a scratch table shaped like the events table."""

    def __init__(self, cons: list[psycopg.AsyncConnection[Any]], schema: str) -> None:
        self.cons = cons
        self.schema = schema
        self.position = 0
        self.versions = [0] * len(cons)

    @classmethod
    async def create(cls, schema: str) -> Floor:
        import psycopg

        cons = [
            await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)
            for _ in range(FLOOR_CONNECTIONS)
        ]
        for con in cons:  # as the adapter's sessions: durable commits, whatever the default
            await con.execute("SELECT set_config('synchronous_commit', 'on', false)")
        await cons[0].execute(events_shaped_table(f"{schema}.scaleout_floor"))
        return cls(cons, schema)

    async def commits_per_s(self, seconds: float) -> float:
        sql = (
            f"INSERT INTO {self.schema}.scaleout_floor VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        )
        counts = [0] * len(self.cons)
        data = json.dumps({"n": 1}).encode()

        async def commit(index: int, deadline: float) -> None:
            con = self.cons[index]
            prev = bytes(32)
            while time.perf_counter() < deadline:
                self.position += 1
                self.versions[index] += 1
                digest = os.urandom(32)
                row = (
                    self.position,
                    uuid.uuid4(),
                    f"floor-{index}",
                    self.versions[index],
                    EVENT_TYPE,
                    1,
                    data,
                    b"{}",
                    datetime.now(UTC),
                    prev,
                    digest,
                )
                prev = digest
                async with con.pipeline():
                    await con.execute("BEGIN")
                    await con.execute(sql, row, binary=True)
                    await con.execute("COMMIT")
                counts[index] += 1

        start = time.perf_counter()
        await asyncio.gather(*(commit(i, start + seconds) for i in range(len(self.cons))))
        return sum(counts) / (time.perf_counter() - start)

    async def close(self) -> None:
        for con in self.cons:
            await con.close()


@contextlib.asynccontextmanager
async def floor_beside(schema: str) -> AsyncIterator[Floor]:
    floor = await Floor.create(schema)
    try:
        await floor.commits_per_s(0.3)  # warm-up
        yield floor
    finally:
        await floor.close()


# -- helpers --------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-int(pct * len(ordered)) // 100) - 1)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@dataclass(frozen=True)
class Mark:
    workflow_id: str
    step: str
    pid: int
    at: float


def read_marks(path: Path) -> list[Mark]:
    """The lines bench/_scaleout_app.py wrote, complete ones only."""
    if not path.exists():
        return []
    marks: list[Mark] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            marks.append(Mark(parts[0], parts[1], int(parts[2]), float(parts[3])))
    return marks


async def until(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float, every: float = POLL_S
) -> None:
    deadline = time.perf_counter() + timeout
    while not await check():
        if time.perf_counter() > deadline:
            raise BenchError(f"{what}: not after {timeout:.0f} s")
        await asyncio.sleep(every)


# -- workers (the CLI) ----------------------------------------------------------------


def worker_argv(
    url: str, *, lease: float | None = None, app: Sequence[str] = ("_scaleout_app",)
) -> list[str]:
    argv = [sys.executable, *LEDGERFLOW_CLI, "worker", "--db", url, "--app", *app]
    if lease is not None:
        argv += ["--lease", f"{lease:g}"]
    return argv


WORKER_COMMAND = "ledgerflow worker --db <url> --app _scaleout_app (cwd bench/)"


async def start_workers(
    children: Children,
    url: str,
    n: int,
    tag: str,
    *,
    lease: float | None = None,
    env: dict[str, str] | None = None,
    app: Sequence[str] = ("_scaleout_app",),
) -> list[Child]:
    workers = [
        await children.spawn(
            f"{tag}-worker-{i + 1}",
            worker_argv(
                with_params(url, application_name=f"lf-scaleout-{tag}-{i + 1}"),
                lease=lease,
                app=app,
            ),
            cwd=BENCH,  # as deploy.md has it: the --app module in the current directory
            env=env,
        )
        for i in range(n)
    ]
    await asyncio.gather(*(until_started(w) for w in workers))
    return workers


async def until_started(worker: Child) -> None:
    deadline = time.perf_counter() + SPAWN_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError):
            if " started on " in worker.log.read_text(errors="replace"):
                return
        if worker.proc.returncode is not None:
            raise BenchError(
                f"{worker.name} exited ({worker.proc.returncode}) before it started: "
                f"{worker.log_tail()}"
            )
        if time.perf_counter() > deadline:
            raise BenchError(f"{worker.name} did not start in {SPAWN_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)


async def stop_workers(workers: Sequence[Child]) -> list[dict[str, Any]]:
    """SIGTERM to each, at once; how each exited (code, seconds), or that it did not."""

    async def stop(worker: Child) -> dict[str, Any]:
        began = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        try:
            code = await worker.wait(STOP_TIMEOUT_S)
        except BenchError:
            return {"worker": worker.name, "exited": False, "after_s": STOP_TIMEOUT_S}
        return {
            "worker": worker.name,
            "exited": True,
            "exit_code": code,
            "after_s": round(time.perf_counter() - began, 2),
        }

    return list(await asyncio.gather(*(stop(w) for w in workers)))


def stop_problems(stops: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{s['worker']}: "
        + ("did not exit on SIGTERM" if not s["exited"] else f"exit {s['exit_code']}")
        for s in stops
        if not s["exited"] or s["exit_code"] != 0
    ]


# -- case: append -----------------------------------------------------------------------


@dataclass
class WriterOut:
    start: float
    seconds: float
    acks: dict[str, list[tuple[int, int, float]]]
    """Per stream: (version, position, time acknowledged) of each append."""
    errors: list[str]

    def rate(self) -> float:
        end = self.start + self.seconds
        return sum(1 for a in self.all_acks() if a[2] <= end) / self.seconds

    def all_acks(self) -> list[tuple[int, int, float]]:
        return [a for acks in self.acks.values() for a in acks]


@dataclass
class AppendRun:
    processes: int
    writers: list[WriterOut]
    subscriber: dict[str, Any]
    frozen: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return sum(w.rate() for w in self.writers)


async def append_run(
    children: Children,
    schema: str,
    processes: int,
    prefix: str,
    seconds: float,
    freeze: bool = False,
) -> AppendRun:
    """``processes`` writer processes of ``TOTAL_TASKS // processes`` tasks each and
    one subscriber process, started together."""
    url = pg_store_url(schema)
    head = (await pg_rows(f"SELECT coalesce(max(position), 0) FROM {schema}.events"))[0][0]
    directory = children.directory
    sub_out = directory / f"{prefix}-subscriber.json"
    subscriber = await children.spawn(
        f"{prefix}-subscriber",
        own_script(
            "subscriber",
            *("--url", with_params(url, application_name=f"lf-scaleout-{prefix}-sub")),
            *("--from-position", str(head + 1), "--out", str(sub_out)),
        ),
    )
    writers: list[Child] = []
    for k in range(processes):
        writers.append(
            await children.spawn(
                f"{prefix}-writer-{k + 1}",
                own_script(
                    "writer",
                    *("--url", with_params(url, application_name=f"lf-scaleout-{prefix}-w{k + 1}")),
                    *("--tasks", str(TOTAL_TASKS // processes), "--prefix", f"{prefix}-w{k + 1}"),
                    *("--out", str(directory / f"{prefix}-writer-{k + 1}.json")),
                ),
            )
        )
    await asyncio.gather(*(c.expect("ready") for c in [subscriber, *writers]))
    go = time.time() + 0.3
    for w in writers:
        await w.send(f"go {go!r} {seconds!r}")
    frozen: dict[str, Any] = {}
    if freeze:
        frozen = await freeze_one(writers[0], go, prefix)
    for w in writers:
        code = await w.wait(seconds + 30)
        if code != 0:
            raise BenchError(f"{w.name} exited {code}: {w.log_tail()}")
    outs = []
    for k in range(processes):
        raw = json.loads((directory / f"{prefix}-writer-{k + 1}.json").read_text())
        acks = {s: [(a[0], a[1], a[2]) for a in v] for s, v in raw["streams"].items()}
        outs.append(WriterOut(raw["start"], raw["seconds"], acks, raw["errors"]))
    last = max((a[1] for w in outs for a in w.all_acks()), default=head)
    await subscriber.send(f"until {last}")
    code = await subscriber.wait(CATCH_UP_TIMEOUT_S + 15)
    if code != 0:
        raise BenchError(f"{subscriber.name} exited {code}: {subscriber.log_tail()}")
    seen = json.loads(sub_out.read_text())
    run = AppendRun(processes, outs, check_subscriber(outs, seen), frozen)
    if freeze:
        run.frozen.update(frozen_figures(outs, frozen))
    return run


async def freeze_one(victim: Child, go: float, prefix: str) -> dict[str, Any]:
    """SIGSTOP ``victim`` ``FREEZE_AT_S`` after the start, for ``FREEZE_S``; halfway
    through, what PostgreSQL says the writers' sessions are doing."""
    await asyncio.sleep(max(0.0, go + FREEZE_AT_S - time.time()))
    stopped = time.time()
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(FREEZE_S / 2)
        rows = await pg_rows(
            "SELECT application_name, state, wait_event_type, wait_event, "
            "extract(epoch FROM now() - xact_start), left(query, 80) FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND state <> 'idle' ORDER BY application_name",
            (f"lf-scaleout-{prefix}-%",),
        )
        await asyncio.sleep(max(0.0, stopped + FREEZE_S - time.time()))
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    resumed = time.time()
    sessions = [
        {
            "session": name,
            "state": state,
            "waiting_for": f"{wtype}:{wevent}" if wtype else None,
            "in_transaction_s": None if xact is None else round(float(xact), 2),
            "query": query,
        }
        for name, state, wtype, wevent, xact, query in rows
    ]
    # The other writer waiting for a lock the stopped one holds.
    held = any(
        s["session"] != f"lf-scaleout-{prefix}-w1" and (s["waiting_for"] or "").startswith("Lock:")
        for s in sessions
    )
    return {
        "stopped_at": stopped,
        "resumed_at": resumed,
        "other_writer_waited_on_a_lock": held,
        "sessions_mid_freeze": sessions,
    }


def frozen_figures(outs: list[WriterOut], frozen: dict[str, Any]) -> dict[str, Any]:
    """The other writer's appends/s before, during and after the freeze, and its
    longest pause while the first was stopped."""
    stopped, resumed = frozen.pop("stopped_at"), frozen.pop("resumed_at")
    other = sorted(a[2] for a in outs[1].all_acks())
    victim = sorted(a[2] for a in outs[0].all_acks())

    def rate(times: list[float], lo: float, hi: float) -> float:
        return sum(1 for t in times if lo <= t < hi) / (hi - lo)

    window = min(FREEZE_AT_S - 0.5, FREEZE_S)
    before = rate(other, stopped - window, stopped)
    during = rate(other, stopped, resumed)
    after = rate(other, resumed, resumed + window)
    inside = [stopped, *(t for t in other if stopped <= t < resumed), resumed]
    gap = max(b - a for a, b in itertools.pairwise(inside))
    return {
        "freeze_s": round(resumed - stopped, 3),
        "other_before_per_s": round(before, 1),
        "other_during_per_s": round(during, 1),
        "other_after_per_s": round(after, 1),
        "other_during_ratio": round(during / before, 3) if before else None,
        "other_longest_pause_ms": ms(gap),
        "frozen_acks_during": sum(1 for t in victim if stopped + 0.05 <= t < resumed),
    }


def check_subscriber(outs: list[WriterOut], seen_out: dict[str, Any]) -> dict[str, Any]:
    """Did the subscriber see each acknowledged event once, in increasing position
    order, and nothing else? How far behind was it when the last append returned?"""
    acked: dict[int, tuple[str, int, float]] = {}
    for w in outs:
        for stream, acks in w.acks.items():
            for version, position, at in acks:
                acked[position] = (stream, version, at)
    seen = [(int(p), str(s), int(v), float(t)) for p, s, v, t in seen_out["seen"]]
    positions = [s[0] for s in seen]
    out_of_order = sum(1 for a, b in itertools.pairwise(positions) if b <= a)
    counts = collections.Counter(positions)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    first_seen: dict[int, tuple[str, int, float]] = {}
    for position, stream, version, at in seen:
        first_seen.setdefault(position, (stream, version, at))
    missing = [p for p in acked if p not in first_seen]
    unexpected = [
        p
        for p, (stream, version, _) in first_seen.items()
        if acked.get(p, ("", 0))[:2] != (stream, version)
    ]
    last_ack = max((a[2] for a in acked.values()), default=0.0)
    delays = [first_seen[p][2] - a[2] for p, a in acked.items() if p in first_seen]
    caught_up = max((first_seen[p][2] for p in acked if p in first_seen), default=last_ack)
    ok = not (out_of_order or duplicates or missing or unexpected or seen_out["timed_out"])
    return {
        "ok": ok,
        "acknowledged": len(acked),
        "seen": len(seen),
        "missing": len(missing),
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "unexpected": len(unexpected),
        "timed_out": seen_out["timed_out"],
        "lag_at_end_events": sum(1 for _, _, at in first_seen.values() if at > last_ack),
        "caught_up_after_end_ms": ms(max(0.0, caught_up - last_ack)),
        "delay_p50_ms": ms(percentile(delays, 50)) if delays else None,
        "delay_p99_ms": ms(percentile(delays, 99)) if delays else None,
    }


async def case_append(children: Children, schema: str) -> dict[str, Any]:
    floors: list[float] = []
    runs: dict[int, AppendRun] = {}
    async with floor_beside(schema) as floor:
        for n in WRITER_PROCESSES:
            floors.append(await floor.commits_per_s(FLOOR_SECONDS))
            note(f"append: {n} writer process(es) x {TOTAL_TASKS // n} tasks, {APPEND_SECONDS:g} s")
            runs[n] = await append_run(children, schema, n, f"p{n}", APPEND_SECONDS)
            note(
                f"append: floor {floors[-1]:.0f}/s, {n} process(es) {runs[n].rate:.0f} appends/s, "
                f"subscriber ok: {runs[n].subscriber['ok']}"
            )
        floors.append(await floor.commits_per_s(FLOOR_SECONDS))
        note(f"append: frozen writer (2 processes, one stopped {FREEZE_S:g} s)")
        frozen = await append_run(children, schema, 2, "frozen", FROZEN_RUN_S, freeze=True)
        floors.append(await floor.commits_per_s(FLOOR_SECONDS))
    floor_rate = statistics.median(floors)
    rates = {n: r.rate for n, r in runs.items()}
    ratio_4_to_1 = rates[4] / rates[1] if rates[1] else None
    frozen_figs = {
        **frozen.frozen,
        "other_process_tasks": TOTAL_TASKS // 2,
        "subscriber_ok": frozen.subscriber["ok"],
    }
    writer_errors = [e for r in [*runs.values(), frozen] for w in r.writers for e in w.errors]
    note(
        f"append: frozen writer: other {frozen_figs['other_before_per_s']}/s before, "
        f"{frozen_figs['other_during_per_s']}/s during, longest pause "
        f"{frozen_figs['other_longest_pause_ms']} ms"
    )
    during_ratio = frozen_figs.get("other_during_ratio")
    return {
        "floor_commits_per_s": round(floor_rate, 1),
        "floor_rounds": [round(f, 1) for f in floors],
        "floor_connections": FLOOR_CONNECTIONS,
        "tasks_total": TOTAL_TASKS,
        "seconds_per_run": APPEND_SECONDS,
        "appends_per_s": {str(n): round(r, 1) for n, r in rates.items()},
        "ratio": {str(n): ratio(r, floor_rate) for n, r in rates.items()},
        "per_process_appends_per_s": {
            str(n): [round(w.rate(), 1) for w in r.writers] for n, r in runs.items()
        },
        "ratio_4_to_1": None if ratio_4_to_1 is None else round(ratio_4_to_1, 3),
        "subscriber_ok": all(r.subscriber["ok"] for r in [*runs.values(), frozen]),
        "subscriber": {str(n): r.subscriber for n, r in runs.items()},
        "frozen_writer": frozen_figs,
        "writer_errors": writer_errors[:10],
        "targets": {
            "ratio_4_to_1": TARGETS["append_ratio_4_to_1"],
            "frozen_writer.other_during_ratio": TARGETS["frozen_writer_other_during_ratio"],
            "subscriber_ok": "true",
        },
        "targets_met": {
            "ratio_4_to_1": ratio_4_to_1 is not None and ratio_4_to_1 >= 1.0,
            "frozen_writer.other_during_ratio": during_ratio is not None and during_ratio >= 0.5,
            "subscriber_ok": all(r.subscriber["ok"] for r in [*runs.values(), frozen]),
        },
    }


# -- the writer and subscriber processes of the append case -------------------------------


async def writer_role(url: str, tasks: int, prefix: str) -> dict[str, Any]:
    """Open the store, say ``ready``, wait for ``go <time> <seconds>``, then append
    from ``tasks`` tasks until then; each acknowledgement goes to ``out``."""
    async with lf.open_store(url) as store:
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line.startswith("go "):
            return {}  # the driver is gone
        _, go_text, seconds_text = line.split()
        go, seconds = float(go_text), float(seconds_text)
        await asyncio.sleep(max(0.0, go - time.time()))
        start = time.time()
        deadline = start + seconds
        acks: dict[str, list[tuple[int, int, float]]] = {}

        async def write(index: int) -> None:
            stream = f"{prefix}-{index}"
            mine = acks[stream] = []
            version = await store.stream_version(stream)
            n = 0
            while time.time() < deadline:
                n += 1
                result = await store.append(
                    stream, [lf.NewEvent(type=EVENT_TYPE, data={"n": n})], version
                )
                version = result.version
                mine.append((result.version, result.positions[0], time.time()))

        outcomes = await asyncio.gather(*(write(i) for i in range(tasks)), return_exceptions=True)
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    return {"start": start, "seconds": seconds, "streams": acks, "errors": errors}


async def subscriber_role(url: str, from_position: int) -> dict[str, Any]:
    """Follow the log from ``from_position``; after ``until <position>`` arrives on
    stdin, stop once that position is seen (or ``CATCH_UP_TIMEOUT_S`` later)."""
    async with lf.open_store(url) as store:
        seen: list[tuple[int, str, int, float]] = []
        target: list[int] = []
        reached = asyncio.Event()

        async def follow() -> None:
            async for event in store.subscribe(from_position=from_position):
                seen.append((event.position, event.stream_id, event.version, time.time()))
                if target and event.position >= target[0]:
                    reached.set()

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.2)  # subscribed and listening before the writers start
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        timed_out = False
        if line.startswith("until "):
            target.append(int(line.split()[1]))
            if seen and seen[-1][0] >= target[0]:
                reached.set()
            try:
                await asyncio.wait_for(reached.wait(), CATCH_UP_TIMEOUT_S)
            except TimeoutError:
                timed_out = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"seen": seen, "timed_out": timed_out}


# -- case: workflows --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkflowRound:
    workers: int
    total_s: float
    start_s: float
    first_step_after_s: float | None
    stops: list[dict[str, Any]]

    @property
    def workflows_per_s(self) -> float:
        return WORKFLOWS / self.total_s


async def workflow_round(
    children: Children, client: lf.WorkflowClient, schema: str, workers: int
) -> WorkflowRound:
    url = pg_store_url(schema)
    prefix = f"w{workers}"
    procs = await start_workers(children, url, workers, prefix)
    try:
        began_wall = time.time()
        began = time.perf_counter()
        handles: list[lf.WorkflowHandle[int]] = []
        for b in range(0, WORKFLOWS, START_BATCH):
            handles += await asyncio.gather(
                *(
                    client.start(app.three_steps, i, id=f"{prefix}-{i}")
                    for i in range(b, min(WORKFLOWS, b + START_BATCH))
                )
            )
        started = time.perf_counter()

        async def none_running() -> bool:
            return not await client.list_workflows(status="running", limit=1)

        await until(f"{WORKFLOWS} workflows on {workers} worker(s)", none_running, RESULT_TIMEOUT_S)
        done = time.perf_counter()
        results = await asyncio.gather(*(h.result(timeout=10) for h in handles))
        wrong = sum(r != app.three_steps_result(i) for i, r in enumerate(results))
        if wrong:
            raise BenchError(f"{prefix}: {wrong} of {WORKFLOWS} results are wrong")
        first = await pg_rows(
            f"SELECT extract(epoch FROM min(recorded_at)) FROM {schema}.events "
            "WHERE type = 'wf.step_done' AND stream_id LIKE %s",
            (f"{lf.WorkflowClient.stream_id(prefix)}-%",),
        )
    finally:
        stops = await stop_workers(procs)
    first_step = None if first[0][0] is None else float(first[0][0]) - began_wall
    return WorkflowRound(workers, done - began, started - began, first_step, stops)


async def case_workflows(children: Children, schema: str) -> dict[str, Any]:
    floors: list[float] = []
    rounds: dict[int, WorkflowRound] = {}
    async with (
        floor_beside(schema) as floor,
        lf.WorkflowClient(pg_store_url(schema), workflows=app.WORKFLOWS) as client,
    ):
        for n in WORKER_COUNTS:
            floors.append(await floor.commits_per_s(FLOOR_SECONDS))
            note(f"workflows: {WORKFLOWS} on {n} worker(s)")
            rounds[n] = await workflow_round(children, client, schema, n)
            r = rounds[n]
            note(
                f"workflows: floor {floors[-1]:.0f}/s, {n} worker(s): {r.workflows_per_s:.0f} wf/s "
                f"({r.total_s:.2f} s; first step after {r.first_step_after_s or 0:.2f} s)"
            )
        floors.append(await floor.commits_per_s(FLOOR_SECONDS))
    floor_rate = statistics.median(floors)
    steps = {n: r.workflows_per_s * STEPS_PER_WORKFLOW for n, r in rounds.items()}
    stops = [s for r in rounds.values() for s in r.stops]
    return {
        "floor_commits_per_s": round(floor_rate, 1),
        "floor_rounds": [round(f, 1) for f in floors],
        "floor_connections": FLOOR_CONNECTIONS,
        "workflows_per_round": WORKFLOWS,
        "start_batch": START_BATCH,
        "worker_command": WORKER_COMMAND,
        "worker_concurrency": 200,
        "workflows_per_s": {str(n): round(r.workflows_per_s, 1) for n, r in rounds.items()},
        "steps_per_s": {str(n): round(s, 1) for n, s in steps.items()},
        "steps_ratio": {str(n): ratio(s, floor_rate) for n, s in steps.items()},
        "steps_ratio_4_to_1": round(steps[4] / steps[1], 3),
        "round_s": {str(n): round(r.total_s, 3) for n, r in rounds.items()},
        "start_s": {str(n): round(r.start_s, 3) for n, r in rounds.items()},
        "first_step_after_s": {
            str(n): None if r.first_step_after_s is None else round(r.first_step_after_s, 3)
            for n, r in rounds.items()
        },
        "steps_per_s_from_first_step": {
            str(n): round(WORKFLOWS * STEPS_PER_WORKFLOW / (r.total_s - r.first_step_after_s), 1)
            for n, r in rounds.items()
            if r.first_step_after_s is not None and r.total_s > r.first_step_after_s
        },
        "worker_stops": stops,
        "worker_stop_problems": stop_problems(stops),
    }


# -- case: failover ---------------------------------------------------------------------


async def case_failover(children: Children, schema: str) -> dict[str, Any]:
    url = pg_store_url(schema)
    marks = children.directory / "failover-marks.log"
    workers = await start_workers(
        children, url, 2, "failover", lease=FAILOVER_LEASE_S, env={app.MARKS_ENV: str(marks)}
    )
    by_pid = {w.pid: w for w in workers}
    stops: list[dict[str, Any]] = []
    try:
        async with lf.WorkflowClient(url, workflows=app.WORKFLOWS) as client:
            ids = [f"f-{i}" for i in range(FAILOVER_INSTANCES)]
            handles = [await client.start(app.failover, FAILOVER_STEP_S, id=wid) for wid in ids]

            def slow_marks() -> list[Mark]:
                return [m for m in read_marks(marks) if m.step == "slow"]

            async def all_in_step() -> bool:
                return len({m.workflow_id for m in slow_marks()}) == len(ids)

            await until("every instance in its slow step", all_in_step, 15)
            await asyncio.sleep(0.3)
            held: dict[int, list[str]] = collections.defaultdict(list)
            for m in slow_marks():
                held[m.pid].append(m.workflow_id)
            victim_pid = max(held, key=lambda pid: len(held[pid]))
            victim = by_pid[victim_pid]
            survivor = next(w for w in workers if w is not victim)
            moved = held[victim_pid]
            note(f"failover: SIGKILL to {victim.name}, which runs {len(moved)} of {len(ids)}")
            killed = time.time()
            victim.proc.kill()
            await victim.wait(5)

            def restarts() -> dict[str, float]:
                return {
                    m.workflow_id: m.at
                    for m in reversed(slow_marks())
                    if m.pid == survivor.pid and m.at > killed and m.workflow_id in moved
                }

            async def all_restarted() -> bool:
                return len(restarts()) == len(moved)

            await until("the killed worker's instances restarted", all_restarted, 30)
            after = {wid: at - killed for wid, at in restarts().items()}
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            if any(r != FAILOVER_STEP_S for r in results):
                raise BenchError(f"failover: wrong results {results}")
            finished_after = time.time() - killed
    finally:
        stops = await stop_workers([w for w in workers if w.proc.returncode is None])
    worst = max(after.values())
    note(f"failover: running again after {worst:.2f} s (lease {FAILOVER_LEASE_S:g} s)")
    return {
        "lease_s": FAILOVER_LEASE_S,
        "instances": FAILOVER_INSTANCES,
        "instances_on_killed_worker": len(moved),
        "step_sleep_s": FAILOVER_STEP_S,
        "failover_s": round(worst, 3),
        "failover_median_s": round(statistics.median(after.values()), 3),
        "all_finished_after_kill_s": round(finished_after, 3),
        "worker_command": WORKER_COMMAND + f" --lease {FAILOVER_LEASE_S:g}",
        "worker_stops": stops,
        "worker_stop_problems": stop_problems(stops),
        "targets": {"failover_s": TARGETS["failover_s"]},
        "targets_met": {"failover_s": worst <= FAILOVER_LEASE_S + 1},
    }


# -- case: claim latency ----------------------------------------------------------------


async def case_claim_latency(children: Children, schema: str) -> dict[str, Any]:
    return await _first_step_latency(children, schema, remote=False)


async def case_task_latency(children: Children, schema: str) -> dict[str, Any]:
    return await _first_step_latency(children, schema, remote=True)


async def _first_step_latency(children: Children, schema: str, *, remote: bool) -> dict[str, Any]:
    """From each ``start`` call until the workflow's first step starts (on the
    workflow's worker, or with ``remote`` on the worker of its task queue)."""
    url = pg_store_url(schema)
    case = "task_latency" if remote else "claim_latency"
    marks = children.directory / f"{case}-marks.log"
    env = {app.MARKS_ENV: str(marks)}
    workers = await start_workers(children, url, 1, "claim", env=env)
    if remote:
        queue_app = ("_scaleout_app:remote_first", "--queue", app.REMOTE_QUEUE)
        workers += await start_workers(children, url, 1, "queue", env=env, app=queue_app)
    workflow = app.remote if remote else app.claim
    stops: list[dict[str, Any]] = []
    try:
        async with lf.WorkflowClient(url, workflows=app.WORKFLOWS) as client:

            def firsts() -> dict[str, float]:
                return {m.workflow_id: m.at for m in reversed(read_marks(marks))}

            for i in range(CLAIM_WARMUP):  # the workers' first passes, one at a time
                await client.start(workflow, i, id=f"warm-{i}")

                async def warmed(i: int = i) -> bool:
                    return f"warm-{i}" in firsts()

                await until("warm-up", warmed, 10)
            rng = random.Random(12)
            called: dict[str, float] = {}
            returned: dict[str, float] = {}
            note(f"{case}: {CLAIM_STARTS} starts, {CLAIM_GAP_S[0]}-{CLAIM_GAP_S[1]} s apart")
            for i in range(CLAIM_STARTS):
                wid = f"c-{i}"
                called[wid] = time.time()
                await client.start(workflow, i, id=wid)
                returned[wid] = time.time()
                await asyncio.sleep(rng.uniform(*CLAIM_GAP_S))

            async def all_started() -> bool:
                return called.keys() <= firsts().keys()

            await until("every workflow's first step", all_started, 15)
            started = firsts()
    finally:
        stops = await stop_workers(workers)
    latencies = [started[wid] - at for wid, at in called.items()]
    calls = [returned[wid] - at for wid, at in called.items()]
    after_return = [started[wid] - at for wid, at in returned.items()]
    p50 = percentile(latencies, 50)
    note(f"{case}: p50 {p50 * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms")
    figures: dict[str, Any] = {
        "starts": CLAIM_STARTS,
        "gap_s": list(CLAIM_GAP_S),
        "worker_poll_s": 1.0,
        "worker_command": WORKER_COMMAND + " (default --poll 1.0)",
        "latency_p50_ms": ms(p50),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "latency_mean_ms": ms(statistics.mean(latencies)),
        "latency_min_ms": ms(min(latencies)),
        "latency_max_ms": ms(max(latencies)),
        "start_call_p50_ms": ms(percentile(calls, 50)),
        "after_start_returned_p50_ms": ms(percentile(after_return, 50)),
        "after_start_returned_p99_ms": ms(percentile(after_return, 99)),
        "worker_stops": stops,
        "worker_stop_problems": stop_problems(stops),
    }
    if remote:
        figures["queue_worker_command"] = (
            "ledgerflow worker --db <url> --app _scaleout_app:remote_first --queue "
            f"{app.REMOTE_QUEUE} (cwd bench/)"
        )
    else:
        figures["targets"] = {"latency_p50_ms": TARGETS["claim_latency_p50_ms"]}
        figures["targets_met"] = {"latency_p50_ms": p50 * 1000 < 5}
    return figures


# -- the run ----------------------------------------------------------------------------

CASE_BODIES: dict[str, Callable[[Children, str], Awaitable[dict[str, Any]]]] = {
    "append": case_append,
    "workflows": case_workflows,
    "failover": case_failover,
    "claim_latency": case_claim_latency,
    "task_latency": case_task_latency,
}


async def run_case(name: str) -> dict[str, Any]:
    began = time.perf_counter()
    errors: list[str] = []
    figures: dict[str, Any] = {}
    problems: list[str] = []
    settings = await pg_settings()
    directory = Path(tempfile.mkdtemp(prefix="ledgerflow-bench-scaleout-"))
    note(f"{name}: starting")
    try:
        async with fresh_ledger() as schema:
            children = Children(directory)
            try:
                figures = await asyncio.wait_for(
                    CASE_BODIES[name](children, schema), CASE_TIMEOUT_S
                )
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON, traceback on stderr
                traceback.print_exc(file=sys.stderr)
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                left = await children.kill_all()
                problems = children.log_problems()
            if left:
                errors.append(f"killed at the end of the case, still running: {', '.join(left)}")
    except Exception as exc:  # noqa: BLE001 - e.g. the schema could not be made or dropped
        traceback.print_exc(file=sys.stderr)
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    errors += figures.pop("worker_stop_problems", [])
    return {
        "benchmark": "scaleout",
        "case": name,
        "backend": "postgres",
        "settings": settings,
        **figures,
        "child_log_problems": len(problems),
        "child_log_samples": problems[:8],
        "errors": errors,
        "seconds": round(time.perf_counter() - began, 1),
    }


def run_role(args: argparse.Namespace) -> int:
    if args.role == "writer":
        out = asyncio.run(writer_role(args.url, args.tasks, args.prefix))
    else:
        out = asyncio.run(subscriber_role(args.url, args.from_position))
    Path(args.out).write_text(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("case", nargs="?", choices=(*CASES, "all"), default="all")
    parser.add_argument("--role", choices=("writer", "subscriber"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--from-position", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return run_role(args)
    if problem := pg_problem():
        # As the other benchmarks do: skip with a note, so `make bench` goes on.
        print(json.dumps({"benchmark": "scaleout", "skipped": f"PostgreSQL: {problem}"}))
        return 0
    ok = True
    for name in CASES if args.case == "all" else (args.case,):
        try:
            line = asyncio.run(interruptible(run_case(name)))
        except asyncio.CancelledError:
            note(f"{name}: interrupted; child processes killed, schema dropped")
            return 130
        print(json.dumps(line), flush=True)
        ok = ok and not line["errors"]
    return 0 if ok else 1


async def interruptible(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """SIGTERM or Ctrl-C cancel ``work``, which then kills its children and drops
    its schema on the way out."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    return await work


if __name__ == "__main__":
    sys.exit(main())
