"""The transformers model runner: load a causal LM, render prompts, build the per-request sampler.

Shared by the transformers engine (one runner, one continuous-batching scheduler thread) and DeepSpeed TP
(every rank loads a runner and shards its model with `wrap_model`; rank 0 drives the scheduler). Interface:

    runner = HFModelRunner(model_source, HFEngineConfig(device="cpu"), model_id="m")
    runner.load()                                   # tokenizer + model on runner.device, eval mode, ragged attention
    runner.wrap_model(lambda m: shard(m))           # e.g. DeepSpeed AutoTP
    model = runner.step_model()                     # RaggedModel: prefill / batched decode over per-sequence caches
    runner.warmup(model)                            # one short greedy decode through it
    ids = runner.prompt_ids(request)                # chat template / prompt -> token ids (400 when empty or too long)
    sampler = runner.sampler(request, max_new)      # per-request generator, penalties, hooks (app.engines.hf.sampling)

`sampler` seeds a per-request torch.Generator (seeded requests are reproducible; `seed` in engine_kwargs makes
unseeded ones reproducible in arrival order, as vLLM's engine seed does) and attaches `sequence_hooks(request)`,
the request's grammar mask and logprobs capture (`app.engines.hf.sequence_hooks`). The decode loop itself is
`app.engines.hf.batching.BatchScheduler`; the batched forward `app.engines.hf.ragged.RaggedModel`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.engines.base import GenerationRequest
from app.engines.hf import cpu_threads, ragged
from app.engines.hf.batching import DEFAULT_PREFILL_CHUNK
from app.engines.hf.sampling import Sampler, SequenceHook
from app.engines.hf.sequence_hooks import needs_hooks, sequence_hooks
from app.engines.import_lock import IMPORT_LOCK
from app.engines.text import max_token_chars, render_prompt, token_budget

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048  # when the model config names no max_position_embeddings


@dataclass(frozen=True)
class HFEngineConfig:
    """The transformers engine's settings, from the `engine_kwargs` it uses (see `app.engines.hf.engine`)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None
    max_num_seqs: int = 16  # sequences decoded together per step (the engine's admission slots)
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK  # prompt tokens prefilled per step (per-sequence chunks)
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    seed: int | None = None
    cpu_threads: int | None = None  # torch threads for the forwards on CPU (None: measured at load)
    engine_process: bool = True  # serve from a process of its own (app.engines.hf.engine_process)
    max_lora_rank: int = 16  # LoRA: the highest adapter rank served (vLLM's knob and default)
    max_loras: int | None = None  # LoRA: distinct adapters in one decode step (None: as many as are held)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None


