"""The registry of workers (issue 12, ADR 009): who is alive is what the database
says, judged by each worker's heartbeat against its own lease, never by host and pid.

- The store's contract, on every backend: register, heartbeat, list, deregister, and
  ``reap_workers``, which in one transaction removes the workers whose heartbeat is
  older than their lease and releases their leases (and the expired leases of owners
  with no row), leaving live workers alone.
- Engines: they register at start, heartbeat, mark themselves stopping when they
  close and deregister last; they reap dead workers at start and while running; one
  killed with SIGKILL is reaped and its instances finish elsewhere; and a live worker
  whose owner names this host and a pid that is not alive here (it runs in another
  PID namespace) is left alone while it beats: the bug the registry fixes.
- ``WorkflowClient.workers()`` and ``ledgerflow workers list`` (table and ``--json``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import ledgerflow
from ledgerflow import ManualClock, NewEvent, WorkerInfo, WorkflowContext
from ledgerflow._version import running_version
from ledgerflow.cli import app
from ledgerflow.store import WorkflowStore
from ledgerflow.store._base import BaseEventStore
from ledgerflow.store.runtime import Schedule, WakeupRow, WorkerRow

from ._adapters import open_adapter
from ._engines import WAIT, EngineFactory
from ._passes import no_pass_crashed as no_pass_crashed  # autouse: applies here
from ._registry_worker import STALL, stall
from ._workers import CLI, child_env
from .conftest import backend_url

LEASE = 10_000_000
"""A worker's lease in the store-level tests (µs)."""
FAR = 2**60


def worker_row(
    worker_id: str,
    beat: int,
    *,
    lease: int = LEASE,
    host: str = "host-a",
    pid: int = 4321,
    queues: tuple[str, ...] = (),
    workflows: tuple[str, ...] = ("order@1",),
    in_flight: int = 0,
    stopping: bool = False,
) -> WorkerRow:
    return WorkerRow(
        worker_id, host, pid, queues, workflows, "0.1.0", beat, beat, lease, in_flight, stopping
    )


async def leases(store: WorkflowStore, **owners: tuple[str, int]) -> None:
    """Lease instance ``wf-<key>`` to each owner until the time given."""
    await store.append(
        "setup",
        [NewEvent("setup")],
        runtime=[Schedule(f"wf-{key}", 1, owner, until) for key, (owner, until) in owners.items()],
    )


async def holder(store: WorkflowStore, key: str) -> str | None:
    row = await store.get_wakeup(f"wf-{key}")
    assert row is not None
    return row.lease_owner


@asynccontextmanager
async def after_close(store_url: str, engine: ledgerflow.Engine) -> AsyncIterator[WorkflowStore]:
    """A store to look with once ``engine`` closed: the one it shared (memory), or
    a new one on its database (an engine closes the store it opened from a URL)."""
    if store_url.startswith("memory"):
        yield engine.store
        return
    async with open_adapter(store_url) as fresh:
        yield fresh


