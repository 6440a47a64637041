"""Projection catch-up, the way users write a projection, as a ratio to the commit floor
measured in the same run on the same database.

    python bench/projections.py                     # sqlite, then postgres if it answers
    python bench/projections.py --backend sqlite    # or: postgres
    python bench/projections.py --quick             # smaller log, one round: ~10 s
    python bench/projections.py --profile           # where catch-up time goes (stderr)

Prints exactly one JSON line on stdout (progress goes to stderr): a key per backend,
``{"skipped": why}`` for PostgreSQL when it does not answer. Each backend runs on a
fresh database (a temporary directory for SQLite, a new schema
``lf_bench_projections_<random>`` for PostgreSQL), removed afterwards.

The log: orders over many streams (``order-<n>``), each ``Placed``, most of them later
``Approved`` and most of those later ``Shipped``, interleaved with ``Audited`` events in
other streams that the projection does not handle (a quarter of the log). The log is
written in waves of concurrent single-event appends: wave ``w`` places one slice of
orders, approves the slice placed in wave ``w - 1`` and ships the slice approved in
wave ``w - 2``, shuffled, so an order's events lie about a wave (~2,000 events) apart,
as they would in a live system, and most ``Approved``/``Shipped`` events find their
order's row in an earlier batch, not in their own.

The projection keeps one row per order in a declared table (indexed on ``status``):
``view.put`` on ``Placed``, ``view.update`` on the others. ``catch_up()`` from position
0 is timed for each mode, on a projection of a new name each time (so each starts from
0 on the same log):

- ``batch500`` (the runner's default), ``batch50``, ``batch2000``: plain handlers.
- ``reads_batch500``: the read-modify-write handlers users often write: ``Approved``
  and ``Shipped`` first ``await view.get(...)`` the order's row, check its status,
  then update it from what they read (an event counter).

Before the timed runs a ``reads`` projection catches up once, untimed (warm-up). The
modes then run in the order above, then mirrored (``ROUNDS``); each mode's figure is
its events over its runs' total time. A second-round run is left out, and named
under ``incomplete``, if it would end past the backend's ``BUDGET_S``.
``events_per_s`` counts every event the checkpoint passed (handled or not),
``handled_events_per_s`` those the handlers took; ``ratio`` is ``events_per_s`` over
the floor, the target (issue 16) >= 5. After each run the read model must equal the
expected orders (every row: status, amounts, approver, carrier, counter), the
checkpoint be at the log's head and no failure be recorded; otherwise ``errors``
(exit status 1).

The floor is the one of bench/store.py (single-row INSERT + COMMIT, same driver and
durability, beside the ledger), ``FLOOR_SECONDS`` before each run and once at the end;
ratios use the median.

The log's size is set per backend (``EVENTS``) and bounded by a fill budget
(``FILL_BUDGET_S``): a slow disk writes fewer waves, and the figures say how many.

``--profile`` prints no JSON: per backend, for ``batch500``, ``batch50`` and
``reads_batch500``, one catch-up with every store call the runner awaits timed (wall
clock, no profiler), then one under cProfile in every thread (the SQLite store's
writer and readers included), to stderr. See bench/README.md for what it showed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import io
import json
import pstats
import random
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import ledgerflow as lf
from store import fresh_database, note, pg_problem, ratio

if TYPE_CHECKING:
    from ledgerflow.store import WorkflowStore

BACKENDS = ("sqlite", "postgres")
EVENTS = {"sqlite": 20_000, "postgres": 15_000}
"""Events written before the catch-ups (the fill stops early at ``FILL_BUDGET_S``).
A full run took 20-22 s on SQLite and 23-25 s on PostgreSQL on the 2-core development
machine (2026-11-30)."""
FILL_BUDGET_S = {"sqlite": 5.0, "postgres": 5.0}
BUDGET_S = {"sqlite": 25.0, "postgres": 28.0}
"""A backend's run: a run of the second round is left out (and named under
``incomplete``) if, judged by the mode's first run, it would end after this."""
QUICK_DIVISOR = 4
WAVE_ORDERS = 600
"""Orders placed per wave: with the approvals and shipments of earlier waves and the
unhandled events, a wave is ~2,000 events."""
NOISE_SHARE = 0.25
"""Of the log: events the projection does not handle."""
DEFAULT_BATCH = 500
MODES: dict[str, tuple[int, bool]] = {
    "batch500": (DEFAULT_BATCH, False),
    "batch50": (50, False),
    "batch2000": (2000, False),
    "reads_batch500": (DEFAULT_BATCH, True),
}
"""Mode: (batch size, handlers read before they update)."""
ROUNDS = 2
FLOOR_SECONDS = 0.8
QUICK_FLOOR_SECONDS = 0.3
TARGET_RATIO = 5.0
SEED = 16


