"""Events sent to one state-machine instance from several processes at once, while a
worker process runs it (SQLite and PostgreSQL): every event applies exactly once, one
at a time, each to the configuration it was checked against, none lost."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
from pathlib import Path

import pytest

import ledgerflow as lf
from ledgerflow.workflow.history import EventReceived, Transitioned

from ._engines import WAIT
from ._workers import CLI, child_env

SENDS = 12
"""Events each sender process sends."""
SENDERS = 3

COUNTERS = textwrap.dedent(
    f"""
    import ledgerflow as lf

    LIMIT = {SENDS * SENDERS}


    def count(call: lf.MachineCall) -> int:
        return call.data["n"] + 1


    COUNTER = lf.Machine("counter", data={{"n": range(LIMIT + 1)}}, initial_data={{"n": 0}})
    COUNTER.state("counting", initial=True)
    COUNTER.state("done", terminal=True)
    COUNTER.transition(
        "counting",
        "add",
        "counting",
        guard=lambda d, p: d["n"] < LIMIT,
        update=lambda d, p: {{"n": d["n"] + 1}},
        activity=count,
    )
    COUNTER.transition("counting", "stop", "done")
    """
)

SENDER = textwrap.dedent(
    """
    import asyncio, json, sys

    import ledgerflow as lf
    from counters import COUNTER


    async def main(db: str, sends: int, who: str) -> None:
        seen = []
        async with lf.WorkflowClient(db, workflows=[COUNTER], poll_interval=0.05) as client:
            for _ in range(sends):
                state = await client.execute("c", "add", actor=who, timeout=60)
                seen.append(state.data["n"])
        print(json.dumps(seen))


    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
    """
)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "counters.py").write_text(COUNTERS)
    (tmp_path / "sender.py").write_text(SENDER)
    return tmp_path


async def test_events_from_several_processes_apply_one_at_a_time(
    shared_url: str, app: Path
) -> None:
    worker = await asyncio.create_subprocess_exec(
        *CLI,
        "worker",
        "--app",
        "counters:COUNTER",
        "--db",
        shared_url,
        "--poll",
        "0.05",
        cwd=app,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        sys.path.insert(0, str(app))
        try:
            import counters  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(app))
        async with lf.WorkflowClient(shared_url, workflows=[counters.COUNTER]) as client:
            await client.start(counters.COUNTER, None, id="c")
            senders = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "sender.py",
                    shared_url,
                    str(SENDS),
                    f"sender-{i}",
                    cwd=app,
                    env=child_env(),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                for i in range(SENDERS)
            ]
            outputs = await asyncio.wait_for(
                asyncio.gather(*(s.communicate() for s in senders)), WAIT * 3
            )
            for sender, (_, err) in zip(senders, outputs, strict=True):
                assert sender.returncode == 0, err.decode()
            seen = [json.loads(out) for out, _ in outputs]
            # Each sender saw its own events applied, in its own order, and together
            # every count from 1 to the limit exactly once.
            for counts in seen:
                assert counts == sorted(counts)
            assert sorted(n for counts in seen for n in counts) == list(
                range(1, SENDS * SENDERS + 1)
            )
            history = [e.data for e in await client.history("c")]
            moves = [e for e in history if isinstance(e, Transitioned)]
            assert [t.data["n"] for t in moves] == list(range(SENDS * SENDERS + 1))
            received = [e for e in history if isinstance(e, EventReceived)]
            assert len(received) == SENDS * SENDERS
            assert {r.by for r in received} == {f"sender-{i}" for i in range(SENDERS)}
            final = await client.machine_state("c")
            assert final.results == {"count": SENDS * SENDERS}
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(worker.communicate(), WAIT)
        assert worker.returncode == 0, output.decode()