async def until(condition: Any, what: str) -> None:
    """Wait for ``condition`` (a coroutine function) to be true: a hang guard."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- the store's contract ----------------------------------------------------------


async def test_registered_workers_are_listed_in_id_order_and_deregistered(
    store: BaseEventStore,
) -> None:
    assert await store.list_workers() == []
    b = worker_row("b", 5, queues=("emails", "é-queue"), workflows=("x@1", "y@2"), in_flight=3)
    a = worker_row("a", 7, host="host-b", pid=1, workflows=(), stopping=True)
    await store.register_worker(b)
    await store.register_worker(a)
    assert await store.list_workers() == [a, b]
    # Registering again replaces the whole row (a worker reaped comes back).
    again = worker_row("b", 9, lease=2 * LEASE, workflows=("z@3",))
    await store.register_worker(again)
    assert await store.list_workers() == [a, again]
    await store.deregister_worker("a")
    await store.deregister_worker("nobody")  # nothing to remove: no error
    assert await store.list_workers() == [again]


async def test_lists_given_for_queues_and_workflows_are_kept_as_tuples(
    store: BaseEventStore,
) -> None:
    row = WorkerRow("w", "h", 1, ["q"], ["a@1"], "v", 1, 1, LEASE, 0)  # type: ignore[arg-type]
    await store.register_worker(row)
    [listed] = await store.list_workers()
    assert (listed.queues, listed.workflows) == (("q",), ("a@1",))


async def test_a_heartbeat_moves_the_time_and_reports_in_flight_and_stopping(
    store: BaseEventStore,
) -> None:
    await store.register_worker(worker_row("w", 100))
    assert await store.heartbeat_worker("w", now_us=250, in_flight=7)
    assert await store.list_workers() == [
        WorkerRow("w", "host-a", 4321, (), ("order@1",), "0.1.0", 100, 250, LEASE, 7, False)
    ]
    assert await store.heartbeat_worker("w", now_us=300, in_flight=2, stopping=True)
    [row] = await store.list_workers()
    assert (row.started_at_us, row.heartbeat_at_us, row.in_flight, row.stopping) == (
        100,
        300,
        2,
        True,
    )
    assert not await store.heartbeat_worker("nobody", now_us=300, in_flight=0)
    assert [w.worker_id for w in await store.list_workers()] == ["w"]


async def test_reaping_releases_only_the_dead_workers_leases(store: BaseEventStore) -> None:
    now = 1_000_000_000
    await store.register_worker(worker_row("dead", now - LEASE - 1))
    await store.register_worker(worker_row("edge", now - LEASE))  # within its lease: alive
    await store.register_worker(worker_row("live", now))
    await store.register_worker(worker_row("patient", now - LEASE - 1, lease=LEASE + 1))
    await leases(
        store,
        d1=("dead", FAR),
        d2=("dead", now - 5),
        e=("edge", FAR),
        l1=("live", FAR),
        l2=("live", now - 5),  # expired, but its owner lives: not the reaper's to touch
        p=("patient", FAR),
    )
    assert await store.reap_workers(now) == ["dead"]
    # Released as release_wakeups does: no owner, no end, the epoch kept (so the dead
    # runner's fence fails if it comes back), the due time kept.
    assert await store.get_wakeup("wf-d1") == WakeupRow("wf-d1", 1, None, None, 1)
    assert await store.get_wakeup("wf-d2") == WakeupRow("wf-d2", 1, None, None, 1)
    for key, owner in {"e": "edge", "l1": "live", "l2": "live", "p": "patient"}.items():
        assert await holder(store, key) == owner
    assert [w.worker_id for w in await store.list_workers()] == ["edge", "live", "patient"]
    assert await store.reap_workers(now) == []
    # A moment later the edge and the patient one are dead too.
    assert await store.reap_workers(now + 1) == ["edge", "patient"]
    assert await holder(store, "e") is None
    assert await holder(store, "p") is None
    assert await holder(store, "l1") == "live"


async def test_reaping_releases_expired_leases_of_owners_without_a_row(
    store: BaseEventStore,
) -> None:
    """Engines from before the registry have no row: their leases go once expired,
    and not before (they may still be running, renewing them)."""
    now = 1_000_000_000
    await leases(store, old=("legacy:1:a", now - 1), held=("legacy:1:a", now), later=("b", FAR))
    assert await store.reap_workers(now) == []
    assert await holder(store, "old") is None
    assert await holder(store, "held") == "legacy:1:a"
    assert await holder(store, "later") == "b"


async def test_a_reaped_worker_learns_it_from_its_heartbeat_and_registers_again(
    store: BaseEventStore,
) -> None:
    await store.register_worker(worker_row("w", 0))
    await leases(store, x=("w", FAR))
    assert await store.reap_workers(LEASE + 1) == ["w"]
    assert not await store.heartbeat_worker("w", now_us=LEASE + 2, in_flight=1)
    assert await store.list_workers() == []
    await store.register_worker(worker_row("w", LEASE + 3))
    assert await store.heartbeat_worker("w", now_us=LEASE + 4, in_flight=1)
    assert await holder(store, "x") is None  # its old lease stays released


async def test_a_dead_workers_runner_that_comes_back_fails_its_fence(
    store: BaseEventStore,
) -> None:
    from ledgerflow.store.runtime import Fence

    now = 1_000_000_000
    await store.register_worker(worker_row("w", now - LEASE - 1))
    await store.append("wf-x", [NewEvent("started")], runtime=[Schedule("wf-x", 0, "w", FAR)])
    await store.append("wf-x", [NewEvent("step")], fence=Fence("wf-x", "w", 1))
    assert await store.reap_workers(now) == ["w"]
    with pytest.raises(ledgerflow.LeaseLostError):
        await store.append("wf-x", [NewEvent("late")], fence=Fence("wf-x", "w", 1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"worker_id": ""}, "worker id"),
        ({"worker_id": 7}, "worker id"),
        ({"host": "a\x00b"}, "NUL"),
        ({"pid": -1}, "WorkerRow.pid"),
        ({"pid": True}, "WorkerRow.pid"),
        ({"queues": "emails"}, "WorkerRow.queues"),
        ({"workflows": ("ok@1", 3)}, "WorkerRow.workflows"),
        ({"version": None}, "version"),
        ({"lease_us": 0}, "WorkerRow.lease_us"),
        ({"heartbeat_at_us": -1}, "WorkerRow.heartbeat_at_us"),
        ({"started_at_us": 2**63}, "WorkerRow.started_at_us"),
        ({"in_flight": -1}, "WorkerRow.in_flight"),
        ({"stopping": 1}, "WorkerRow.stopping"),
    ],
)
async def test_a_bad_worker_row_is_refused_before_anything_is_written(
    store: BaseEventStore, change: dict[str, Any], message: str
) -> None:
    fields: dict[str, Any] = {
        "worker_id": "w",
        "host": "h",
        "pid": 1,
        "queues": (),
        "workflows": (),
        "version": "v",
        "started_at_us": 1,
        "heartbeat_at_us": 1,
        "lease_us": LEASE,
        "in_flight": 0,
        "stopping": False,
    }
    with pytest.raises(ledgerflow.InvalidEventDataError, match=message):
        await store.register_worker(WorkerRow(**(fields | change)))
    assert await store.list_workers() == []


async def test_bad_heartbeats_and_reaps_are_refused(store: BaseEventStore) -> None:
    await store.register_worker(worker_row("w", 1))
    bad: list[Any] = [
        lambda: store.heartbeat_worker("w", now_us=-1, in_flight=0),
        lambda: store.heartbeat_worker("w", now_us=1, in_flight=-1),
        lambda: store.heartbeat_worker("w", now_us=1, in_flight=0, stopping=None),  # type: ignore[arg-type]
        lambda: store.heartbeat_worker("", now_us=1, in_flight=0),
        lambda: store.reap_workers(2**63),
        lambda: store.deregister_worker(""),
    ]
    for call in bad:
        with pytest.raises(ledgerflow.InvalidEventDataError):
            await call()
    assert await store.list_workers() == [worker_row("w", 1)]


REGISTRY_USES: dict[str, Any] = {
    "register_worker": lambda s: s.register_worker(worker_row("w", 1)),
    "heartbeat_worker": lambda s: s.heartbeat_worker("w", now_us=1, in_flight=0),
    "deregister_worker": lambda s: s.deregister_worker("w"),
    "list_workers": lambda s: s.list_workers(),
    "reap_workers": lambda s: s.reap_workers(1),
}


@pytest.mark.parametrize("use", list(REGISTRY_USES))
async def test_a_closed_store_refuses_registry_calls(store: BaseEventStore, use: str) -> None:
    await store.close()
    with pytest.raises(ledgerflow.StoreClosedError):
        await REGISTRY_USES[use](store)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request.param, tmp_path, request)


async def test_workers_survive_close_and_reopen(ledger_url: str) -> None:
    row = worker_row("w", 5, queues=("a", "b"), workflows=("x@1",), stopping=True)
    async with open_adapter(ledger_url) as store:
        await store.register_worker(row)
    async with open_adapter(ledger_url) as store:
        assert await store.list_workers() == [row]


async def test_concurrent_reapers_on_postgres_remove_each_dead_worker_once(
    pg_schema: str,
) -> None:
    from .conftest import pg_url

    url = pg_url(pg_schema)
    stores = [await open_adapter(url).open() for _ in range(4)]
    try:
        now = 1_000_000_000
        dead = [f"dead-{i}" for i in range(20)]
        for wid in dead:
            await stores[0].register_worker(worker_row(wid, now - LEASE - 1))
        await stores[0].register_worker(worker_row("live", now))
        await leases(stores[0], **{f"{i}": (wid, FAR) for i, wid in enumerate(dead)})
        reaped = await asyncio.gather(*(s.reap_workers(now) for s in stores))
        everyone = [wid for ids in reaped for wid in ids]
        assert sorted(everyone) == sorted(dead)  # each once, by one reaper or another
        assert await stores[0].lease_owners() == []
        assert [w.worker_id for w in await stores[0].list_workers()] == ["live"]
    finally:
        for store in stores:
            await store.close()


# -- WorkerInfo -----------------------------------------------------------------------


def test_worker_info_is_alive_within_its_lease_and_late_after() -> None:
    row = worker_row("w", 1_000, lease=500, stopping=False)
    assert WorkerInfo.from_row(row, 1_500).alive  # at the very edge, as reaping judges
    assert WorkerInfo.from_row(row, 1_500).state == "alive"
    late = WorkerInfo.from_row(row, 1_501)
    assert (late.alive, late.state) == (False, "late")
    assert late.heartbeat_age == timedelta(microseconds=501)
    stopping = WorkerInfo.from_row(worker_row("w", 1_000, lease=500, stopping=True), 1_200)
    assert (stopping.alive, stopping.state) == (True, "stopping")
    gone = WorkerInfo.from_row(worker_row("w", 1_000, lease=500, stopping=True), 9_000)
    assert gone.state == "late"  # stopped beating while stopping: dead all the same
    info = WorkerInfo.from_row(row, 1_200)
    assert info.last_heartbeat == datetime(1970, 1, 1, 0, 0, 0, 1_000, tzinfo=UTC)
    assert info.lease == timedelta(microseconds=500)


# -- engines --------------------------------------------------------------------------


async def test_an_engine_registers_at_start_and_deregisters_when_it_closes(
    engine: EngineFactory, clock: ManualClock, store_url: str
) -> None:
    async with engine(
        stall, queues=["emails", "sms"], steps=[send], lease=timedelta(seconds=30)
    ) as e:
        [row] = await e.store.list_workers()
        assert row == WorkerRow(
            e.owner,
            socket.gethostname(),
            os.getpid(),
            ("emails", "sms"),
            ("registry.stall@1",),
            running_version(),
            clock.now_us(),
            clock.now_us(),
            30_000_000,
            0,
            False,
        )
        [info] = await e.workers()
        assert (info.worker_id, info.workflows, info.queues) == (
            e.owner,
            ("registry.stall@1",),
            ("emails", "sms"),
        )
    async with after_close(store_url, e) as store:
        assert await store.list_workers() == []


def send(n: int) -> int:
    """A step for the task queues the engines here serve."""
    return n


def test_queues_must_be_names() -> None:
    for bad in ("emails", [""], [3]):
        with pytest.raises(ledgerflow.ConfigurationError, match="queues"):
            ledgerflow.Engine("memory://", queues=bad)  # type: ignore[arg-type]


gate: asyncio.Event | None = None


async def waits_at_the_gate(n: int) -> int:
    assert gate is not None
    await gate.wait()
    return n


@ledgerflow.workflow(name="registry.gated", version=1)
async def gated(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step(waits_at_the_gate, n)


async def test_a_closing_engine_says_it_is_stopping_then_leaves_after_its_leases(
    engine: EngineFactory, monkeypatch: pytest.MonkeyPatch, store_url: str
) -> None:
    global gate
    gate = asyncio.Event()
    calls: list[str] = []
    async with engine(gated) as e:
        store = e.store
        for name in ("heartbeat_worker", "release_wakeups", "deregister_worker"):
            real = getattr(store, name)

            async def spy(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
                calls.append(f"{_name}{'(stopping)' if kw.get('stopping') else ''}")
                return await _real(*args, **kw)

            monkeypatch.setattr(store, name, spy)
        await e.start(gated, 4, id="g-1")

        async def in_flight() -> bool:
            row = await store.get_wakeup("g-1")
            return row is not None and row.lease_owner == e.owner

        await until(in_flight, "the pass to run")
        closing = asyncio.create_task(e.close(grace=WAIT))

        async def stopping() -> bool:
            return any(w.stopping for w in await store.list_workers())

        # The pass still runs: the worker is listed, stopping, with its instance.
        await until(stopping, "the row to say stopping")
        [row] = await store.list_workers()
        assert (row.worker_id, row.in_flight) == (e.owner, 1)
        gate.set()
        await closing
    assert calls[0] == "heartbeat_worker(stopping)"
    assert calls[-2:] == ["release_wakeups", "deregister_worker"]
    async with after_close(store_url, e) as after:
        assert await after.list_workers() == []
        instance = await after.get_instance("g-1")
    assert instance is not None
    assert instance.status == "completed"  # the pass finished within the grace period


async def test_an_engine_judged_dead_registers_again_and_says_so(
    engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(lease=timedelta(seconds=0.15)) as e:
        [before] = await e.store.list_workers()
        await e.store.deregister_worker(e.owner)  # as a reaper would

        async def back() -> bool:
            return [w.worker_id for w in await e.store.list_workers()] == [e.owner]

        await until(back, "the engine to register again")
        [after] = await e.store.list_workers()
        assert after.started_at_us == before.started_at_us
    assert any("registering again" in r.getMessage() for r in caplog.records)


async def test_a_running_engine_reaps_a_worker_that_died_meanwhile(
    engine: EngineFactory, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with engine(lease=timedelta(seconds=0.15)) as e:
        now = clock.now_us()
        await e.store.register_worker(worker_row("gone:1:x", now - LEASE - 1))
        await leases(e.store, x=("gone:1:x", FAR))

        async def released() -> bool:
            return await holder(e.store, "x") is None

        await until(released, "the heartbeat loop to reap the dead worker")
        assert [w.worker_id for w in await e.store.list_workers()] == [e.owner]
    assert any("worker gone:1:x missed its heartbeat" in r.getMessage() for r in caplog.records)


async def _dead_pid() -> int:
    finished = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await finished.wait()  # its pid now names no process here
    return finished.pid


async def test_a_live_worker_named_after_this_host_and_a_dead_pid_is_not_reaped(
    engine: EngineFactory, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug the registry fixes: containers with host networking share this host's
    name, and a worker in another PID namespace has a pid that names no process here
    (or another one). Judged by host and pid, its leases were released while it ran.
    Judged by its heartbeat, it lives as long as it beats: through the engine's start
    and many reaps, then dead the moment its heartbeat is older than its lease."""
    neighbour = f"{socket.gethostname()}:{await _dead_pid()}:c0ffee00"
    host, pid, _ = neighbour.split(":")
    lease = 60_000_000
    async with engine(takeover=False) as e:
        row = worker_row(neighbour, clock.now_us(), lease=lease, host=host, pid=int(pid))
        await e.store.register_worker(row)
        await leases(e.store, n=(neighbour, clock.now_us() + lease))
    reaps: list[list[str]] = []
    async with engine(lease=timedelta(seconds=0.15)) as e:  # reaps at start
        real = e.store.reap_workers

        async def counted(now_us: int) -> list[str]:
            reaps.append(await real(now_us))
            return reaps[-1]

        monkeypatch.setattr(e.store, "reap_workers", counted)

        async def reaped_often() -> bool:
            return len(reaps) >= 3

        await until(reaped_often, "three reaps by the heartbeat loop")
        assert reaps[:3] == [[], [], []]
        assert await holder(e.store, "n") == neighbour
        assert neighbour in {w.worker_id for w in await e.store.list_workers()}
        # Its heartbeat now older than its lease: dead, whatever its host and pid.
        clock.advance(timedelta(microseconds=lease + 1))

        async def neighbour_reaped() -> bool:
            return any(neighbour in ids for ids in reaps)

        await until(neighbour_reaped, "the neighbour to be reaped once it stopped beating")
        assert await holder(e.store, "n") is None


