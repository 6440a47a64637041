"""`ledgerflow keys` and `ledgerflow server`: keys made, listed and revoked from the
command line; a real server process (uvicorn) started, used and stopped."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import ledgerflow
from ledgerflow.cli import app

from ._workers import CLI, child_env

WAIT = 30.0

APP = textwrap.dedent(
    """
    import ledgerflow as lf

    @lf.workflow(name="hello", version=1)
    async def hello(ctx: lf.WorkflowContext, name: str) -> str:
        return f"hello {name}"
    """
)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def ledger_at(db: str) -> str:
    """A new ledger at ``db`` (as a server or worker makes it on its first start)."""

    async def make() -> None:
        async with ledgerflow.open_store(db):
            pass

    asyncio.run(make())
    return db


def test_key_commands_need_a_ledger_and_never_make_one(tmp_path: Path) -> None:
    """They made one: a mistyped URL got an empty ledger, and a key no server read."""
    path = tmp_path / "typo.db"
    db = f"sqlite:///{path}"
    for args in [
        ("keys", "create", "x", "--role", "viewer", "--db", db),
        ("keys", "list", "--db", db),
        ("keys", "revoke", "ffffffffffffffff", "--reason", "x", "--db", db),
    ]:
        code, _, err = run(*args)
        assert code == 2, (args, err)
        assert "no ledger at" in err
        assert not path.exists()


def test_keys_are_created_listed_and_revoked(tmp_path: Path) -> None:
    db = ledger_at(f"sqlite:///{tmp_path / 'keys.db'}")
    code, out, err = run(
        "keys", "create", "deploy bot", "--role", "operator", "--tenant", "acme", "--db", db
    )
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("lfk_")
    assert "shown this once" in err
    key_id = secret.split("_")[1]

    code, out, _ = run("keys", "list", "--db", db, "--json")
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed["key_id"] == key_id
    assert (listed["name"], listed["role"], listed["tenant"], listed["revoked"]) == (
        "deploy bot",
        "operator",
        "acme",
        False,
    )
    # The secret is the 43 characters after "lfk_<16 hex>_" (it may hold "_" itself).
    assert secret[21:] not in out

    code, out, err = run("keys", "revoke", key_id, "--reason", "rotated", "--db", db)
    assert code == 0, err
    code, out, _ = run("keys", "list", "--db", db, "--json")
    assert json.loads(out)["revoked"] is True

    # Mistakes: exit 2 with one line, no traceback.
    for args, message in [
        (("keys", "create", "x", "--role", "root", "--db", db), "unknown role"),
        (("keys", "create", "x", "--tenant", "Not Valid", "--db", db), "tenant"),
        (("keys", "revoke", "ffffffffffffffff", "--reason", "x", "--db", db), "no API key"),
        (("keys", "revoke", key_id, "--reason", " ", "--db", db), "reason"),
    ]:
        code, _, err = run(*args)
        assert code == 2, (args, err)
        assert message in err
        assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    """A ``ledgerflow server`` process: its base URL while it runs; what it printed
    and how it ended once stopped (SIGTERM)."""

    base: str
    output: str = ""
    returncode: int | None = None


@contextmanager
def serving(db: str, *options: str, cwd: Path | None = None, **env: str) -> Iterator[Served]:
    """A ``ledgerflow server`` process on ``db``, ready, until the block ends."""
    port = _free_port()
    process = subprocess.Popen(
        [*CLI, "server", "--db", db, "--port", str(port), *options],
        cwd=cwd,
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{served.base}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never got ready"
            time.sleep(0.05)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        served.output, _ = process.communicate(timeout=WAIT)
        served.returncode = process.returncode


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_server_process_serves_runs_and_stops_on_sigterm(tmp_path: Path, log_format: str) -> None:
    (tmp_path / "hello_app.py").write_text(APP)
    db = ledger_at(f"sqlite:///{tmp_path / 'server.db'}")
    code, out, err = run("keys", "create", "ops", "--role", "operator", "--db", db)
    assert code == 0, err
    headers = {"Authorization": f"Bearer {out.strip()}"}
    options = ("--app", "hello_app", "--worker", "--access-log")
    with serving(db, *options, cwd=tmp_path, LEDGERFLOW_LOG_FORMAT=log_format) as served:
        base = served.base
        started = httpx.post(
            f"{base}/api/v1/workflows",
            json={"workflow": "hello", "input": "ana", "id": "h-1"},
            headers=headers,
        )
        assert started.status_code == 201, started.text
        deadline = time.monotonic() + WAIT
        while True:
            described = httpx.get(f"{base}/api/v1/workflows/h-1", headers=headers).json()
            if described["status"] == "completed":
                break
            assert time.monotonic() < deadline, described
            time.sleep(0.05)
        assert described["result"] == "hello ana"
    output = served.output
    # uvicorn shuts down gracefully, then ends by the signal it caught (as the
    # process would have without handling it): -SIGTERM.
    assert served.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "Traceback" not in output
    messages = output.splitlines()
    if log_format == "json":
        # Every line, uvicorn's included, is one JSON object (uvicorn once kept its
        # own text handlers, and Litestar replaced the root handler with its own).
        lines = [json.loads(line) for line in messages if line.strip()]
        assert {line["logger"] for line in lines} >= {"uvicorn.access", "uvicorn.error"}
        messages = [line["message"] for line in lines]
    assert any('POST /api/v1/workflows HTTP/1.1" 201' in m for m in messages)  # access log


def _session_cookie(base: str, key: str, **headers: str) -> str:
    signed = httpx.post(f"{base}/ui/sign-in", data={"key": key}, headers=headers)
    assert signed.status_code == 303, signed.text
    return signed.headers["set-cookie"]


def test_behind_a_tls_proxy_the_session_cookie_is_secure(tmp_path: Path) -> None:
    """A proxy that terminates TLS talks plain HTTP to the server: the UI's session
    cookie went without Secure (a browser would send it over plain HTTP too). With
    the proxy's address given, its X-Forwarded-Proto is believed; from anyone else it
    is ignored."""
    db = ledger_at(f"sqlite:///{tmp_path / 'proxied.db'}")
    code, key, err = run("keys", "create", "ops", "--role", "viewer", "--db", db)
    assert code == 0, err
    key = key.strip()
    https = {"X-Forwarded-Proto": "https"}
    with serving(db, "--forwarded-allow-ips", "127.0.0.1") as served:
        assert "secure" in _session_cookie(served.base, key, **https).lower()
        assert "secure" not in _session_cookie(served.base, key).lower()
    with serving(db) as served:  # no proxy named: the header is anyone's claim
        assert "secure" not in _session_cookie(served.base, key, **https).lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--jwks-url", "https://x/jwks", "--jwks-file", "f.json"), "not both"),
        (("--jwks-file", "missing.json", "--issuer", "i", "--audience", "a"), "JWKS file"),
        (("--jwks-url", "https://x/jwks"), "--issuer and --audience"),
        (("--app", "no_such_module"), "cannot import"),
        (("--worker", "--processes", "2"), "--processes 1"),
    ],
)
def test_server_configuration_mistakes_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, _, err = run("server", "--db", f"sqlite:///{tmp_path / 'x.db'}", *args)
    assert code == 2, err
    assert message in err
