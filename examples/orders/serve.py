"""The order example behind the HTTP API and web UI (`make demo` runs it after the
batch): an engine runs the order saga in the server's process, a few orders wait
for an approver, and an operator key is printed once to sign in with.

    python examples/orders/serve.py sqlite:///ledgerflow.db [--port 8000] [--orders 3]

Open the printed URL, sign in with the key, pick an order that waits for approval,
and approve or reject it in the form; the order then runs its steps and completes.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from uuid import uuid4

import uvicorn
from erp import CATALOG, FakeErp
from order import registry
from order_machine import ORDER_MACHINE
from order_workflow import ERP_POLICY, OrderInput, Systems, order_workflow, use_systems
from read_model import ORDER_VIEW

import ledgerflow
from ledgerflow.server import ApiKeys, Role, create_app

CUSTOMERS = ["acme", "globex", "initech", "umbrella"]


def engine(url: str) -> ledgerflow.Engine:
    """The order saga's engine on ``url``, with a healthy fake ERP."""
    built = ledgerflow.Engine(
        url,
        # The state-machine form too: an engine claims whatever is due in the ledger,
        # and the demo's batch may have left machine instances behind.
        workflows=[order_workflow, ORDER_MACHINE],
        registry=registry,
        policies={"erp": ERP_POLICY},
        projections=[ORDER_VIEW],
        poll_interval=0.2,
    )
    use_systems(Systems.on(built.store, erp=FakeErp(0.0, 1), stock=dict.fromkeys(CATALOG, 1_000)))
    return built


async def prepare(url: str, orders: int, seed: int = 1) -> tuple[str, list[str]]:
    """Start ``orders`` orders (they wait for approval) and make an operator key
    for every tenant-less instance: the key and the orders' ids."""
    rng = random.Random(seed)
    run = uuid4().hex[:6]
    async with engine(url) as running:
        ids = []
        for n in range(1, orders + 1):
            order = OrderInput(
                order_id=f"web-{run}-{n}",
                customer=rng.choice(CUSTOMERS),
                sku=rng.choice(sorted(CATALOG)),
                quantity=rng.randint(1, 5),
                amount_cents=rng.randint(2_000, 90_000),
            )
            await running.start(order_workflow, order, id=order.order_id, reason="demo order")
            ids.append(order.order_id)
        key = await ApiKeys(running.store).create(
            "demo operator", Role.OPERATOR, "*", by="examples/orders/serve.py"
        )
    return key.secret, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", nargs="?", default="sqlite:///ledgerflow.db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--orders", type=int, default=3)
    args = parser.parse_args(argv)
    secret, ids = asyncio.run(prepare(args.url, args.orders))
    base = f"http://{args.host}:{args.port}"
    print(f"\nThe web UI: {base}/ui   (the API: {base}/api/v1, its document: {base}/openapi.json)")
    print(f"Sign in with this operator key (shown once): {secret}")
    print(f"Orders waiting for approval: {', '.join(ids)}")
    print("Ctrl-C stops the server.\n", flush=True)
    uvicorn.run(create_app(engine(args.url)), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
