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
on that row only (and the batched forward is row-invariant, see `app.engines.hf.ragged`).

`sample_rows(logits, samplers)` is a decode step's sampling: the rows of plain greedy sequences (temperature 0,
no hooks, no penalties: what a benchmark or a batch job sends) take one EOS ban and one argmax over all of them,
which picks for each row the very token `sample_row` would (the same values, the first maximum); every other
row goes through `sample_row`. At 8-16 rows the per-row path cost 17-22% of a decode step of the tiny model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.engines.base import FinishReason, GenerationRequest

log = logging.getLogger(__name__)

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
    if _bans_eos(seq):
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
    return _advance(seq, token, stop, extras)


def _advance(seq: Sampler, token: int, stop: bool, extras: list[Any]) -> Sample:
    """`token` is the sequence's next one: count the step and say whether (and why) the sequence ends."""
    seq.step += 1
    finish: FinishReason | None = None
    if stop or (token in seq.eos_ids and not seq.req.ignore_eos):
        finish = "stop"
    elif seq.step >= seq.max_new:
        finish = "length"
    return Sample(token, finish, extras)


def plain_greedy(seq: Sampler) -> bool:
    """A sequence whose token is the argmax of its row after the EOS ban: no hooks, no penalties, temperature 0."""
    return not seq.hooks and seq.counts is None and seq.req.temperature < SAMPLING_EPS


def _bans_eos(seq: Sampler) -> bool:
    return seq.eos is not None and (seq.req.ignore_eos or seq.step < seq.req.min_tokens)


def sample_rows(logits: Any, samplers: Sequence[Sampler]) -> list[Sample | Exception]:
    """A decode step's tokens: row i of `logits` (float32, cut to the vocabulary) for `samplers[i]`. Plain greedy
    rows are chosen together, the rest by `sample_row`; a row that fails gives its exception (that sequence
    fails, the others go on)."""
    out: list[Sample | Exception | None] = [None] * len(samplers)
    fast = [i for i, seq in enumerate(samplers) if plain_greedy(seq)]
    if len(fast) > 1:
        chosen = _greedy([samplers[i] for i in fast], logits, fast)
        for i, token in zip(fast, chosen or [], strict=False):
            out[i] = _advance(samplers[i], token, False, [])
    for i, seq in enumerate(samplers):
        if out[i] is None:
            try:
                out[i] = sample_row(logits[i], seq)
            except Exception as exc:
                out[i] = exc
    return out  # type: ignore[return-value]


def _greedy(samplers: Sequence[Sampler], logits: Any, index: list[int]) -> list[int] | None:
    """The argmax tokens of rows `index` after each sequence's EOS ban (None if that fails: row by row then)."""
    import torch

    try:
        rows = logits[index]  # a copy: the step's logits stay as the forward left them
        banned: dict[tuple[int, ...], list[int]] = {}
        for j, seq in enumerate(samplers):
            if _bans_eos(seq):
                banned.setdefault(tuple(seq.eos_ids), []).append(j)
        for eos_ids, js in banned.items():
            rows[torch.tensor(js)[:, None], torch.tensor(eos_ids)[None, :]] = float("-inf")
        best, chosen = rows.max(dim=1)  # the first maximum of each row, as argmax
        tokens = [int(t) for t in chosen.tolist()]
        for j, value in enumerate(best.tolist()):
            if value == float("-inf"):  # only the end was left (sample_row's rule): the end wins
                tokens[j] = int(torch.argmax(logits[index[j]]))
        return tokens
    except Exception:
        log.debug("batched greedy choice failed; sampling row by row", exc_info=True)
        return None
