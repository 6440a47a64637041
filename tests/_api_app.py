"""Workflows and a harness for the HTTP API tests: a server (with an engine in it)
on SQLite or PostgreSQL, driven through Litestar's test client, and API keys of
every role for two tenants and for all of them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar.testing import TestClient

import ledgerflow as lf
from ledgerflow.server import ApiKeys, Role, ServerSettings, create_app

WAIT = 20.0
"""Guard against a hang, never an assertion about speed."""


class Approval(msgspec.Struct, forbid_unknown_fields=True):
    approved: bool
    approver: str


@lf.workflow(name="approval", version=1)
async def approval(ctx: lf.WorkflowContext, order: str) -> str:
    decision = await ctx.wait_for_signal("approval", Approval)
    assert decision is not None  # no timeout: a decision comes
    verdict = "approved" if decision.approved else "rejected"
    return f"{order}: {verdict} by {decision.approver}"


erp = {"healthy": False}


def create_po(order: str) -> str:
    if not erp["healthy"]:
        raise ConnectionError("ERP unreachable")
    return f"po for {order}"


@lf.workflow(name="purchase", version=1)
async def purchase(ctx: lf.WorkflowContext, order: str) -> str:
    return await ctx.step(create_po, order, policy="erp")


@lf.workflow(name="leaf", version=1)
async def leaf(ctx: lf.WorkflowContext, order: str) -> str:
    go = await ctx.wait_for_signal("go", bool)
    if not go:
        raise ValueError(f"{order} refused")
    return f"{order} done"


@lf.workflow(name="tree", version=1)
async def tree(ctx: lf.WorkflowContext, order: str) -> str:
    """A parent: its child (``<id>.1``) waits for a signal ``go``."""
    done: str = await ctx.child(leaf, order)
    return done


def doc_machine() -> lf.Machine:
    m = lf.Machine("doc")
    m.state("draft", initial=True)
    m.state("published", terminal=True)
    m.transition("draft", "publish", "published")
    return m


PARKS = lf.Policy(retry=lf.Retry(max_attempts=1), on_exhausted="park")
WORKFLOWS: list[Any] = [approval, purchase, leaf, tree, doc_machine()]
TENANTS = ("acme", "beta", "*")
ROLES = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)


async def _keys(url: str) -> dict[tuple[str, Role], str]:
    async with lf.Engine(url, workflows=WORKFLOWS, policies={"erp": PARKS}) as engine:
        keys = ApiKeys(engine.store)
        return {
            (tenant, role): (
                await keys.create(f"{role.label} of {tenant}", role, tenant, by="t")
            ).secret
            for tenant in TENANTS
            for role in ROLES
        }


@dataclass
class Api:
    """A running server and the keys to call it with."""

    http: TestClient[Any]
    keys: dict[tuple[str, Role], str]
    url: str
    tenant: str = "acme"
    role: Role = Role.OPERATOR
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, tenant: str | None = None, role: Role | None = None) -> dict[str, str]:
        key = self.keys[(tenant or self.tenant, role or self.role)]
        return {"Authorization": f"Bearer {key}"}

    def call(
        self,
        method: str,
        path: str,
        *,
        tenant: str | None = None,
        role: Role | None = None,
        **kw: Any,
    ) -> Any:
        headers = {**self.auth(tenant, role), **kw.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.call("POST", path, **kw)

    def until(self, path: str, check: Any, **kw: Any) -> Any:
        """GET ``path`` until ``check(json)`` holds; the last answer."""
        deadline = time.monotonic() + WAIT
        while True:
            answer = self.get(path, **kw)
            if answer.status_code == 200 and check(answer.json()):
                return answer.json()
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.02)


@contextmanager
def serve(url: str, settings: ServerSettings | None = None) -> Iterator[Api]:
    erp["healthy"] = False
    keys = asyncio.run(_keys(url))
    engine = lf.Engine(url, workflows=WORKFLOWS, policies={"erp": PARKS}, poll_interval=0.05)
    with TestClient(create_app(engine, settings)) as http:
        yield Api(http, keys, url)
