"""A PostgreSQL server that vanishes without a word (its address leads nowhere: a
failover that moved the name, a cut network path, a host powered off) sends no TCP
reset. Before DEAD_PEER, a store's call on such a connection waited for the kernel:
two hours for an answer, ~15 minutes for a write. These tests check that every
connection carries the dead-peer settings, and, on a real network path cut inside a
network namespace, that a call fails with ``StoreUnavailableError`` while the path is
down and the store connects again once it is back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ledgerflow
from ledgerflow import NewEvent, StoreUnavailableError
from ledgerflow.store import _postgres_conn
from ledgerflow.store.postgres import PostgresEventStore

from .conftest import pg_url

_EXPECTED = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


async def test_every_connection_of_a_store_carries_the_dead_peer_settings(pg_schema: str) -> None:
    async with ledgerflow.open_store(pg_url(pg_schema)) as store:
        assert isinstance(store, PostgresEventStore)
        await store.append("s", [NewEvent("Tick", {})])
        writer = store._writer_conn
        assert writer is not None
        assert _EXPECTED.items() <= writer.info.get_parameters().items()
        assert store._pool is not None
        async with store._pool.connection() as reader:
            assert _EXPECTED.items() <= reader.info.get_parameters().items()
        listener = await store._connect()  # the LISTEN connection's way in
        try:
            assert _EXPECTED.items() <= listener.info.get_parameters().items()
        finally:
            await listener.close()


async def test_a_urls_own_dead_peer_settings_win(pg_schema: str) -> None:
    async with ledgerflow.open_store(pg_url(pg_schema) + "&keepalives_idle=60") as store:
        await store.append("s", [NewEvent("Tick", {})])
        assert isinstance(store, PostgresEventStore)
        assert store._writer_conn is not None
        given = store._writer_conn.info.get_parameters()
        assert given["keepalives_idle"] == "60"
        assert given["tcp_user_timeout"] == "30000"


# -- a real path cut ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Path:
    url: str
    link: str  # our end of the veth pair: down cuts the path, up restores it

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", self.link, "down"], check=True)

    def restore(self) -> None:
        subprocess.run(["ip", "link", "set", self.link, "up"], check=True)


def _initdb() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1] if found else None


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "cutting a network path needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("runuser") is None:
        return "cutting a network path needs iproute2's ip and runuser"
    if _initdb() is None:
        return "a private PostgreSQL server needs initdb (/usr/lib/postgresql/*/bin)"
    probe = f"lfprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"network namespaces are not available here: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cut_path() -> Iterator[_Path]:
    """A private PostgreSQL server inside a network namespace of its own, reached
    from here through a veth pair whose end here can be taken down."""
    problem = _why_not()
    if problem is not None:
        pytest.skip(problem)
    initdb = _initdb()
    assert initdb is not None
    tag = f"lfdp{os.getpid() % 100000}"
    ns, here, there = tag, f"{tag}a", f"{tag}b"
    subnet = f"10.213.{os.getpid() % 250}"
    data = Path(tempfile.mkdtemp(prefix="lf-dead-path-"))
    port = _free_port()

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        run("ip", "link", "set", there, "netns", ns)
        run("ip", "addr", "add", f"{subnet}.1/24", "dev", here)
        run("ip", "link", "set", here, "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/24", "dev", there)
        run("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        shutil.chown(data, "postgres")
        cluster = data / "cluster"
        run("runuser", "-u", "postgres", "--", str(initdb), "-D", str(cluster), "-A", "trust")
        with (cluster / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {subnet}.0/24 trust\n")
        options = f"-p {port} -c listen_addresses={subnet}.2 -k {data}"
        pg_ctl = str(initdb.parent / "pg_ctl")
        start = ["runuser", "-u", "postgres", "--", pg_ctl, "-D", str(cluster), "-w"]
        run("ip", "netns", "exec", ns, *start, "-o", options, "-l", str(data / "log"), "start")
        yield _Path(f"postgresql://postgres@{subnet}.2:{port}/postgres?schema=lf_dead", here)
    finally:
        subprocess.run(["ip", "link", "set", here, "up"], capture_output=True)
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(initdb.parent / "pg_ctl"),
                "-D",
                str(data / "cluster"),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


_DOWN_S = 20.0
"""How long the path stays cut: far longer than the shortened settings below need to
notice (about 2 s), far shorter than the kernel's own retransmissions would take."""


async def test_a_call_on_a_cut_path_fails_and_the_store_reconnects_when_it_is_back(
    cut_path: _Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The defaults (the test above) notice within 25-40 s; the same mechanism, sooner.
    for key, value in {
        "keepalives_idle": "1",
        "keepalives_interval": "1",
        "keepalives_count": "2",
        "tcp_user_timeout": "2000",
    }.items():
        monkeypatch.setitem(_postgres_conn.CONNECTION_DEFAULTS, key, value)
    async with ledgerflow.open_store(cut_path.url) as store:
        await store.append("before", [NewEvent("Tick", {"n": 1})])
        assert [e.data for e in await store.read_stream("before")] == [{"n": 1}]
        cut_path.cut()
        restored = asyncio.get_running_loop().call_later(_DOWN_S, cut_path.restore)
        try:
            began = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await store.append("during", [NewEvent("Tick", {"n": 2})])
            # It failed while the path was still down: it did not wait for it.
            assert time.monotonic() - began < _DOWN_S - 5
            with pytest.raises(StoreUnavailableError):
                await store.read_stream("before")
            assert time.monotonic() - began < _DOWN_S - 2
        finally:
            restored.cancel()
            cut_path.restore()
        # The path is back: both the writer and the readers connect afresh.
        deadline = time.monotonic() + 30
        while True:
            try:
                await store.append("after", [NewEvent("Tick", {"n": 3})])
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        assert [e.data for e in await store.read_stream("after")] == [{"n": 3}]
        assert [e.data for e in await store.read_stream("before")] == [{"n": 1}]
