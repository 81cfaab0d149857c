"""Standalone API server (`python -m app serve`): the router on uvicorn, no Ray.

This is also the process nginx fails over to, so it shuts down gracefully: on
SIGTERM/SIGINT `/readyz` turns 503 at once, the listener closes, in-flight
requests get up to `graceful_timeout_s` to finish; then the ones still running are cut as the server's
doing (streams end with an SSE error `server_shutting_down` and `[DONE]`, others get a 503), and after
`CUT_WRITE_S` more uvicorn cancels what is left and the engines stop. The transport limits of
`app.http_guard` (read timeouts, header size, keep-alive, connection cap) come from the settings.
One `PrometheusSink` records for the engines and the API alike (served on `/metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import uvicorn

from app import compat
from app.api.app import create_app
from app.api.backend import LocalBackend
from app.engines.base import EngineSpec, ServingKnobs
from app.engines.select import SelectedEngine
from app.http_guard import TransportLimits, server_config
from app.metrics import MetricsSink, PrometheusSink
from app.settings import Settings, default_model_id, model_aliases

log = logging.getLogger(__name__)

SETTINGS_SOURCE = "LLM_* settings / serve options"
CUT_WRITE_S = 1.0  # after the grace: time the cut requests get to write their last event




class _DrainingServer(uvicorn.Server):
    """uvicorn server that flags the app as draining as soon as a stop signal arrives, and cuts the requests
    still running when the grace ends (`app.state.stream_cut`) a moment before uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, app_state: Any, grace_s: float):
        super().__init__(config)
        self._app_state = app_state
        self._grace_s = grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        cut = asyncio.get_running_loop().call_later(self._grace_s, self._app_state.stream_cut.set)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app_state.draining = True
        log.info("signal %s: draining (in-flight requests get %ss)", sig, self._grace_s)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a drained SIGTERM is a normal stop (exit 0), see compat
            compat.uvicorn_forget_signal(self, signal.SIGTERM)


def build_backend(specs: list[EngineSpec], metrics: MetricsSink, backup: bool = False,
                  aliases: dict[str, str] | None = None) -> LocalBackend:
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate model ids: {ids}")
    return LocalBackend({s.model_id: SelectedEngine(s, metrics) for s in specs}, location="standalone",
                        backup=backup, aliases=aliases)


def spec_from_settings(settings: Settings) -> EngineSpec:
    if not settings.model:
        raise ValueError("no model given: pass --model PATH_OR_HUB_ID (or set LLM_MODEL)")
    kwargs: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype,
                              "trust_remote_code": settings.trust_remote_code}
    if settings.max_model_len:
        kwargs["max_model_len"] = settings.max_model_len
    if settings.max_num_seqs is not None:  # unset: each engine's own default
        kwargs["max_num_seqs"] = settings.max_num_seqs
    return EngineSpec(
        model_id=settings.served_model_name or default_model_id(settings.model),
        model_source=settings.model,
        engine=settings.engine,
        engine_kwargs=kwargs,
        source=SETTINGS_SOURCE,
        **settings.model_dump(include=set(ServingKnobs.model_fields)),
    )


def transport_limits(settings: Settings) -> TransportLimits:
    return TransportLimits(header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                           max_header_bytes=settings.max_header_bytes,
                           keepalive_timeout_s=settings.keepalive_timeout_s, max_connections=settings.max_connections)


def run(settings: Settings, specs: list[EngineSpec] | None = None) -> None:
    aliases: dict[str, str] = {}
    if not specs:
        specs = [spec_from_settings(settings)]
        aliases = model_aliases(settings.model, specs[0].model_id)
    sink = PrometheusSink()
    backend = build_backend(specs, sink, backup=settings.backup, aliases=aliases)
    batch = None
    if settings.batch_dir:  # the Batch API on this server, its runner sending to the server itself
        from app.batch.service import BatchService

        batch = BatchService.from_settings(
            settings, sink, settings.batch_target_url or f"http://127.0.0.1:{settings.port}")
    app = create_app(backend, metrics=sink, api_keys=settings.api_key_list, max_body_bytes=settings.max_body_bytes,
                     sse_keepalive_s=settings.sse_keepalive_s, batch=batch)
    config = server_config(app, host=settings.host, port=settings.port, limits=transport_limits(settings),
                           log_level=settings.log_level, graceful_timeout_s=settings.graceful_timeout_s + CUT_WRITE_S)
    server = _DrainingServer(config, app.state, settings.graceful_timeout_s)
    log.info("serving %s on http://%s:%s", ", ".join(s.model_id for s in specs), settings.host, settings.port)
    server.run()
