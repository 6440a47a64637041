"""The order example, as `make demo` runs it, on a fresh SQLite file."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "orders" / "demo.py"


def run_demo(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )


def statuses(output: str) -> dict[str, int]:
    """The demo's tally line: ``7 placed, 3 rejected, 2 compensated``."""
    found = re.search(r"^(\d+ \w+(?:, \d+ \w+)*)$", output, re.MULTILINE)
    assert found, output
    return {word: int(n) for n, word in (part.split() for part in found[1].split(", "))}


def test_order_demo_runs_and_the_ledger_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    demo = run_demo(url)
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    for status in ("placed", "rejected", "compensated"):
        assert status in out
    assert "auto-reject" in out  # the order nobody answered, after its three days
    assert "no decision within 3 days" in out
    assert "ErpUnavailable" in out
    assert "hash chains intact" in out
    # Act 3: the state-machine form, verified, refusing an event its state does not
    # accept, compensating when the ERP fails for good.
    act3 = out.split("act 3: the same process as a state machine")[1]
    assert "order-machine v1: sound" in act3
    assert "in state 'created' does not accept 'charge'; it accepts: 'approve', 'expire'" in act3
    assert re.search(r"sm-placed\s*│ placed\s*│ created -> approved -> reserved", act3)
    assert re.search(r"sm-refused\s*│ rejected", act3)
    assert re.search(r"sm-failing\s*│ compensated", act3)
    # The default seed is fixed: the same outcomes every run.
    tally = statuses(out)
    assert tally == {"placed": 7, "rejected": 3, "compensated": 2}
    # The orders read model, kept by a projection, says the same.
    assert re.search(r"read model order_view \(projection at position \d+\): "
                     r"2 compensated, 7 placed, 3 rejected", out)  # fmt: skip
    # The history shown is a compensated order's: refund, then release.
    refund = re.search(r"compensation_done\s*│\s*7 │ charge_card", out)
    release = re.search(r"compensation_done\s*│\s*8 │ reserve_stock", out)
    assert refund
    assert release
    assert refund.start() < release.start()

    # The simulated days end at the present: nothing is dated after it was written.
    with sqlite3.connect(tmp_path / "demo.db") as db:
        (latest,) = db.execute("SELECT max(recorded_at) FROM events").fetchone()
    assert latest <= time.time_ns() // 1_000

    # A second run appends new orders to the same ledger, and it still verifies.
    again = run_demo(url)
    assert again.returncode == 0, again.stderr
    assert "hash chains intact" in again.stdout
    assert statuses(again.stdout) == tally
    first = re.search(r"(\d+) events in (\d+) streams", out)
    second = re.search(r"(\d+) events in (\d+) streams", again.stdout)
    assert first
    assert second
    # New orders in new streams; the ERP's policy and breaker streams are shared (how
    # many calls the breaker refused depends on timing, so events are not counted).
    assert int(second[1]) > int(first[1])
    assert int(second[2]) == 2 * int(first[2]) - 2


def test_order_demo_without_erp_failures_places_every_approved_order(tmp_path: Path) -> None:
    demo = run_demo(f"sqlite:///{tmp_path / 'demo.db'}", "--erp-failure-rate", "0")
    assert demo.returncode == 0, demo.stderr
    assert statuses(demo.stdout) == {"placed": 9, "rejected": 3}
    act1, act2 = demo.stdout.split("act 2: the ERP goes down")
    assert "compensated" not in act1
    assert "hash chains intact" in act2
    assert "hash chains intact" in demo.stdout
