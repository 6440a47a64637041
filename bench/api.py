"""Starting workflows over HTTP: requests/s and latency with 50 concurrent clients,
next to the engine's own start rate in the same run, on the same store.

    python bench/api.py                       # SQLite; prints one JSON line; ~30 s
    python bench/api.py --backend postgres    # PostgreSQL at LEDGERFLOW_TEST_PG
    python bench/api.py --quick               # shorter phases

- ``in_process``: ``CLIENTS`` tasks each start instances with
  ``WorkflowClient.start`` in a loop for ``SECONDS`` (the API's own call, without
  HTTP): starts/s.
- ``http``: ``ledgerflow server`` runs in a child process (uvicorn, one worker
  process, as a user runs it) on a fresh ledger of the same backend, and wrk (Debian's
  ``wrk``: a load generator in C, so the client's own cost stays out of the figure)
  keeps ``CLIENTS`` connections each POSTing ``/api/v1/workflows`` (keep-alive, an API
  key, a new id each) for ``SECONDS``: requests/s, and p50 / p99 latency from wrk's
  ``--latency`` report. Every answer must be 2xx; each instance must be in the ledger
  once. Without wrk the line says it was skipped. (httpx, tried first as the client,
  held the figure to ~700 requests/s even on ``/health``: the client, not the server.)
- ``ratio``: http / in_process (the issue's target: at least 0.5). The commit floor
  (bench/store.py) is measured beside them. CPU time per start (this process, every
  thread) and per request (the server process, from /proc) are printed too: they
  vary less than the rates on a machine the load generator shares.

Both start a workflow that nobody runs (no engine): the cost measured is the start's
append and the HTTP path around it, not the workflow. The server process and this
process share the machine's cores, as a load balancer and a server on one host would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
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


async def in_process(url: str, workflow: Any, seconds: float) -> tuple[float, float]:
    """Starts/s, and the process's CPU time (every thread) per start in µs."""
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

        began, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*(starter(i) for i in range(CLIENTS)))
        rate = count / (time.monotonic() - began)
        return rate, (time.process_time() - cpu) / count * 1e6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local body = '{"workflow":"bench.order","input":' .. counter .. ',"id":"http-' .. counter .. '"}'
  return wrk.format("POST", "/api/v1/workflows", {
    ["Content-Type"] = "application/json", ["Authorization"] = "Bearer %s"}, body)
end
"""


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) process ``pid`` has used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk_figures(output: str) -> dict[str, Any]:
    """requests/s, p50 and p99 (ms) and the count of answers other than 2xx, from
    wrk's report (``--latency``)."""

    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    if not (rate and p50 and p99 and total):
        raise RuntimeError(f"cannot read wrk's report: {output}")
    return {
        "requests_per_s": round(float(rate.group(1)), 1),
        "p50_ms": round(ms(p50.group(1)), 2),
        "p99_ms": round(ms(p99.group(1)), 2),
        "requests": int(total.group(1)),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


async def over_http(url: str, directory: Path, seconds: float, processes: int) -> dict[str, Any]:
    async with ledgerflow.WorkflowClient(url) as client:
        key = await ApiKeys(client.store).create("bench", Role.OPERATOR, "*", by="bench")
    script = directory / "start.lua"
    script.write_text(WRK_SCRIPT % key.secret)
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
            "--processes",
            str(processes),
        ],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
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
        cpu_before = _cpu_seconds(server.pid)
        wrk = await asyncio.create_subprocess_exec(
            "wrk",
            "-t1",
            f"-c{CLIENTS}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            base,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output, _ = await wrk.communicate()
        cpu_used = _cpu_seconds(server.pid) - cpu_before
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
    figures = _wrk_figures(output.decode())
    # The server's CPU time (every thread) per answered request: steadier than the
    # rate on a machine the load generator shares.
    figures["server_cpu_us_per_request"] = round(cpu_used / figures["requests"] * 1e6, 1)
    async with ledgerflow.WorkflowClient(url) as client:
        stored = 0
        after = None
        while page := await client.list_workflows(id_prefix="http-", after=after, limit=500):
            stored += len(page)
            after = page[-1].workflow_id
    figures["stored"] = stored
    # wrk counts the answers it read: the requests in flight when it stopped (at
    # most one a connection) are stored but not counted.
    figures["ok"] = figures["non_2xx"] == 0 and 0 <= stored - figures["requests"] <= CLIENTS
    return figures


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--processes", type=int, default=1, help="server processes (`--processes`)")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else SECONDS
    if shutil.which("wrk") is None:
        print(json.dumps({"bench": "api", "skipped": "wrk is missing: apt-get install wrk"}))
        return 0
    directory = Path(tempfile.mkdtemp(prefix="ledgerflow-api-bench-"))
    workflow = _load_app(directory)
    async with fresh_database(args.backend, "api_in") as (url, floor, settings):
        floor_rate = await floor.commits_per_s(FLOOR_SECONDS)
        engine_rate, engine_cpu_us = await in_process(url, workflow, seconds)
    async with fresh_database(args.backend, "api_http") as (url, _, _):
        http = await over_http(url, directory, seconds, args.processes)
    line = {
        "bench": "api",
        "backend": args.backend,
        "clients": CLIENTS,
        "server_processes": args.processes,
        "seconds": seconds,
        "floor_commits_per_s": round(floor_rate, 1),
        "in_process_starts_per_s": round(engine_rate, 1),
        "http": http,
        "in_process_cpu_us_per_start": round(engine_cpu_us, 1),
        "ratio_http_to_in_process": round(http["requests_per_s"] / engine_rate, 3),
        "in_process_to_floor": round(engine_rate / floor_rate, 3),
        "settings": settings,
    }
    print(json.dumps(line))
    return 0 if http["ok"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
