"""Projections under kill -9: every event applied exactly once to the read model.

``_projection_crash_worker.py`` runs the projection ``tally`` (per stream: how many
``Tick`` events it applied, and the last one's position) with a short lease and small
batches. On SQLite and PostgreSQL:

- one worker at a time is killed with SIGKILL at random instants and restarted, while
  this process keeps appending events through a connection of its own; then a last
  run follows the log to its head and exits;
- two workers start together on one projection: one applies, the other waits; both
  exit once the checkpoint reaches the head; or the holder is killed half way and the
  other takes over (a new owner, a higher epoch).

Then each stream's ``count`` is its number of ``Tick`` events exactly (one applied
twice would make it higher, one lost lower), ``last_position`` its last one's position,
the checkpoint the head, no failure recorded. Kills that landed with events left to
apply, and those that cut a batch off after its handlers ran (``handled`` lines past
the committed checkpoint), are printed (``-s``) and must have happened.
``LEDGERFLOW_PROJECTION_CRASH_SEED`` replays the kill delays and the events written,
``LEDGERFLOW_PROJECTION_CRASH_KILLS`` (10) sets the kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ledgerflow as lf
from ledgerflow.store import WorkflowStore

from . import _projection_crash_worker as w
from .conftest import backend_url

WORKER = Path(__file__).with_name("_projection_crash_worker.py")
SEED = int(os.environ.get("LEDGERFLOW_PROJECTION_CRASH_SEED", str(random.randrange(2**32))))
KILLS = int(os.environ.get("LEDGERFLOW_PROJECTION_CRASH_KILLS", "10"))
KILL_AFTER = (0.2, 1.5)
"""Seconds after a worker starts at which it is killed (it needs ~0.3 s to start, and
then waits for the lease of the one killed before it to run out)."""
EVENTS = 4000
STREAMS = 30
LIVE_PAUSE = 0.02
"""Between two appends of a few events while a worker runs (the live writes)."""
FINAL_EVENTS = 100
"""Written before the last run, which has these to apply at least (it takes the
projection over, then gives it back)."""
MID_WAY = 3
"""Kills that must land after the worker committed some and with events left (most
do: the backlog lasts about as long as the kills take)."""
NEVER = 2**62
"""The target of a worker that is to be killed: it never gets there."""
HANG_GUARD = 120.0
"""Seconds a worker that should exit gets (it needs a few)."""


@dataclass
class Kill:
    run: int
    delay: float
    before: int
    """The checkpoint when the worker started."""
    at: int
    """The checkpoint it left (committed), read after its death."""
    head: int
    epoch: int
    handled: int
    """The highest position its handlers applied (0: none), committed or not."""

    @property
    def mid_way(self) -> bool:
        """It had applied and committed some, and events were left to apply."""
        return self.before < self.at < self.head

    @property
    def mid_batch(self) -> bool:
        """Its handlers had applied events its death threw away (not committed)."""
        return self.handled > self.at


@dataclass
class Ledger:
    """The test's own connection: writes the events the workers project."""

    store: WorkflowStore
    rng: random.Random
    appended: Counter[str] = field(default_factory=Counter)

    async def append_some(self) -> int:
        """A few events to one stream (now and then noise the projection ignores)."""
        k = self.rng.randint(1, 6)
        if self.rng.random() < 0.1:
            await self.store.append("noise", [w.Noise(n) for n in range(k)])
        else:
            stream = f"s-{self.rng.randrange(STREAMS):02d}"
            await self.store.append(stream, [w.Tick(n) for n in range(k)])
            self.appended[stream] += k
        return k

    async def fill(self, count: int) -> None:
        written = 0
        while written < count:
            written += await self.append_some()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request.param, tmp_path, request)


@pytest.fixture
async def ledger(url: str) -> AsyncIterator[Ledger]:
    async with lf.open_store(url, registry=w.registry()) as store:
        yield Ledger(store, random.Random(SEED ^ 0x5EED))


def start_worker(url: str, owner: str, target: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), url, owner, str(target)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def kill(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGKILL)  # a no-op if it exited meanwhile
    return proc.wait()


async def exited(proc: subprocess.Popen[bytes], log: Path) -> int:
    """Its exit code once it exits by itself (killed after ``HANG_GUARD``: a hang)."""
    deadline = time.monotonic() + HANG_GUARD
    while proc.poll() is None:
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"a worker hung for {HANG_GUARD:.0f}s\n{_text(log)}")
        await asyncio.sleep(0.05)
    return proc.returncode


def handled(log: Path) -> list[int]:
    """The positions the worker's handlers applied, in order (repeats included)."""
    text = log.read_text(errors="replace")
    return [int(n) for n in re.findall(r"^handled (\d+)$", text, re.MULTILINE)]


