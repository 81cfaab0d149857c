"""`python -m app batch-server`: the Batch API as a service of its own (the compose `batch` service).

It serves `/v1/files` and `/v1/batches` (nginx routes them here on the API port), `/healthz` and `/metrics`,
with the same API keys (`API_KEYS` and the keys file, `KEYS_FILE`), error shapes, request ids and body limits
as the API (the one middleware stack of `app.api.app`), and its runner sends the lines to `LLM_BATCH_TARGET_URL`
(the front door). On SIGTERM it stops the runner: lines in flight are resent after the restart, their outcomes
not yet committed. It runs on the kit's guarded HTTP server (`app.http_guard`: slow-client limits, connection cap,
drain), with a body timeout long enough for an upload through a slow tunnel.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.app import install_middleware
from app.api.errors import install_error_handlers
from app.batch.routes import health_router, router
from app.batch.service import BatchService
from app.http_guard import guarded_server
from app.metrics import PrometheusSink
from app.settings import Settings
from app.tenants.gate import TenantGate

log = logging.getLogger(__name__)
UPLOAD_BODY_TIMEOUT_S = 600.0  # the least time an upload's body gets (LLM_BODY_TIMEOUT_S when longer)


def default_target() -> str:
    """The front door where nginx listens (NGINX_BIND:NGINX_PORT, 0.0.0.0 reached on loopback)."""
    host = os.environ.get("NGINX_BIND", "127.0.0.1")
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{host}:{os.environ.get('NGINX_PORT', '8080')}"


def create_batch_app(settings: Settings) -> FastAPI:
    if not settings.batch_dir:
        raise ValueError("no batch folder: set LLM_BATCH_DIR (or pass --data-dir)")
    sink = PrometheusSink()
    service = BatchService.from_settings(settings, sink, settings.batch_target_url or default_target())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="LLM serving kit: Batch API", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.batch = service
    app.state.metrics = sink
    app.state.api_keys = settings.api_key_list
    app.state.tenants = TenantGate.build(sink, api_keys=settings.api_key_list, keys_file=settings.keys_file or None)
    app.state.draining = False
    app.state.stream_cut = asyncio.Event()
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(router)
    install_middleware(app, sink, max_body_bytes=settings.max_body_bytes, echo_request_id=True,
                       upload_bytes=settings.batch_max_file_bytes)
    return app


def run(settings: Settings) -> None:
    app = create_batch_app(settings)
    # an upload of up to batch_max_file_bytes through a slow tunnel: the body may take minutes
    knobs = settings.model_copy(update={"body_timeout_s": max(settings.body_timeout_s, UPLOAD_BODY_TIMEOUT_S)})
    server = guarded_server(app, knobs, host=settings.host, port=settings.port, log_level=settings.log_level)
    log.info("batch service on http://%s:%s (data %s, target %s)", settings.host, settings.port,
             settings.batch_dir, settings.batch_target_url or default_target())
    server.run()