class BenchError(Exception):
    """A wrong result: the read model or the checkpoint is not what the log says."""


# -- the domain --------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    customer: str
    amount_cents: int


@dataclass(frozen=True)
class Approved:
    approver: str


@dataclass(frozen=True)
class Shipped:
    carrier: str


@dataclass(frozen=True)
class Audited:
    """Written to ``audit-<n>`` streams; no handler."""

    note: str


def make_registry() -> lf.EventRegistry:
    registry = lf.EventRegistry()
    registry.register(Placed, "order.placed")
    registry.register(Approved, "order.approved")
    registry.register(Shipped, "order.shipped")
    registry.register(Audited, "audit.noted")
    return registry


ORDERS = lf.Table(
    "orders",
    key="order_id",
    columns={
        "order_id": str,
        "customer": str,
        "amount_cents": int,
        "status": str,
        "approver": str | None,
        "carrier": str | None,
        "events": int,
    },
    indexes=("status",),
)


def projection(name: str, reads: bool) -> lf.Projection:
    """The orders read model; with ``reads``, Approved and Shipped read the row first."""
    p = lf.Projection(name, tables=[ORDERS])

    @p.on(Placed)
    def placed(event: lf.RecordedEvent, view: lf.View) -> None:
        view.put(
            ORDERS,
            {
                "order_id": event.stream_id,
                "customer": event.data.customer,
                "amount_cents": event.data.amount_cents,
                "status": "placed",
                "events": 1,
            },
        )

    if not reads:

        @p.on(Approved)
        def approved(event: lf.RecordedEvent, view: lf.View) -> None:
            view.update(
                ORDERS, event.stream_id, status="approved", approver=event.data.approver, events=2
            )

        @p.on(Shipped)
        def shipped(event: lf.RecordedEvent, view: lf.View) -> None:
            view.update(
                ORDERS, event.stream_id, status="shipped", carrier=event.data.carrier, events=3
            )

        return p

    @p.on(Approved)
    async def approved_read(event: lf.RecordedEvent, view: lf.View) -> None:
        row = await view.get(ORDERS, event.stream_id)
        if row is None or row["status"] != "placed":
            raise BenchError(f"{event.stream_id} approved from {row}")
        view.update(
            ORDERS,
            event.stream_id,
            status="approved",
            approver=event.data.approver,
            events=row["events"] + 1,
        )

    @p.on(Shipped)
    async def shipped_read(event: lf.RecordedEvent, view: lf.View) -> None:
        row = await view.get(ORDERS, event.stream_id)
        if row is None or row["status"] != "approved":
            raise BenchError(f"{event.stream_id} shipped from {row}")
        view.update(
            ORDERS,
            event.stream_id,
            status="shipped",
            carrier=event.data.carrier,
            events=row["events"] + 1,
        )

    return p


# -- the log -------------------------------------------------------------------------------


@dataclass
class Log:
    """What was written, and the read model it must give."""

    events: int = 0
    handled: int = 0
    expected: dict[str, dict[str, Any]] | None = None
    fill_s: float = 0.0
    waves: int = 0


