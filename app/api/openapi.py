"""The OpenAPI document tells the truth: the error responses the server really sends, and who may call it.

Routes declare their error statuses with `errors(...)` (each with the `ErrorResponse` schema), and
`document(app, ...)` post-processes FastAPI's document: FastAPI's 422 (this server answers a bad body
with a 400, never a 422) and its validation-error schemas are removed; `model` in the request bodies is
the list of ids this server serves; when API keys are set, a bearer security scheme and the 401 are on
every `/v1` operation (and only then: without keys the API is open, and saying otherwise would be a lie
that schema-driven clients and fuzzers act on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.protocol import ErrorResponse

_WHY = {
    400: "Invalid request: bad JSON, a field out of range or unsupported (`param` names it), invalid Unicode.",
    401: "Missing or invalid API key.",
    404: "Unknown model (the message lists the served ids).",
    408: "The request body did not arrive within the server's body read timeout.",
    413: "Request body larger than the server's limit.",
    429: "The model's queue is full; retry after `Retry-After` seconds.",
    503: "The model is loading, dead, or the server is shutting down; retry after `Retry-After` seconds.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for a route: each status with the OpenAI error schema."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


def _model_ids_enum(schema: dict[str, Any], model_ids: list[str]) -> None:
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
        if "model" in props and model_ids:
            props["model"] = {**props["model"], "enum": list(model_ids),
                              "description": "One of the model ids this server serves (GET /v1/models)."}


def document(app: FastAPI, *, model_ids: Callable[[], list[str]], auth: bool) -> None:
    """Install `app.openapi`, building the document once on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                if auth and path.startswith("/v1"):
                    op["security"] = [{"bearer": []}]
                    op["responses"]["401"] = {
                        "description": _WHY[401],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
        components = schema.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        if auth:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        _model_ids_enum(schema, model_ids())
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
