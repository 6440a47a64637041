"""Pins the public names: adding or removing one is a deliberate, reviewed change."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ledgerflow

EXPECTED = {
    # audit: Merkle checkpoints, signed heads, witnesses, bundles (issue 18)
    "AuditError",
    "BundleReport",
    "CheckpointMismatchError",
    "Checkpointer",
    "FileWitness",
    "LogSigner",
    "LogVerifier",
    "SignedTreeHead",
    "TreeHead",
    "Witness",
    "WitnessError",
    "WitnessRefusedError",
    "check_bundle",
    "generate_signing_key",
    "make_bundle",
    # the replay gate before a deploy
    "Breakage",
    "GateReport",
    "replay_check",
    # personal data and its erasure
    "KeyVault",
    "Personal",
    "PersonalDataErasedError",
    "Subject",
    "erase_subject",
    "Projection",
    "ProjectionError",
    "ProjectionLeaseLostError",
    "ProjectionHeldError",
    "ProjectionNotFailedError",
    "ProjectionNotFoundError",
    "ProjectionRunner",
    "ReadModel",
    "Table",
    "View",
    "InstanceBusyError",
    "InvalidTransition",
    "TransitionFailedError",
    "MigrationError",
    "MachineCall",
    "MachineOutcome",
    "MachineState",
    "verify_machine",
    "Machine",
    "StepNotParkedError",
    "WorkflowNotStuckError",
    "CircuitOpenError",
    "BulkheadFullError",
    "BusUnavailableError",
    "classify",
    "Timeouts",
    "StepTimeoutError",
    "Retry",
    "ResilienceError",
    "RateLimit",
    "PolicyVersion",
    "PolicyNotFoundError",
    "PolicyChanged",
    "PolicyBook",
    "Policy",
    "InvalidPolicyError",
    "Bulkhead",
    "Breaker",
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AlreadyAppended",
    "AppendResult",
    "Appended",
    "ChildWorkflowError",
    "Clock",
    "ConcurrencyError",
    "ConfigurationError",
    "DatabaseClock",
    "DuplicateEventError",
    "Engine",
    "EventError",
    "EventRegistry",
    "EventSerializationError",
    "EventStore",
    "EventInputError",
    "EventTooLargeError",
    "ExpectedVersion",
    "Finding",
    "FindingKind",
    "InvalidEventDataError",
    "LeaseLostError",
    "LedgerflowError",
    "Loaded",
    "ManualClock",
    "Metadata",
    "NewEvent",
    "NonDeterminismError",
    "RecordedEvent",
    "Repository",
    "RetryPolicy",
    "SchemaVersionError",
    "Snapshot",
    "StepFailedError",
    "StepInfo",
    "StoreClosedError",
    "StoreError",
    "StaleReadError",
    "StoreCorruptError",
    "StoreInternalError",
    "StoreUnavailableError",
    "StreamNotFoundError",
    "StreamState",
    "SystemClock",
    "UnknownEventTypeError",
    "UnknownWorkflowError",
    "VerifyReport",
    "WorkflowCancelled",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowDefinitionError",
    "WorkflowDescription",
    "WorkflowError",
    "WorkflowFailedError",
    "WorkflowFinishedError",
    "WorkflowHandle",
    "WorkflowInputError",
    "RecordedValueError",
    "ResultTooLargeError",
    "SignalInputError",
    "StepCancelledError",
    "UnrecordableValueError",
    "WorkflowAlreadyStartedError",
    "WorkflowClient",
    "WorkerInfo",
    "WorkflowStatus",
    "LedgerNotFoundError",
    "SchemaOutdatedError",
    "StoreReadOnlyError",
    "WorkflowNotFoundError",
    "__version__",
    "current_step",
    "lint_workflow",
    "open_store",
    "QueueInfo",
    "TaskLeaseLostError",
    "step",
    "verify_ledger",
    "workflow",
}


def test_all_is_pinned() -> None:
    assert set(ledgerflow.__all__) == EXPECTED
    assert len(ledgerflow.__all__) == len(EXPECTED), "duplicates in __all__"


def test_every_name_in_all_exists() -> None:
    for name in ledgerflow.__all__:
        assert hasattr(ledgerflow, name), name


def test_errors_form_one_hierarchy() -> None:
    for name in ledgerflow.__all__:
        obj = getattr(ledgerflow, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ledgerflow.LedgerflowError), name


@pytest.mark.parametrize("module", ["ledgerflow", "ledgerflow.cli"])
def test_the_cli_runs_as_a_module(module: str) -> None:
    """Where the ``ledgerflow`` script is not on PATH: ``python -m ledgerflow.cli``
    ran nothing and said nothing."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "workflows" in done.stdout
