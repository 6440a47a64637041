"""``ledgerflow server`` and ``ledgerflow keys``. Imported by the main CLI; the web
framework is imported only when a command runs (it is the ``server`` extra)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from .cli_options import DEFAULT_DB, DbOption, Terminal
from .cli_options import configure_logs as _configure_logs
from .errors import LedgerflowError
from .store import WorkflowStore
from .tenants import ALL_TENANTS

__all__ = ["keys_app", "server"]

out = Terminal(highlight=False)
err = Terminal(stderr=True, highlight=False)


keys_app = typer.Typer(
    rich_markup_mode="markdown",
    help="API keys of the HTTP API: create, list, revoke.",
    no_args_is_help=True,
)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(2)


def _needs_extra() -> None:
    try:
        import litestar  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise _fail(
            "the server needs the 'server' extra: pip install 'ledgerflow[server]'"
        ) from None


def server(
    app_target: Annotated[
        str | None,
        typer.Option(
            "--app",
            envvar="LEDGERFLOW_APP",
            help="The workflows it may start: module or module:attribute, as for "
            "'ledgerflow worker'. Env LEDGERFLOW_APP.",
        ),
    ] = None,
    db: DbOption = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker/--no-worker",
            help="Also run the workflows in this process (an engine), as a worker would.",
        ),
    ] = False,
    jwks_url: Annotated[
        str | None, typer.Option(help="Accept OIDC/JWT bearer tokens signed by this JWKS URL.")
    ] = None,
    jwks_file: Annotated[
        Path | None, typer.Option(help="Accept JWTs signed by the keys in this JWKS file.")
    ] = None,
    issuer: Annotated[str | None, typer.Option(help="The tokens' required issuer (iss).")] = None,
    audience: Annotated[
        str | None, typer.Option(help="The tokens' required audience (aud).")
    ] = None,
    role_claim: Annotated[str, typer.Option(help="The claim naming the role.")] = (
        "ledgerflow_role"
    ),
    tenant_claim: Annotated[str, typer.Option(help="The claim naming the tenant.")] = (
        "ledgerflow_tenant"
    ),
    rate: Annotated[
        float, typer.Option(min=0.001, help="Requests a second per key or token subject.")
    ] = 50.0,
    burst: Annotated[int, typer.Option(min=1, help="Requests at once per key.")] = 100,
    request_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds a request may take before its caller hears 503 with "
            "Retry-After (a database that froze answers nothing, and no socket "
            "timeout notices); 0: no deadline.",
        ),
    ] = 30.0,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = False,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes sharing the port (each with its own connections "
            "and rate limits): one per core the server may use.",
        ),
    ] = 1,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(
            "--forwarded-allow-ips",
            envvar="FORWARDED_ALLOW_IPS",
            help="Behind a reverse proxy: the addresses of the proxies (comma-separated, "
            "or '*') whose X-Forwarded-Proto and X-Forwarded-For are believed, so that "
            "a proxy terminating TLS gets the web UI's session cookie marked Secure and "
            "logs name the client. Unset: those headers are ignored. "
            "Env FORWARDED_ALLOW_IPS.",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json) and the web UI (/ui) until
    SIGTERM or Ctrl-C."""
    _needs_extra()
    import uvicorn

    if jwks_url and jwks_file:
        raise _fail("--jwks-url or --jwks-file, not both")
    if (jwks_url or jwks_file) and (not issuer or not audience):
        raise _fail("JWTs need --issuer and --audience to be checked against")
    if worker and processes > 1:
        raise _fail("--worker runs one engine: use --processes 1 (run workers apart to scale)")
    options = {
        "app": app_target,
        "db": db,
        "worker": worker,
        "jwks_url": jwks_url,
        "jwks_file": str(jwks_file) if jwks_file else None,
        "issuer": issuer,
        "audience": audience,
        "role_claim": role_claim,
        "tenant_claim": tenant_claim,
        "rate": rate,
        "burst": burst,
        "request_timeout": request_timeout,
    }
    _configure_logs()
    asgi = _built(options)  # in this process first: a mistake is reported once, here
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "info",
        "access_log": access_log,
        # Forwarded headers only from the proxies named: anyone else could claim to
        # be https, or to be another client.
        "proxy_headers": forwarded_allow_ips is not None,
        "forwarded_allow_ips": forwarded_allow_ips,
        # uvicorn's records go through ledgerflow's handler (LEDGERFLOW_LOG_FORMAT):
        # its own config would put its text handlers back on its loggers.
        "log_config": None,
    }
    if processes == 1:
        uvicorn.run(asgi, **common)
        return
    # Each process builds its own application from the same options.
    os.environ[_OPTIONS_VARIABLE] = json.dumps(options)
    uvicorn.run(f"{__name__}:serve_factory", factory=True, workers=processes, **common)


_OPTIONS_VARIABLE = "LEDGERFLOW_SERVER_OPTIONS"


