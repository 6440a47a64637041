"""``python -m ledgerflow.server.openapi``: print the API's OpenAPI document (what
``/openapi.json`` serves), for checking it in as ``docs/openapi.json``."""

from __future__ import annotations

import json
from typing import Any

from ..workflow.client import WorkflowClient
from .app import create_app
from .schemas import strict_bodies

__all__ = ["openapi_document"]


def openapi_document() -> dict[str, Any]:
    """The document of the API; no store is opened to make it."""
    served = create_app(WorkflowClient("memory://"))
    document: dict[str, Any] = strict_bodies(served.litestar.openapi_schema).to_schema()
    return document


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))