async def checkpoint(store: WorkflowStore) -> lf.projections.ProjectionRow:
    row = await store.projection_row(w.NAME)
    assert row is not None, "the projection has no row"
    return row


async def where(store: WorkflowStore) -> tuple[int, int]:
    """The projection's checkpoint and epoch; (0, 0) before a runner made its row."""
    row = await store.projection_row(w.NAME)
    return (0, 0) if row is None else (row.position, row.epoch)


async def check(ledger: Ledger, logs: Path) -> list[str]:
    """What is wrong with the read model, the checkpoint and the workers' logs."""
    store = ledger.store
    ticks: Counter[str] = Counter()
    last: dict[str, int] = {}
    position = 0
    while batch := await store.read_all(from_position=position + 1, limit=1000):
        for event in batch:
            if isinstance(event.data, w.Tick):
                ticks[event.stream_id] += 1
                last[event.stream_id] = event.position
        position = batch[-1].position
    problems: list[str] = []
    if ticks != ledger.appended:
        problems.append(f"the ledger holds {dict(ticks)}, the test wrote {dict(ledger.appended)}")
    expected = {
        stream: {"stream": stream, "count": ticks[stream], "last_position": last[stream]}
        for stream in ticks
    }
    rows = await lf.ReadModel(store, w.TALLY).select(w.COUNTS, limit=1000)
    found = {row["stream"]: row for row in rows}
    for stream in sorted(expected.keys() | found.keys()):
        if found.get(stream) != expected.get(stream):
            problems.append(
                f"{stream}: read model {found.get(stream)}, expected {expected.get(stream)}"
            )
    row = await checkpoint(store)
    head = await store.head_position()
    if (row.position, row.failure, row.owner) != (head, None, None):
        problems.append(f"projection row {row} (head {head})")
    problems.extend(_bad_lines(logs))
    print(
        f"  read model: {len(found)} streams, {sum(r['count'] for r in found.values())} ticks "
        f"(the ledger: {sum(ticks.values())}); checkpoint {row.position} = head {head}, "
        f"epoch {row.epoch}"
    )
    return problems


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


def _bad_lines(logs: Path) -> list[str]:
    """Errors the workers logged or printed, as ``log: line``."""
    return [
        f"{log.name}: {line}"
        for log in sorted(logs.iterdir())
        for line in _text(log).splitlines()
        if line.startswith(("ERROR", "CRITICAL", "Traceback"))
    ]


