"""One sequence's constrained decoding and logprobs inside the kit's own decode loops (transformers, DeepSpeed TP).

`SequenceConstraints.for_request(request, tokenizer, vocab_size)` is None when the request asks for neither a
grammar nor logprobs; otherwise a decode step does, for this sequence's 1-D logits row:

    row = logits[i, :vocab].float()
    constraints.prepare(row)            # grammar mask in place; raw logprobs (log_softmax) of the masked row kept
    ... penalties, EOS ban, temperature, top-p, sampling on `row` ...
    entry, terminated = constraints.settle(token)   # TokenLogprob (or None), and whether the grammar ended

Logprobs are vLLM 0.32's default `raw_logprobs`: after the grammar mask, before penalties and temperature. Nothing
here knows the loop's shape, so a batched loop calls it per row as a single-sequence loop does. A grammar that has
ended (accepted the stop token) ends the generation: `terminated` -> finish reason "stop".
"""

from __future__ import annotations

from typing import Any

from app.engines.base import GenerationRequest, TokenLogprob
from app.engines.grammar_matcher import GrammarCompiler, SequenceMatcher
from app.engines.logprobs import TokenTexts, top_logprobs


class SequenceConstraints:
    """Grammar state and logprobs of one generating sequence."""

    def __init__(self, matcher: SequenceMatcher | None, logprobs_k: int | None, texts: TokenTexts):
        self.matcher = matcher
        self.logprobs_k = logprobs_k
        self.texts = texts
        self._masked: Any = None  # the current step's row as the grammar left it

    @classmethod
    def for_request(cls, req: GenerationRequest, tokenizer: Any, vocab_size: int) -> SequenceConstraints | None:
        if req.grammar is None and req.logprobs is None:
            return None
        compiler = GrammarCompiler.for_tokenizer(tokenizer, vocab_size)
        matcher = compiler.matcher(req.grammar) if req.grammar is not None else None
        return cls(matcher, req.logprobs, compiler.token_texts())

    def prepare(self, row: Any) -> None:
        """Before sampling: forbid (-inf, in place) what the grammar does not allow next; keep the masked row for
        the logprobs (a copy: the loop's later in-place edits, such as the EOS ban, do not reach it)."""
        if self.matcher is not None:
            self.matcher.mask_logits(row)
        if self.logprobs_k is not None:
            self._masked = row.detach().clone()

    def settle(self, token: int) -> tuple[TokenLogprob | None, bool]:
        """After sampling `token`: its logprob entry (None without logprobs) and whether the grammar terminated."""
        entry = None
        if self.logprobs_k is not None and self._masked is not None:
            entry = self.texts.entry(*top_logprobs(self._masked, token, self.logprobs_k), self.logprobs_k)
            self._masked = None
        terminated = False
        if self.matcher is not None:
            self.matcher.accept(token)
            terminated = self.matcher.is_terminated()
        return entry, terminated
