"""The ONE API router, mounted by every server in the kit.

Standalone uvicorn server, Ray Serve ingress and DeepSpeed rank 0 all serve
exactly these routes; they differ only in the `ModelBackend` on `app.state`.
Route functions stay thin: logic lives in `app.api.openai`. API keys are checked by
`APIKeyMiddleware` before the body is read; the error responses each route documents
in OpenAPI are added by `app.api.openapi`.

Health: `/healthz` is liveness (the process answers), `/health` is the front door's readiness probe
(200 while the server takes requests, 503 once it drains; it touches no engine, so it answers at once
even while models load), `/readyz` is per-model readiness (details only with a valid key when keys are set).
All three answer HEAD too (load balancers and vLLM tools probe with it).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BeforeValidator, Field

from app.api.auth import is_authenticated
from app.api.backend import ModelBackend
from app.api.errors import error_response
from app.api.openai import OpenAIServing, not_allowed
from app.api.openapi import errors
from app.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from app.engines.base import ModelNotFoundError
from app.engines.grammar.install import missing_packages
from app.tenants.gate import tenant_of
from app.tenants.usage import LATEST_SECONDS, usage_window

router = APIRouter()
v1 = APIRouter(prefix="/v1")


def _backend(request: Request) -> ModelBackend:
    backend: ModelBackend = request.app.state.backend
    return backend


@router.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.api_route("/readyz", methods=["GET", "HEAD"], include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining", "models": {}}, status_code=503)
    ready, detail = await _backend(request).readiness()
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "models": detail}
    if not is_authenticated(request.scope):  # model paths, devices, engine reasons are for key holders
        body["models"] = {mid: {"ready": bool(entry.get("ready"))} for mid, entry in detail.items()}
    elif missing := missing_packages():  # optional features this server cannot offer, and the fix
        body["missing_packages"] = missing
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


async def _card(backend: ModelBackend, model_id: str, detail: dict[str, Any], parent: str | None = None
                ) -> ModelCard:
    info = await backend.engine_info(model_id)
    return ModelCard(
        id=model_id,
        engine=info.engine,
        engine_reason=info.reason,
        max_model_len=info.max_context or None,
        ready=bool(detail.get(parent or model_id, {}).get("ready")),
        root=parent,
        parent=parent,
        engine_info=dataclasses.asdict(info),
    )


def _allows(request: Request, model_id: str) -> bool:
    tenant = tenant_of(request.scope)
    return tenant is None or tenant.allows(model_id)


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    """Every model, then each model's LoRA adapters found now (`<model>:<adapter>`, `parent` the model)."""
    backend = _backend(request)
    _, detail = await backend.readiness()
    cards = [await _card(backend, mid, detail) for mid in backend.model_ids() if _allows(request, mid)]
    for mid in backend.model_ids():
        cards += [await _card(backend, f"{mid}:{name}", detail, parent=mid) for name in await backend.adapter_ids(mid)
                  if _allows(request, f"{mid}:{name}")]
    return ModelList(data=cards)


@v1.get("/models/{model_id:path}", responses=errors(404))
async def get_model(model_id: str, request: Request) -> ModelCard:
    backend = _backend(request)
    if not _allows(request, model_id):
        raise not_allowed(backend, lambda m: _allows(request, m), model_id)
    _, detail = await backend.readiness()
    base, adapter = backend.split(model_id)
    if adapter is not None and adapter not in await backend.adapter_ids(base):
        raise ModelNotFoundError(f"model {model_id!r} does not exist: model {base} has no adapter {adapter!r}")
    return await _card(backend, model_id, detail, parent=base if adapter is not None else None)


def _not_a_number(value: Any) -> Any:
    """A numeric bound is unix seconds (the integer branch, with its range), never a date-time's timestamp."""
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMBER.match(value.strip())):
        raise ValueError("unix seconds must be an integer in [0, 253402300799]")
    return value


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
UsageBound = Annotated[
    Annotated[int, Field(ge=0, le=LATEST_SECONDS)] | Annotated[datetime, BeforeValidator(_not_a_number)]
    | Annotated[date, BeforeValidator(_not_a_number)] | None,
    Query(description="Unix seconds, an ISO 8601 date (midnight UTC) or date-time (UTC when naive)."),
]


@v1.get("/usage", responses=errors(400))
async def usage(request: Request, start: UsageBound = None, end: UsageBound = None) -> JSONResponse:
    """Requests and tokens per key name and model over [start, end) (default: this calendar month, UTC), in whole
    UTC hours; `end` must be after `start`. A key sees its own usage; an admin key sees every key's."""
    tenant = tenant_of(request.scope)
    try:
        begin, until = usage_window(start, end)
    except ValueError as exc:
        return error_response(str(exc), 400, param=str(exc).split(":", 1)[0], code="invalid_value")
    key = None if tenant is not None and tenant.entry.admin else (tenant.name if tenant else "anonymous")
    rows = request.app.state.tenants.usage.query(begin, until, key)
    return JSONResponse({"object": "usage", "start": int(begin), "end": int(until), "key": key or "*",
                         "data": [r.as_dict() for r in rows]})


_GENERATION_ERRORS = errors(400, 404, 408, 413, 429, 503)
# with "stream": true; one schema per event (OpenAPI 3.2's reading of text/event-stream)
_SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {
    "type": "string", "description": "a chunk (the JSON response's shape with `delta`s), an error object, or "
    "`[DONE]` last; `: keep-alive` comment lines come while the next token is slow"}}}}}


@v1.post("/chat/completions", response_model=None,
         responses={200: {"model": ChatCompletionResponse, "content": _SSE}, **_GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await OpenAIServing(_backend(request), request.app.state.metrics).chat(body, request)


@v1.post("/completions", response_model=None,
         responses={200: {"model": CompletionResponse, "content": _SSE}, **_GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await OpenAIServing(_backend(request), request.app.state.metrics).completion(body, request)


router.include_router(v1)
