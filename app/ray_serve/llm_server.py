"""The LLM server deployment: one Serve replica = one engine from the engine protocol.

The constructor is async and starts the engine (vLLM or the transformers
fallback via `start_engine`, handed this replica's `RaySink`), so a replica only
becomes RUNNING once its engine has loaded and warmed up. `generate` streams
`GenerationChunk`s back to the ingress, coalesced (`app.ray_serve.coalesce`: what the engine yields within
`stream_coalesce_ms` crosses Ray as one message; the first one is stamped with
`served_by = "<engine>@<node_ip>/<replica_id>"`); engine errors travel as the
picklable `EngineError`s. `report()` returns a `ReplicaReport`: the engine's
`EngineInfo` as is, its live stats and where the replica runs. When the ingress
cancels the stream (client went away), Serve cancels this coroutine and the
engine's generator is closed, which stops the decode loop.

LoRA (a model with a `lora_config`): the ingress sends a request for `<model>:<adapter>` with Serve's
`multiplexed_model_id` = the adapter, so Serve routes it to a replica that already holds that adapter. Here the
adapter is taken through Serve's model multiplexing (`serve.multiplexed`, at most
`max_num_adapters_per_replica` per replica): its loader asks the engine to load the adapter (once while held),
and when Serve evicts the least recently used one it calls the held object's `__del__`, which asks the engine to
unload it (once no running request uses it). Serve reports the adapters each replica holds to its router.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from app.engines.base import Engine, EngineInfo, EngineSpec, EngineStats, GenerationChunk, GenerationRequest
from app.engines.select import start_engine
from app.metrics import RaySink
from app.ray_serve import registry
from app.ray_serve.coalesce import coalesce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaLocation:
    """Where a replica runs (also its record in the GCS registry)."""

    app: str
    deployment: str
    replica_id: str
    actor_name: str
    node_id: str
    node_ip: str
    pid: int
    started_at: float

    def record(self, model_id: str, info: EngineInfo) -> dict[str, object]:
        """The replica's JSON record in the GCS registry: this location, `model` and the EngineInfo fields."""
        return {**dataclasses.asdict(self), "model": model_id, **dataclasses.asdict(info)}


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica says about itself; crosses Ray by pickling, unchanged."""

    info: EngineInfo
    ready: bool
    stats: EngineStats
    location: ReplicaLocation


class HeldAdapter:
    """What Serve's multiplexing caches for an adapter a replica holds. Serve calls the object's `__del__` when it
    evicts it; set on the instance (not the class) so that garbage collection never calls it."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.name = name
        setattr(self, "__del__", functools.partial(engine.unload_adapter, name))  # noqa: B010


class LLMServer:
    """Deployment class (wrapped with `serve.deployment` by the app builder)."""

    async def __init__(self, spec: EngineSpec,  # type: ignore[misc]  # Serve awaits async constructors
                       stream_coalesce_ms: float = 50.0) -> None:
        import ray
        from ray import serve

        self.spec = spec
        self.coalesce_s = stream_coalesce_ms / 1000
        self.engine: Engine = await start_engine(spec, RaySink())
        self._hold_adapter: Any = None
        if spec.lora_config is not None:
            engine = self.engine

            async def hold(adapter: str) -> HeldAdapter:
                await engine.load_adapter(adapter)
                return HeldAdapter(engine, adapter)

            self._hold_adapter = serve.multiplexed(
                max_num_models_per_replica=spec.lora_config.max_num_adapters_per_replica)(hold)
        ctx = serve.get_replica_context()
        rt = ray.get_runtime_context()
        self.location = ReplicaLocation(
            app=ctx.app_name, deployment=ctx.deployment, replica_id=ctx.replica_tag,
            actor_name=rt.get_actor_name() or "", node_id=rt.get_node_id(),
            node_ip=ray.util.get_node_ip_address(), pid=os.getpid(), started_at=time.time(),
        )
        self.served_by = f"{self.engine.info.engine}@{self.location.node_ip}/{self.location.replica_id}"
        registry.put(self.location.replica_id, self.location.record(spec.model_id, self.engine.info))
        log.info("replica %s serves %s with %s", self.location.replica_id, spec.model_id, self.engine.info.engine)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if request.adapter is not None and self._hold_adapter is not None:
            await self._hold_adapter(request.adapter)  # 404/400 for a bad adapter; loaded once while held
        first = True
        async with contextlib.aclosing(coalesce(self.engine.generate(request), self.coalesce_s)) as chunks:
            async for chunk in chunks:
                if first:
                    chunk = dataclasses.replace(chunk, served_by=self.served_by)
                    first = False
                yield chunk

    async def adapters(self) -> list[str]:
        """The adapters this replica can serve (the folder's, read now)."""
        return self.engine.adapter_ids()

    async def report(self) -> ReplicaReport:
        return ReplicaReport(info=self.engine.info, ready=self.engine.is_ready(), stats=self.engine.stats(),
                             location=self.location)

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        await self.engine.check_health()

    async def __del__(self) -> None:
        if not hasattr(self, "location"):  # the constructor did not finish
            return
        try:
            registry.delete(self.location.replica_id)
        except Exception:  # the GCS may already be gone at shutdown
            log.debug("could not delete the replica record", exc_info=True)
        await self.engine.shutdown()
