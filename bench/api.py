"""Starting workflows over HTTP: requests/s and latency with 50 concurrent clients,
next to the engine's own start rate in the same run, on the same store.

    python bench/api.py                       # SQLite; prints one JSON line; ~30 s
    python bench/api.py --backend postgres    # PostgreSQL at LEDGERFLOW_TEST_PG
    python bench/api.py --quick               # shorter phases

- ``in_process``: ``CLIENTS`` tasks each start instances with
  ``WorkflowClient.start`` in a loop for ``SECONDS`` (the API's own call, without
  HTTP): starts/s.
- ``http``: ``ledgerflow server`` runs in a child process (uvicorn, one worker
  process, as a user runs it) on a fresh ledger of the same backend, and ``CLIENTS``
  tasks in this process each POST ``/api/v1/workflows`` in a loop (httpx, keep-alive,
  an API key) for ``SECONDS``: requests/s, and p50 / p99 nearest-rank latency from
  send to answer. Every answer must be 201; each instance must be in the ledger once.
- ``ratio``: http / in_process (the issue's target: at least 0.5). The commit floor
  (bench/store.py) is measured beside them.

Both start a workflow that nobody runs (no engine): the cost measured is the start's
append and the HTTP path around it, not the workflow. The server process and this
process share the machine's cores, as a load balancer and a server on one host would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

import ledgerflow
from ledgerflow.server import ApiKeys, Role
from modes import percentile
from store import fresh_database

CLIENTS = 50
SECONDS = 8.0
FLOOR_SECONDS = 2.0
APP = textwrap.dedent(
    """
    import ledgerflow

    @ledgerflow.workflow(name="bench.order", version=1)
    async def order(ctx: ledgerflow.WorkflowContext, n: int) -> int:
        return n
    """
)


def _load_app(directory: Path) -> Any:
    (directory / "bench_api_app.py").write_text(APP)
    sys.path.insert(0, str(directory))
    import bench_api_app  # type: ignore[import-not-found]

    return bench_api_app.order


async def in_process(url: str, workflow: Any, seconds: float) -> float:
    async with ledgerflow.WorkflowClient(url, workflows=[workflow]) as client:
        count = 0
        deadline = time.monotonic() + seconds

        async def starter(index: int) -> None:
            nonlocal count
            n = 0
            while time.monotonic() < deadline:
                await client.start(workflow, n, id=f"in-{index}-{n}")
                n += 1
                count += 1

        began = time.monotonic()
        await asyncio.gather(*(starter(i) for i in range(CLIENTS)))
        return count / (time.monotonic() - began)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def over_http(url: str, directory: Path, seconds: float) -> dict[str, Any]:
    async with ledgerflow.WorkflowClient(url) as client:
        key = await ApiKeys(client.store).create("bench", Role.OPERATOR, "*", by="bench")
    port = _free_port()
    server = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-c",
            "from ledgerflow.cli import main; main()",
            "server",
            "--app",
            "bench_api_app",
            "--db",
            url,
            "--port",
            str(port),
            "--rate",
            "1000000",
            "--burst",
            "1000000",
        ],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key.secret}"}
    try:
        async with httpx.AsyncClient(
            base_url=base, headers=headers, limits=httpx.Limits(max_connections=CLIENTS)
        ) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.returncode is not None or time.monotonic() > deadline:
                    problem = await server.stderr.read() if server.stderr else b""
                    raise RuntimeError(f"the server did not start: {problem.decode()}")
                await asyncio.sleep(0.05)
            latencies: list[float] = []
            failures: list[str] = []
            stop = time.monotonic() + seconds

            async def caller(index: int) -> None:
                n = 0
                while time.monotonic() < stop:
                    body = {"workflow": "bench.order", "input": n, "id": f"http-{index}-{n}"}
                    sent = time.monotonic()
                    answer = await http.post("/api/v1/workflows", json=body)
                    latencies.append(time.monotonic() - sent)
                    if answer.status_code != 201:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    n += 1

            began = time.monotonic()
            await asyncio.gather(*(caller(i) for i in range(CLIENTS)))
            elapsed = time.monotonic() - began
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
    async with ledgerflow.WorkflowClient(url) as client:
        stored = 0
        after = None
        while page := await client.list_workflows(id_prefix="http-", after=after, limit=500):
            stored += len(page)
            after = page[-1].workflow_id
    return {
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "requests": len(latencies),
        "failures": failures[:3],
        "stored": stored,
        "ok": not failures and stored == len(latencies),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else SECONDS
    directory = Path(tempfile.mkdtemp(prefix="ledgerflow-api-bench-"))
    workflow = _load_app(directory)
    async with fresh_database(args.backend, "api_in") as (url, floor, settings):
        floor_rate = await floor.commits_per_s(FLOOR_SECONDS)
        engine_rate = await in_process(url, workflow, seconds)
    async with fresh_database(args.backend, "api_http") as (url, _, _):
        http = await over_http(url, directory, seconds)
    line = {
        "bench": "api",
        "backend": args.backend,
        "clients": CLIENTS,
        "seconds": seconds,
        "floor_commits_per_s": round(floor_rate, 1),
        "in_process_starts_per_s": round(engine_rate, 1),
        "http": http,
        "ratio_http_to_in_process": round(http["requests_per_s"] / engine_rate, 3),
        "in_process_to_floor": round(engine_rate / floor_rate, 3),
        "settings": settings,
    }
    print(json.dumps(line))
    return 0 if http["ok"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