class HFModelRunner:
    """One transformers causal LM and its tokenizer. `prompt_ids` may run in any thread; the model is used by
    the one thread that drives its `step_model()`."""

    def __init__(self, model_source: str, config: HFEngineConfig, model_id: str = ""):
        self.model_source = model_source
        self.config = config
        self.model_id = model_id or model_source
        self.device = "cpu"
        self.dtype = "float32"
        self.max_context = config.max_model_len or 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: list[int] = []
        self._max_token_chars = 0
        self.granule = 1
        self.batched = False
        self._seeds = random.Random(config.seed) if config.seed is not None else None

    # ------------------------------------------------------------------ loading
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model(self) -> Any:
        return self._model

    def wrap_model(self, wrap: Callable[[Any], Any]) -> None:
        """Replace the model by `wrap(model)` (DeepSpeed AutoTP sharding, rank 0's broadcasting mirror)."""
        self._model = wrap(self._model)

    def load_tokenizer(self) -> None:
        """The tokenizer alone (a server whose model runs in the engine process renders and detokenizes)."""
        with IMPORT_LOCK:  # transformers' lazy imports race when two threads import at once
            from transformers import AutoTokenizer

        cfg = self.config
        # `revision` names a revision of the model; a separate `tokenizer` source is taken at its default
        self._tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or self.model_source,
                                                        revision=None if cfg.tokenizer else cfg.revision,
                                                        trust_remote_code=cfg.trust_remote_code)
        self._max_token_chars = max_token_chars(self._tokenizer)

    def load(self) -> None:
        import torch

        with IMPORT_LOCK:
            from transformers import AutoModelForCausalLM

        cfg = self.config
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        t0 = time.monotonic()
        self.load_tokenizer()
        tok = self._tokenizer
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_source, dtype=dtype, revision=cfg.revision,
                                                     trust_remote_code=cfg.trust_remote_code)
        model.to(device)
        model.eval()
        self._model = model
        eos: set[int] = set()
        for src in (model.generation_config.eos_token_id if model.generation_config else None,
                    model.config.eos_token_id, tok.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list):
                eos.update(int(x) for x in src)
        self._eos_ids = sorted(eos)
        ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0) or DEFAULT_CONTEXT
        if cfg.max_model_len:
            ctx = min(ctx, cfg.max_model_len)
        self.max_context = ctx
        self.batched = ragged.install(model)
        if device == "cpu":  # before the granule probe: the GEMM kernels depend on the thread count
            if cfg.cpu_threads is not None:
                cpu_threads.set_cpu_threads(cfg.cpu_threads)
            else:
                probe = ragged.RaggedModel(model, vocab_size=int(model.config.vocab_size), device=device,
                                           batched=self.batched)
                cpu_threads.choose_cpu_threads(probe, cfg.max_num_seqs)
        self.granule = ragged.probe_row_granule(model, cfg.max_num_seqs) if self.batched else 1
        self.device = device
        self.dtype = str(dtype).removeprefix("torch.")
        torch.set_grad_enabled(False)
        log.info("loaded %s from %s in %.1fs", self.model_id, self.model_source, time.monotonic() - t0)

    @property
    def eos_ids(self) -> list[int]:
        return list(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size)

    def step_model(self) -> ragged.RaggedModel:
        """The forwards the scheduler drives, over the model as it is now (after any `wrap_model`)."""
        return ragged.RaggedModel(self._model, vocab_size=self.vocab_size, device=self.device,
                                  granule=self.granule, batched=self.batched)

    def warmup(self, model: ragged.RaggedModel | None = None) -> None:
        """One short greedy decode (prefill and two batched steps) through `model` (default: `step_model()`)."""
        import torch

        model = model or self.step_model()
        ids = self._tokenizer("warm-up", add_special_tokens=False)["input_ids"] or [0]
        with torch.inference_mode():
            cache = model.new_cache()
            token = int(torch.argmax(model.prefill(cache, ids, 0)))
            for _ in range(2):
                token = int(torch.argmax(model.decode([cache], [token], model.rows_for(1), slots=[0])[0]))
            model.release(0)

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """Token ids of the request (CPU-heavy for large prompts: engines call it off the event loop). A prompt
        that cannot fit the context is refused before (or without finishing) its tokenization."""
        return render_prompt(self._tokenizer, req, self.model_id, plain_chat_fallback=True,
                             max_tokens=self.max_context - 1, max_token_chars=self._max_token_chars)

    def max_new_tokens(self, prompt_len: int, req: GenerationRequest, default_max_tokens: int) -> int:
        return token_budget(prompt_len, req, self.max_context, default_max_tokens)

    # ------------------------------------------------------------------ sampling
    def sequence_hooks(self, req: GenerationRequest) -> list[SequenceHook]:
        """Per-sequence hooks on the decode step for this request: its grammar mask and logprobs capture
        (`app.engines.hf.sequence_hooks`; none for a plain request)."""
        return sequence_hooks(req, self._tokenizer, self.vocab_size)

    def sampler(self, req: GenerationRequest, max_new: int, hooks: list[SequenceHook] | None = None) -> Sampler:
        """The request's sampler (hooks: `sequence_hooks(req)` unless given); call in arrival order (an engine
        seed hands out seeds in that order)."""
        return Sampler(req, max_new, generator=self._generator(req), eos_ids=self._eos_ids,
                       vocab_size=self.vocab_size, device=self.device,
                       hooks=self.sequence_hooks(req) if hooks is None else hooks)

    async def sampler_off_loop(self, req: GenerationRequest, max_new: int) -> Sampler:
        """`sampler` for an async engine: the hooks are built in a worker thread (compiling a JSON schema's
        grammar can take a while), the generator on the loop (so an engine seed stays in arrival order)."""
        hooks = await asyncio.to_thread(self.sequence_hooks, req) if needs_hooks(req) else []
        return self.sampler(req, max_new, hooks)

    def _generator(self, req: GenerationRequest) -> Any:
        import torch

        gen = torch.Generator(device=self.device)
        if req.seed is not None:
            gen.manual_seed(int(req.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        elif self._seeds is not None:
            gen.manual_seed(self._seeds.getrandbits(64))
        else:
            gen.seed()
        return gen
