"""A PostgreSQL outage as a store sees it: how long a call waits before it hears
``StoreUnavailableError``, and how soon after the database is back a call succeeds.

    python bench/db_outage.py [--down 40]

A TCP proxy in this process stands between the store and PostgreSQL. The store opens
through it and appends once; then the proxy goes down for ``--down`` seconds (every
connection cut, new ones refused) while a read is tried every 0.5 s; then it comes
back and reads are tried every 0.1 s until one succeeds. Prints one JSON line:
``longest_read_while_down_s`` (the longest a read made during the outage took: each
fails after at most the pool's wait for a connection, or gets through once the
database is back) and ``first_read_after_s`` (from the proxy's return to the first
read that succeeded). Both are bounded by the store's settings, not by the machine
(see bench/README.md). Uses a fresh schema ``lf_bench_outage_<random>``, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from urllib.parse import urlsplit

import ledgerflow as lf
from store import PG_URL, note, pg_problem

READ_EVERY_DOWN_S = 0.5
READ_EVERY_UP_S = 0.1
GIVE_UP_S = 120.0


class Proxy:
    """Forwards TCP connections to PostgreSQL while up; cuts them all when taken
    down, and refuses new ones until brought up again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self._open: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def down(self) -> None:
        self.up = False
        for writer in self._open:
            writer.close()
        self._open.clear()

    async def close(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Their sockets are closed: each ends at its next read.
        await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._open += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def run(down_s: float) -> dict[str, object]:
    import psycopg

    target = urlsplit(PG_URL)
    proxy = Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    port = await proxy.start()
    schema = f"lf_bench_outage_{uuid.uuid4().hex[:12]}"
    netloc = f"{target.username or 'postgres'}@127.0.0.1:{port}"
    url = target._replace(netloc=netloc).geturl() + f"?schema={schema}"
    try:
        async with lf.open_store(url) as store:
            await store.append("s", [lf.NewEvent("noted", {})])
            note(f"proxy down for {down_s:.0f} s")
            proxy.down()
            began = time.monotonic()
            waits: list[float] = []
            while time.monotonic() - began < down_s:
                asked = time.monotonic()
                with contextlib.suppress(lf.StoreUnavailableError):
                    await store.read_stream("s")
                waits.append(time.monotonic() - asked)
                await asyncio.sleep(READ_EVERY_DOWN_S)
            proxy.up = True
            back = time.monotonic()
            note("proxy up")
            while time.monotonic() - back < GIVE_UP_S:
                try:
                    await store.read_stream("s")
                    break
                except lf.StoreUnavailableError:
                    await asyncio.sleep(READ_EVERY_UP_S)
            recovered = time.monotonic() - back
    finally:
        await proxy.close()
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return {
        "bench": "outage",
        "backend": "postgres",
        "down_s": down_s,
        "longest_read_while_down_s": round(max(waits), 2),
        "first_read_after_s": round(recovered, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--down", type=float, default=40.0, help="seconds the proxy is down")
    args = parser.parse_args()
    problem = pg_problem()
    if problem is not None:
        print(json.dumps({"bench": "outage", "skipped": problem}))
        return
    # The pool's reconnection warnings are what the outage should cause: not shown.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    print(json.dumps(asyncio.run(run(args.down))))


if __name__ == "__main__":
    main()
