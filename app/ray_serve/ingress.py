"""The ingress deployment (the ONE API router via `create_app`) and the app builder from model configs.

`build_app(configs)` makes one LLM server deployment per model config (its own
actor options, autoscaling, max_ongoing_requests / max_queued_requests) and an
ingress that routes by the request's `model`. The ingress exposes no routes of
its own: it mounts `create_app(RayServeBackend(handles))`, so the wire format,
auth, errors and metrics are exactly the standalone server's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from app import metrics
from app.api.app import create_app
from app.models.config import ModelConfig
from app.serving.backend import RayServeBackend

APP_NAME = "llm"
INGRESS_NAME = "ingress"


def route_access_log_to_serve() -> None:
    """Send our access log (`app.access`) to this replica's Serve log handlers.

    Serve writes its own logger (`ray.serve`, no propagation) to logs/serve/replica_<app>_<deployment>_*.log,
    while other loggers in a replica stay at the root logger's WARNING. Sharing Serve's handlers puts our line
    (tokens, TTFT) next to Serve's access line for the same request id, in the same format and file.
    """
    serve_logger = logging.getLogger("ray.serve")
    access = logging.getLogger("app.access")
    if not serve_logger.handlers or os.environ.get("LLM_ACCESS_LOG", "true").strip().lower() in ("0", "false", "no"):
        return
    access.setLevel(logging.INFO)
    access.propagate = False
    for handler in serve_logger.handlers:
        if handler not in access.handlers:
            access.addHandler(handler)


class Ingress:
    """Deployment class; `__serve_build_asgi_app__` hands Serve the API app at replica start."""

    def __init__(self, handles: dict[str, Any], api_keys: list[str], max_body_bytes: int) -> None:
        metrics.use_ray_backend()
        route_access_log_to_serve()
        self._backend = RayServeBackend(handles)
        self._api_keys = api_keys
        self._max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(
            self._backend, api_keys=self._api_keys, max_body_bytes=self._max_body_bytes, manage_backend=False,
            title="LLM serving kit (Ray Serve)", echo_request_id=False,
        )


def deployment_options(cfg: ModelConfig) -> dict[str, Any]:
    dc = cfg.deployment_config
    actor: dict[str, Any] = dc.ray_actor_options.model_dump(exclude_none=True)
    if not actor.get("resources"):
        actor.pop("resources", None)
    if cfg.runtime_env:
        actor["runtime_env"] = cfg.runtime_env
    opts: dict[str, Any] = {
        "name": cfg.deployment_name,
        "ray_actor_options": actor,
        "max_ongoing_requests": dc.max_ongoing_requests,
        "max_queued_requests": dc.max_queued_requests,
        "health_check_period_s": dc.health_check_period_s,
        "health_check_timeout_s": dc.health_check_timeout_s,
        "graceful_shutdown_timeout_s": dc.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": dc.graceful_shutdown_wait_loop_s,
    }
    if dc.autoscaling_config is not None:
        opts["autoscaling_config"] = dc.autoscaling_config.model_dump(exclude_none=True)
    else:
        opts["num_replicas"] = dc.num_replicas or 1
    return opts


def build_app(
    configs: list[ModelConfig],
    *,
    api_keys: list[str] | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
    ingress_replicas: int = 1,
    ingress_max_ongoing: int = 1000,
) -> Any:
    """The Serve `Application`: ingress bound to one LLM server deployment per config."""
    from ray import serve

    from app.serving.server import LLMServer

    handles = {
        cfg.model_id: serve.deployment(LLMServer).options(**deployment_options(cfg)).bind(cfg.engine_spec())
        for cfg in configs
    }
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS_NAME,
        num_replicas=ingress_replicas,
        max_ongoing_requests=ingress_max_ongoing,
        ray_actor_options={"num_cpus": 0.1},
    )
    return ingress.bind(handles, list(api_keys or []), max_body_bytes)
