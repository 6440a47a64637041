"""Options and plumbing every ``ledgerflow`` command module shares."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .errors import LedgerflowError

__all__ = ["DEFAULT_DB", "DbOption", "configure_logs", "err", "fail", "out", "run"]

T = TypeVar("T")

out = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """One line on stderr, exit 2: the command could not be carried out."""
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` on a fresh event loop; ledgerflow errors become ``fail``."""
    try:
        return asyncio.run(work())
    except LedgerflowError as exc:
        fail(str(exc))


DEFAULT_DB = "sqlite:///ledgerflow.db"
DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="LEDGERFLOW_DB",
        help="Store URL: sqlite:///path.db or postgresql://... (env LEDGERFLOW_DB).",
    ),
]


def configure_logs() -> None:
    """Logs of a long-running command, as ``LEDGERFLOW_LOG_FORMAT`` says."""
    from .logs import configure

    try:
        configure()
    except LedgerflowError as exc:
        fail(str(exc))