def serve_factory() -> Any:
    """The application of one of ``--processes`` server processes."""
    _configure_logs()
    return _built(json.loads(os.environ[_OPTIONS_VARIABLE]))


def _built(options: dict[str, Any]) -> Any:
    from .server.app import ServerSettings, create_app
    from .server.deadline import DEFAULT_REQUEST_TIMEOUT
    from .server.tokens import TokenVerifier
    from .workflow.client import WorkflowClient
    from .workflow.engine import Engine
    from .workflow.worker import load_app

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # --app modules of the current directory
    try:
        loaded = load_app(options["app"]) if options["app"] else None
        workflows = loaded.workflows if loaded is not None else []
        registry = loaded.registry if loaded is not None else None
        tokens = None
        claims: dict[str, Any] = {
            "issuer": options["issuer"],
            "audience": options["audience"],
            "role_claim": options["role_claim"],
            "tenant_claim": options["tenant_claim"],
        }
        if options["jwks_url"]:
            tokens = TokenVerifier.from_url(options["jwks_url"], **claims)
        elif options["jwks_file"]:
            tokens = TokenVerifier.from_file(options["jwks_file"], **claims)
        db = options["db"]
        client = (
            Engine(db, workflows=workflows, registry=registry)
            if options["worker"]
            else WorkflowClient(db, workflows=workflows, registry=registry)
        )
    except LedgerflowError as exc:
        raise _fail(str(exc)) from None
    settings = ServerSettings(
        tokens=tokens,
        rate=options["rate"],
        burst=options["burst"],
        request_timeout=options.get("request_timeout", DEFAULT_REQUEST_TIMEOUT) or None,
    )
    return create_app(client, settings)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for (shown when listed).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    tenant: Annotated[
        str, typer.Option(help=f"The key's tenant, or {ALL_TENANTS!r} for every instance.")
    ] = ALL_TENANTS,
    db: DbOption = DEFAULT_DB,
    by: Annotated[str | None, typer.Option(help="Who creates it (default user@host).")] = None,
) -> None:
    """Create an API key and print it: it is shown this once."""
    from .resilience.book import default_actor
    from .server.keys import ApiKeys
    from .server.principals import Role

    try:
        parsed = Role.parse(role)
    except ValueError as exc:
        raise _fail(str(exc)) from None

    async def create() -> str:
        async with _ledger(db) as store:
            created = await ApiKeys(store).create(name, parsed, tenant, by=by or default_actor())
            return created.secret

    secret = _run(create)
    err.print(f"created a {parsed.label} key for {tenant}; it is shown this once:")
    out.print(secret, soft_wrap=True)


@keys_app.command("list")
def keys_list(
    db: DbOption = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the API keys (never their secrets)."""
    from .server.keys import ApiKey, ApiKeys

    async def listed() -> list[ApiKey]:
        async with _ledger(db) as store:
            return await ApiKeys(store).list()

    found = _run(listed)
    if as_json:
        for key in found:
            out.print(
                json.dumps(
                    {
                        "key_id": key.key_id,
                        "name": key.name,
                        "role": key.role.label,
                        "tenant": key.tenant,
                        "created_by": key.created_by,
                        "created_at": key.created_at.isoformat(),
                        "revoked": key.revoked,
                    }
                ),
                soft_wrap=True,
            )
        return
    if not found:
        out.print("no API keys")
        return
    table = Table()
    for column in ("key id", "name", "role", "tenant", "created", "by", "revoked"):
        table.add_column(column)
    for key in found:
        table.add_row(
            key.key_id,
            escape(key.name),
            key.role.label,
            key.tenant,
            key.created_at.isoformat(timespec="seconds"),
            escape(key.created_by),
            escape(f"yes: {key.revoked_reason}") if key.revoked else "",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from 'keys list').")],
    reason: Annotated[str, typer.Option(help="Why (recorded).")],
    db: DbOption = DEFAULT_DB,
    by: Annotated[str | None, typer.Option(help="Who revokes it (default user@host).")] = None,
) -> None:
    """Revoke an API key: every server refuses it within a second."""
    from .resilience.book import default_actor
    from .server.keys import ApiKeys

    async def revoke() -> None:
        async with _ledger(db) as store:
            try:
                await ApiKeys(store).revoke(key_id, by=by or default_actor(), reason=reason)
            except KeyError:
                raise _fail(f"no API key {key_id!r}") from None

    _run(revoke)
    out.print(f"revoked key {key_id}")


def _ledger(db: str) -> WorkflowStore:
    """The ledger at ``db``, which must exist (the server or a worker makes it): a
    mistyped URL would else get an empty ledger, and a key nobody's server reads."""
    from .store import open_store

    return open_store(db, create=False)


def _run(work: Any) -> Any:
    try:
        return asyncio.run(work())
    except LedgerflowError as exc:
        raise _fail(str(exc)) from None
