"""The HTTP API (and, later, the web UI): ``ledgerflow server``, or
``create_app(client)`` served by any ASGI server. Needs the ``server`` extra; the
keys need nothing more than ledgerflow (the CLI manages them without the extra)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .keys import ApiKey, ApiKeys, NewKey
from .principals import Principal, Role

if TYPE_CHECKING:
    from .app import ServerSettings, create_app
    from .tokens import TokenError, TokenVerifier

__all__ = [
    "ApiKey",
    "ApiKeys",
    "NewKey",
    "Principal",
    "Role",
    "ServerSettings",
    "TokenError",
    "TokenVerifier",
    "create_app",
]

_LAZY = {
    "ServerSettings": ".app",
    "create_app": ".app",
    "TokenError": ".tokens",
    "TokenVerifier": ".tokens",
}


def __getattr__(name: str) -> Any:
    # The web framework and the JWT library load when first asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
