"""Who may do what over HTTP: every route against every role, tenants kept apart
(guessed ids included), API keys revoked, and JWTs from a key set checked."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ledgerflow.server import Role, ServerSettings, TokenVerifier

from ._api_app import Api, serve

# Every route, with a body good enough to pass validation, and the least role.
ROUTES: list[tuple[str, str, dict[str, Any] | None, Role]] = [
    ("GET", "/api/v1/workflows", None, Role.VIEWER),
    ("GET", "/api/v1/workflows/{id}", None, Role.VIEWER),
    ("GET", "/api/v1/workflows/{id}/history", None, Role.VIEWER),
    ("GET", "/api/v1/workflows/{id}/query", None, Role.VIEWER),
    ("POST", "/api/v1/workflows", {"workflow": "approval", "input": "x"}, Role.OPERATOR),
    ("POST", "/api/v1/workflows/{id}/signals/nudge", {"payload": 1}, Role.OPERATOR),
    ("POST", "/api/v1/workflows/{id}/retry", {"reason": "r"}, Role.OPERATOR),
    ("POST", "/api/v1/workflows/{id}/skip", {"reason": "r"}, Role.OPERATOR),
    ("POST", "/api/v1/workflows/{id}/compensate", {"reason": "r"}, Role.OPERATOR),
    ("POST", "/api/v1/workflows/{id}/resume", {"reason": "r"}, Role.OPERATOR),
    ("POST", "/api/v1/workflows/{id}/cancel", {"reason": "r"}, Role.OPERATOR),
    ("GET", "/api/v1/keys", None, Role.ADMIN),
    ("POST", "/api/v1/keys", {"name": "k", "role": "viewer"}, Role.ADMIN),
    ("POST", "/api/v1/keys/0000000000000000/revoke", {"reason": "r"}, Role.ADMIN),
]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with serve(f"sqlite:///{tmp_path / 'ledger.db'}") as running:
        yield running


def test_every_route_checks_the_callers_role(api: Api) -> None:
    seen = set()
    for method, template, body, needed in ROUTES:
        for role in (Role.VIEWER, Role.OPERATOR, Role.ADMIN):
            started = api.post(
                "/api/v1/workflows", json={"workflow": "approval", "input": "m"}, role=Role.ADMIN
            ).json()["id"]
            path = template.format(id=started)
            answer = api.call(method, path, json=body, role=role)
            seen.add((method, template))
            if role < needed:
                assert answer.status_code == 403, (method, path, role, answer.text)
                assert needed.label in answer.json()["detail"]
            else:
                assert answer.status_code not in (401, 403), (method, path, role, answer.text)
            unauthenticated = api.http.request(method, path, json=body)
            assert unauthenticated.status_code == 401, (method, path)
            assert unauthenticated.headers["www-authenticate"] == "Bearer"
    # The table covers every route the API serves.
    spec = api.http.get("/openapi.json").json()
    served = {
        (method.upper(), path.replace("{workflow_id}", "{id}").replace("{signal}", "nudge"))
        for path, item in spec["paths"].items()
        if path.startswith("/api/")
        for method in item
    }
    served = {(m, p.replace("{key_id}", "0000000000000000")) for m, p in served}
    assert served == seen


def test_bad_credentials_are_refused(api: Api) -> None:
    good = api.keys[("acme", Role.ADMIN)]
    for header in [
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer lfk_nonsense"},
        {
            "Authorization": f"Bearer {good[:-1]}A"
            if not good.endswith("A")
            else f"Bearer {good[:-1]}B"
        },
        {"Authorization": f"Bearer {good}x"},
        {"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."},  # alg none
    ]:
        answer = api.http.get("/api/v1/workflows", headers=header)
        assert answer.status_code == 401, (header, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
    # The key also works as X-API-Key.
    assert api.http.get("/api/v1/workflows", headers={"X-API-Key": good}).status_code == 200


def test_tenants_cannot_read_or_act_on_each_others_instances(api: Api) -> None:
    for tenant in ("acme", "beta"):
        answer = api.post(
            "/api/v1/workflows",
            json={"workflow": "approval", "input": tenant, "id": "o-1"},
            tenant=tenant,
        )
        assert answer.status_code == 201, answer.text  # the same id, in two namespaces
    api.until("/api/v1/workflows/o-1", lambda b: bool(b["waiting_signals"]), tenant="beta")

    acme = api.get("/api/v1/workflows", tenant="acme").json()["items"]
    assert [(i["id"], i["name"]) for i in acme] == [("o-1", "approval")]
    everything = api.get("/api/v1/workflows?order=id", tenant="*").json()["items"]
    assert [i["id"] for i in everything] == ["acme/o-1", "beta/o-1"]

    # beta signals its own o-1; acme's is untouched.
    api.post(
        "/api/v1/workflows/o-1/signals/approval",
        json={"payload": {"approved": False, "approver": "bo"}},
        tenant="beta",
    )
    api.until("/api/v1/workflows/o-1", lambda b: b["status"] == "completed", tenant="beta")
    assert api.get("/api/v1/workflows/o-1", tenant="acme").json()["status"] == "running"

    # Guessing: other spellings of acme's instance, from beta, find nothing.
    for guess in [
        "acme%2Fo-1",
        "..%2Facme%2Fo-1",
        "%2Facme%2Fo-1",
        "acme/o-1",
        "..%2F..%2Facme%2Fo-1",
    ]:
        for method, suffix, body in [
            ("GET", "", None),
            ("GET", "/history", None),
            ("POST", "/cancel", {"reason": "x"}),
            ("POST", "/signals/approval", {"payload": None}),
        ]:
            answer = api.call(
                method, f"/api/v1/workflows/{guess}{suffix}", json=body, tenant="beta"
            )
            assert answer.status_code == 404, (guess, suffix, answer.text)
    assert api.get("/api/v1/workflows?text=acme", tenant="beta").json()["items"] == []
    assert api.get("/api/v1/workflows/o-1", tenant="acme").json()["status"] == "running"


def test_keys_are_managed_per_tenant_and_revocation_takes_effect(api: Api) -> None:
    created = api.post(
        "/api/v1/keys", json={"name": "ci", "role": "operator"}, tenant="acme", role=Role.ADMIN
    )
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    key_id = created.json()["key"]["key_id"]
    assert created.json()["key"]["tenant"] == "acme"
    header = {"Authorization": f"Bearer {secret}"}
    assert api.http.get("/api/v1/workflows", headers=header).status_code == 200

    # A tenant's admin cannot mint keys elsewhere, nor see or revoke others' keys.
    assert (
        api.post(
            "/api/v1/keys",
            json={"name": "x", "role": "admin", "tenant": "beta"},
            tenant="acme",
            role=Role.ADMIN,
        ).status_code
        == 403
    )
    listed = api.get("/api/v1/keys", tenant="beta", role=Role.ADMIN).json()
    assert key_id not in [k["key_id"] for k in listed]
    assert all("secret" not in json.dumps(k) for k in listed)
    assert (
        api.post(
            f"/api/v1/keys/{key_id}/revoke", json={"reason": "x"}, tenant="beta", role=Role.ADMIN
        ).status_code
        == 404
    )

    revoked = api.post(
        f"/api/v1/keys/{key_id}/revoke", json={"reason": "leaked"}, tenant="acme", role=Role.ADMIN
    )
    assert revoked.json()["revoked"] is True
    assert api.http.get("/api/v1/workflows", headers=header).status_code == 401


# -- JWT --------------------------------------------------------------------------------


@pytest.fixture
def signing(tmp_path: Path) -> tuple[Any, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    public_jwk.update(kid="k1", alg="RS256", use="sig")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk]}))
    return private, path


def token(private: Any, **claims: Any) -> str:
    body = {
        "iss": "https://idp.example",
        "aud": "ledgerflow",
        "sub": "ana@example.com",
        "exp": int(time.time()) + 300,
        "ledgerflow_role": "operator",
        "ledgerflow_tenant": "acme",
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, private, algorithm="RS256", headers={"kid": "k1"})


def hmac_token(secret: bytes) -> str:
    """The algorithm-confusion attack: HS256 with the server's public key as the
    secret (PyJWT refuses to make one, so it is made by hand)."""
    encode = jwt.utils.base64url_encode
    header = encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    claims = {
        "iss": "https://idp.example",
        "aud": "ledgerflow",
        "sub": "mallory",
        "exp": int(time.time()) + 300,
        "ledgerflow_role": "admin",
        "ledgerflow_tenant": "*",
    }
    payload = encode(json.dumps(claims).encode())
    signature = hmac.new(secret, header + b"." + payload, hashlib.sha256).digest()
    return (header + b"." + payload + b"." + encode(signature)).decode()


def test_jwts_are_verified_against_the_key_set(signing: tuple[Any, Path], tmp_path: Path) -> None:
    private, jwks = signing
    verifier = TokenVerifier.from_file(jwks, issuer="https://idp.example", audience="ledgerflow")
    with serve(f"sqlite:///{tmp_path / 'l.db'}", ServerSettings(tokens=verifier)) as api:

        def status(credential: str) -> int:
            answer = api.http.get(
                "/api/v1/workflows", headers={"Authorization": f"Bearer {credential}"}
            )
            return int(answer.status_code)

        good = token(private)
        assert status(good) == 200
        started = api.http.post(
            "/api/v1/workflows",
            json={"workflow": "approval", "input": "j", "id": "j-1"},
            headers={"Authorization": f"Bearer {good}"},
        )
        assert started.status_code == 201
        everything = api.get("/api/v1/workflows", tenant="*").json()["items"]
        assert [i["id"] for i in everything] == ["acme/j-1"]
        first = api.get("/api/v1/workflows/j-1/history", tenant="acme").json()["items"][0]
        assert first["metadata"]["actor"] == "jwt:ana@example.com"

        header, _, signature = good.split(".")
        tampered_payload = jwt.utils.base64url_encode(
            json.dumps(
                {
                    **jwt.decode(good, options={"verify_signature": False}),
                    "ledgerflow_role": "admin",
                }
            ).encode()
        ).decode()
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        refused = {
            "expired": token(private, exp=int(time.time()) - 3600),
            "tampered": f"{header}.{tampered_payload}.{signature}",
            "signed by another key": token(other),
            "another audience": token(private, aud="someone-else"),
            "another issuer": token(private, iss="https://evil.example"),
            "no expiry": token(private, exp=None),
            "unknown kid": jwt.encode(
                {"sub": "x"}, private, algorithm="RS256", headers={"kid": "k9"}
            ),
            "HMAC with the public key": hmac_token(public_pem),
            "garbage": "not.a.token",
            # The ledger records the caller as jwt:<sub>: an empty subject names nobody.
            "an empty subject": token(private, sub=""),
            "a subject with a line break": token(private, sub="ana\nactor: admin"),
            "a subject that is no string": token(private, sub=42),
        }
        for what, credential in refused.items():
            assert status(credential) == 401, what
        # Valid, but granting nothing here: 403.
        assert status(token(private, ledgerflow_role="superuser")) == 403
        assert status(token(private, ledgerflow_tenant="Not A Tenant")) == 403
        assert status(token(private, ledgerflow_tenant=None)) == 403
        # Roles still apply to tokens.
        viewer = token(private, ledgerflow_role="viewer")
        answer = api.http.post(
            "/api/v1/workflows",
            json={"workflow": "approval", "input": "v"},
            headers={"Authorization": f"Bearer {viewer}"},
        )
        assert answer.status_code == 403
