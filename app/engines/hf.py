"""Hugging Face transformers engine: the fallback that runs on any device.

Loads a local folder or hub id with AutoModelForCausalLM/AutoTokenizer and runs
its own token-by-token decode loop (KV cache, per-request torch.Generator for
seeded sampling, temperature/top-p, presence/frequency penalties) in a worker
thread, so that every token streams out at once, each request checks its own
cancel flag between tokens (client disconnects stop generation within one
token), and stop strings are matched on the decoded text. Concurrency is bounded
by an `AdmissionController` whose full queue turns into HTTP 429.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app import metrics
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
)
from app.engines.text import ChunkAssembler, render_prompt, token_budget

log = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (as vLLM does)
_IMPORT_LOCK = threading.Lock()


@dataclass
class HFEngineConfig:
    model_id: str
    model_source: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None
    max_running: int = 4
    max_waiting: int = 32
    default_max_tokens: int = 256
    trust_remote_code: bool = False
    retry_after_s: float = 1.0
    reason: str = ""


class GenerationCancelled(Exception):
    """Raised inside `decode_steps` when the request's cancel flag is set."""


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None


class TransformersEngine(Engine):
    """Engine protocol over a transformers causal LM."""

    name = "transformers"

    def __init__(self, config: HFEngineConfig):
        self.cfg = config
        self.info = EngineInfo(
            model_id=config.model_id,
            engine=self.name,
            model_source=config.model_source,
            max_context=config.max_model_len or 0,
            reason=config.reason,
        )
        self._labels = {"model": config.model_id, "engine": self.name}
        self._admission = AdmissionController(
            config.max_running, config.max_waiting, config.retry_after_s, metric_labels=self._labels
        )
        self.info.max_parallel = self._admission.capacity
        self._executor = ThreadPoolExecutor(max_workers=config.max_running, thread_name_prefix="hf-gen")
        self._ready = False
        self._dead_reason: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: list[int] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)
        await asyncio.to_thread(self._load)
        await asyncio.to_thread(self._warmup)
        self._ready = True
        metrics.set_gauge(metrics.MODEL_READY, self._labels, 1)
        metrics.set_gauge(
            metrics.ENGINE_INFO,
            {**self._labels, "fallback": "true" if self.cfg.reason.startswith("fallback") else "false",
             "reason": self.cfg.reason},
            1,
        )
        self._admission.publish()
        log.info("model %s ready on %s (%s)", self.cfg.model_id, self.info.device, self.info.dtype)

    def _load(self) -> None:
        import torch

        with _IMPORT_LOCK:  # transformers' lazy imports race when two models load in parallel threads
            from transformers import AutoModelForCausalLM, AutoTokenizer

        device = _resolve_device(self.cfg.device)
        dtype = _resolve_dtype(self.cfg.dtype, device)
        t0 = time.monotonic()
        tok = AutoTokenizer.from_pretrained(self.cfg.model_source, trust_remote_code=self.cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            self.cfg.model_source, dtype=dtype, trust_remote_code=self.cfg.trust_remote_code
        )
        model.to(device)
        model.eval()
        self._model, self._tokenizer = model, tok
        eos: set[int] = set()
        for src in (model.generation_config.eos_token_id if model.generation_config else None,
                    model.config.eos_token_id, tok.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list):
                eos.update(int(x) for x in src)
        self._eos_ids = sorted(eos)
        ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
        if self.cfg.max_model_len:
            ctx = min(ctx, self.cfg.max_model_len)
        self.info.max_context = ctx
        self.info.device = device
        self.info.dtype = str(dtype).removeprefix("torch.")
        torch.set_grad_enabled(False)
        log.info("loaded %s from %s in %.1fs", self.cfg.model_id, self.cfg.model_source, time.monotonic() - t0)

    def _warmup(self) -> None:
        ids = self._tokenizer("warm-up", add_special_tokens=False)["input_ids"] or [0]
        cancel = threading.Event()
        for _ in self.decode_steps(ids, GenerationRequest(temperature=0.0, max_tokens=2), 2, cancel):
            pass

    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    async def check_health(self) -> None:
        if self._dead_reason:
            raise EngineDeadError(f"engine for {self.cfg.model_id} is dead: {self._dead_reason}")
        if not self._ready:
            raise EngineNotReadyError(f"model {self.cfg.model_id} is still loading")

    def stats(self) -> EngineStats:
        return self._admission.stats()

    async def shutdown(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ prompt handling
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        return render_prompt(self._tokenizer, req, self.cfg.model_id, plain_chat_fallback=True)

    def max_new_tokens(self, prompt_len: int, req: GenerationRequest) -> int:
        return token_budget(prompt_len, req, self.info.max_context, self.cfg.default_max_tokens)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    # ------------------------------------------------------------------ decode loop (worker thread)
    def decode_steps(self, prompt_ids: list[int], req: GenerationRequest, max_new: int, cancel: threading.Event):
        """Yields (token_id, finish) per generated token; finish is None, 'stop' or 'length'."""
        import torch
        from transformers import DynamicCache

        model = self._model
        device = self.info.device
        gen = torch.Generator(device=device)
        if req.seed is not None:
            gen.manual_seed(int(req.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        else:
            gen.seed()
        vocab = model.config.vocab_size
        counts = torch.zeros(vocab, device=device) if (req.presence_penalty or req.frequency_penalty) else None
        eos = torch.tensor(self._eos_ids, dtype=torch.long, device=device) if self._eos_ids else None
        cache = DynamicCache()
        inp = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            for step in range(max_new):
                if cancel.is_set():
                    raise GenerationCancelled()
                out = model(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                logits = out.logits[0, -1, :vocab].float()
                if counts is not None:
                    logits = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0).float()
                if eos is not None and (req.ignore_eos or step < req.min_tokens):
                    logits[eos] = float("-inf")
                if req.temperature < _SAMPLING_EPS:  # a tiny temperature would overflow the logits: greedy
                    token = int(torch.argmax(logits))
                else:
                    logits = logits / req.temperature
                    probs = torch.softmax(logits, dim=-1)
                    if req.top_p < 1.0:
                        sorted_p, idx = torch.sort(probs, descending=True)
                        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < req.top_p
                        sorted_p = sorted_p * keep
                        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                if counts is not None:
                    counts[token] += 1
                finish = None
                if token in self._eos_ids and not req.ignore_eos:
                    finish = "stop"
                elif step + 1 >= max_new:
                    finish = "length"
                yield token, finish
                if finish:
                    return
                inp = torch.tensor([[token]], dtype=torch.long, device=device)

    def _run_thread(self, prompt_ids, req, max_new, cancel, loop, queue) -> None:
        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            for token, finish in self.decode_steps(prompt_ids, req, max_new, cancel):
                put(("token", token, finish))
        except GenerationCancelled:
            put(("cancelled",))
        except Exception as exc:  # surfaced to the request; the engine stays up
            log.exception("generation failed for request %s", req.request_id)
            put(("error", exc))

    # ------------------------------------------------------------------ public generate
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._dead_reason:
            raise EngineDeadError(f"engine for {self.cfg.model_id} is dead: {self._dead_reason}")
        if not self._ready:
            raise EngineNotReadyError(f"model {self.cfg.model_id} is still loading", retry_after=5)
        prompt_ids = self.prompt_ids(request)
        max_new = self.max_new_tokens(len(prompt_ids), request)
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
        chunks = ChunkAssembler(self._tokenizer, req.stop, len(prompt_ids))
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
                _, token, finish = item
                chunk = chunks.push(token, finish)
                if chunk is not None:
                    yield chunk
                if chunks.done:
                    finished = True
                    return
        finally:
            cancel.set()
            if not finished:
                metrics.inc(metrics.ABORTED, self._labels)
            # hold the admission slot until the worker thread has really stopped
            await asyncio.shield(fut)
