"""What the API router talks to: a set of models, each served by some engine.

`ModelBackend` is the seam between the one API router and the three servers that
mount it: `LocalBackend` holds in-process engines (standalone server, DeepSpeed
rank 0); the Ray Serve ingress provides a backend that forwards to model
deployments. The router never knows which one it has. `generate` is an async
generator everywhere: an unknown model, a full queue or a dead engine are raised
when the first chunk is asked for, like every engine error.

LoRA: a request's `model` may be `<model id>:<adapter>` (Ray Serve LLM's naming); `split` finds the model, and
`generate` hands the engine the adapter on `GenerationRequest.adapter` (the engine checks it: 404 for no such
adapter folder, 400 for a bad one). `adapter_ids(model)` lists the adapters found now (for /v1/models).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator
from typing import Any

from app.engines.base import (
    Engine,
    EngineError,
    EngineInfo,
    GenerationChunk,
    GenerationRequest,
    ModelNotFoundError,
    ModelNotServedHereError,
)
from app.engines.lora import split_model_id

log = logging.getLogger(__name__)


class ModelBackend(abc.ABC):
    @abc.abstractmethod
    def model_ids(self) -> list[str]: ...

    @abc.abstractmethod
    async def engine_info(self, model_id: str) -> EngineInfo:
        """Raises ModelNotFoundError for unknown ids."""

    @abc.abstractmethod
    def generate(self, model_id: str, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """The engine's stream; its first chunk carries `served_by`."""

    async def adapter_ids(self, model_id: str) -> list[str]:
        """The LoRA adapters model `model_id` serves now (default: none)."""
        return []

    def split(self, model: str) -> tuple[str, str | None]:
        """(model id, adapter) of a request's `model` (`<model id>:<adapter>`; adapter None for a model id)."""
        return split_model_id(model, set(self.model_ids()))

    @abc.abstractmethod
    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(all models ready, per-model detail: `ready`, the EngineInfo fields, live stats, `error`)."""

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    backup = False  # a backup server: an unknown model is the cluster's, retryable (ModelNotServedHereError)

    def not_found(self, model_id: str) -> EngineError:
        available = ", ".join(self.model_ids()) or "none"
        if self.backup:
            return ModelNotServedHereError(
                f"model {model_id!r} is not served by this backup server (it serves: {available}); the cluster "
                "that serves it is unavailable: retry shortly", retry_after=5)
        return ModelNotFoundError(f"model {model_id!r} does not exist; available models: {available}")


class LocalBackend(ModelBackend):
    """Engines living in this process, started in the background at server start-up.

    `location` names this server in `served_by` (`<engine>@<location>`, e.g. `transformers@standalone`).
    """

    def __init__(self, engines: dict[str, Engine], location: str = "standalone", backup: bool = False,
                 aliases: dict[str, str] | None = None):
        """`aliases`: other names clients may send for a model id (not listed by /v1/models), e.g. the model's
        folder path for a server whose id defaults to the folder's name."""
        self.engines = engines
        self.aliases = {a: mid for a, mid in (aliases or {}).items() if a not in engines}
        self.backup = backup
        self.location = location
        self._start_errors: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def model_ids(self) -> list[str]:
        return list(self.engines)

    def split(self, model: str) -> tuple[str, str | None]:
        base, adapter = split_model_id(model, set(self.engines) | set(self.aliases))
        return self.aliases.get(base, base), adapter

    def _engine(self, model_id: str) -> Engine:
        try:
            return self.engines[self.aliases.get(model_id, model_id)]
        except KeyError:
            raise self.not_found(model_id) from None

    async def engine_info(self, model_id: str) -> EngineInfo:
        return self._engine(self.split(model_id)[0]).info

    async def adapter_ids(self, model_id: str) -> list[str]:
        engine = self._engine(model_id)
        return await asyncio.to_thread(engine.adapter_ids)

    async def generate(self, model_id: str, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        base, adapter = self.split(model_id)
        engine = self._engine(base)
        if adapter is not None:
            request = dataclasses.replace(request, adapter=adapter)
        first = True
        async with contextlib.aclosing(engine.generate(request)) as chunks:
            async for chunk in chunks:
                if first:
                    chunk = dataclasses.replace(chunk, served_by=f"{engine.info.engine}@{self.location}")
                    first = False
                yield chunk

    async def start(self) -> None:
        """Load every engine in the background so /healthz answers at once and /readyz tracks loading."""

        async def _load(mid: str, engine: Engine) -> None:
            try:
                await engine.start()
            except Exception as exc:
                log.exception("model %s failed to load", mid)
                self._start_errors[mid] = f"{type(exc).__name__}: {exc}"

        for mid, engine in self.engines.items():
            self._tasks.append(asyncio.create_task(_load(mid, engine), name=f"load-{mid}"))

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {}
        for mid, engine in self.engines.items():
            entry: dict[str, Any] = {"ready": engine.is_ready(), **dataclasses.asdict(engine.info)}
            if mid in self._start_errors:
                entry["error"] = self._start_errors[mid]
            else:
                try:
                    await engine.check_health()
                except Exception as exc:
                    entry["ready"] = False
                    entry["error"] = str(exc)
            entry.update(dataclasses.asdict(engine.stats()))
            detail[mid] = entry
        return bool(detail) and all(e["ready"] for e in detail.values()), detail

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        for engine in self.engines.values():
            await engine.shutdown()
