"""The ledgerflow version this process runs, for ``--version`` and the worker registry."""

from __future__ import annotations

import functools
import importlib.metadata

__all__ = ["running_version"]


@functools.cache  # it cannot change while the process runs; a lookup reads the disk
def running_version() -> str:
    """The installed distribution's version; ``__version__`` when run from a source
    tree that is not installed."""
    try:
        return importlib.metadata.version("ledgerflow")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__
