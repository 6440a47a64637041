"""How fast a state-machine definition is verified: a machine with about 100,000
reachable configurations, explored in full.

    python bench/verify.py            # prints one JSON line
    python bench/verify.py --quick    # about 10,000 configurations

The machine: an order process whose data are a stock level (0..N-1), an amount class,
an approval count and a retry counter, so that the configurations are the product of
those domains over its states. Reports the configurations explored, seconds,
configurations per second, the transitions that fired and peak memory (tracemalloc,
which slows the run: measured in a second run), and the findings (it is sound: none
expected). No ratio to a floor: no database is involved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from typing import Any

from ledgerflow.statemachine import Machine, eventually, verify

TARGET_CONFIGURATIONS = 100_000


def machine(stock: int) -> Machine:
    m = Machine(
        "bench_order",
        data={
            "stock": range(stock),
            "amount": ["small", "large"],
            "approvals": range(3),
            "tries": range(4),
        },
        initial_data={"approvals": 0, "tries": 0},
    )
    for name in ("created", "pending", "approved", "reserved", "charged"):
        m.state(name, initial=name == "created")
    for name in ("placed", "rejected", "failed"):
        m.state(name, terminal=True)
    m.transition("created", "submit", "pending")
    m.transition(
        "pending",
        "approve",
        "pending",
        guard=lambda d, p: d["amount"] == "large" and d["approvals"] < 1,
        update=lambda d, p: {**d, "approvals": d["approvals"] + 1},
    )
    m.transition(
        "pending",
        "approve",
        "approved",
        guard=lambda d, p: d["amount"] == "small" or d["approvals"] >= 1,
        update=lambda d, p: {**d, "approvals": min(2, d["approvals"] + 1)},
    )
    m.transition("pending", "reject", "rejected")
    m.transition(
        "approved",
        "reserve",
        "reserved",
        guard=lambda d, p: d["stock"] > 0,
        update=lambda d, p: {**d, "stock": d["stock"] - 1},
    )
    m.transition("approved", "out_of_stock", "failed", guard=lambda d, p: d["stock"] == 0)
    m.transition(
        "reserved",
        "charge_failed",
        "reserved",
        guard=lambda d, p: d["tries"] < 3,
        update=lambda d, p: {**d, "tries": d["tries"] + 1},
    )
    m.transition("reserved", "charge", "charged")
    m.transition("reserved", "give_up", "failed", guard=lambda d, p: d["tries"] == 3)
    m.transition("charged", "place", "placed")
    m.property("ends", eventually(lambda s, d: m.states[s].terminal))
    return m


def run(stock: int) -> dict[str, Any]:
    m = machine(stock)
    began = time.perf_counter()
    report = verify(m, max_configurations=10 * TARGET_CONFIGURATIONS)
    seconds = time.perf_counter() - began
    tracemalloc.start()
    verify(machine(stock), max_configurations=10 * TARGET_CONFIGURATIONS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "benchmark": "verify",
        "configurations": report.configurations,
        "transitions_fired": report.transitions_fired,
        "seconds": round(seconds, 2),
        "configurations_per_s": round(report.configurations / seconds),
        "peak_mib": round(peak / 2**20, 1),
        "findings": [str(f) for f in report.findings],
        "bounded": report.bounded,
        "notes": list(report.notes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    # Per stock level: 8 states x 2 amounts x 3 approvals x 4 tries (not all reachable).
    stock = 280 if args.quick else 2_800
    print(json.dumps(run(stock)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
