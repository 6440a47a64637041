"""The ``ledgerflow`` command line: a thin adapter over the Python API."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer
from rich.console import Console

from .audit import VerifyReport, verify_ledger
from .errors import LedgerflowError
from .store import open_store

__all__ = ["app", "main"]

DEFAULT_DB = "sqlite:///ledgerflow.db"

app = typer.Typer(
    name="ledgerflow",
    help="Durable workflows and sagas on a hash-chained event ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
audit_app = typer.Typer(help="Check the ledger for tampering.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="LEDGERFLOW_DB",
        help="Store URL: sqlite:///path.db or postgresql://... (env LEDGERFLOW_DB).",
    ),
]

out = Console()
err = Console(stderr=True)


async def _verify(url: str) -> VerifyReport:
    async with open_store(url) as store:
        return await verify_ledger(store)


@audit_app.command("verify")
def audit_verify(db: DbOption = DEFAULT_DB) -> None:
    """Walk every stream and check its hash chain. Exit 0 if intact, 1 if not."""
    if db.startswith("sqlite:///") and not os.path.exists(db[len("sqlite:///") :]):
        err.print(f"[red]error:[/] no ledger at {db}")
        raise typer.Exit(2)
    try:
        report = asyncio.run(_verify(db))
    except LedgerflowError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    if report.ok:
        out.print(
            f"[green]intact[/]: {report.events_checked} events in "
            f"{report.streams_checked} streams, every hash chain verified"
        )
        return
    out.print(
        f"[red]TAMPERED[/]: {len(report.findings)} problem(s) in {report.events_checked} "
        f"events, {report.streams_checked} streams"
    )
    for finding in report.findings:
        out.print(f"  - {finding}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def main() -> None:
    app()
