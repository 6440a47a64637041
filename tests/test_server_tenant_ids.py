"""A tenant's callers see every id in their own form, without the ``<tenant>/`` the
ledger holds: in what an instance waits for, in its history's events, in a state
machine's state, in its error, in the problems the API answers and in the web UI's
pages. An all-tenants caller sees the ledger's ids whole. Payloads are the user's:
never rewritten, whatever they hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.server import Role
from ledgerflow.server.ids import CallerIds

from ._api_app import Api, serve
from .conftest import backend_url


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    with serve(backend_url(request.param, tmp_path, request)) as running:
        yield running


def event(history: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e["data"] for e in history["items"] if e["type"] == kind)
    return found


def test_a_tenant_sees_its_parent_and_child_by_its_own_ids(api: Api) -> None:
    # A user's text holding the ledger's spelling of the child's id stays as it is.
    said = "acme/par.1 'acme/par.1'"
    started = api.post("/api/v1/workflows", json={"workflow": "tree", "input": said, "id": "par"})
    assert started.status_code == 201, started.text
    waits = api.until("/api/v1/workflows/par", lambda b: b["waiting_for"] is not None)
    assert waits["waiting_for"] == "child par.1"
    # The id as shown is the one that works.
    child = api.until("/api/v1/workflows/par.1", lambda b: bool(b["waiting_signals"]))
    assert child["parent_id"] == "par"
    assert api.get("/api/v1/workflows/acme%2Fpar.1").status_code == 404

    history = api.get("/api/v1/workflows/par/history").json()
    assert event(history, "wf.started")["input"] == said
    assert event(history, "wf.child_started")["child_id"] == "par.1"
    started_data = event(api.get("/api/v1/workflows/par.1/history").json(), "wf.started")
    assert started_data["parent_id"] == "par"
    assert started_data["tenant"] == "acme"

    # The whole tenant's operator sees the ledger's ids.
    whole = api.get("/api/v1/workflows/acme%2Fpar", tenant="*").json()
    assert whole["waiting_for"] == "child acme/par.1"
    history = api.get("/api/v1/workflows/acme%2Fpar/history", tenant="*").json()
    assert event(history, "wf.child_started")["child_id"] == "acme/par.1"
    history = api.get("/api/v1/workflows/acme%2Fpar.1/history", tenant="*").json()
    assert event(history, "wf.started")["parent_id"] == "acme/par"

    # The child fails: the parent's error names it as the caller does, and the
    # user's message in it is left as it was.
    sent = api.post("/api/v1/workflows/par.1/signals/go", json={"payload": False})
    assert sent.status_code == 202, sent.text
    failed = api.until("/api/v1/workflows/par", lambda b: b["status"] == "failed")
    told = f"child workflow 'par.1' ended failed: ValueError: {said} refused"
    assert failed["error"] == f"ChildWorkflowError: {told}"
    history = api.get("/api/v1/workflows/par/history").json()
    news = event(history, "wf.child_finished")
    assert (news["child_id"], news["message"]) == ("par.1", f"{said} refused")
    assert event(history, "wf.finished")["message"] == told
    whole = api.get("/api/v1/workflows/acme%2Fpar", tenant="*").json()
    assert whole["error"] == f"ChildWorkflowError: {told.replace('par.1', 'acme/par.1', 1)}"

    # The web UI shows what the API does.
    signed = api.http.post(
        "/ui/sign-in", data={"key": api.keys[("acme", Role.VIEWER)]}, follow_redirects=False
    )
    assert signed.status_code == 303, signed.text
    page = api.http.get("/ui/workflows/par").text
    assert "child workflow &#39;par.1&#39;" in page
    assert "acme/par" not in page.replace("acme/par.1 &#39;acme/par.1&#39;", "")
    page = api.http.get("/ui/workflows/par.1").text
    assert "acme/par" not in page.replace("acme/par.1 &#39;acme/par.1&#39;", "")
    assert '"parent_id": "par"' in page.replace("&#34;", '"')


def test_a_tenant_queries_a_state_machine_by_its_own_id(api: Api) -> None:
    started = api.post("/api/v1/workflows", json={"workflow": "doc", "id": "doc-1"})
    assert started.status_code == 201, started.text
    state = api.until("/api/v1/workflows/doc-1/query", lambda b: b["state"]["state"] == "draft")
    assert state["id"] == "doc-1"
    assert state["state"]["instance_id"] == "doc-1"
    whole = api.get("/api/v1/workflows/acme%2Fdoc-1/query", tenant="*").json()
    assert whole["state"]["instance_id"] == "acme/doc-1"
    # Refusals name it as the caller does.
    refused = api.post("/api/v1/workflows/doc-1/resume", json={"reason": "try"})
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"] == "cannot resume workflow 'doc-1': it is running, not stuck"
    refused = api.post("/api/v1/workflows/acme%2Fdoc-1/resume", json={"reason": "x"}, tenant="*")
    assert "workflow 'acme/doc-1'" in refused.json()["detail"]


def test_problems_name_the_instance_as_the_caller_does(api: Api) -> None:
    def detail(answer: Any, status: int) -> str:
        assert answer.status_code == status, answer.text
        text: str = answer.json()["detail"]
        assert "acme/" not in text, text
        return text

    assert api.post("/api/v1/workflows", json={"workflow": "approval", "input": "x", "id": "o-1"})
    api.until("/api/v1/workflows/o-1", lambda b: bool(b["waiting_signals"]))
    assert "'o-1'" in detail(
        api.post("/api/v1/workflows", json={"workflow": "approval", "input": "y", "id": "o-1"}), 409
    )
    assert "'o-1'" in detail(api.post("/api/v1/workflows/o-1/retry", json={"reason": "r"}), 409)
    ok = {"payload": {"approved": True, "approver": "ana"}, "id": "s-1"}
    assert api.post("/api/v1/workflows/o-1/signals/approval", json=ok).status_code == 202
    other = {**ok, "payload": {"approved": False, "approver": "ana"}}
    again = detail(api.post("/api/v1/workflows/o-1/signals/approval", json=other), 409)
    assert "to workflow 'o-1'" in again
    assert "(stream 'wf-o-1')" in again
    api.until("/api/v1/workflows/o-1", lambda b: b["status"] == "completed")
    assert detail(
        api.post("/api/v1/workflows/o-1/skip", json={"reason": "r", "result": "x"}), 409
    ).startswith("cannot skip workflow 'o-1'")
    assert detail(
        api.post("/api/v1/workflows/o-1/signals/approval", json={"payload": None}), 409
    ).startswith("cannot signal workflow 'o-1'")
    # The whole tenant's operator sees the ledger's id.
    whole = api.post("/api/v1/workflows/acme%2Fo-1/cancel", json={"reason": "r"}, tenant="*")
    assert whole.status_code == 409
    assert whole.json()["detail"].startswith("cannot cancel workflow 'acme/o-1'")


def test_only_the_callers_own_ids_are_shortened_and_only_where_ids_are() -> None:
    acme, everyone = CallerIds("acme/"), CallerIds(None)
    assert acme.id("acme/o-1") == "o-1"
    assert acme.id("acme-eu/o-1") is None  # another tenant's: never shortened
    assert everyone.id("acme/o-1") == "acme/o-1"

    # A grandchild's failure, told by its child and then by the parent: each id the
    # engine quotes is the caller's; the user's message is left as it was.
    user = "order 'acme/p.1' refused"
    nested = (
        "child workflow 'acme/p.1' ended failed: ChildWorkflowError: child workflow "
        f"'acme/p.1.1' ended failed: ValueError: {user}"
    )
    assert acme.message("ChildWorkflowError", nested) == (
        "child workflow 'p.1' ended failed: ChildWorkflowError: child workflow "
        f"'p.1.1' ended failed: ValueError: {user}"
    )
    assert acme.error(f"ChildWorkflowError: {nested}") == (
        f"ChildWorkflowError: {acme.message('ChildWorkflowError', nested)}"
    )
    assert everyone.message("ChildWorkflowError", nested) == nested
    assert acme.message("ValueError", "workflow 'acme/p' broke") == "workflow 'acme/p' broke"
    odd = "workflow 'acme-eu/p' diverged from its history at command 1: ..."
    assert acme.message("NonDeterminismError", odd) == odd

    # What it waits for: a child, and a parked step whose message (the user's) holds
    # what looks like one.
    parked = "operator: step 'x' failed 1 time(s): E: see; child acme/p.1 (retry, skip...)"
    said = f"child acme/p.1; {parked}"
    assert acme.waiting_for(said, ["acme/p.1"]) == f"child p.1; {parked}"
    assert acme.undo_failed(
        ["compensation 'x': E: child acme/p.1", "child acme/p.1: compensation_failed"],
        ["acme/p.1"],
    ) == ["compensation 'x': E: child acme/p.1", "child p.1: compensation_failed"]
