"""The relay under kill -9 (SQLite and PostgreSQL, real NATS JetStream): killed at
random instants (between publishing a batch and recording its checkpoint among them)
and started again, it ends with every selected event in the broker exactly once, each
ledger stream's in order, and its checkpoint at the ledger's head.
``LEDGERFLOW_RELAY_CRASH_SEED`` replays the kill delays."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

import ledgerflow as lf

from . import _relay_crash_worker as w
from .conftest import backend_url

WORKER = Path(__file__).with_name("_relay_crash_worker.py")
SEED = int(os.environ.get("LEDGERFLOW_RELAY_CRASH_SEED", str(random.randrange(2**32))))
KILLS = 8
STREAMS = 20
EACH = 100
FINAL_TIMEOUT = 60.0


def _run(args: list[str], log: Path, timeout: float) -> int | None:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        return None if code == -signal.SIGKILL else code


@pytest.mark.parametrize(
    ("backend", "mode"),
    [("sqlite", "one-by-one"), ("postgres", "one-by-one"), ("sqlite", "pipelined")],
)
def test_a_killed_relay_publishes_everything_once_in_order(
    backend: str, mode: str, tmp_path: Path, request: pytest.FixtureRequest, nats_url: str
) -> None:
    url = backend_url(backend, tmp_path, request)
    tag = uuid.uuid4().hex[:10]
    stream, root = f"LFCRASH_{tag}", f"lfcrash{tag}"

    async def write() -> None:
        async with lf.open_store(url, registry=w.registry()) as store:
            for n in range(EACH):
                for s in range(STREAMS):
                    await store.append(f"order-{s}", [w.Placed(n), w.Noise(n)])

    asyncio.run(write())
    print(f"\nrelay crash on {backend} ({mode}), seed {SEED}")
    rng = random.Random(SEED)
    args = [url, nats_url, stream, root, mode]
    kills = 0
    for round_ in range(KILLS * 3):
        if kills >= KILLS:
            break
        delay = rng.uniform(0.4, 1.0)
        code = _run(args, tmp_path / f"run-{round_}.log", delay)
        if code not in (None, 0):
            pytest.fail(
                f"run {round_} exited {code}: {(tmp_path / f'run-{round_}.log').read_text()}"
            )
        if code == 0:
            break  # it finished before its kill: everything is published
        kills += 1
    print(f"  {kills} kills landed")
    assert kills >= KILLS // 2, "too few kills landed on a running relay to test anything"
    code = _run(args, tmp_path / "run-final.log", FINAL_TIMEOUT)
    assert code == 0, (tmp_path / "run-final.log").read_text()
    try:
        seen = asyncio.run(_read_all(nats_url, stream, root))
    finally:
        asyncio.run(_drop(nats_url, stream))
    ids = [m["id"] for m in seen]
    assert len(ids) == len(set(ids)) == STREAMS * EACH  # each once
    for s in range(STREAMS):
        assert [m["data"]["n"] for m in seen if m["stream"] == f"order-{s}"] == list(range(EACH))


async def _read_all(nats_url: str, stream: str, root: str) -> list[dict[str, Any]]:
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        sub = await js.pull_subscribe(f"{root}.>", durable="check", stream=stream)
        found: list[dict[str, Any]] = []
        while len(found) < info.state.messages:
            for msg in await sub.fetch(200, timeout=5):
                found.append(msgspec.json.decode(msg.data))
                await msg.ack()
        return found
    finally:
        await nc.close()


async def _drop(nats_url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(nats_url)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(stream)
    await nc.close()
