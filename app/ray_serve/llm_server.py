"""The LLM server deployment: one Serve replica = one engine from the engine protocol.

The constructor is async and starts the engine (vLLM or the transformers
fallback via `start_engine`), so a replica only becomes RUNNING once its engine
has loaded and warmed up. `generate` streams `GenerationChunk`s back to the
ingress; engine errors travel as the picklable `EngineError`s. When the ingress
cancels the stream (client went away), Serve cancels this coroutine and the
engine's generator is closed, which stops the decode loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from app import metrics
from app.engines.base import Engine, GenerationChunk, GenerationRequest
from app.engines.select import EngineSpec, start_engine
from app.serving import registry

log = logging.getLogger(__name__)


class LLMServer:
    """Deployment class (wrapped with `serve.deployment` by the app builder)."""

    async def __init__(self, spec: EngineSpec) -> None:  # type: ignore[misc]  # Serve awaits async constructors
        import ray
        from ray import serve

        metrics.use_ray_backend()
        self.spec = spec
        self.engine: Engine = await start_engine(spec)
        ctx = serve.get_replica_context()
        rt = ray.get_runtime_context()
        self.replica_id = ctx.replica_id.unique_id
        self.record: dict[str, Any] = {
            "app": ctx.app_name,
            "deployment": ctx.deployment,
            "replica_id": self.replica_id,
            "actor_name": rt.get_actor_name(),
            "node_id": rt.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "model": spec.model_id,
            **self.engine.info.as_dict(),
            "started_at": time.time(),
        }
        registry.put(self.replica_id, self.record)
        log.info("replica %s serves %s with %s", self.replica_id, spec.model_id, self.engine.info.engine)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.engine.generate(request):
            yield chunk

    async def info(self) -> dict[str, Any]:
        s = self.engine.stats()
        return {**self.record, "ready": self.engine.is_ready(), "running": s.running, "waiting": s.waiting,
                "max_context": self.engine.info.max_context}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        if not hasattr(self, "engine"):  # the constructor did not finish
            return
        try:
            registry.delete(self.replica_id)
        except Exception:  # the GCS may already be gone at shutdown
            log.debug("could not delete the replica record", exc_info=True)
        await self.engine.shutdown()