def wave(w: int, rng: random.Random, expected: dict[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    """Wave ``w``'s events (stream, event), shuffled; ``expected`` is updated as if
    they were written. Order ``i`` is approved unless ``i % 5 == 4``, shipped if also
    ``i % 3 != 2``."""
    out: list[tuple[str, Any]] = []
    for i in range(w * WAVE_ORDERS, (w + 1) * WAVE_ORDERS):
        oid = f"order-{i}"
        amount = rng.randrange(100, 100_000)
        customer = f"customer-{rng.randrange(500)}"
        out.append((oid, Placed(customer, amount)))
        expected[oid] = {
            "order_id": oid,
            "customer": customer,
            "amount_cents": amount,
            "status": "placed",
            "approver": None,
            "carrier": None,
            "events": 1,
        }
    for i in range((w - 1) * WAVE_ORDERS, w * WAVE_ORDERS):
        if i >= 0 and i % 5 != 4:
            approver = f"approver-{i % 7}"
            out.append((f"order-{i}", Approved(approver)))
            expected[f"order-{i}"] |= {"status": "approved", "approver": approver, "events": 2}
    for i in range((w - 2) * WAVE_ORDERS, (w - 1) * WAVE_ORDERS):
        if i >= 0 and i % 5 != 4 and i % 3 != 2:
            carrier = ("post", "courier", "pickup")[i % 3]
            out.append((f"order-{i}", Shipped(carrier)))
            expected[f"order-{i}"] |= {"status": "shipped", "carrier": carrier, "events": 3}
    handled = len(out)
    noise = round(handled * NOISE_SHARE / (1 - NOISE_SHARE))
    out.extend((f"audit-{j}", Audited(f"wave {w} note {j}")) for j in range(noise))
    rng.shuffle(out)
    return out


async def fill(store: WorkflowStore, target: int, budget_s: float) -> Log:
    """Waves of concurrent single-event appends (group commit) until ``target``
    events or ``budget_s``, whichever first."""
    rng = random.Random(SEED)
    expected: dict[str, dict[str, Any]] = {}
    log = Log(expected=expected)
    began = time.perf_counter()
    w = 0
    while log.events < target and time.perf_counter() - began < budget_s:
        events = wave(w, rng, expected)
        # Each wave's streams are distinct (an order gets one event per wave, each
        # audit stream one), so the appends can all go at once.
        await asyncio.gather(*(store.append(stream, [e]) for stream, e in events))
        log.events += len(events)
        log.handled += sum(not isinstance(e, Audited) for _, e in events)
        w += 1
    log.fill_s = time.perf_counter() - began
    log.waves = w
    return log


# -- one catch-up --------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    seconds: float
    events: int
    applied: int


async def check(store: WorkflowStore, p: lf.Projection, log: Log, applied: int) -> None:
    """The read model, checkpoint and failure as the log says they must be."""
    assert log.expected is not None
    row = await store.projection_row(p.name)
    head = await store.head_position()
    if row is None or row.failure is not None or row.position != head:
        raise BenchError(f"{p.name}: checkpoint {row} after catch-up, head {head}")
    if applied != log.handled:
        raise BenchError(f"{p.name}: {applied} events applied, {log.handled} handled expected")
    model = lf.ReadModel(store, p)
    rows: dict[str, dict[str, Any]] = {}
    while True:
        page = await model.select(ORDERS, limit=10_000, offset=len(rows))
        rows.update((r["order_id"], r) for r in page)
        if len(page) < 10_000:
            break
    if rows != log.expected:
        missing = log.expected.keys() - rows.keys()
        extra = rows.keys() - log.expected.keys()
        wrong = [k for k in rows.keys() & log.expected.keys() if rows[k] != log.expected[k]]
        first = wrong[0] if wrong else None
        raise BenchError(
            f"{p.name}: read model wrong: {len(missing)} rows missing, {len(extra)} extra, "
            f"{len(wrong)} differ (first: {first} {rows.get(first or '')} != "
            f"{log.expected.get(first or '')})"
        )


async def catch_up(store: WorkflowStore, name: str, mode: str, log: Log) -> Run:
    batch, reads = MODES[mode]
    p = projection(name, reads)
    runner = lf.ProjectionRunner(store, [p], batch_size=batch)
    began = time.perf_counter()
    applied = await runner.catch_up()
    seconds = time.perf_counter() - began
    await check(store, p, log, applied)
    return Run(mode, seconds, log.events, applied)


def mode_figures(runs: list[Run], floor: float) -> dict[str, Any]:
    seconds = sum(r.seconds for r in runs)
    events = sum(r.events for r in runs)
    eps = events / seconds
    batch, reads = MODES[runs[0].mode]
    return {
        "batch_size": batch,
        "handler_reads": reads,
        "events_per_s": round(eps, 1),
        "ratio": ratio(eps, floor),
        "handled_events_per_s": round(sum(r.applied for r in runs) / seconds, 1),
        "handled_ratio": ratio(sum(r.applied for r in runs) / seconds, floor),
        "batches": -(-runs[0].events // batch),
        "run_seconds": [round(r.seconds, 3) for r in runs],
        "target_met": eps / floor >= TARGET_RATIO,
    }


# -- a backend -----------------------------------------------------------------------------


async def run_backend(backend: str, quick: bool) -> dict[str, Any]:
    began = time.perf_counter()
    divisor = QUICK_DIVISOR if quick else 1
    rounds = 1 if quick else ROUNDS
    floor_s = QUICK_FLOOR_SECONDS if quick else FLOOR_SECONDS
    order = list(MODES)
    plan = [m for r in range(rounds) for m in (order if r % 2 == 0 else order[::-1])]
    async with (
        fresh_database(backend, "bench_projections") as (url, floor, settings),
        lf.open_store(url, registry=make_registry()) as store,
    ):
        note(f"{backend}: writing the log")
        log = await fill(store, EVENTS[backend] // divisor, FILL_BUDGET_S[backend] / divisor)
        note(
            f"{backend}: {log.events} events ({log.handled} handled, {len(log.expected or {})} "
            f"orders) in {log.fill_s:.1f} s"
        )
        # Warm-up: a small projection over the start of the log, and the floor.
        await floor.commits_per_s(0.2)
        warm = lf.ProjectionRunner(store, [projection("warm", True)], batch_size=DEFAULT_BATCH)
        await warm.catch_up()
        floors: list[float] = []
        runs: dict[str, list[Run]] = {m: [] for m in MODES}
        incomplete: list[str] = []
        deadline = began + BUDGET_S[backend] / divisor
        for n, mode in enumerate(plan):
            if runs[mode] and time.perf_counter() + floor_s + runs[mode][0].seconds > deadline:
                incomplete.append(f"{mode} run {len(runs[mode]) + 1}: out of time")
                continue
            floors.append(await floor.commits_per_s(floor_s))
            run = await catch_up(store, f"{mode.replace('_batch', '')}_r{n}", mode, log)
            runs[mode].append(run)
            note(
                f"{backend}: {mode}: {run.events / run.seconds:.0f} events/s "
                f"({run.seconds:.2f} s; floor {floors[-1]:.0f} commits/s)"
            )
        floors.append(await floor.commits_per_s(floor_s))
    floor_rate = statistics.median(floors)
    modes = {m: mode_figures(rs, floor_rate) for m, rs in runs.items()}
    return {
        "settings": settings,
        "events": log.events,
        "handled_events": log.handled,
        "orders": len(log.expected or {}),
        "waves": log.waves,
        "fill_s": round(log.fill_s, 2),
        "fill_events_per_s": round(log.events / log.fill_s, 1),
        "floor_commits_per_s": round(floor_rate, 1),
        "floor_rounds": [round(f, 1) for f in floors],
        **modes,
        "reads_cost": round(
            modes["batch500"]["events_per_s"] / modes["reads_batch500"]["events_per_s"], 3
        ),
        "incomplete": incomplete,
        "seconds": round(time.perf_counter() - began, 1),
    }


# -- profiling -----------------------------------------------------------------------------


class _Timed:
    """The store, with every coroutine the runner awaits on it timed (wall clock)."""

    def __init__(self, store: WorkflowStore) -> None:
        self._store = store
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._store, name)
        if not inspect.iscoroutinefunction(found):
            return found
        fn = cast("Callable[..., Awaitable[Any]]", found)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


PROFILED_MODES = ("batch500", "batch50", "reads_batch500")


async def profile_backend(backend: str, quick: bool) -> None:
    """Per mode in ``PROFILED_MODES``: one catch-up with the store's calls timed (no
    profiler: wall clock as in the benchmark), then one under cProfile, in every
    thread (the SQLite store's writer and readers too); both to stderr."""
    profiles: list[tuple[str, cProfile.Profile]] = []

    def per_thread(*_: Any) -> None:
        prof = cProfile.Profile()
        profiles.append((threading.current_thread().name, prof))
        prof.enable()  # replaces this hook in the thread

    divisor = QUICK_DIVISOR if quick else 1
    async with fresh_database(backend, "bench_projections") as (url, floor, _):
        threading.setprofile(per_thread)  # the store's threads start after this
        try:
            async with lf.open_store(url, registry=make_registry()) as store:
                log = await fill(
                    store, EVENTS[backend] // divisor, FILL_BUDGET_S[backend] / divisor
                )
                await catch_up(store, "warm", "reads_batch500", log)
                floor_rate = await floor.commits_per_s(FLOOR_SECONDS)
                note(f"PROFILE {backend}: {log.events} events, floor {floor_rate:.0f} commits/s")
                for n, mode in enumerate(PROFILED_MODES):
                    batch, reads = MODES[mode]
                    timed = _Timed(store)
                    p = projection(f"timed_{n}", reads)
                    runner = lf.ProjectionRunner(
                        cast("WorkflowStore", timed), [p], batch_size=batch
                    )
                    began = time.perf_counter()
                    applied = await runner.catch_up()
                    seconds = time.perf_counter() - began
                    await check(store, p, log, applied)
                    in_store = sum(timed.spent.values())
                    parts = "; ".join(
                        f"{k} {v:.3f} s / {timed.calls[k]} calls ({v / seconds:.0%})"
                        for k, v in sorted(timed.spent.items(), key=lambda kv: -kv[1])
                    )
                    commits = -(-log.events // batch)
                    note(
                        f"PROFILE {backend} {mode} (no profiler): {seconds:.3f} s, "
                        f"{log.events / seconds:.0f} events/s, ratio "
                        f"{log.events / seconds / floor_rate:.2f}. Awaiting the store: {parts}. "
                        f"Outside the store (handlers, View, runner): {seconds - in_store:.3f} s "
                        f"({(seconds - in_store) / seconds:.0%}). {commits} commits at the "
                        f"floor's rate would take {commits / floor_rate:.3f} s."
                    )
                    p = projection(f"profiled_{n}", reads)
                    runner = lf.ProjectionRunner(store, [p], batch_size=batch)
                    main = cProfile.Profile()
                    for _, prof in profiles:
                        prof.clear()
                    main.enable()
                    applied = await runner.catch_up()
                    main.disable()
                    await check(store, p, log, applied)
                    _print_stats(f"{backend} {mode}: event-loop thread", main, 25)
                    for name, prof in profiles:
                        _print_stats(f"{backend} {mode}: thread {name}", prof, 6)
        finally:
            threading.setprofile(None)


def _print_stats(title: str, prof: cProfile.Profile, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    if not stats.stats:  # type: ignore[attr-defined]
        return
    stats.sort_stats("tottime").print_stats(top)
    note(f"PROFILE {title} (under cProfile, by own time):\n{out.getvalue()}")


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=BACKENDS, help="one backend (default: both)")
    parser.add_argument("--quick", action="store_true", help="a smaller log, one round")
    parser.add_argument(
        "--profile", action="store_true", help="profile one catch-up per mode (stderr)"
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()
    backends = [args.backend] if args.backend else list(BACKENDS)
    if args.profile:
        for backend in backends:
            if backend == "postgres" and (problem := pg_problem()):
                note(f"skipping postgres: {problem}")
                continue
            asyncio.run(profile_backend(backend, args.quick))
        return 0
    line: dict[str, Any] = {
        "benchmark": "projections",
        "quick": args.quick,
        "settings": {
            "events_target": {
                b: EVENTS[b] // (QUICK_DIVISOR if args.quick else 1) for b in BACKENDS
            },
            "fill_budget_s": FILL_BUDGET_S,
            "wave_orders": WAVE_ORDERS,
            "unhandled_share": NOISE_SHARE,
            "rounds": 1 if args.quick else ROUNDS,
            "floor_seconds": QUICK_FLOOR_SECONDS if args.quick else FLOOR_SECONDS,
            "runner": "ProjectionRunner defaults but batch_size; catch_up() from position 0",
        },
        "target": f"ratio >= {TARGET_RATIO} (catch-up events/s over floor commits/s)",
    }
    errors: list[str] = []
    for backend in BACKENDS:
        if backend not in backends:
            line[backend] = {"skipped": "not asked for (--backend)"}
            continue
        if backend == "postgres" and (problem := pg_problem()):
            note(f"skipping postgres: {problem}")
            line[backend] = {"skipped": problem}
            continue
        try:
            line[backend] = asyncio.run(run_backend(backend, args.quick))
        except Exception as exc:  # noqa: BLE001 - recorded, traceback on stderr
            traceback.print_exc(file=sys.stderr)
            errors.append(f"{backend}: {type(exc).__name__}: {exc}")
            line[backend] = {"error": f"{type(exc).__name__}: {exc}"}
    line["errors"] = errors
    line["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(line), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
