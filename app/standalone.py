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

import logging
from typing import Any

from app.api.app import create_app
from app.api.backend import LocalBackend
from app.engines.base import EngineSpec, LoraConfig, ServingKnobs
from app.engines.select import SelectedEngine
from app.http_guard import guarded_server
from app.metrics import MetricsSink, PrometheusSink
from app.settings import Settings, default_model_id, model_aliases

log = logging.getLogger(__name__)

SETTINGS_SOURCE = "LLM_* settings / serve options"




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
    lora = None
    if settings.dynamic_lora_loading_path:
        lora = LoraConfig(dynamic_lora_loading_path=settings.dynamic_lora_loading_path,
                          max_num_adapters_per_replica=settings.max_num_adapters_per_replica)
    return EngineSpec(
        model_id=settings.served_model_name or default_model_id(settings.model),
        model_source=settings.model,
        engine=settings.engine,
        engine_kwargs=kwargs,
        lora_config=lora,
        source=SETTINGS_SOURCE,
        **settings.model_dump(include=set(ServingKnobs.model_fields)),
    )


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
                     sse_keepalive_s=settings.sse_keepalive_s, batch=batch, keys_file=settings.keys_file or None,
                     usage_db=settings.usage_db or None)
    server = guarded_server(app, settings, host=settings.host, port=settings.port, log_level=settings.log_level)
    log.info("serving %s on http://%s:%s", ", ".join(s.model_id for s in specs), settings.host, settings.port)
    server.run()
