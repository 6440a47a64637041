"""Durable, code-first workflows and sagas on the ledger."""

from __future__ import annotations

from .client import WorkflowClient
from .context import WorkflowContext
from .definition import StepOptions, WorkflowDefinition, step, workflow
from .engine import Engine, WorkflowDescription, WorkflowHandle
from .handles import QueueInfo, WorkerInfo
from .history import WorkflowStatus
from .lint import LintFinding, lint_workflow
from .replay import export_history, replay
from .steps import StepInfo, current_step

__all__ = [
    "Engine",
    "LintFinding",
    "QueueInfo",
    "StepInfo",
    "StepOptions",
    "WorkerInfo",
    "WorkflowClient",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowDescription",
    "WorkflowHandle",
    "WorkflowStatus",
    "current_step",
    "export_history",
    "lint_workflow",
    "replay",
    "step",
    "workflow",
]
