"""`RayServeBackend`: the `ModelBackend` the ingress mounts, forwarding to LLM server deployments.

Routes by model id to that model's deployment handle (a `<model>:<adapter>` request with Serve's
`multiplexed_model_id` = the adapter, so it reaches a replica holding it) and streams chunks back
with `handle.options(stream=True)`. Each replica's `ReplicaReport` (its engine's
`EngineInfo` as is, live stats, location) is what `/readyz` and `/v1/models`
show; the `EngineInfo` is cached per model (so the fan-out limit `max_parallel`
applies here exactly as on the standalone server). Errors: an `EngineError`
raised in a replica arrives pickled inside Ray's `RayTaskError` and is returned
as it is (`.cause`); only Ray's own exceptions are mapped: Serve's
`BackPressureError` (max_queued_requests reached) becomes 429 with Retry-After,
a dead replica or actor 503. Closing the stream (the client went away) cancels
the request on the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator
from typing import Any

from app.api.backend import ModelBackend
from app.engines.base import (
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    GenerationChunk,
    GenerationRequest,
    QueueFullError,
)
from app.ray_serve.llm_server import ReplicaReport

log = logging.getLogger(__name__)


def unwrap_ray_error(exc: BaseException, model_id: str, retry_after_s: float = 1.0) -> BaseException:
    """The error the API should report for an exception raised through a Serve handle."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if isinstance(cause, EngineError):
            return cause  # raised by the engine, pickled across Ray unchanged
        if isinstance(cause, BaseException) and not isinstance(cause, rex.RayTaskError):
            nested = unwrap_ray_error(cause, model_id, retry_after_s)
            if isinstance(nested, EngineError):
                return nested
        return EngineNotReadyError(f"model {model_id}: replica failed: {type(cause).__name__}", retry_after=1)
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, BackPressureError):
        return QueueFullError(
            f"model {model_id} is at capacity (max_queued_requests reached); retry later", retry_after=retry_after_s
        )
    if isinstance(exc, rex.RayActorError | rex.ActorUnavailableError | DeploymentUnavailableError):
        return EngineNotReadyError(f"model {model_id}: replica unavailable ({type(exc).__name__})", retry_after=5)
    return exc


class RayServeBackend(ModelBackend):
    """Model id -> Serve deployment handle of that model's LLM server."""

    def __init__(self, handles: dict[str, Any], info_timeout_s: float = 5.0, retry_after_s: float = 1.0):
        self.handles = handles
        self.info_timeout_s = info_timeout_s
        self.retry_after_s = retry_after_s
        self._info: dict[str, EngineInfo] = {}
        self._stream = {mid: h.options(stream=True) for mid, h in handles.items()}

    def model_ids(self) -> list[str]:
        return list(self.handles)

    def _check(self, model_id: str) -> None:
        if model_id not in self.handles:
            raise self.not_found(model_id)

    async def adapter_ids(self, model_id: str) -> list[str]:
        """A replica's reading of the model's adapter folder (the same mount on every worker)."""
        self._check(model_id)
        resp = self.handles[model_id].adapters.remote()
        try:
            names: list[str] = await asyncio.wait_for(resp, self.info_timeout_s)
        except Exception:
            resp.cancel()
            return []
        return names

    async def _report(self, model_id: str) -> ReplicaReport:
        resp = self.handles[model_id].report.remote()
        try:
            report: ReplicaReport = await asyncio.wait_for(resp, self.info_timeout_s)
        except TimeoutError:
            resp.cancel()
            raise
        self._info[model_id] = report.info
        return report

    async def engine_info(self, model_id: str) -> EngineInfo:
        model_id = self.split(model_id)[0]
        self._check(model_id)
        if model_id in self._info:
            return self._info[model_id]
        try:
            return (await self._report(model_id)).info
        except Exception as exc:
            return EngineInfo(model_id=model_id, engine="pending", model_source="", max_context=0,
                              reason=f"no ready replica yet ({type(exc).__name__})")

    async def generate(self, model_id: str, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        model_id, adapter = self.split(model_id)
        self._check(model_id)
        handle = self._stream[model_id]
        if adapter is not None:  # Serve's multiplexing: to a replica that holds the adapter when one does
            request = dataclasses.replace(request, adapter=adapter)
            handle = handle.options(multiplexed_model_id=adapter)
        gen = handle.generate.remote(request)
        finished = False
        try:
            async for chunk in gen:
                yield chunk
            finished = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            mapped = unwrap_ray_error(exc, model_id, self.retry_after_s)
            finished = True
            if mapped is exc:
                # a replica that died mid-request (or a transport error): retryable, so 503 rather than 500
                log.warning("model %s: request failed in Serve: %s: %s", model_id, type(exc).__name__, exc)
                raise EngineNotReadyError(
                    f"model {model_id}: the replica failed during the request ({type(exc).__name__}); retry",
                    retry_after=1,
                ) from None
            raise mapped from None
        finally:
            if not finished:
                gen.cancel()  # client went away: stop the replica's generation

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every model has a RUNNING replica whose engine is ready (replicas only run once loaded)."""

        async def one(mid: str) -> tuple[str, dict[str, Any]]:
            try:
                report = await self._report(mid)
            except Exception as exc:
                known = self._info.get(mid)
                return mid, {
                    "ready": False,
                    **(dataclasses.asdict(known) if known else {"engine": "pending", "reason": "no running replica"}),
                    "error": f"no running replica answered within {self.info_timeout_s:g}s ({type(exc).__name__})",
                }
            return mid, {"ready": report.ready, **dataclasses.asdict(report.info), **dataclasses.asdict(report.stats),
                         "node_ip": report.location.node_ip, "replica_id": report.location.replica_id}

        detail = dict(await asyncio.gather(*(one(m) for m in self.handles)))
        return bool(detail) and all(e["ready"] for e in detail.values()), detail
