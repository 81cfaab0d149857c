"""The transformers model runner: load a causal LM, warm it up, run its token-by-token decode loop.

Shared by the transformers engine (one runner, decode loops in worker threads) and DeepSpeed TP (every
rank loads a runner, shards its model with `wrap_model`, rank 0 drives the loop). Interface:

    runner = HFModelRunner(model_source, HFEngineConfig(device="cpu"), model_id="m")
    runner.load()                                   # tokenizer + model on runner.device, eval mode
    runner.wrap_model(lambda m: shard(m))           # e.g. DeepSpeed AutoTP, or rank 0's broadcasting mirror
    runner.warmup()                                 # one short greedy decode
    ids = runner.prompt_ids(request)                # chat template / prompt -> token ids (400 when empty)
    for token, finish, logprob in runner.decode_steps(ids, request, max_new, cancel): ...

`decode_steps` keeps a KV cache, samples with a per-request torch.Generator (seeded requests are
reproducible; `seed` in engine_kwargs makes unseeded ones reproducible in arrival order, as vLLM's engine
seed does), applies the request's grammar and reports logprobs (`app.engines.sequence_constraints`, per
sequence), temperature / top-p / presence and frequency penalties, min_tokens and ignore_eos, and checks `cancel`
between tokens. It is synchronous: callers run it in a thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from app.engines.base import FinishReason, GenerationRequest, TokenLogprob
from app.engines.sequence_constraints import SequenceConstraints
from app.engines.text import render_prompt, token_budget

log = logging.getLogger(__name__)

SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (as vLLM does)
DEFAULT_CONTEXT = 2048  # when the model config names no max_position_embeddings
_IMPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class HFEngineConfig:
    """The transformers engine's settings, from the `engine_kwargs` it uses (see `app.engines.hf`)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None
    max_num_seqs: int = 4  # concurrent generations (the engine's admission slots and decode threads)
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    seed: int | None = None


class GenerationCancelled(Exception):
    """Raised inside `decode_steps` when the request's cancel flag is set."""


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
    """One transformers causal LM and its tokenizer; `decode_steps` is safe to run in several threads."""

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

    def load(self) -> None:
        import torch

        with _IMPORT_LOCK:  # transformers' lazy imports race when two models load in parallel threads
            from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        t0 = time.monotonic()
        # `revision` names a revision of the model; a separate `tokenizer` source is taken at its default
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer or self.model_source,
                                            revision=None if cfg.tokenizer else cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_source, dtype=dtype, revision=cfg.revision,
                                                     trust_remote_code=cfg.trust_remote_code)
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
        ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0) or DEFAULT_CONTEXT
        if cfg.max_model_len:
            ctx = min(ctx, cfg.max_model_len)
        self.max_context = ctx
        self.device = device
        self.dtype = str(dtype).removeprefix("torch.")
        torch.set_grad_enabled(False)
        log.info("loaded %s from %s in %.1fs", self.model_id, self.model_source, time.monotonic() - t0)

    def warmup(self) -> None:
        """One short greedy decode through the (possibly wrapped) model."""
        ids = self._tokenizer("warm-up", add_special_tokens=False)["input_ids"] or [0]
        for _ in self.decode_steps(ids, GenerationRequest(temperature=0.0, max_tokens=2), 2, threading.Event()):
            pass

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        return render_prompt(self._tokenizer, req, self.model_id, plain_chat_fallback=True)

    def max_new_tokens(self, prompt_len: int, req: GenerationRequest, default_max_tokens: int) -> int:
        return token_budget(prompt_len, req, self.max_context, default_max_tokens)

    # ------------------------------------------------------------------ decode loop
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

    def decode_steps(
        self, prompt_ids: list[int], req: GenerationRequest, max_new: int, cancel: threading.Event
    ) -> Iterator[tuple[int, FinishReason | None, TokenLogprob | None]]:
        """Yields (token_id, finish, logprob) per generated token; finish is None, 'stop' (EOS, or the request's
        grammar ended) or 'length'; logprob is the token's entry when the request asked for logprobs."""
        import torch
        from transformers import DynamicCache

        model = self._model
        device = self.device
        gen = self._generator(req)
        vocab = model.config.vocab_size
        counts = torch.zeros(vocab, device=device) if (req.presence_penalty or req.frequency_penalty) else None
        eos = torch.tensor(self._eos_ids, dtype=torch.long, device=device) if self._eos_ids else None
        constraints = SequenceConstraints.for_request(req, self._tokenizer, vocab)
        cache = DynamicCache()
        inp = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            for step in range(max_new):
                if cancel.is_set():
                    raise GenerationCancelled()
                out = model(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                logits = out.logits[0, -1, :vocab].float()
                if constraints is not None:
                    constraints.prepare(logits)
                if counts is not None:
                    logits = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0).float()
                if eos is not None and (req.ignore_eos or step < req.min_tokens):
                    banned = logits[eos].clone()
                    logits[eos] = float("-inf")
                    if not torch.isfinite(logits).any():  # the grammar allows only the end: it wins
                        logits[eos] = banned
                if req.temperature < SAMPLING_EPS:  # a tiny temperature would overflow the logits: greedy
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
                logprob, terminated = constraints.settle(token) if constraints is not None else (None, False)
                finish: FinishReason | None = None
                if terminated or (token in self._eos_ids and not req.ignore_eos):
                    finish = "stop"
                elif step + 1 >= max_new:
                    finish = "length"
                yield token, finish, logprob
                if finish:
                    return
                inp = torch.tensor([[token]], dtype=torch.long, device=device)
