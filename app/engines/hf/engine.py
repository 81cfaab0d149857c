"""Hugging Face transformers engine: the fallback that runs on any device, with continuous batching.

The model runner (`app.engines.hf.runner`) loads the model; one `BatchScheduler` thread
(`app.engines.hf.batching`) owns it and advances every running request by one token per forward, prefilling
new prompts in chunks between steps; requests join and leave at step boundaries, a closed stream (client
disconnect) leaves within one step, and a request's tokens are identical alone or batched. Stop strings are
matched on the decoded text, on the event loop. Prompts are rendered and tokenized in a worker thread (a
multi-megabyte prompt never stalls the loop). Concurrency is bounded by an `AdmissionController`:
`max_num_seqs` running (the batch size, default 16) plus `max_waiting` queued; a full queue turns into HTTP 429.
By default the model, the samplers and the scheduler run in a process of their own (`app.engines.hf.engine_process`,
as vLLM runs its EngineCore) while tokenization, admission, detokenization and stop strings stay here;
`engine_kwargs.engine_process: false` keeps everything in this process.

`engine_kwargs` are validated here and nowhere else (`transformers_engine_config`): the keys it uses
(`USED_KWARGS`), vLLM-only tuning keys it knowingly ignores (`IGNORED_VLLM_KWARGS`: warned once and named
in the engine's reason), keys whose meaning it cannot honour because results would differ
(`REFUSED_KWARGS`: an error, except in an `auto` fallback, whose reason then says what was dropped), and
anything else, which is an error naming the key (again except in a fallback, which drops and names it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator
from typing import Any

from app import metrics
from app.engines.base import (
    EngineDeadError,
    EngineInfo,
    EngineSpec,
    GenerationChunk,
    GenerationRequest,
)
from app.engines.hf.batching import BatchScheduler, stream_sequence
from app.engines.hf.engine_process import RemoteScheduler
from app.engines.hf.runner import HFEngineConfig, HFModelRunner
from app.engines.lora import AdapterFolder, AdapterInfo
from app.engines.skeleton import EngineSkeleton
from app.metrics import MetricsSink

log = logging.getLogger(__name__)

ENGINE_NAME = "transformers"
USED_KWARGS = frozenset({"dtype", "device", "max_model_len", "max_num_seqs", "trust_remote_code", "revision",
                         "tokenizer", "seed", "prefill_chunk_tokens", "cpu_threads", "engine_process",
                         "max_lora_rank", "max_loras"})
# vLLM performance knobs with no effect on what is generated: the transformers engine has no use for them
IGNORED_VLLM_KWARGS = frozenset({
    "gpu_memory_utilization", "enable_prefix_caching", "enforce_eager", "kv_cache_dtype", "max_num_batched_tokens",
    "enable_chunked_prefill", "swap_space", "block_size", "cpu_offload_gb", "kv_cache_memory_bytes",
    "max_seq_len_to_capture", "disable_log_stats", "distributed_executor_backend", "disable_custom_all_reduce",
    "compilation_config", "download_dir", "scheduling_policy", "async_scheduling", "max_logprobs",
    "enable_lora",  # the model's lora_config turns LoRA on, on every engine
})
# vLLM arguments that change the results (or the model): refused unless an `auto` fallback drops them
REFUSED_KWARGS = frozenset({"quantization", "tensor_parallel_size", "pipeline_parallel_size", "speculative_config",
                            "hf_overrides", "rope_scaling", "override_generation_config", "load_format",
                            "tokenizer_mode", "data_parallel_size"})
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
    own_process = kw.get("engine_process", True)
    if not isinstance(own_process, bool):
        raise ValueError(f"engine_kwargs.engine_process={own_process!r}: must be true or false")
    seed = kw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"engine_kwargs.seed={seed!r}: must be an integer")
    config = HFEngineConfig(
        device=device, dtype=dtype, max_model_len=_int(kw, "max_model_len", 16),
        max_num_seqs=_int(kw, "max_num_seqs", 1) or HFEngineConfig.max_num_seqs, trust_remote_code=trust,
        revision=_str(kw, "revision"), tokenizer=_str(kw, "tokenizer"), seed=seed,
        prefill_chunk_tokens=_int(kw, "prefill_chunk_tokens", 1) or HFEngineConfig.prefill_chunk_tokens,
        cpu_threads=_int(kw, "cpu_threads", 1), engine_process=own_process,
        max_lora_rank=_int(kw, "max_lora_rank", 1) or HFEngineConfig.max_lora_rank, max_loras=_int(kw, "max_loras", 1),
    )
    notes = []
    if ignored:
        notes.append(f"ignores vLLM-only engine_kwargs {', '.join(ignored)}")
    if refused:
        notes.append(f"dropped engine_kwargs {', '.join(refused)} (results differ from vLLM's)")
    if unknown:
        notes.append(f"dropped engine_kwargs {', '.join(unknown)} (unknown to the transformers engine)")
    return config, notes


def engine_config(spec: EngineSpec, *, fallback: bool = False) -> tuple[HFEngineConfig, list[str]]:
    """`transformers_engine_config` of the spec's engine_kwargs, its errors prefixed with the spec's source."""
    try:
        return transformers_engine_config(spec.engine_kwargs, fallback=fallback)
    except ValueError as exc:
        raise ValueError(f"{spec.source}: {exc}" if spec.source else str(exc)) from None


def _harmless(key: str, value: Any) -> bool:
    """A refused key at the value that means what the transformers engine does anyway (one device)."""
    return key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size") and value == 1


class TransformersEngine(EngineSkeleton):
    """Engine protocol over a transformers causal LM (`HFModelRunner`)."""

    name = ENGINE_NAME

    def __init__(self, spec: EngineSpec, metrics: MetricsSink | None = None, *, reason: str = "",
                 fallback: bool = False):
        """`fallback`: vLLM was wanted and could not start; engine_kwargs this engine cannot honour are dropped
        (and named in the reason) instead of refused. Raises ValueError naming the spec's source and key."""
        self.cfg, notes = engine_config(spec, fallback=fallback)
        self.spec = spec
        for note in notes:
            if (spec.model_id, note) not in _warned:
                _warned.add((spec.model_id, note))
                log.warning("model %s: the transformers engine %s", spec.model_id, note)
        self.reason = "; ".join([reason, *notes]) if reason else "; ".join(notes)
        self.runner = HFModelRunner(spec.model_source, self.cfg, model_id=spec.model_id)
        info = EngineInfo(model_id=spec.model_id, engine=self.name, model_source=spec.model_source,
                          max_context=self.cfg.max_model_len or 0, reason=self.reason,
                          tool_call_parser=spec.tool_call_parser)
        adapters = (AdapterFolder(spec.lora_config, model_id=spec.model_id, model_source=spec.model_source,
                                  max_rank=self.cfg.max_lora_rank) if spec.lora_config is not None else None)
        super().__init__(info, metrics_sink=metrics, max_running=self.cfg.max_num_seqs,
                         max_waiting=spec.max_waiting, retry_after_s=spec.retry_after_s,
                         default_max_tokens=spec.default_max_tokens, fallback=fallback, adapters=adapters)
        self._scheduler: BatchScheduler | None = None
        self._remote: RemoteScheduler | None = None  # the model in the engine process
        self._thread: threading.Thread | None = None

    @property
    def process_pid(self) -> int | None:
        """The engine process's pid (None: the model runs in this process)."""
        return self._remote.pid if self._remote is not None else None

    # ------------------------------------------------------------------ lifecycle
    async def _load(self) -> None:
        if self.cfg.engine_process:
            await self._start_remote()
        else:
            await self._start_here()
        log.info("model %s ready on %s (%s), batch of up to %d sequences", self.spec.model_id, self.info.device,
                 self.info.dtype, self.cfg.max_num_seqs)

    async def _start_here(self) -> None:
        await asyncio.to_thread(self.runner.load)
        self.info.max_context = self.runner.max_context
        self.info.device = self.runner.device
        self.info.dtype = self.runner.dtype
        model = self.runner.step_model()
        await asyncio.to_thread(self.runner.warmup, model)
        self._scheduler = BatchScheduler(model, max_num_seqs=self.cfg.max_num_seqs,
                                         prefill_chunk=self.cfg.prefill_chunk_tokens, on_decode=self._observe_batch,
                                         max_loras=self.cfg.max_loras or 0)
        self._thread = threading.Thread(target=self._serve, args=(self._scheduler,), name="hf-scheduler",
                                        daemon=True)
        self._thread.start()

    async def _start_remote(self) -> None:
        """This process keeps the tokenizer (prompts, detokenization, stop strings); the model loads in the
        engine process (`app.engines.hf.engine_process`)."""
        self._remote = RemoteScheduler(self.spec, self.cfg, on_decode=self._observe_batch)
        tokenizer = asyncio.create_task(asyncio.to_thread(self.runner.load_tokenizer))
        try:
            facts = await self._remote.start()
        finally:
            await tokenizer
        self.runner.max_context = self.info.max_context = facts["max_context"]
        self.info.device, self.info.dtype = facts["device"], facts["dtype"]

    def _dead_reason(self) -> str | None:
        where = self._remote if self._remote is not None else self._scheduler
        return where.dead_reason if where is not None else None

    def _dead_error(self, reason: str) -> EngineDeadError:
        what = "" if self._remote is not None else "scheduler died: "
        return EngineDeadError(f"model {self.spec.model_id}: {what}{reason}", retry_after=10)

    def _serve(self, scheduler: BatchScheduler) -> None:
        try:
            scheduler.run()
        except BaseException:  # a bug in the loop: every request was told (EngineDeadError), health turns dead
            log.exception("the scheduler of model %s stopped", self.spec.model_id)

    def _observe_batch(self, rows: int) -> None:
        self.metrics.observe(metrics.DECODE_BATCH, self._labels, rows)

    async def _load_adapter(self, info: AdapterInfo) -> None:
        if self._remote is not None:
            await self._remote.adapter("load", info.name, info.path)
        else:
            assert self._scheduler is not None
            await asyncio.wrap_future(self._scheduler.call(lambda model: model.load_adapter(info.name, info.path)))

    async def _unload_adapter(self, name: str) -> None:
        if self._remote is not None:
            await self._remote.adapter("unload", name, "")
        else:
            assert self._scheduler is not None
            await asyncio.wrap_future(self._scheduler.call(lambda model: model.unload_adapter(name)))

    async def check_health(self) -> None:
        self._check_serving()
        if self._remote is not None:
            await self._remote.ping()

    async def shutdown(self) -> None:
        self._ready = False
        if self._remote is not None:
            await self._remote.shutdown()
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ------------------------------------------------------------------ requests
    def _render(self, request: GenerationRequest) -> list[int]:
        return self.runner.prompt_ids(request)

    async def _stream(
        self, prompt_ids: list[int], req: GenerationRequest, max_new: int
    ) -> AsyncGenerator[GenerationChunk, None]:
        dead = self._dead_reason()  # again: the engine may have died while this request waited for its slot
        if dead is not None:
            raise EngineDeadError(f"model {self.spec.model_id}: {dead}", retry_after=10)
        if self._remote is not None:
            stream = self._remote.stream(self.runner.tokenizer, prompt_ids, req, max_new, on_abort=self._count_abort)
        else:
            assert self._scheduler is not None  # set before the engine reports ready
            sampler = await self.runner.sampler_off_loop(req, max_new)
            stream = stream_sequence(self._scheduler, self.runner.tokenizer, prompt_ids, req, sampler,
                                     on_abort=self._count_abort)
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                yield chunk
