"""Per-sequence token choice on one row of (batched) logits, and the per-sequence hook on it.

`Sampler` holds one request's sampling state (its torch.Generator, token counts for the penalties, the
step count, its hooks); `sample_row(row, sampler)` is the ONE function that turns that sequence's row of a
decode step's logits into the next token and a finish reason (`Sampler.next(row)` calls it). What it does
to the row, in order:

1. `SequenceHook.process(row)` for each hook (a logits processor with per-sequence state, e.g. a grammar
   mask: `SequenceMatcher.mask_logits(row)`), on the float32 row cut to the vocabulary;
2. presence / frequency penalties, then EOS banned while `step < min_tokens` or with `ignore_eos`;
3. greedy (temperature < SAMPLING_EPS) or temperature + top-p sampling with the request's generator;
4. `SequenceHook.observe(processed_row, token)` for each hook: the row as step 1 left it (before penalties
   and temperature, as vLLM reports raw logprobs), for a logprobs capture; what it returns travels with
   the token to the request's stream (`Sample.extras`, one entry per hook);
5. `SequenceHook.accept(token)`: True ends the sequence with "stop" (a grammar that has terminated).

A request's row gives the same token whether the step ran it alone or in a batch: every operation here is
on that row only (and the batched forward is row-invariant, see `app.engines.ragged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.engines.base import FinishReason, GenerationRequest

SAMPLING_EPS = 1e-5  # temperatures below this decode greedily (as vLLM does)


class SequenceHook:
    """Per-sequence hook on the decode step; every method may keep per-sequence state. Defaults do nothing."""

    def process(self, row: Any) -> Any:
        """Before penalties and sampling: return the row to sample from (may modify it in place)."""
        return row

    def observe(self, row: Any, token: int) -> Any:
        """After sampling: `row` as the processors left it, `token` chosen. The result rides with the token."""
        return None

    def accept(self, token: int) -> bool:
        """The token is final; True ends the sequence ("stop")."""
        return False


@dataclass
class Sample:
    token: int
    finish: FinishReason | None
    extras: list[Any] = field(default_factory=list)


class Sampler:
    """One request's sampling state (`sample_row` reads and advances it); `next(row)` per generated token."""

    def __init__(self, req: GenerationRequest, max_new: int, *, generator: Any, eos_ids: Sequence[int],
                 vocab_size: int, device: str, hooks: Sequence[SequenceHook] = ()):
        import torch

        self.req = req
        self.max_new = max_new
        self.generator = generator
        self.eos_ids = list(eos_ids)
        self.hooks = list(hooks)
        self.step = 0
        self.eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device) if self.eos_ids else None
        penalised = bool(req.presence_penalty or req.frequency_penalty)
        self.counts = torch.zeros(vocab_size, device=device) if penalised else None

    def next(self, row: Any) -> Sample:
        """The next token of this sequence from its row of the step's logits (`sample_row`)."""
        return sample_row(row, self)


def sample_row(row: Any, seq: Sampler) -> Sample:
    """THE per-row sampling step of a decode step: one sequence's float32 logits row (cut to the vocabulary)
    and its sampling state in, its next token out (steps 1-5 of the module docstring; advances `seq`)."""
    import torch

    req = seq.req
    for hook in seq.hooks:
        row = hook.process(row)
    processed = row.clone() if seq.hooks else row
    logits = row
    if seq.counts is not None:
        logits = logits - req.frequency_penalty * seq.counts - req.presence_penalty * (seq.counts > 0).float()
    if seq.eos is not None and (req.ignore_eos or seq.step < req.min_tokens):
        banned = logits[seq.eos].clone()
        logits[seq.eos] = float("-inf")
        if not torch.isfinite(logits).any():  # a grammar that allows only the end: the end wins
            logits[seq.eos] = banned
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
        token = int(torch.multinomial(probs, 1, generator=seq.generator))
    if seq.counts is not None:
        seq.counts[token] += 1
    extras = [hook.observe(processed, token) for hook in seq.hooks]
    stop = any([hook.accept(token) for hook in seq.hooks])  # every hook sees the token
    seq.step += 1
    finish: FinishReason | None = None
    if stop or (token in seq.eos_ids and not req.ignore_eos):
        finish = "stop"
    elif seq.step >= seq.max_new:
        finish = "length"
    return Sample(token, finish, extras)
