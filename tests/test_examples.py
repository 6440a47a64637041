"""The order example, as `make demo` runs it, on a fresh SQLite file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_order_demo_runs_and_the_ledger_verifies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    demo = subprocess.run(
        [sys.executable, str(ROOT / "examples/orders/demo.py"), url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert "approved" in demo.stdout
    assert "rejected" in demo.stdout
    assert "hash chains intact" in demo.stdout
    # A second run appends to the same ledger and still verifies.
    again = subprocess.run(
        [sys.executable, str(ROOT / "examples/orders/demo.py"), url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "32 events in 16 streams" in again.stdout
