"""Options and plumbing every ``ledgerflow`` command module shares."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from .errors import LedgerflowError

__all__ = ["DEFAULT_DB", "DbOption", "Terminal", "configure_logs", "err", "fail", "out", "run"]

T = TypeVar("T")

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Characters a terminal acts on rather than shows: C0 and C1 controls but tab and
newline (ESC starts sequences that retitle a window, clear the screen, recolour or
move the cursor; CR writes over a line) and the bidirectional overrides, which show
text in another order than it has."""


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class Terminal(Console):
    """A console that shows control characters escaped (``\\x1b``), never acts on
    them: ids, names, payloads and error messages come from API callers and from
    external systems' answers, and printed raw they could rewrite the operator's
    terminal (a fake "completed", a cleared screen, a retitled window)."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(_UNSAFE.sub(_escaped, text), **kwargs)


out = Terminal()
err = Terminal(stderr=True)


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
