"""Ragged batches on a transformers causal LM: one forward advances every running sequence by one token.

Layout (why this one): every sequence keeps its OWN `transformers.DynamicCache` (the library's cache class,
grown by `update` exactly as in a one-sequence decode); nothing is padded along the sequence axis. A decode
step is one `model(...)` call over a [rows, 1] batch of the sequences' last tokens with their own position
ids; the linear layers (projections, MLP, lm_head) run batched, and attention runs per sequence through an
attention function registered with transformers' `AttentionInterface` (`ATTENTION`): for row b it appends
that row's new key/value to sequence b's cache and calls transformers' own `sdpa_attention_forward` on
exactly that sequence's keys. (transformers' continuous-batching `sdpa_attention_forward` likewise updates a
cache handed to it through the attention kwargs; we hand the per-row caches the same way, `ROWS_KWARG`.)

Why not left padding + an attention mask: masked padding changes SDPA's results (the kernel sums over a
longer, shifted key axis: measured differences of ~5e-8 on this CPU), so a sequence's logits would depend on
the longest sequence it happens to share a batch with. Per-row attention over the sequence's own keys gives
the very same attention call whether the sequence runs alone or among 15 others.

The other half of batch invariance is the GEMM: CPU BLAS kernels compute a row differently depending on how
many rows the call has (on MKL here: M=1 takes a GEMV path and a tail of M mod 4 rows another micro-kernel),
so decode batches are padded with dummy rows to a multiple of `granule`, the smallest row count at which this
machine's GEMM is row-invariant for the model's own linear layers (`probe_row_granule`, measured at load;
1 with a warning when none is, e.g. some GPU kernels, where greedy output can then differ on near ties).
Dummy rows cost a little compute, no cache and no attention. Prefill runs per sequence (in chunks whose
boundaries depend only on the prompt), so it is identical alone or batched too. The result: a request's
logits are bitwise identical alone or in any batch (tests/unit/engines/hf/test_batching.py proves it on the tiny model).

LoRA adapters (`app.engines.hf.peft_rows`): `load_adapter`/`unload_adapter` inject PEFT LoRA layers into the model
in place, and `prefill(..., adapter=)` / `decode(..., adapters=)` name each row's adapter (None: the base model), so
one decode forward mixes rows of different adapters and rows without one. Rows without an adapter keep the
invariance above bit for bit; an adapter's low-rank product runs over that adapter's rows of the step, so a row
with an adapter matches its unbatched self to float rounding (not bit for bit).

Models whose attention does not go through `AttentionInterface` (`_supports_attention_backend` false) get a
sequential decode: one single-row forward per sequence per step (same results, no batching gain).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

ATTENTION = "llm_kit_ragged"  # the name our attention function is registered under
ROWS_KWARG = "llm_kit_rows"  # forward kwarg carrying the per-row caches down to the attention function
GRANULE_CANDIDATES = (1, 2, 4, 8, 16)
_REGISTER_LOCK = threading.Lock()
_registered = False


def _ragged_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: per-row attention over each sequence's own cache, or plain SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    caches = kwargs.pop(ROWS_KWARG, None)
    if caches is None:  # prefill (one sequence, its own cache, the causal mask transformers built): plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    layer = module.layer_idx
    outs = []
    for b, cache in enumerate(caches):
        k, v = cache.update(key[b : b + 1], value[b : b + 1], layer)
        if window:
            k, v = k[:, :, -window:], v[:, :, -window:]
        out, _ = sdpa_attention_forward(module, query[b : b + 1], k, v, None, dropout=0.0, scaling=scaling,
                                        is_causal=False)
        outs.append(out)
    dummy = query.shape[0] - len(outs)
    if dummy:  # padding rows: no cache, no attention (their output is never read)
        outs.append(query.new_zeros((dummy, query.shape[2], query.shape[1], query.shape[3])))
    return torch.cat(outs), None


def register_attention() -> None:
    """Register `ATTENTION` with transformers (attention function + SDPA's causal-mask builder), once."""
    global _registered
    with _REGISTER_LOCK:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, _ragged_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _registered = True


def install(model: Any) -> bool:
    """Switch `model` to the ragged attention. False when the model cannot (then decode runs sequentially)."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    register_attention()
    try:
        model.set_attn_implementation(ATTENTION)
    except Exception as exc:  # a model that refuses custom attention functions
        log.warning("model %s keeps its attention (%s): decode steps run sequence by sequence",
                    type(model).__name__, exc)
        return False
    return getattr(model.config, "_attn_implementation", None) == ATTENTION


def _linears(model: Any, limit: int = 8) -> list[tuple[Any, Any]]:
    """(weight, bias) of the model's distinct nn.Linear shapes (the GEMMs of a decode step)."""
    import torch

    seen: dict[tuple[int, ...], tuple[Any, Any]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and tuple(module.weight.shape) not in seen:
            seen[tuple(module.weight.shape)] = (module.weight, module.bias)
    return list(seen.values())[:limit]


def _row_invariant(weight: Any, bias: Any, granule: int, upto: int) -> bool:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cpu").manual_seed(granule)
    x = torch.randn(upto, weight.shape[1], generator=gen).to(device=weight.device, dtype=weight.dtype)
    full = F.linear(x, weight, bias)
    for m in range(granule, upto + 1, granule):
        out = F.linear(x[:m], weight, bias)
        if not torch.equal(out, full[:m]):
            return False
        if not torch.equal(F.linear(x[:m].flip(0), weight, bias), out.flip(0)):  # a row's place must not matter
            return False
    return True


def probe_row_granule(model: Any, max_rows: int) -> int:
    """Smallest row multiple at which the model's GEMMs give every row the same result whatever the batch."""
    import torch

    linears = _linears(model)
    with torch.inference_mode():
        for granule in GRANULE_CANDIDATES:
            upto = max(2 * granule, math.ceil(max_rows / granule) * granule)
            if all(_row_invariant(w, b, granule, upto) for w, b in linears):
                log.info("decode rows padded to a multiple of %d (row-invariant GEMM on this device)", granule)
                return granule
    log.warning("no row count up to %d makes this device's GEMM row-invariant: batched greedy output may differ "
                "from unbatched output on near ties", GRANULE_CANDIDATES[-1])
    return 1


class RaggedModel:
    """Forwards of a (possibly sharded) causal LM over per-sequence caches: `prefill` and `decode`.

    Logits come back as float32 rows cut to `vocab_size`. Every rank of DeepSpeed TP holds one and runs the
    same calls (rank 0 decides them, `app.deepspeed.tp` replays them).
    """

    def __init__(self, model: Any, *, vocab_size: int, device: str, granule: int = 1, batched: bool = True):
        self.model = model
        self.vocab_size = vocab_size
        self.device = device
        self.granule = max(1, granule)
        self.batched = batched
        self.lora: Any = None  # app.engines.hf.peft_rows.PeftRows, once an adapter was loaded

    def load_adapter(self, name: str, path: str) -> None:
        """Inject LoRA adapter `name` from the PEFT folder `path` (on the thread that runs the forwards)."""
        if self.lora is None:
            from app.engines.hf.peft_rows import PeftRows

            self.lora = PeftRows(self.model)
        self.lora.load(name, path)

    def unload_adapter(self, name: str) -> None:
        if self.lora is not None:
            self.lora.unload(name)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache()

    def rows_for(self, n: int) -> int:
        """Rows of the decode forward for `n` sequences (padded to the granule)."""
        return math.ceil(n / self.granule) * self.granule

    def _rows(self, names: Sequence[str | None], rows: int) -> Any:
        """Context naming each row's adapter for the next forward (nothing to name before any adapter loaded)."""
        import contextlib

        return self.lora.rows(names, rows) if self.lora is not None else contextlib.nullcontext()

    def prefill(self, cache: Any, ids: Sequence[int], start: int, *, slot: int = 0, adapter: str | None = None) -> Any:
        """Feed prompt tokens `ids` (positions start..) into `cache`; logits row after the last one."""
        import torch

        inp = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), dtype=torch.long, device=self.device).unsqueeze(0)
        with self._rows([adapter], 1):
            out = self.model(input_ids=inp, position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[0, -1, : self.vocab_size].float()

    def decode(self, caches: Sequence[Any], tokens: Sequence[int], rows: int | None = None, *,
               slots: Sequence[int] | None = None, adapters: Sequence[str | None] | None = None) -> Any:
        """One step: token `tokens[i]` appended to sequence `caches[i]` (with LoRA adapter `adapters[i]`, None:
        the base model); logits [len(caches), vocab].

        `slot`/`slots` name the sequences for subclasses that replay the calls elsewhere (DeepSpeed TP)."""
        import torch

        n = len(caches)
        names = list(adapters) if adapters is not None else [None] * n
        if not self.batched:
            return torch.stack([self._decode_one(c, t, a) for c, t, a in zip(caches, tokens, names, strict=True)])
        m = rows if rows is not None else self.rows_for(n)
        ids = torch.zeros((m, 1), dtype=torch.long)
        pos = torch.zeros((m, 1), dtype=torch.long)
        ids[:n, 0] = torch.tensor(list(tokens), dtype=torch.long)
        pos[:n, 0] = torch.tensor([c.get_seq_length() for c in caches], dtype=torch.long)
        with self._rows(names, m):
            out = self.model(input_ids=ids.to(self.device), position_ids=pos.to(self.device), use_cache=False,
                             logits_to_keep=1, **{ROWS_KWARG: list(caches)})
        return out.logits[:n, -1, : self.vocab_size].float()

    def release(self, slot: int) -> None:
        """The sequence in `slot` left the batch (its cache is dropped by its owner)."""

    def _decode_one(self, cache: Any, token: int, adapter: str | None = None) -> Any:
        return self.prefill(cache, [token], cache.get_seq_length(), adapter=adapter)
