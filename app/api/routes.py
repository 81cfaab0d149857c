"""The ONE API router, mounted by every server in the kit.

Standalone uvicorn server, Ray Serve ingress and DeepSpeed rank 0 all serve
exactly these routes; they differ only in the `ModelBackend` on `app.state`.
Route functions stay thin: logic lives in `app.api.openai`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from app.api.auth import require_api_key
from app.api.backend import ModelBackend
from app.api.openai import OpenAIServing
from app.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _backend(request: Request) -> ModelBackend:
    backend: ModelBackend = request.app.state.backend
    return backend


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining", "models": {}}, status_code=503)
    ready, detail = await _backend(request).readiness()
    return JSONResponse({"status": "ready" if ready else "not_ready", "models": detail},
                        status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


async def _card(backend: ModelBackend, model_id: str, detail: dict[str, Any]) -> ModelCard:
    info = await backend.engine_info(model_id)
    return ModelCard(
        id=model_id,
        engine=info.engine,
        engine_reason=info.reason,
        max_model_len=info.max_context or None,
        ready=bool(detail.get(model_id, {}).get("ready")),
        engine_info=dataclasses.asdict(info),
    )


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    backend = _backend(request)
    _, detail = await backend.readiness()
    return ModelList(data=[await _card(backend, mid, detail) for mid in backend.model_ids()])


@v1.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    backend = _backend(request)
    _, detail = await backend.readiness()
    return await _card(backend, model_id, detail)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await OpenAIServing(_backend(request), request.app.state.metrics).chat(body, request)


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await OpenAIServing(_backend(request), request.app.state.metrics).completion(body, request)


router.include_router(v1)
