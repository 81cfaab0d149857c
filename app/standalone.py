"""Standalone API server: the router on uvicorn, no Ray.

This is also the process nginx fails over to, so it shuts down gracefully: on
SIGTERM/SIGINT `/readyz` turns 503 at once, the listener closes, in-flight
requests get up to `graceful_timeout_s` to finish, then the engines stop.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

import uvicorn

from app.api.app import create_app
from app.api.backend import LocalBackend
from app.engines.select import EngineSpec, SelectedEngine
from app.settings import Settings

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn server that flags the app as draining as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, app_state: Any):
        super().__init__(config)
        self._app_state = app_state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app_state.draining = True
        log.info("signal %s: draining (in-flight requests get %ss)", sig, self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its shutdown, so a clean drain would end in "killed by
        # SIGTERM" (exit -15); a drained SIGTERM is a normal stop for systemd/compose/nginx failover: exit 0
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def build_backend(specs: list[EngineSpec]) -> LocalBackend:
    ids = [s.model_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate model ids: {ids}")
    return LocalBackend({s.model_id: SelectedEngine(s) for s in specs})


def spec_from_settings(settings: Settings) -> EngineSpec:
    if not settings.model:
        raise ValueError("no model given: pass --model PATH_OR_HUB_ID (or set LLM_MODEL)")
    kwargs: dict[str, Any] = {"device": settings.device, "dtype": settings.dtype,
                              "max_num_seqs": settings.max_running,
                              "trust_remote_code": settings.trust_remote_code}
    if settings.max_model_len:
        kwargs["max_model_len"] = settings.max_model_len
    return EngineSpec(
        model_id=settings.served_model_name or settings.model,
        model_source=settings.model,
        engine=settings.engine,
        engine_kwargs=kwargs,
        max_waiting=settings.max_waiting,
        default_max_tokens=settings.default_max_tokens,
        retry_after_s=settings.retry_after_s,
    )


def run(settings: Settings, specs: list[EngineSpec] | None = None) -> None:
    specs = specs or [spec_from_settings(settings)]
    backend = build_backend(specs)
    app = create_app(backend, api_keys=settings.api_key_list, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # 0 means no grace period (int(0.5) or None would have meant waiting forever)
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout_s),
        timeout_keep_alive=30,
        access_log=False,
    )
    server = _DrainingServer(config, app.state)
    log.info("serving %s on http://%s:%s", ", ".join(s.model_id for s in specs), settings.host, settings.port)
    server.run()
