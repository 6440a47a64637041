"""What resilience policies cost: a policy-wrapped step against a bare one, and each
guard's decision, on SQLite and PostgreSQL.

    python bench/resilience.py                      # sqlite, then postgres if it answers
    python bench/resilience.py --backend sqlite     # or postgres, or all
    python bench/resilience.py --quick              # sizes / 5, a smoke test

Prints one JSON line per backend on stdout; progress goes to stderr. Each run uses a
fresh database (as bench/store.py), removed afterwards, and an Engine with its default
settings. The way users write code: plain ``def`` steps, workflows started in a loop
and awaited together.

- ``steps``: the same 3-step workflow (trivial sync steps) run ``n`` times in each
  kind, in the order bare, policy, policy, bare, ... so drift hits all alike: ``bare``
  (no policy), ``policy`` (a named policy with retry and timeouts, no guard),
  ``breaker`` (the same plus a circuit breaker that stays closed), ``rate_limit`` (a
  bucket far above the load) and ``bulkhead`` (room for every call). Each kind's
  workflows/s, and its ratio to bare (``overhead_*``: bare rate / kind's rate; the
  target for ``policy`` is <= 1.2).
- ``decisions``: each guard's own cost at the store, one call at a time: reading a
  resource's state (what a closed breaker costs every 0.25 s), taking a half-open
  probe, taking a token, taking and dropping a permit; µs per decision, and as a
  ratio to the commit floor's µs per commit measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import traceback
from typing import Any

import ledgerflow as lf
from ledgerflow.store.runtime import DropPermit, MoveBreaker
from modes import add_one, double, minus_three  # the same trivial steps
from store import fresh_database, note, pg_problem, ratio

BACKENDS = ("sqlite", "postgres")
SIZES = {"sqlite": 400, "postgres": 200}
"""Workflows per batch of the steps phase."""
DECISIONS = {"sqlite": 400, "postgres": 200}
QUICK_DIVISOR = 5
ROUNDS = 2
FLOOR_SECONDS = 0.8
TARGETS = {"overhead_policy": 1.2}
RESULT_TIMEOUT_S = 120.0

RETRY = lf.Retry(max_attempts=3, initial_interval=0.1)
TIMEOUTS = lf.Timeouts(start_to_close=30, schedule_to_close=300)
KINDS: dict[str, lf.Policy | None] = {
    "bare": None,
    "policy": lf.Policy(retry=RETRY, timeout=TIMEOUTS),
    "breaker": lf.Policy(retry=RETRY, timeout=TIMEOUTS, breaker=lf.Breaker()),
    "rate_limit": lf.Policy(retry=RETRY, rate_limit=lf.RateLimit(rate=1e6, burst=1_000_000)),
    "bulkhead": lf.Policy(retry=RETRY, bulkhead=lf.Bulkhead(max_concurrent=100_000)),
}


def _flow(kind: str) -> lf.WorkflowDefinition[int, int]:
    policy = None if KINDS[kind] is None else kind

    async def three(ctx: lf.WorkflowContext, n: int) -> int:
        a = await ctx.step(add_one, n, policy=policy)
        b = await ctx.step(double, a, policy=policy)
        return await ctx.step(minus_three, b, policy=policy)

    three.__name__ = f"three_{kind}"
    return lf.workflow(name=f"resilience.{kind}", version=1, lint=False)(three)


FLOWS = {kind: _flow(kind) for kind in KINDS}


async def batch(eng: lf.Engine, kind: str, prefix: str, n: int) -> float:
    """Start ``n`` in a loop, await all; seconds from first start to last result."""
    began = time.perf_counter()
    handles = [await eng.start(FLOWS[kind], i, id=f"{prefix}-{i}") for i in range(n)]
    results = await asyncio.gather(*(h.result(timeout=RESULT_TIMEOUT_S) for h in handles))
    elapsed = time.perf_counter() - began
    wrong = [i for i, r in enumerate(results) if r != (i + 1) * 2 - 3]
    if wrong:
        raise RuntimeError(f"{prefix}: {len(wrong)} wrong results")
    return elapsed


async def steps_phase(eng: lf.Engine, backend: str, n: int) -> dict[str, Any]:
    order = [k for k in KINDS if k != "bare"]
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for kind in KINDS:  # warm up every path
        await batch(eng, kind, f"warm-{kind}", max(10, n // 10))
    for round_ in range(ROUNDS):
        for kind in ["bare", *order, *reversed(order), "bare"]:
            elapsed = await batch(eng, kind, f"{kind}-{round_}-{len(times[kind])}", n)
            times[kind].append(elapsed)
            note(f"{backend}: {kind} x{n}: {n / elapsed:.0f} wf/s")
    rates = {k: n * len(t) / sum(t) for k, t in times.items()}
    out: dict[str, Any] = {"n": n, "workflows_per_s": {k: round(v, 1) for k, v in rates.items()}}
    for kind in order:
        out[f"overhead_{kind}"] = ratio(rates["bare"], rates[kind])
    return out


async def timed(n: int, call: Any) -> float:
    """µs per call of ``call(i)``, one at a time."""
    began = time.perf_counter()
    for i in range(n):
        await call(i)
    return (time.perf_counter() - began) / n * 1e6


async def decisions_phase(store: Any, n: int, now: int) -> dict[str, float]:
    await store.append(
        "breaker-probe",
        [lf.NewEvent("bench.move")],
        lf.NO_STREAM,
        runtime=[MoveBreaker("probe", "half_open", now, 1)],
    )

    async def state(i: int) -> None:
        await store.resource_state("probe", now_us=now)

    async def probe(i: int) -> None:
        await store.take_probe("probe", transitions=1, max_probes=10**9)

    async def token(i: int) -> None:
        await store.take_token("tokens", rate=1e6, burst=10**9, now_us=now + i)

    async def permit(i: int) -> None:
        await store.acquire_permit(
            "permits",
            f"c{i}",
            owner="bench",
            max_concurrent=10**6,
            now_us=now,
            until_us=now + 10**9,
        )
        await store.append(
            "calls", [lf.NewEvent("bench.done")], runtime=[DropPermit("permits", f"c{i}")]
        )

    async def plain_append(i: int) -> None:
        await store.append("calls", [lf.NewEvent("bench.done")])

    return {
        "read_state_us": round(await timed(n, state), 1),
        "take_probe_us": round(await timed(n, probe), 1),
        "take_token_us": round(await timed(n, token), 1),
        "permit_and_drop_us": round(await timed(n, permit), 1),
        "plain_append_us": round(await timed(n, plain_append), 1),
    }


async def run_backend(backend: str, quick: bool) -> dict[str, Any]:
    began = time.perf_counter()
    errors: list[str] = []
    floors: list[float] = []
    result: dict[str, Any] = {"benchmark": "resilience", "backend": backend}
    n = SIZES[backend] // (QUICK_DIVISOR if quick else 1)
    d = DECISIONS[backend] // (QUICK_DIVISOR if quick else 1)
    try:
        async with fresh_database(backend, "bench_resilience") as (url, floor, settings):
            result["settings"] = {**settings, "quick": quick, "rounds": ROUNDS}
            policies = {k: p for k, p in KINDS.items() if p is not None}
            async with lf.Engine(url, workflows=list(FLOWS.values()), policies=policies) as eng:
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                result["steps"] = await steps_phase(eng, backend, n)
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
                decided = await decisions_phase(eng.store, d, eng._now_us())
                floors.append(await floor.commits_per_s(FLOOR_SECONDS))
    except Exception as exc:  # noqa: BLE001 - recorded, traceback on stderr
        traceback.print_exc(file=sys.stderr)
        errors.append(f"{type(exc).__name__}: {exc}")
        decided = {}
    floor_rate = statistics.median(floors) if floors else 0.0
    result["floor_commits_per_s"] = round(floor_rate, 1)
    result["floor_rounds"] = [round(f, 1) for f in floors]
    if decided and floor_rate:
        commit_us = 1e6 / floor_rate
        result["decisions"] = {
            **decided,
            **{
                k.replace("_us", "_over_commit"): round(v / commit_us, 2)
                for k, v in decided.items()
            },
        }
    steps = result.get("steps", {})
    result["targets"] = {k: f"<= {v}" for k, v in TARGETS.items()}
    result["targets_met"] = {
        k: (steps[k] <= v) if isinstance(steps.get(k), int | float) else None
        for k, v in TARGETS.items()
    }
    result["errors"] = errors
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    backends = BACKENDS if args.backend in (None, "all") else (args.backend,)
    failed = False
    for backend in backends:
        if backend == "postgres":
            problem = pg_problem()
            if problem is not None:
                if args.backend == "postgres":
                    print(
                        json.dumps(
                            {"benchmark": "resilience", "backend": backend, "errors": [problem]}
                        )
                    )
                    return 1
                note(f"postgres skipped: {problem}")
                continue
        result = asyncio.run(run_backend(backend, args.quick))
        print(json.dumps(result), flush=True)
        failed = failed or bool(result["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
