"""The HTTP API end to end on each backend: start, find, read, signal, act, with
the events recording who did it and why; bad input answered with problem details
naming the field, and nothing recorded."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import StoreReadOnlyError
from ledgerflow.server import Role, ServerSettings

from ._api_app import Api, erp, serve
from .conftest import backend_url

PROBLEM = "application/problem+json"


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    with serve(backend_url(request.param, tmp_path, request)) as running:
        yield running


def problem(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    assert "Traceback" not in answer.text
    assert 'File "' not in answer.text
    return body


def waiting(body: dict[str, Any]) -> bool:
    return bool(body["waiting_signals"])


def test_an_order_is_started_approved_and_read_over_http(api: Api) -> None:
    started = api.post(
        "/api/v1/workflows",
        json={"workflow": "approval", "input": "o-1", "id": "o-1", "reason": "customer order"},
    )
    assert started.status_code == 201, started.text
    assert started.json() == {"id": "o-1", "name": "approval", "version": 1, "status": "running"}

    described = api.until("/api/v1/workflows/o-1", waiting)
    (wait,) = described["waiting_signals"]
    assert wait["name"] == "approval"
    schema = wait["schema"]
    assert schema["$ref"] == "#/$defs/Approval"
    assert set(schema["$defs"]["Approval"]["properties"]) == {"approved", "approver"}
    assert described["waiting_for"] == "signal 'approval'"

    # A payload that does not fit the waited-for type: 422 naming the field,
    # and nothing recorded.
    before = api.get("/api/v1/workflows/o-1/history").json()["items"]
    refused = problem(
        api.post(
            "/api/v1/workflows/o-1/signals/approval",
            json={"payload": {"approved": "yes", "approver": "ana"}},
        ),
        422,
    )
    assert refused["errors"][0]["field"] == "body.payload"
    assert "approved" in refused["detail"]
    assert api.get("/api/v1/workflows/o-1/history").json()["items"] == before

    sent = api.post(
        "/api/v1/workflows/o-1/signals/approval",
        json={"payload": {"approved": True, "approver": "ana"}, "reason": "within budget"},
    )
    assert sent.status_code == 202, sent.text
    done = api.until("/api/v1/workflows/o-1", lambda b: b["status"] == "completed")
    assert done["result"] == "o-1: approved by ana"
    assert done["waiting_signals"] == []

    # History, paged: every event once, in order; who did what and why.
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = api.get(f"/api/v1/workflows/o-1/history?after={after}&limit=2").json()
        events += page["items"]
        if page["next"] is None:
            break
        after = page["next"]
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    first = events[0]
    assert first["type"] == "wf.started"
    assert first["data"]["tenant"] == "acme"
    ops_key = api.keys[("acme", Role.OPERATOR)].split("_")[1]
    # Started outside any trace (no traceparent header): none recorded. The signal
    # is recorded in its sender's span (the tests run with the OpenTelemetry SDK on).
    traced = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]")
    assert first["metadata"] == {
        "actor": f"key:{ops_key}",
        "reason": "customer order",
        "tenant": "acme",
    }
    signal = next(e for e in events if e["type"] == "wf.signal")
    assert traced.fullmatch(signal["metadata"].pop("traceparent"))
    assert signal["metadata"] == {"actor": f"key:{ops_key}", "reason": "within budget"}

    # Starting again with the same id and input is idempotent; another input is not.
    again = api.post(
        "/api/v1/workflows", json={"workflow": "approval", "input": "o-1", "id": "o-1"}
    )
    assert again.status_code == 200  # started before, the same way
    assert (
        problem(
            api.post("/api/v1/workflows", json={"workflow": "approval", "input": "x", "id": "o-1"}),
            409,
        )["title"]
        == "Workflow already started"
    )
    # A finished instance takes no more signals.
    assert (
        problem(api.post("/api/v1/workflows/o-1/signals/approval", json={"payload": None}), 409)[
            "title"
        ]
        == "Workflow finished"
    )


def test_listing_filters_and_pages(api: Api) -> None:
    for n in range(7):
        name = "approval" if n % 2 == 0 else "purchase"
        answer = api.post(
            "/api/v1/workflows", json={"workflow": name, "input": f"x{n}", "id": f"w-{n}"}
        )
        assert answer.status_code == 201
    api.until("/api/v1/workflows?status=needs_attention", lambda b: len(b["items"]) == 3)

    listed = api.get("/api/v1/workflows?name=approval&order=id").json()
    assert [i["id"] for i in listed["items"]] == ["w-0", "w-2", "w-4", "w-6"]
    newest = api.get("/api/v1/workflows").json()["items"]
    assert [i["id"] for i in newest] == [f"w-{n}" for n in reversed(range(7))]
    assert [i["id"] for i in api.get("/api/v1/workflows?text=W-3").json()["items"]] == ["w-3"]

    pages: list[str] = []
    after = None
    while True:
        query = "?limit=3" + (f"&after={after}" if after else "")
        page = api.get(f"/api/v1/workflows{query}").json()
        pages += [i["id"] for i in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert pages == [f"w-{n}" for n in reversed(range(7))]

    created = newest[3]["created_at"]
    older = api.get("/api/v1/workflows", params={"created_before": created}).json()["items"]
    assert [i["id"] for i in older] == ["w-2", "w-1", "w-0"]
    since = api.get("/api/v1/workflows", params={"created_from": created}).json()["items"]
    assert [i["id"] for i in since] == ["w-6", "w-5", "w-4", "w-3"]

    # Bad filters: 422 naming the parameter.
    for query, field in [
        ("limit=0", "query.limit"),
        ("limit=501", "query.limit"),
        ("status=sleeping", "query.status"),
        ("order=random", "query.order"),
        ("created_from=2026-01-01T00:00:00", "query.created_from"),
        ("created_from=yesterday", "query.created_from"),
        ("created_before=", "query.created_before"),
        (f"after={'x' * 300}", "query.after"),  # it named path.workflow_id
    ]:
        body = problem(api.get(f"/api/v1/workflows?{query}"), 422)
        assert body["errors"][0]["field"] == field, (query, body)


def test_operator_actions_record_who_and_why(api: Api) -> None:
    for n in (1, 2, 3):
        api.post(
            "/api/v1/workflows", json={"workflow": "purchase", "input": f"p{n}", "id": f"p-{n}"}
        )
    for n in (1, 2, 3):
        api.until(f"/api/v1/workflows/p-{n}", lambda b: b["status"] == "needs_attention")

    assert (
        problem(api.post("/api/v1/workflows/p-1/retry", json={}), 422)["errors"][0]["field"]
        == "body.reason"
    )
    assert problem(api.post("/api/v1/workflows/p-1/retry", json={"reason": ""}), 422)

    erp["healthy"] = True
    retried = api.post("/api/v1/workflows/p-1/retry", json={"reason": "ERP is back"})
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"id": "p-1", "action": "retry", "seq": 1}
    assert (
        api.until("/api/v1/workflows/p-1", lambda b: b["status"] == "completed")["result"]
        == "po for p1"
    )

    skipped = api.post(
        "/api/v1/workflows/p-2/skip", json={"reason": "made by hand", "result": "po 77"}
    )
    assert skipped.status_code == 200, skipped.text
    assert (
        api.until("/api/v1/workflows/p-2", lambda b: b["status"] == "completed")["result"]
        == "po 77"
    )

    refused = problem(
        api.post("/api/v1/workflows/p-3/skip", json={"reason": "wrong type", "result": 5}), 422
    )
    assert refused["errors"][0]["field"] == "body.result"
    assert "return type" in refused["detail"]

    given_up = api.post("/api/v1/workflows/p-3/compensate", json={"reason": "order withdrawn"})
    assert given_up.status_code == 200
    assert api.until("/api/v1/workflows/p-3", lambda b: b["status"] == "failed")

    history = api.get("/api/v1/workflows/p-2/history").json()["items"]
    action = next(e for e in history if e["metadata"].get("reason", "").startswith("skip"))
    assert action["metadata"]["reason"] == "skip: made by hand"
    assert action["metadata"]["actor"].startswith("key:")

    # Nothing to act on now: 409, and a resume of an instance that is not stuck too.
    assert problem(api.post("/api/v1/workflows/p-1/retry", json={"reason": "again"}), 409)
    assert problem(api.post("/api/v1/workflows/p-1/resume", json={"reason": "x"}), 409)


def test_cancel_and_query(api: Api) -> None:
    api.post("/api/v1/workflows", json={"workflow": "approval", "input": "c", "id": "c-1"})
    api.until("/api/v1/workflows/c-1", waiting)
    assert api.get("/api/v1/workflows/c-1/query").json() == {"id": "c-1", "state": None}
    assert problem(api.post("/api/v1/workflows/c-1/cancel", json={}), 422)
    cancelled = api.post("/api/v1/workflows/c-1/cancel", json={"reason": "customer withdrew"})
    assert cancelled.status_code == 202
    assert api.until("/api/v1/workflows/c-1", lambda b: b["status"] == "cancelled")
    assert problem(api.post("/api/v1/workflows/c-1/cancel", json={"reason": "again"}), 409)


def test_ids_with_slashes_travel_encoded(api: Api) -> None:
    started = api.post(
        "/api/v1/workflows", json={"workflow": "approval", "input": "s", "id": "2026/12/o-9"}
    )
    assert started.json()["id"] == "2026/12/o-9"
    described = api.until("/api/v1/workflows/2026%2F12%2Fo-9", waiting)
    assert described["id"] == "2026/12/o-9"
    everything = api.get("/api/v1/workflows", tenant="*", role=Role.VIEWER).json()["items"]
    assert [i["id"] for i in everything] == ["acme/2026/12/o-9"]
    assert api.get("/api/v1/workflows/acme%2F2026%2F12%2Fo-9", tenant="*").status_code == 200
    assert problem(api.get("/api/v1/workflows/a%00b"), 400)


def test_bad_requests_are_problems_and_change_nothing(api: Api) -> None:
    cases = [
        (api.post("/api/v1/workflows", json={"workflow": "nope"}), 422, "body.workflow"),
        (
            api.post("/api/v1/workflows", json={"workflow": "approval", "input": 5}),
            422,
            "body.input",
        ),
        (
            api.post("/api/v1/workflows", json={"workflow": "approval", "input": "x", "color": 1}),
            422,
            "body.color",
        ),
        (api.post("/api/v1/workflows", json={"input": "x"}), 422, "body.workflow"),
        (api.post("/api/v1/workflows", json={"workflow": "approval", "id": ""}), 422, "body.id"),
        (api.post("/api/v1/workflows", json=[1, 2]), 422, "body"),
    ]
    for answer, status, field in cases:
        body = problem(answer, status)
        assert body["errors"][0]["field"].startswith(field), body

    malformed = api.post(
        "/api/v1/workflows", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert malformed.status_code in (400, 422)
    assert malformed.headers["content-type"].startswith(PROBLEM)
    huge = api.post("/api/v1/workflows", json={"workflow": "approval", "input": "x" * (1 << 21)})
    problem(huge, 413)
    problem(api.get("/api/v1/workflows/nobody"), 404)
    problem(api.get("/api/v1/nowhere"), 404)
    problem(api.call("DELETE", "/api/v1/workflows"), 405)
    problem(api.call("PUT", "/api/v1/workflows/x/cancel", json={}), 405)
    assert api.get("/api/v1/workflows", tenant="*", role=Role.ADMIN).json()["items"] == []


def test_a_payload_nested_too_deeply_is_422_not_a_defect(api: Api) -> None:
    """Nested 400-999 levels (JSON decoders take 1,000), a signal's payload made the
    server answer 500 (a RecursionError checking it against the waited-for type)."""
    started = api.post(
        "/api/v1/workflows", json={"workflow": "approval", "input": "o-1", "id": "o-1"}
    )
    assert started.status_code == 201, started.text
    api.until("/api/v1/workflows/o-1", waiting)
    for depth in (150, 500, 900):
        body = ('{"payload":' + "[" * depth + "]" * depth + "}").encode()
        refused = problem(
            api.post(
                "/api/v1/workflows/o-1/signals/approval",
                content=body,
                headers={"content-type": "application/json"},
            ),
            422,
        )
        assert "nested deeper than 100 levels" in refused["detail"], refused
        body = (
            '{"workflow":"approval","input":' + "[" * depth + "]" * depth + ',"id":"o-2"}'
        ).encode()
        refused = problem(
            api.post(
                "/api/v1/workflows", content=body, headers={"content-type": "application/json"}
            ),
            422,
        )
        assert "nested deeper than 100 levels" in refused["detail"], refused
    assert [e["type"] for e in api.get("/api/v1/workflows/o-1/history").json()["items"]].count(
        "wf.signal_sent"
    ) == 0


def test_every_get_route_answers_head_and_options_needs_no_admin(api: Api) -> None:
    """HEAD was 405 on every route (/health included, which probes ask so), and the
    framework's OPTIONS answer needed the admin role."""
    for path in ("/health", "/ready"):
        got, head = api.http.get(path), api.http.head(path)
        assert head.status_code == 200, head.text
        assert head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"]
    assert api.call("HEAD", "/api/v1/workflows").status_code == 200
    assert api.http.head("/api/v1/workflows").status_code == 401  # still needs a key
    assert api.call("HEAD", "/api/v1/workflows/nobody").status_code == 404
    options = api.call("OPTIONS", "/api/v1/workflows", role=Role.VIEWER)
    assert options.status_code == 204, options.text
    assert "GET" in options.headers["allow"]