async def test_two_engines_on_one_sqlite_file_are_both_listed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with (
        ledgerflow.Engine(url, workflows=[stall]) as a,
        ledgerflow.Engine(url, workflows=[stall, gated], queues=["q"], steps=[send]) as b,
    ):
        async with ledgerflow.WorkflowClient(url) as client:
            workers = await client.workers()
        assert [w.worker_id for w in workers] == sorted([a.owner, b.owner])
        by_id = {w.worker_id: w for w in workers}
        assert by_id[a.owner].workflows == ("registry.stall@1",)
        assert by_id[b.owner].workflows == ("registry.gated@1", "registry.stall@1")
        assert by_id[b.owner].queues == ("q",)
        for w in workers:
            assert (w.alive, w.state, w.stopping, w.in_flight) == (True, "alive", False, 0)
            assert (w.host, w.pid, w.version) == (
                socket.gethostname(),
                os.getpid(),
                running_version(),
            )
            assert w.lease == timedelta(seconds=60)
            # On the database's clock, which each engine tracks to within a round trip.
            assert timedelta(seconds=-1) < w.heartbeat_age < timedelta(seconds=30)
    async with ledgerflow.WorkflowClient(url) as client:
        assert await client.workers() == []


def _spawn_stalling_worker(url: str, lease: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *CLI,
            "worker",
            "--app",
            "tests._registry_worker",
            "--db",
            url,
            "--poll",
            "0.05",
            "--lease",
            str(lease),
        ],
        env=child_env(**{STALL: "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow  # seconds, and its worker runs in a subprocess (out of mutmut's runs)
async def test_a_worker_killed_with_sigkill_is_reaped_and_its_instances_finish_elsewhere(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ledgerflow.engine")
    async with ledgerflow.open_store(ledger_url):
        pass  # the ledger exists before the worker opens it
    ids = [f"k-{n}" for n in range(3)]
    victim = _spawn_stalling_worker(ledger_url, lease=1.0)
    try:
        async with ledgerflow.WorkflowClient(ledger_url, workflows=[stall]) as client:
            for n, workflow_id in enumerate(ids):
                await client.start(stall, n, id=workflow_id)

            async def all_held() -> bool:
                workers = await client.workers()
                if [w.pid for w in workers] != [victim.pid]:
                    return False
                rows = [await client.store.get_wakeup(i) for i in ids]
                return all(r is not None and r.lease_owner == workers[0].worker_id for r in rows)

            await until(all_held, "the worker to hold every instance")
            [dead] = await client.workers()
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=WAIT) == -signal.SIGKILL
        async with ledgerflow.Engine(
            ledger_url, workflows=[stall], lease=timedelta(seconds=1), poll_interval=0.05
        ) as rescuer:
            results = [await rescuer.handle(i).result(timeout=WAIT) for i in ids]

            async def only_the_rescuer() -> bool:
                # Its instances may be claimed as their leases run out, a moment
                # before the heartbeat loop reaps the worker itself.
                return [w.worker_id for w in await rescuer.workers()] == [rescuer.owner]

            await until(only_the_rescuer, "the killed worker to be reaped")
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert results == [0, 10, 20]
    reaped = f"worker {dead.worker_id} missed its heartbeat"
    assert any(reaped in r.getMessage() for r in caplog.records)


# -- the command line -----------------------------------------------------------------


async def cli(*args: str) -> Result:
    """Invoke the CLI on a thread: it runs its own event loop with asyncio.run."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, app, list(args), env={"COLUMNS": "250"})


@pytest.fixture
async def registry_url(tmp_path: Path) -> str:
    """A SQLite ledger with a late worker and a stopping one, times on its clock."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url) as store:
        now = await store.database_now_us()
        await store.register_worker(
            worker_row("late:9:aa", now - 120_000_000, lease=30_000_000, host="old-host", pid=9)
        )
        await store.register_worker(
            worker_row("quitting:8:bb", now, host="h2", pid=8, in_flight=2, stopping=True)
        )
    return url


def table_rows(output: str) -> dict[str, list[str]]:
    """The cells of a rich table's body rows, by their first cell."""
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.splitlines()
        if line.startswith("│")
    ]
    return {cells[0]: cells for cells in rows}


async def test_cli_workers_list_shows_each_worker_and_its_state(registry_url: str) -> None:
    # takeover=False: it would reap the late worker at start.
    async with ledgerflow.Engine(
        registry_url, workflows=[stall], queues=["emails"], steps=[send], takeover=False
    ) as e:
        result = await cli("workers", "list", "--db", registry_url)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in header.split("┃")[1:-1]] == [
        "id",
        "queues",
        "workflows",
        "version",
        "heartbeat",
        "running",
        "state",
    ]
    rows = table_rows(result.output)
    assert list(rows) == sorted([e.owner, "late:9:aa", "quitting:8:bb"])
    queues, workflows, version, age, in_flight, state = rows[e.owner][1:]
    assert e.owner.startswith(f"{socket.gethostname()}:{os.getpid()}:")  # host and pid
    assert (queues, workflows) == ("emails", "registry.stall@1")
    assert (version, in_flight, state) == (running_version(), "0", "alive")
    assert age.endswith("s ago")
    late = rows["late:9:aa"]
    assert (late[1], late[2], late[-1]) == ("-", "order@1", "late")
    assert 120 <= float(late[4].removesuffix("s ago")) < 180
    assert (rows["quitting:8:bb"][-2], rows["quitting:8:bb"][-1]) == ("2", "stopping")