@pytest.mark.slow
async def test_kill_minus_nine_applies_each_event_to_the_read_model_exactly_once(
    url: str, ledger: Ledger, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    backend = url.split(":", 1)[0]
    print(f"\nprojection crash test on {backend}: seed {SEED} (LEDGERFLOW_PROJECTION_CRASH_SEED)")
    began = time.monotonic()
    await ledger.fill(EVENTS)
    store = ledger.store
    print(f"  {await store.head_position()} positions written in {time.monotonic() - began:.1f}s")
    rng = random.Random(SEED)
    kills: list[Kill] = []
    for run in range(KILLS):
        delay = rng.uniform(*KILL_AFTER)
        log = logs / f"run-{run:02d}.log"
        before, _ = await where(store)
        proc = start_worker(url, f"run-{run:02d}", NEVER, log)
        kill_at = time.monotonic() + delay
        while (left := kill_at - time.monotonic()) > 0:  # live writes meanwhile
            if proc.poll() is not None:
                pytest.fail(f"run {run}: the worker exited {proc.returncode}\n{_text(log)}")
            await ledger.append_some()
            await asyncio.sleep(min(LIVE_PAUSE, left))
        code = kill(proc)
        assert code == -signal.SIGKILL, f"run {run}: exited {code}\n{_text(log)}"
        at, epoch = await where(store)
        applied = handled(log)
        head = await store.head_position()
        landed = Kill(run, delay, before, at, head, epoch, max(applied, default=0))
        kills.append(landed)
        print(
            f"  run {run}: killed at {delay:.2f}s: checkpoint {before} -> {landed.at} of head "
            f"{landed.head} (epoch {landed.epoch}), handled up to {landed.handled}"
            + (f": {landed.handled - landed.at} positions not committed" * landed.mid_batch)
        )
    await ledger.fill(FINAL_EVENTS)  # the last run has these to apply at least
    target = await store.head_position()
    log = logs / "run-final.log"
    final = time.monotonic()
    proc = start_worker(url, "run-final", target, log)
    code = await exited(proc, log)
    assert code == 0, f"the final run exited {code}\n{_text(log)}"
    print(f"  final run to {target}: {time.monotonic() - final:.1f}s")
    runs = sorted(logs.iterdir())
    total = sum(len(handled(log)) for log in runs)
    print(
        f"  {sum(ledger.appended.values())} ticks; their handlers ran {total} times (again after "
        f"a kill: {total - sum(ledger.appended.values())}); {time.monotonic() - began:.1f}s"
    )
    problems = await check(ledger, logs)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
    mid_way = [k.run for k in kills if k.mid_way]
    mid_batch = [k.run for k in kills if k.mid_batch]
    print(f"  kills with events left to apply: runs {mid_way}; cutting a batch off: {mid_batch}")
    assert [k.epoch for k in kills] == sorted(k.epoch for k in kills)
    assert len(mid_way) >= MID_WAY, f"only kills {mid_way} landed with events left to apply"
    assert mid_batch, "no kill cut a batch off after its handlers ran"


@dataclass
class Sample:
    owner: str | None
    epoch: int
    position: int


async def watch(store: WorkflowStore, samples: list[Sample]) -> None:
    """Read the projection's row again and again until cancelled."""
    while True:
        row = await store.projection_row(w.NAME)
        if row is not None:
            samples.append(Sample(row.owner, row.epoch, row.position))
        await asyncio.sleep(0.005)


def check_samples(samples: list[Sample], owners: set[str]) -> dict[int, str]:
    """Epochs never go back, each has one owner, one of ``owners``; epoch -> owner."""
    by_epoch: dict[int, str] = {}
    for earlier, later in itertools.pairwise(samples):
        assert later.epoch >= earlier.epoch, f"epoch: {earlier} -> {later}"
        assert later.position >= earlier.position, f"checkpoint: {earlier} -> {later}"
    for sample in samples:
        if sample.owner is None:
            continue
        assert sample.owner in owners, f"an owner nobody started: {sample}"
        holder = by_epoch.setdefault(sample.epoch, sample.owner)
        assert holder == sample.owner, f"epoch {sample.epoch} held by {holder} and {sample.owner}"
    return by_epoch


@pytest.mark.slow
@pytest.mark.parametrize("kill_holder", [False, True], ids=["both-finish", "holder-killed"])
async def test_two_runners_of_one_projection_apply_each_event_once(
    url: str, ledger: Ledger, tmp_path: Path, kill_holder: bool
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    print(f"\ntwo runners on {url.split(':', 1)[0]}: seed {SEED}")
    await ledger.fill(EVENTS)
    store = ledger.store
    target = await store.head_position()
    began = time.monotonic()
    procs = {owner: start_worker(url, owner, target, logs / f"{owner}.log") for owner in ("a", "b")}
    samples: list[Sample] = []
    watcher = asyncio.create_task(watch(store, samples))
    killed: Sample | None = None
    try:
        if kill_holder:
            # Once a quarter of the way, kill whichever worker holds the lease then.
            deadline = time.monotonic() + HANG_GUARD
            while killed is None:
                assert time.monotonic() < deadline, "no worker took the projection up"
                row = await store.projection_row(w.NAME)
                if row is not None and row.owner in procs and row.position >= target // 4:
                    assert row.position < target, "the holder finished before its kill"
                    code = kill(procs[row.owner])
                    assert code == -signal.SIGKILL, f"{row.owner} exited {code} before its kill"
                    killed = Sample(row.owner, row.epoch, (await checkpoint(store)).position)
                    print(
                        f"  killed {row.owner} (epoch {row.epoch}) at checkpoint "
                        f"{killed.position} of {target}"
                    )
                await asyncio.sleep(0.005)
        codes = {
            owner: await exited(proc, logs / f"{owner}.log")
            for owner, proc in procs.items()
            if killed is None or owner != killed.owner
        }
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        for proc in procs.values():
            if proc.poll() is None:
                kill(proc)
    print(f"  exits {codes} after {time.monotonic() - began:.1f}s; {len(samples)} samples")
    assert codes == dict.fromkeys(codes, 0), "\n".join(
        (logs / f"{owner}.log").read_text() for owner in codes
    )
    by_epoch = check_samples(samples, set(procs))
    runs = {owner: len(handled(logs / f"{owner}.log")) for owner in procs}
    print(f"  owners by epoch {by_epoch}; handlers run by each: {runs}")
    problems = await check(ledger, logs)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
    if killed is not None:
        survivor = next(owner for owner in procs if owner != killed.owner)
        row = await checkpoint(store)
        assert row.epoch > killed.epoch
        assert any(e > killed.epoch and o == survivor for e, o in by_epoch.items()), by_epoch
        assert 0 < killed.position < target
