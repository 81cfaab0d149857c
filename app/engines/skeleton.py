"""The skeleton every engine repeats, written once: `EngineSkeleton`.

Each engine (transformers, vLLM, DeepSpeed TP rank 0) serves a request the same way: refuse it while the engine
is loading or dead, render and tokenize the prompt off the event loop (a multi-MB prompt must not stall it),
compute the token budget against the context, wait for an admission slot (`AdmissionController`: `max_running`
generations plus `max_waiting` queued, 429 beyond), then stream. Around that, the same metrics: the model's ready
gauge (0 while loading, 1 once ready, 0 again when it dies), the engine-info gauge with the reason the engine was
chosen, the admission gauges, the aborted-request counter. A subclass implements only what differs:

- `_load()`: load the model and warm it up (the ready gauges and the log line are set around it);
- `_render(request)`: the prompt's token ids (runs in a worker thread);
- `_stream(prompt_ids, request, max_new)`: the generation itself, run once the request holds its slot;
- `_check_request(request, max_new)`: optional, refuse what the engine cannot run before it waits for a slot;
- `_dead_reason()` and `_dead_error()`: whether the engine died, and the error a request then gets;
- `_load_adapter(info)` / `_unload_adapter(name)`: for an engine built with an `AdapterFolder` (a model with a
  `lora_config`), put a LoRA adapter in and out of the model. Which adapters are held, loaded on first use and
  evicted least-recently-used, is `app.engines.adapters.AdapterCache`, the same for every engine; a request with
  `adapter` set holds its adapter from before admission until its stream ends, and is counted per adapter.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncGenerator

from app import metrics
from app.engines.adapters import AdapterCache
from app.engines.admission import AdmissionController
from app.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    ModelNotFoundError,
)
from app.engines.lora import AdapterFolder, AdapterInfo, check_name
from app.engines.text import token_budget
from app.metrics import MetricsSink, PrometheusSink


class EngineSkeleton(Engine):
    """Spec-independent engine plumbing: labels, admission, ready and info gauges, render → budget → admit."""

    name: str

    def __init__(self, info: EngineInfo, *, metrics_sink: MetricsSink | None, max_running: int, max_waiting: int,
                 retry_after_s: float, default_max_tokens: int, fallback: bool = False,
                 adapters: AdapterFolder | None = None) -> None:
        self.info = info
        self.metrics = metrics_sink or PrometheusSink()
        self.fallback = fallback
        self.default_max_tokens = default_max_tokens
        self._labels = {"model": info.model_id, "engine": self.name}
        self._admission = AdmissionController(max_running, max_waiting, retry_after_s, metrics=self.metrics,
                                              metric_labels=self._labels)
        self.info.max_parallel = self._admission.capacity
        self._ready = False
        self.adapters: AdapterCache | None = None
        if adapters is not None:
            self.info.lora_path, self.info.max_adapters = str(adapters.root), adapters.max_adapters
            self.adapters = AdapterCache(adapters, load=self._load_adapter, unload=self._unload_adapter,
                                         sink=self.metrics, labels=self._labels)

    # ------------------------------------------------------------------ what each engine implements
    @abc.abstractmethod
    async def _load(self) -> None:
        """Load the model and warm it up; raise on failure (the model then stays not ready)."""

    @abc.abstractmethod
    def _render(self, request: GenerationRequest) -> list[int]:
        """The request's prompt token ids (called in a worker thread)."""

    @abc.abstractmethod
    def _stream(self, prompt_ids: list[int], request: GenerationRequest, max_new: int
                ) -> AsyncGenerator[GenerationChunk, None]:
        """The generation, once admitted. Closing it aborts the request in the engine."""

    def _check_request(self, request: GenerationRequest, max_new: int) -> None:
        """Refuse (InvalidRequestError) what the engine cannot run, before the request waits for a slot."""
        return None

    async def _load_adapter(self, info: AdapterInfo) -> None:
        """Put the checked adapter `info` into the model (engines built with an AdapterFolder implement it)."""
        raise NotImplementedError

    async def _unload_adapter(self, name: str) -> None:
        """Take adapter `name` out of the model (no request uses it)."""
        raise NotImplementedError

    def _no_adapters_error(self, name: str) -> EngineError:
        """What a request for an adapter gets from an engine without a lora_config."""
        return ModelNotFoundError(f"model '{self.info.model_id}:{name}' does not exist: model {self.info.model_id} "
                                  "serves no LoRA adapters (its config has no lora_config)")

    def _dead_reason(self) -> str | None:
        """Why the engine can no longer serve (None: alive)."""
        return None

    def _dead_error(self, reason: str) -> EngineDeadError:
        """The error a request gets from a dead engine (subclasses name what died)."""
        return EngineDeadError(f"model {self.info.model_id}: {reason}", retry_after=10)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)
        await self._load()
        self._ready = True
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 1)
        self.metrics.set_gauge(
            metrics.ENGINE_INFO,
            {**self._labels, "fallback": "true" if self.fallback else "false", "reason": self.info.reason}, 1,
        )
        self._admission.publish()

    def _mark_not_ready(self) -> None:
        """The engine died: its ready gauge goes to 0 (requests get `_dead_error`)."""
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)

    def is_ready(self) -> bool:
        return self._ready and self._dead_reason() is None

    def stats(self) -> EngineStats:
        return self._admission.stats()

    def _count_abort(self) -> None:
        self.metrics.inc(metrics.ABORTED, self._labels)

    def _check_serving(self) -> None:
        """Raise what a request gets from a dead or still-loading engine."""
        dead = self._dead_reason()
        if dead is not None:
            raise self._dead_error(dead)
        if not self._ready:
            raise EngineNotReadyError(f"model {self.info.model_id} is still loading", retry_after=5)

    # ------------------------------------------------------------------ adapters
    def adapter_ids(self) -> list[str]:
        return self.adapters.folder.names() if self.adapters is not None else []

    def _adapter_cache(self, name: str) -> AdapterCache:
        check_name(name, self.info.model_id)
        if self.adapters is None:
            raise self._no_adapters_error(name)
        return self.adapters

    async def load_adapter(self, name: str) -> None:
        self._check_serving()
        await self._adapter_cache(name).hold(name)

    async def unload_adapter(self, name: str) -> None:
        if self.adapters is not None:
            await self.adapters.drop(name)

    # ------------------------------------------------------------------ requests
    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        self._check_serving()
        return len(await asyncio.to_thread(self._render, request))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._check_serving()
        if request.adapter is None:
            async with contextlib.aclosing(self._generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        cache = self._adapter_cache(request.adapter)
        await cache.acquire(request.adapter)
        labels = {**self._labels, "adapter": request.adapter}
        tokens = 0
        try:
            self.metrics.inc(metrics.LORA_REQUESTS, labels)
            async with contextlib.aclosing(self._generate(request)) as chunks:
                async for chunk in chunks:
                    tokens = chunk.completion_tokens
                    yield chunk
        finally:
            self.metrics.inc(metrics.LORA_OUTPUT_TOKENS, labels, tokens)
            await asyncio.shield(cache.release(request.adapter))

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        prompt_ids = await asyncio.to_thread(self._render, request)  # CPU-heavy for large prompts
        max_new = token_budget(len(prompt_ids), request, self.info.max_context, self.default_max_tokens)
        self._check_request(request, max_new)
        # a client disconnect closes this generator; admitted() closes the inner one (aborting it in the engine)
        # while the slot is still held, not whenever it is garbage-collected
        async with self._admission.admitted(self._stream(prompt_ids, request, max_new), request.priority) as chunks:
            async for chunk in chunks:
                yield chunk
