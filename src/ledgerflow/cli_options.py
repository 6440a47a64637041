"""Options every ``ledgerflow`` command module shares."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["DEFAULT_DB", "DbOption"]

DEFAULT_DB = "sqlite:///ledgerflow.db"
DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="LEDGERFLOW_DB",
        help="Store URL: sqlite:///path.db or postgresql://... (env LEDGERFLOW_DB).",
    ),
]
