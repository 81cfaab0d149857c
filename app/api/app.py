"""Builds the FastAPI application around the one router.

`create_app(backend, api_keys=..., keys_file=..., usage_db=...)` is what every server mounts: error
handlers, body-size limit, request ids, keys and their limits (`app.tenants`), the router and a lifespan that
starts and stops the backend.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.access import clean_request_id, request_id_of
from app.api.auth import APIKeyMiddleware
from app.api.backend import ModelBackend
from app.api.errors import count_rejection, install_error_handlers, send_error
from app.api.openapi import document
from app.api.routes import router
from app.batch.routes import router as batch_router
from app.batch.service import BatchService
from app.engines.grammar.install import missing_packages
from app.engines.import_lock import preload
from app.metrics import MetricsSink, PrometheusSink
from app.tenants.gate import TenantGate

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Rejects request bodies over `max_bytes` with 413 (by Content-Length or while streaming);
    `path_limits` (path prefix -> bytes) raise the limit for uploads (the batch service's `/v1/files`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: MetricsSink,
                 path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        max_bytes = next((n for prefix, n in self.path_limits.items() if path.startswith(prefix)), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._reject(scope, send, max_bytes)
            return
        seen = 0
        too_big = False
        started = False

        async def limited() -> Message:
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    too_big = True
                    raise _BodyTooLarge()
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if too_big:
                return  # the app's answer to a truncated body (FastAPI turns our exception into a 400) is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except _BodyTooLarge:
            pass
        if too_big and not started:
            await self._reject(scope, send, max_bytes)

    async def _reject(self, scope: Scope, send: Send, max_bytes: int) -> None:
        count_rejection(self.metrics, scope.get("path", ""), 413, "invalid_request_error", request_id_of(scope))
        await send_error(send, 413, f"request body exceeds {max_bytes} bytes", code="request_too_large")


class _BodyTooLarge(Exception):
    pass


class JSONBodyMiddleware:
    """Treats every POST body under /v1 as JSON, whatever Content-Type says (curl -d sends form type);
    `/v1/files` keeps its multipart upload."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/") \
                and not scope["path"].startswith("/v1/files"):
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Takes the request's X-Request-Id (or makes one) for the access log and echoes it on every response.

    `echo=False` behind Ray Serve: Serve's proxy already sets the header on the request (making one when the
    client sent none) and adds it to the response, so echoing it again would send it twice.
    """

    def __init__(self, app: ASGIApp, echo: bool = True):
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"x-request-id") or uuid.uuid4().hex.encode()
        rid = clean_request_id(raw)
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id, for the access log

        async def with_id(message: Message) -> None:
            if self.echo and message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, with_id)


def install_middleware(app: FastAPI, sink: MetricsSink, *, max_body_bytes: int, echo_request_id: bool,
                       upload_bytes: int | None = None) -> None:
    """The middleware stack of every server (outermost last): request id, API keys and limits, body limit, JSON
    bodies. `upload_bytes`: the body limit of `/v1/files` (a batch input file plus the multipart framing).
    The keys are `app.state.tenants` (a `TenantGate`)."""
    path_limits = {"/v1/files": upload_bytes + 1024 * 1024} if upload_bytes else None
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, metrics=sink, path_limits=path_limits)
    app.add_middleware(APIKeyMiddleware, gate=app.state.tenants, metrics=sink)  # before any body is read
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)


def create_app(
    backend: ModelBackend,
    *,
    metrics: MetricsSink | None = None,
    api_keys: list[str] | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
    manage_backend: bool = True,
    title: str = "LLM serving kit",
    echo_request_id: bool = True,
    sse_keepalive_s: float = 15.0,
    batch: BatchService | None = None,
    keys_file: str | None = None,
    usage_db: str | None = None,
) -> FastAPI:
    """The API application. `metrics` is the sink the server's engines record into too (default: a new
    PrometheusSink, served on /metrics); `manage_backend=False` when the caller starts/stops the backend
    itself; `echo_request_id=False` when a proxy in front (Ray Serve's) already echoes X-Request-Id;
    `sse_keepalive_s`: a `: keep-alive` comment on a stream silent that long (0: never). Setting
    `app.state.stream_cut` (the server's shutdown grace ended) ends the requests still running. `batch`: also serve
    the Batch API (`/v1/files`, `/v1/batches`) and run its runner while the app lives. `keys_file`: the keys file
(named keys with limits, re-read when it changes; a bad one at start raises `KeysFileError`, a ValueError);
`api_keys` stay accepted beside it as the `anonymous` key; `usage_db`: the SQLite file of per-key usage (None: in
memory)."""
    sink = metrics or PrometheusSink()
    tenants = TenantGate.build(sink, api_keys=api_keys, keys_file=keys_file, usage_db=usage_db,
                               model_ids=backend.model_ids, check_globs=not backend.backup)
    if keys_file and not usage_db:
        log.warning("per-key usage is counted in memory only (lost on restart): set LLM_USAGE_DB")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # xgrammar (tools, response_format) takes seconds to import (it loads torch): in the background from the
        # start, so that the first such request does not wait for it
        missing = missing_packages()
        if not missing:
            preload("xgrammar")
        for entry in missing:
            log.warning("%s is not installed: %s answer 501 until it is (%s)", entry["package"],
                        entry["needed_for"], entry["fix"])
        if manage_backend:
            await backend.start()
        if batch is not None:
            await batch.start()
        try:
            yield
        finally:
            app.state.draining = True
            if batch is not None:
                await batch.stop()
            if manage_backend:
                await backend.shutdown()
            tenants.close()

    app = FastAPI(title=title, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.backend = backend
    app.state.metrics = sink
    app.state.api_keys = list(api_keys or [])
    app.state.tenants = tenants
    app.state.draining = False
    app.state.stream_cut = asyncio.Event()
    app.state.sse_keepalive_s = sse_keepalive_s
    app.state.batch = batch
    install_error_handlers(app)
    app.include_router(router)
    if batch is not None:
        app.include_router(batch_router)
    document(app, model_ids=backend.model_ids, auth=tenants.enabled)
    install_middleware(app, sink, max_body_bytes=max_body_bytes, echo_request_id=echo_request_id,
                       upload_bytes=batch.limits.max_file_bytes if batch is not None else None)
    return app
