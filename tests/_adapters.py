"""Stores as the adapter tests see them: the shared base class, internals and all.

Code outside ``store/`` gets the ports from ``open_store``; the store's own tests
reach behind them (writer connections, poll intervals), so they open stores here.
"""

from __future__ import annotations

from typing import Any

import ledgerflow
from ledgerflow.store._base import BaseEventStore


def open_adapter(url: str, **options: Any) -> BaseEventStore:
    store = ledgerflow.open_store(url, **options)
    assert isinstance(store, BaseEventStore)
    return store