async def test_cli_workers_list_json_has_one_object_per_worker(registry_url: str) -> None:
    result = await cli("workers", "list", "--db", registry_url, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["id"] for r in records] == ["late:9:aa", "quitting:8:bb"]
    late, quitting = records
    assert (late["state"], late["alive"], late["host"], late["pid"]) == (
        "late",
        False,
        "old-host",
        9,
    )
    assert late["lease_s"] == 30.0
    assert 120 <= late["heartbeat_age_s"] < 180
    assert late["workflows"] == ["order@1"]
    assert late["queues"] == []
    assert (quitting["state"], quitting["stopping"], quitting["in_flight"]) == ("stopping", True, 2)
    assert datetime.fromisoformat(late["last_heartbeat"]) < datetime.fromisoformat(
        quitting["last_heartbeat"]
    )
    assert set(late) == {
        "id",
        "host",
        "pid",
        "queues",
        "workflows",
        "version",
        "started_at",
        "last_heartbeat",
        "heartbeat_age_s",
        "lease_s",
        "in_flight",
        "stopping",
        "alive",
        "state",
    }


async def test_cli_workers_list_with_nobody_registered(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    async with ledgerflow.open_store(url):
        pass
    result = await cli("workers", "list", "--db", url)
    assert (result.exit_code, result.output.strip()) == (0, "no workers registered")
    result = await cli("workers", "list", "--db", url, "--json")
    assert (result.exit_code, result.output) == (0, "")
