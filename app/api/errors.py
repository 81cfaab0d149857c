"""OpenAI-shaped error responses and the exception handlers that produce them.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`;
bad input is a 4xx, never a 500, and no response ever carries a stack trace.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from app import metrics
from app.api.access import log_request, request_id_of
from app.api.protocol import ErrorBody, ErrorResponse
from app.api.strict import INVALID_UNICODE
from app.engines.base import EngineError
from app.metrics import MetricsSink
from app.tenants.gate import tenant_of

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def _printable(text: str | None) -> str | None:
    """`text` made encodable as UTF-8 (a lone surrogate echoed from a request becomes `\\udc00`)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_payload(
    message: str, status: int, *, err_type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    message, param = _printable(message) or "", _printable(param)
    body = ErrorBody(
        message=message, type=err_type or _TYPE_BY_STATUS.get(status, "server_error"), param=param, code=code
    )
    return ErrorResponse(error=body).model_dump()


def error_response(
    message: str,
    status: int,
    *,
    err_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_payload(message, status, err_type=err_type, param=param, code=code),
        status_code=status,
        headers=headers,
    )


def error_bytes(message: str, status: int, *, code: str | None = None) -> bytes:
    """The JSON body of an error, for the layers below FastAPI (ASGI middleware, the HTTP transport guard)."""
    return json.dumps(error_payload(message, status, code=code), separators=(",", ":")).encode()


async def send_error(send: Send, status: int, message: str, *, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer an ASGI request with an OpenAI-shaped error (for middleware that runs before the router)."""
    body = error_bytes(message, status, code=code)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def engine_error_response(exc: EngineError) -> JSONResponse:
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return error_response(
        exc.message, exc.status_code, err_type=exc.error_type, param=exc.param, code=exc.code, headers=headers
    )


_UNICODE_ERRORS = {INVALID_UNICODE, "string_unicode"}
_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "literal"}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The message and parameter of a 400 for a failed request validation (the batch service reuses it)."""
    # invalid Unicode first: inside a union (`str | list[...]`) pydantic also reports the other members' type
    # mismatches, which would name the wrong problem
    errors = sorted(exc.errors(), key=lambda e: e.get("type") not in _UNICODE_ERRORS)
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")).strip(), None
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query"):  # where the field came from, not part of its name
        loc = loc[1:]
    # pydantic puts union member names into the location; keep the field path only
    # (exact tags only: a prefix test would drop real fields such as `stream`)
    loc = [p for p in loc if not (p in _UNION_TAGS or "[" in p or p.startswith(("function-", "constrained-")))]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first.get("type") == "missing":
        msg = "field required"
    text = f"{param}: {msg}" if param else msg
    if first.get("type") == "string_unicode":  # pydantic's own check (constrained strings)
        msg = "invalid Unicode: lone surrogate (send UTF-8 text)"
    if first.get("type") in _UNICODE_ERRORS:
        return (f"{param}: {msg}" if param else msg), param
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text, param


_GENERATION_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def count_rejection(sink: MetricsSink, path: str, status: int, error_type: str, request_id: str = "-",
                    key: str = "-") -> None:
    """Count a generation request refused before it reached a model (bad body, API key, unknown model, 413).

    Requests that reach a model are counted by the serving layer. These get model="-" and engine="-": the
    model named in a rejected body is never copied into a label (an attacker could grow the series without
    bound), and error rates still add up over all requests.
    """
    endpoint = _GENERATION_ENDPOINTS.get(path.rstrip("/") or path)
    if endpoint is None:
        return
    labels = {"model": "-", "engine": "-", "endpoint": endpoint}
    sink.inc(metrics.REQUESTS, {**labels, "status": str(status)})
    sink.inc(metrics.REQUEST_ERRORS, {**labels, "error_type": error_type})
    log_request(request_id, endpoint, status, error_type=error_type, key=key)


def _reject(request: Request, status: int, error_type: str) -> None:
    tenant = tenant_of(request.scope)
    count_rejection(request.app.state.metrics, request.url.path, status, error_type, request_id_of(request.scope),
                    key=tenant.name if tenant is not None else "-")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        _reject(request, 400, _TYPE_BY_STATUS[400])
        code = INVALID_UNICODE if any(e.get("type") in _UNICODE_ERRORS for e in exc.errors()) else "invalid_value"
        return error_response(message, 400, param=param, code=code)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        # only errors raised before the serving layer took the request (unknown model) get here
        _reject(request, exc.status_code, exc.error_type)
        return engine_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        _reject(request, exc.status_code, _TYPE_BY_STATUS.get(exc.status_code, "http_error"))
        return error_response(str(exc.detail), exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _reject(request, 500, "internal_error")
        return error_response("internal server error", 500, code="internal_error")
