"""Resilience as policy: named, versioned documents in the ledger that say how steps
retry, how long they may take, and (with the shared state of later modules) when calls
to an external resource are refused, queued or slowed."""

from __future__ import annotations

from .book import PolicyBook, PolicyChanged, PolicyVersion, policy_registry
from .policy import (
    Breaker,
    Bulkhead,
    OnExhausted,
    Policy,
    RateLimit,
    Retry,
    Timeouts,
    check_policy,
    policy_changes,
    policy_document,
    with_settings,
)
from .retrying import classify, is_retryable, jitter_source, retry_delay

__all__ = [
    "Breaker",
    "Bulkhead",
    "OnExhausted",
    "Policy",
    "PolicyBook",
    "PolicyChanged",
    "PolicyVersion",
    "RateLimit",
    "Retry",
    "Timeouts",
    "check_policy",
    "classify",
    "is_retryable",
    "jitter_source",
    "policy_changes",
    "policy_document",
    "policy_registry",
    "retry_delay",
    "with_settings",
]
