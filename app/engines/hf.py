"""Hugging Face transformers engine: the fallback that runs on any device.

The model runner (`app.engines.hf_runner`) loads the model and owns the token-by-token decode loop; this
engine runs that loop in worker threads, so every token streams out at once, each request checks its
own cancel flag between tokens (client disconnects stop generation within one token), and stop strings
are matched on the decoded text. Concurrency is bounded by an `AdmissionController` (`max_num_seqs`
slots, `max_waiting` queue places) whose full queue turns into HTTP 429.

`engine_kwargs` are validated here and nowhere else (`transformers_engine_config`): the keys it uses
(`USED_KWARGS`), vLLM-only tuning keys it knowingly ignores (`IGNORED_VLLM_KWARGS`: warned once and named
in the engine's reason), keys whose meaning it cannot honour because results would differ
(`REFUSED_KWARGS`: an error, except in an `auto` fallback, whose reason then says what was dropped), and
anything else, which is an error naming the key (again except in a fallback, which drops and names it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from app import metrics
from app.engines.admission import AdmissionController
from app.engines.base import (
    Engine,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineSpec,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
)
from app.engines.hf_runner import GenerationCancelled, HFEngineConfig, HFModelRunner
from app.engines.text import ChunkAssembler
from app.metrics import MetricsSink, PrometheusSink

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
USED_KWARGS = frozenset({"dtype", "device", "max_model_len", "max_num_seqs", "trust_remote_code", "revision",
                         "tokenizer", "seed"})
# vLLM performance knobs with no effect on what is generated: the transformers engine has no use for them
IGNORED_VLLM_KWARGS = frozenset({
    "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "kv_cache_dtype", "max_num_batched_tokens",
    "enable_chunked_prefill", "swap_space", "block_size", "cpu_offload_gb", "kv_cache_memory_bytes",
    "max_seq_len_to_capture", "disable_log_stats", "distributed_executor_backend", "disable_custom_all_reduce",
    "compilation_config", "download_dir", "scheduling_policy", "async_scheduling", "max_logprobs",
})
# vLLM arguments that change the results (or the model): refused unless an `auto` fallback drops them
REFUSED_KWARGS = frozenset({"quantization", "tensor_parallel_size", "pipeline_parallel_size", "speculative_config",
                            "hf_overrides", "rope_scaling", "override_generation_config", "load_format",
                            "enable_lora", "max_loras", "tokenizer_mode", "data_parallel_size"})
_DTYPES = {"auto", "float32", "float", "float16", "half", "bfloat16"}
_warned: set[tuple[str, str]] = set()


def _int(kw: dict[str, Any], key: str, minimum: int) -> int | None:
    value = kw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"engine_kwargs.{key}={value!r}: must be an integer >= {minimum}")
    return value


def _str(kw: dict[str, Any], key: str) -> str | None:
    value = kw.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"engine_kwargs.{key}={value!r}: must be a string")
    return value


def transformers_engine_config(engine_kwargs: dict[str, Any], *, fallback: bool = False
                               ) -> tuple[HFEngineConfig, list[str]]:
    """The engine's settings from `engine_kwargs`, plus notes on what it ignores or drops (for its reason).

    Raises ValueError naming the key for a bad value, a refused key or an unknown key; with `fallback`
    (vLLM was wanted and could not start) refused and unknown keys are dropped and named in the notes.
    """
    kw = dict(engine_kwargs)
    ignored = sorted(k for k in kw if k in IGNORED_VLLM_KWARGS)
    refused = sorted(k for k in kw if k in REFUSED_KWARGS and not _harmless(k, kw[k]))
    unknown = sorted(k for k in kw if k not in USED_KWARGS | IGNORED_VLLM_KWARGS | REFUSED_KWARGS)
    if not fallback:
        if refused:
            key = refused[0]
            raise ValueError(f"engine_kwargs.{key}={kw[key]!r}: changes results and the transformers engine "
                             "cannot honour it; remove it, or use engine: vllm (or auto, which falls back without it)")
        if unknown:
            raise ValueError(f"engine_kwargs.{unknown[0]}: not an argument of the transformers engine (it uses "
                             f"{', '.join(sorted(USED_KWARGS))} and ignores vLLM's tuning keys)")
    dtype = _str(kw, "dtype") or "auto"
    if dtype not in _DTYPES:
        raise ValueError(f"engine_kwargs.dtype={dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
    device = kw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"engine_kwargs.device={device!r}: use auto, cpu, cuda or cuda:N")
    trust = kw.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ValueError(f"engine_kwargs.trust_remote_code={trust!r}: must be true or false")
    seed = kw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"engine_kwargs.seed={seed!r}: must be an integer")
    config = HFEngineConfig(
        device=device, dtype=dtype, max_model_len=_int(kw, "max_model_len", 16),
        max_num_seqs=_int(kw, "max_num_seqs", 1) or HFEngineConfig.max_num_seqs, trust_remote_code=trust,
        revision=_str(kw, "revision"), tokenizer=_str(kw, "tokenizer"), seed=seed,
    )
    notes = []
    if ignored:
        notes.append(f"ignores vLLM-only engine_kwargs {', '.join(ignored)}")
    if refused:
        notes.append(f"dropped engine_kwargs {', '.join(refused)} (results differ from vLLM's)")
    if unknown:
        notes.append(f"dropped engine_kwargs {', '.join(unknown)} (unknown to the transformers engine)")
    return config, notes


def _harmless(key: str, value: Any) -> bool:
    """A refused key at the value that means what the transformers engine does anyway (one device)."""
    return key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size") and value == 1


class TransformersEngine(Engine):
    """Engine protocol over a transformers causal LM (`HFModelRunner`)."""

    name = ENGINE_NAME

    def __init__(self, spec: EngineSpec, metrics: MetricsSink | None = None, *, reason: str = "",
                 fallback: bool = False):
        """`fallback`: vLLM was wanted and could not start; engine_kwargs this engine cannot honour are dropped
        (and named in the reason) instead of refused. Raises ValueError naming the spec's source and key."""
        try:
            self.cfg, notes = transformers_engine_config(spec.engine_kwargs, fallback=fallback)
        except ValueError as exc:
            raise ValueError(f"{spec.source}: {exc}" if spec.source else str(exc)) from None
        self.spec = spec
        self.metrics = metrics or PrometheusSink()
        for note in notes:
            if (spec.model_id, note) not in _warned:
                _warned.add((spec.model_id, note))
                log.warning("model %s: the transformers engine %s", spec.model_id, note)
        self.reason = "; ".join([reason, *notes]) if reason else "; ".join(notes)
        self.fallback = fallback
        self.runner = HFModelRunner(spec.model_source, self.cfg, model_id=spec.model_id)
        self.info = EngineInfo(model_id=spec.model_id, engine=self.name, model_source=spec.model_source,
                               max_context=self.cfg.max_model_len or 0, reason=self.reason,
                               tool_call_parser=spec.tool_call_parser)
        self._labels = {"model": spec.model_id, "engine": self.name}
        self._admission = AdmissionController(self.cfg.max_num_seqs, spec.max_waiting, spec.retry_after_s,
                                              metrics=self.metrics, metric_labels=self._labels)
        self.info.max_parallel = self._admission.capacity
        self._executor = ThreadPoolExecutor(max_workers=self.cfg.max_num_seqs, thread_name_prefix="hf-gen")
        self._ready = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)
        await asyncio.to_thread(self.runner.load)
        self.info.max_context = self.runner.max_context
        self.info.device = self.runner.device
        self.info.dtype = self.runner.dtype
        await asyncio.to_thread(self.runner.warmup)
        self._ready = True
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 1)
        self.metrics.set_gauge(
            metrics.ENGINE_INFO,
            {**self._labels, "fallback": "true" if self.fallback else "false", "reason": self.reason},
            1,
        )
        self._admission.publish()
        log.info("model %s ready on %s (%s)", self.spec.model_id, self.info.device, self.info.dtype)

    def is_ready(self) -> bool:
        return self._ready

    async def check_health(self) -> None:
        if not self._ready:
            raise EngineNotReadyError(f"model {self.spec.model_id} is still loading", retry_after=5)

    def stats(self) -> EngineStats:
        return self._admission.stats()

    async def shutdown(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests
    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.runner.prompt_ids(request))

    def _run_thread(self, prompt_ids: list[int], req: GenerationRequest, max_new: int, cancel: threading.Event,
                    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[Any, ...]]) -> None:
        def put(item: tuple[Any, ...]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            for token, finish, logprob in self.runner.decode_steps(prompt_ids, req, max_new, cancel):
                put(("token", token, finish, logprob))
        except GenerationCancelled:
            put(("cancelled",))
        except Exception as exc:  # surfaced to the request; the engine stays up
            log.exception("generation failed for request %s", req.request_id)
            put(("error", exc))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        await self.check_health()
        prompt_ids = self.runner.prompt_ids(request)
        max_new = self.runner.max_new_tokens(len(prompt_ids), request, self.spec.default_max_tokens)
        async with self._admission.admitted(self._generate_admitted(prompt_ids, request, max_new)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _generate_admitted(
        self, prompt_ids: list[int], req: GenerationRequest, max_new: int
    ) -> AsyncGenerator[GenerationChunk, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        cancel = threading.Event()
        fut = loop.run_in_executor(
            self._executor, self._run_thread, prompt_ids, req, max_new, cancel, loop, queue
        )
        chunks = ChunkAssembler(self.runner.tokenizer, req.stop, len(prompt_ids))
        finished = False
        try:
            while True:
                item = await queue.get()
                kind = item[0]
                if kind == "error":
                    raise EngineError(f"generation failed: {type(item[1]).__name__}")
                if kind == "cancelled":
                    finished = True
                    return
                _, token, finish, logprob = item
                chunk = chunks.push(token, finish, logprob)
                if chunk is not None:
                    yield chunk
                if chunks.done:
                    finished = True
                    return
        finally:
            cancel.set()
            if not finished:
                self.metrics.inc(metrics.ABORTED, self._labels)
            # hold the admission slot until the worker thread has really stopped
            await asyncio.shield(fut)