def test_a_history_page_is_bounded_in_bytes_too(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """500 events of up to 1 MiB each made one page (and one UI page) of hundreds of
    MB: a page ends once its events' data pass PAGE_BYTES, and ``next`` goes on."""
    from ledgerflow.server import service

    monkeypatch.setattr(service, "PAGE_BYTES", 300)
    api.post("/api/v1/workflows", json={"workflow": "approval", "input": "o-1", "id": "o-1"})
    api.until("/api/v1/workflows/o-1", waiting)
    for n in range(4):
        sent = api.post("/api/v1/workflows/o-1/signals/note", json={"payload": "x" * 200 + str(n)})
        assert sent.status_code == 202, sent.text
    versions: list[int] = []
    pages = 0
    after = 0
    while True:
        page = api.get(f"/api/v1/workflows/o-1/history?after={after}&limit=100").json()
        pages += 1
        versions += [item["version"] for item in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert versions == list(range(1, len(versions) + 1))
    assert len(versions) >= 6
    assert pages >= 3  # cut by size, not by the 100 asked for


def test_health_readiness_and_the_checked_in_spec(api: Api) -> None:
    assert api.http.get("/health").json()["status"] == "ok"
    assert api.http.get("/ready").json()["status"] == "ready"
    served = api.http.get("/openapi.json").json()
    assert served["openapi"].startswith("3.1")
    # Bodies with a field the server does not know are refused: the document says so.
    bodies = served["components"]["schemas"]
    for body in ("StartWorkflow", "SendSignal", "Act", "Skip", "WithReason", "CreateKey"):
        assert bodies[body]["additionalProperties"] is False, body
    assert "pattern" in bodies["CreateKey"]["properties"]["tenant"]
    checked_in = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
    import json

    assert served == json.loads(checked_in.read_text()), (
        "docs/openapi.json differs from the served spec: run `make openapi`"
    )


def test_a_key_over_its_rate_is_told_when_to_come_back(tmp_path: Path) -> None:
    with serve(f"sqlite:///{tmp_path / 'l.db'}", ServerSettings(rate=0.5, burst=3)) as api:
        answers = [api.get("/api/v1/workflows") for _ in range(4)]
        assert [a.status_code for a in answers[:3]] == [200, 200, 200]
        limited = problem(answers[3], 429)
        assert int(answers[3].headers["retry-after"]) >= 1
        assert "retry in" in limited["detail"]
        # Another key has its own bucket.
        assert api.get("/api/v1/workflows", role=Role.VIEWER).status_code == 200


def test_a_signals_id_is_per_instance_and_a_reuse_for_another_signal_is_409(api: Api) -> None:
    """The id was global: the same message id sent to two instances (here of two
    tenants) answered the second with a 500, and so did a reuse with another payload."""
    decision = {"approved": True, "approver": "ana"}
    for tenant in ("acme", "beta"):
        started = api.post(
            "/api/v1/workflows",
            json={"workflow": "approval", "input": "o-9", "id": "o-9"},
            tenant=tenant,
        )
        assert started.status_code == 201, started.text
        for _ in range(2):  # delivered twice: recorded once
            sent = api.post(
                "/api/v1/workflows/o-9/signals/approval",
                json={"payload": decision, "id": "msg-1"},
                tenant=tenant,
            )
            assert sent.status_code == 202, sent.text
        api.until("/api/v1/workflows/o-9", lambda b: b["status"] == "completed", tenant=tenant)
        history = api.get("/api/v1/workflows/o-9/history", tenant=tenant).json()["items"]
        assert [e["type"] for e in history].count("wf.signal") == 1
        # Delivered again after it took the signal and ended: still the same send.
        again = api.post(
            "/api/v1/workflows/o-9/signals/approval",
            json={"payload": decision, "id": "msg-1"},
            tenant=tenant,
        )
        assert again.status_code == 202, again.text
    other = {"payload": {"approved": False, "approver": "bo"}, "id": "msg-1"}
    assert problem(api.post("/api/v1/workflows/o-9/signals/approval", json=other), 409)[
        "title"
    ] == ("Id already used")
    fresh = {"payload": decision, "id": "msg-new"}
    assert problem(api.post("/api/v1/workflows/o-9/signals/approval", json=fresh), 409)[
        "title"
    ] == ("Workflow finished")
    api.post("/api/v1/workflows", json={"workflow": "approval", "input": "o-10", "id": "o-10"})
    note = api.post("/api/v1/workflows/o-10/signals/note", json={"payload": 1, "id": "msg-2"})
    assert note.status_code == 202, note.text
    reused = problem(
        api.post("/api/v1/workflows/o-10/signals/note", json={"payload": 2, "id": "msg-2"}),
        409,
    )
    assert reused["title"] == "Id already used"
    # Named as the caller names it (the ledger's 'acme/o-10' is no id of acme's).
    assert (
        "the id msg-2 was sent to workflow 'o-10' before with another signal" in (reused["detail"])
    )
    assert "acme/" not in reused["detail"]


def test_readiness_answers_503_in_its_time_whatever_the_store_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check was awaited until its cancellation ended, and a query cancelled on
    a dead connection asks the server to cancel it too, over a new connection that
    waits out its connect timeout: 503 came after 12 s, not 2."""
    from ledgerflow.store.sqlite import SQLiteEventStore

    cleaned_up = threading.Event()

    async def stuck(self: SQLiteEventStore) -> None:
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            await asyncio.sleep(3)  # a cancel request that takes its time
            cleaned_up.set()
            raise

    with serve(f"sqlite:///{tmp_path / 'ready.db'}") as api:
        monkeypatch.setattr(SQLiteEventStore, "check_ready", stuck)
        answer = api.http.get("/ready")
        assert answer.status_code == 503, answer.text
        assert answer.json()["detail"] == "the store did not answer within 2 s"
        assert not cleaned_up.is_set()  # answered without waiting for it


def test_an_id_over_the_ledgers_limit_is_refused_as_the_id(api: Api) -> None:
    """The spec said ids of up to 400 characters; the ledger takes 252 (less a
    tenant's prefix), and a longer one was refused as a fault of body.input."""
    spec = api.http.get("/openapi.json").json()
    assert spec["components"]["schemas"]["StartWorkflow"]["properties"]["id"]["maxLength"] == 252
    for given, room in ((300, 252), (250, 247)):  # the key's tenant is acme
        answer = api.post(
            "/api/v1/workflows", json={"workflow": "approval", "input": "x", "id": "i" * given}
        )
        body = problem(answer, 422)
        assert body["errors"][0]["field"] == "body.id", body
        if given <= 252:
            assert f"at most {room}" in body["errors"][0]["message"]
    fits = api.post(
        "/api/v1/workflows", json={"workflow": "approval", "input": "x", "id": "i" * 247}
    )
    assert fits.status_code == 201, fits.text
    problem(api.get("/api/v1/workflows/" + "i" * 253), 422)


def test_a_signal_name_with_a_slash_travels_encoded(api: Api) -> None:
    api.post("/api/v1/workflows", json={"workflow": "approval", "input": "s", "id": "sl-1"})
    api.until("/api/v1/workflows/sl-1", waiting)
    sent = api.post("/api/v1/workflows/sl-1/signals/erp%2Fdone", json={"payload": None})
    assert sent.status_code == 202, sent.text
    history = api.get("/api/v1/workflows/sl-1/history").json()["items"]
    assert any(e["data"].get("name") == "erp/done" for e in history if e["type"] == "wf.signal")


def test_a_time_filter_out_of_range_is_told_in_the_callers_terms(api: Api) -> None:
    answer = api.get("/api/v1/workflows?created_from=2026-01-01T00:00:00%2B99:00")
    body = problem(answer, 422)
    message = body["errors"][0]["message"]
    assert "offset within" in message
    assert "timedelta" not in message


def test_readiness_is_503_when_the_store_takes_no_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/ready asked only for the database's clock: a PostgreSQL server demoted to a
    standby (or made read-only) answered it, and the load balancer kept sending
    requests whose writes all failed. It asks ``check_ready`` now (its PostgreSQL
    query is tested in test_read_only.py)."""
    from ledgerflow.store.sqlite import SQLiteEventStore

    async def standby(self: SQLiteEventStore) -> None:
        raise StoreReadOnlyError("postgres@db.internal:5432/orders", "a standby")

    with serve(f"sqlite:///{tmp_path / 'ready.db'}") as api:
        assert api.http.get("/ready").status_code == 200
        monkeypatch.setattr(SQLiteEventStore, "check_ready", standby)
        answer = problem(api.http.get("/ready"), 503)
        assert answer["title"] == "Store read-only", answer
        assert "standby" in answer["detail"]
        # Anyone may ask: no server, user or database named (the log has it).
        assert "db.internal" not in answer["detail"]
