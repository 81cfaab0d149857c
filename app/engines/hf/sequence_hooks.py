"""The grammar and logprobs hooks of one sequence in the kit's own decode loop (transformers, DeepSpeed TP).

`sequence_hooks(request, tokenizer, vocab_size)` gives the `app.engines.hf.sampling.SequenceHook`s a request needs:
none without a grammar or logprobs; otherwise, on this sequence's float32 logits row of each decode step,

- `GrammarHook.process(row)` forbids (-inf, in place) what the grammar does not allow next, and its
  `accept(token)` advances the matcher; a grammar that has ended ends the generation (finish reason "stop");
- `LogprobsHook.observe(row, token)` turns the row as the processors left it into the token's `TokenLogprob`
  (vLLM 0.32's default `raw_logprobs`: after the grammar mask, before penalties and temperature), which
  travels with the token to the request's stream (`logprob_of(sample.extras)`).

Nothing here knows the batch: the scheduler calls the hooks per row, so a request's grammar and logprobs are the
same alone or batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.engines.base import GenerationRequest, TokenLogprob
from app.engines.grammar.matcher import GrammarCompiler, SequenceMatcher
from app.engines.hf.sampling import SequenceHook
from app.engines.token_logprobs import TokenTexts, top_logprobs


class GrammarHook(SequenceHook):
    """Constrained decoding: the grammar's mask on the row, the chosen token fed to its matcher."""

    def __init__(self, matcher: SequenceMatcher):
        self.matcher = matcher

    def process(self, row: Any) -> Any:
        self.matcher.mask_logits(row)
        return row

    def accept(self, token: int) -> bool:
        self.matcher.accept(token)
        return bool(self.matcher.is_terminated())


class LogprobsHook(SequenceHook):
    """The chosen token's logprob and the top `k` candidates, from the processed row."""

    def __init__(self, k: int, texts: TokenTexts):
        self.k = k
        self.texts = texts

    def observe(self, row: Any, token: int) -> TokenLogprob:
        return self.texts.entry(*top_logprobs(row, token, self.k), self.k)


def needs_hooks(req: GenerationRequest) -> bool:
    return req.grammar is not None or req.logprobs is not None


def sequence_hooks(req: GenerationRequest, tokenizer: Any, vocab_size: int) -> list[SequenceHook]:
    """The hooks of `req` (grammar first: the logprobs see the masked row); [] when it needs none."""
    if not needs_hooks(req):
        return []
    hooks: list[SequenceHook] = []
    if req.grammar is not None:  # xgrammar: only requests with a grammar need it
        hooks.append(GrammarHook(GrammarCompiler.for_tokenizer(tokenizer, vocab_size).matcher(req.grammar)))
    if req.logprobs is not None:
        hooks.append(LogprobsHook(int(req.logprobs), TokenTexts.for_tokenizer(tokenizer, vocab_size)))
    return hooks


def logprob_of(extras: Sequence[Any]) -> TokenLogprob | None:
    """The token's logprob entry among a sample's hook extras (None when the request asked for none)."""
    return next((e for e in extras if isinstance(e, TokenLogprob)), None)
