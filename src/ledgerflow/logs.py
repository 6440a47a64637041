"""Logs of ledgerflow's processes (workers, the server, the checkpointer, the relay):
one line per record, as text for people or as JSON for a log pipeline
(``LEDGERFLOW_LOG_FORMAT=json``).

A JSON line carries what a record knows of its workflow: the ``workflow_id`` and
``correlation_id`` of the pass (or task-queue attempt) running when it was logged,
the ``step``, ``seq`` and ``attempt`` of the step running (so logs written by step
code are tied to their instance without passing anything), the ``trace_id`` and
``span_id`` of the active OpenTelemetry span, or the ``workflow_id`` the engine
names in its own records.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from .errors import ConfigurationError
from .workflow.steps import _current_step, _current_workflow

__all__ = ["JsonFormatter", "TextFormatter", "configure"]

TEXT = "%(asctime)s %(levelname)s %(message)s"
_CONTEXT = ("workflow_id", "step", "seq", "attempt", "correlation_id", "trace_id", "span_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339, UTC), level, logger, message,
    the workflow context, and the error with its traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        running = _current_workflow.get()
        if running is not None:
            line["workflow_id"] = running[0]
            if running[1] is not None:
                line["correlation_id"] = running[1]
        step = _current_step.get()
        if step is not None:
            line.update(
                workflow_id=step.workflow_id, step=step.name, seq=step.seq, attempt=step.attempt
            )
        spanned = trace.get_current_span().get_span_context()
        if spanned.is_valid:
            line["trace_id"] = f"{spanned.trace_id:032x}"
            line["span_id"] = f"{spanned.span_id:016x}"
        for key in _CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters that would end a text line early (a newline, CR) or act on a terminal
reading the log (ESC...): shown escaped."""


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class TextFormatter(logging.Formatter):
    """One line per record, as text: what a record quotes from callers (an id, a
    reason, an error message from another system) cannot start a line of its own
    and pass for another record (log forging). A traceback keeps its lines."""

    def __init__(self) -> None:
        super().__init__(TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _UNSAFE.sub(_escaped, super().formatMessage(record))


def configure(level: int = logging.INFO, log_format: str | None = None) -> None:
    """Log to stderr as ``log_format`` says (default: ``LEDGERFLOW_LOG_FORMAT``, else
    text). ``ConfigurationError`` for a format that is neither ``text`` nor ``json``."""
    chosen = (log_format or os.environ.get("LEDGERFLOW_LOG_FORMAT") or "text").lower()
    if chosen not in ("text", "json"):
        raise ConfigurationError(f"log format {chosen!r} (LEDGERFLOW_LOG_FORMAT): text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
