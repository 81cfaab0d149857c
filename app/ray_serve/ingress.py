"""The ingress deployment (the ONE API router via `create_app`) and the app builder from model configs.

`build_app(configs)` makes one LLM server deployment per model config (its own
actor options, autoscaling, max_ongoing_requests / max_queued_requests, from
`ModelConfig.deployment_options()`) and an ingress that routes by the request's
`model`. The ingress exposes no routes of its own: it mounts
`create_app(RayServeBackend(handles), metrics=RaySink())`, so the wire format,
auth, errors and metrics are exactly the standalone server's. The ingress runs on
the head (under direct ingress it serves SERVE_PORT there itself) with Serve's
user code and handle router on the replica's one event loop.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from app import compat
from app.api.app import create_app
from app.metrics import RaySink
from app.models.config import ModelConfig
from app.ray_serve.backend import RayServeBackend

APP_NAME = "llm"
INGRESS_NAME = "ingress"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource on the head node only


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

    def __init__(self, handles: dict[str, Any], api_keys: list[str], max_body_bytes: int, keys_file: str = "",
                 usage_db: str = "") -> None:
        compat.serve_direct_ingress_reuse_port()  # a restarted ingress binds SERVE_PORT despite TIME_WAIT
        route_access_log_to_serve()
        self._metrics = RaySink()
        self._backend = RayServeBackend(handles)
        self._api_keys = api_keys
        self._max_body_bytes = max_body_bytes
        self._keys_file, self._usage_db = keys_file, usage_db  # paths on the head, where this replica runs

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(
            self._backend, metrics=self._metrics, api_keys=self._api_keys, max_body_bytes=self._max_body_bytes,
            manage_backend=False, title="LLM serving kit (Ray Serve)", echo_request_id=False,
            keys_file=self._keys_file or None, usage_db=self._usage_db or None,
        )


def build_app(
    configs: list[ModelConfig],
    *,
    api_keys: list[str] | None = None,
    max_body_bytes: int = 4 * 1024 * 1024,
    ingress_replicas: int = 1,
    ingress_max_ongoing: int = 1000,
    keys_file: str = "",
    usage_db: str = "",
) -> Any:
    """The Serve `Application`: ingress bound to one LLM server deployment per config. `keys_file`, `usage_db`:
    paths on the head (the ingress runs there), read by the ingress replica."""
    from ray import serve

    from app.ray_serve.llm_server import LLMServer

    deployment: Any = serve.deployment  # typed as a decorator factory; called with the class it builds one
    handles = {
        cfg.model_id: deployment(LLMServer).options(**cfg.deployment_options()).bind(cfg.engine_spec(),
                                                                                    cfg.stream_coalesce_ms)
        for cfg in configs
    }
    ingress = deployment(serve.ingress()(Ingress)).options(
        name=INGRESS_NAME,
        num_replicas=ingress_replicas,
        max_ongoing_requests=ingress_max_ongoing,
        # on the head: under direct ingress it serves SERVE_HOST:SERVE_PORT there itself (nginx's primary upstream)
        ray_actor_options={"num_cpus": 0.1, "resources": {HEAD_RESOURCE: 0.001},
                           "runtime_env": {"env_vars": dict(compat.SERVE_ONE_LOOP_VARS)}},
    )
    return ingress.bind(handles, list(api_keys or []), max_body_bytes, keys_file, usage_db)
